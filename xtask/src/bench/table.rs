//! `cargo xtask bench`, the output: joins the candle and PyTorch numbers into rows, lays them
//! out as a markdown table and writes it, with the notes, to `target/bench/summary.md`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

const SUMMARY_FILE: &str = "target/bench/summary.md";

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Row {
    id: String,
    candle_ms: Option<f64>,
    torch_ms: Option<f64>,
}

/// Suffixes of candle benchmark ids that time another implementation of the same work as the
/// id without them (`convnet_.../forward_backward_native` is `forward_backward`).
const VARIANT_SUFFIXES: &[&str] = &["_explicit", "_native"];

/// candle's rows in their order, PyTorch's numbers joined by id; a PyTorch-only id goes after
/// the last row of its group (the part before `/`), or at the end.
pub(super) fn merge_rows(candle: &[(String, f64)], torch: &[(String, f64)]) -> Vec<Row> {
    let mut rows: Vec<Row> = candle
        .iter()
        .map(|(id, ms)| Row {
            id: id.clone(),
            candle_ms: Some(*ms),
            torch_ms: None,
        })
        .collect();
    for (id, ms) in torch {
        let mut matched = false;
        for row in rows.iter_mut().filter(|r| {
            r.id.strip_prefix(id.as_str())
                .is_some_and(|rest| rest.is_empty() || VARIANT_SUFFIXES.contains(&rest))
        }) {
            row.torch_ms = Some(*ms);
            matched = true;
        }
        if matched {
            continue;
        }
        let row = Row {
            id: id.clone(),
            candle_ms: None,
            torch_ms: Some(*ms),
        };
        match rows.iter().rposition(|r| group_of(&r.id) == group_of(id)) {
            Some(last) => rows.insert(last + 1, row),
            None => rows.push(row),
        }
    }
    rows
}

fn group_of(id: &str) -> &str {
    id.split_once('/').map_or(id, |(group, _)| group)
}

/// Milliseconds with about four significant digits.
fn format_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{ms:.0}")
    } else if ms >= 100.0 {
        format!("{ms:.1}")
    } else if ms >= 10.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.3}")
    }
}

/// A markdown table with padded columns (readable in a terminal too), numbers right-aligned.
pub(super) fn format_table(rows: &[Row]) -> String {
    let header = ["benchmark", "candle ms", "PyTorch ms", "candle/PyTorch"];
    let cells: Vec<[String; 4]> = rows
        .iter()
        .map(|row| {
            let ratio = match (row.candle_ms, row.torch_ms) {
                (Some(c), Some(t)) if t > 0.0 => format!("{:.2}", c / t),
                _ => "-".into(),
            };
            [
                row.id.clone(),
                row.candle_ms.map_or_else(|| "-".into(), format_ms),
                row.torch_ms.map_or_else(|| "-".into(), format_ms),
                ratio,
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for line in &cells {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| {:<w0$} | {:>w1$} | {:>w2$} | {:>w3$} |",
        header[0],
        header[1],
        header[2],
        header[3],
        w0 = widths[0],
        w1 = widths[1],
        w2 = widths[2],
        w3 = widths[3]
    );
    let _ = writeln!(
        out,
        "| {} | {}: | {}: | {}: |",
        "-".repeat(widths[0]),
        "-".repeat(widths[1] - 1),
        "-".repeat(widths[2] - 1),
        "-".repeat(widths[3] - 1)
    );
    for [id, candle, torch, ratio] in &cells {
        let _ = writeln!(
            out,
            "| {id:<w0$} | {candle:>w1$} | {torch:>w2$} | {ratio:>w3$} |",
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
    }
    out
}

/// Writes the notes and the table to [`SUMMARY_FILE`]; returns its path.
pub(super) fn write_summary(root: &Path, notes: &[String], table: &str) -> Result<PathBuf> {
    let path = root.join(SUMMARY_FILE);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut text = String::from("# cargo xtask bench\n\n");
    for note in notes {
        let _ = writeln!(text, "- {note}");
    }
    text.push('\n');
    text.push_str(table);
    fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_join_by_id_and_torch_only_ids_follow_their_group() {
        let candle = [
            ("cmnist/load".to_owned(), 3.0),
            ("net_w8/forward".to_owned(), 10.0),
            ("net_w8/forward_backward".to_owned(), 30.0),
            ("net_w8/forward_backward_native".to_owned(), 15.0),
        ];
        let torch = [
            ("net_w8/forward".to_owned(), 5.0),
            ("net_w8/forward_nograd".to_owned(), 4.0),
            ("net_w8/forward_backward".to_owned(), 20.0),
            ("dc_w8/one_class".to_owned(), 50.0),
        ];
        let rows = merge_rows(&candle, &torch);
        let summary: Vec<(&str, Option<f64>, Option<f64>)> = rows
            .iter()
            .map(|r| (r.id.as_str(), r.candle_ms, r.torch_ms))
            .collect();
        assert_eq!(
            summary,
            [
                ("cmnist/load", Some(3.0), None),
                ("net_w8/forward", Some(10.0), Some(5.0)),
                ("net_w8/forward_backward", Some(30.0), Some(20.0)),
                ("net_w8/forward_backward_native", Some(15.0), Some(20.0)),
                ("net_w8/forward_nograd", None, Some(4.0)),
                ("dc_w8/one_class", None, Some(50.0)),
            ]
        );
    }

    #[test]
    fn table_is_aligned_markdown_with_ratios() {
        let rows = [
            Row {
                id: "net/forward".into(),
                candle_ms: Some(1584.86),
                torch_ms: Some(792.43),
            },
            Row {
                id: "net/forward_nograd".into(),
                candle_ms: None,
                torch_ms: Some(0.5),
            },
        ];
        let expected = "\
| benchmark          | candle ms | PyTorch ms | candle/PyTorch |
| ------------------ | --------: | ---------: | -------------: |
| net/forward        |      1585 |      792.4 |           2.00 |
| net/forward_nograd |         - |      0.500 |              - |
";
        assert_eq!(format_table(&rows), expected);
        assert_eq!(format_ms(12.345), "12.35");
        assert_eq!(format_ms(1.5), "1.500");
    }
}
