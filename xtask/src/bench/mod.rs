//! `cargo xtask bench [--no-torch] [--quick] [FILTER]`: runs the workspace's criterion
//! benchmarks in release mode, then the same work in PyTorch on the CPU, and prints one table
//! `benchmark | candle ms | PyTorch ms | candle/PyTorch` (also written, in markdown, to
//! `target/bench/summary.md`).
//!
//! - candle: the mean (`mean.point_estimate`) of every criterion benchmark that this run
//!   measured, read from `target/criterion/<group>/<function>/new/estimates.json`.
//! - PyTorch: `xtask/bench/torch_reference.py`, run in a virtual environment under
//!   `target/torch-venv` that is made, and given `torch`, on first use (see [`torch::ensure_torch`]).
//!   It prints median milliseconds per benchmark id as JSON. A PyTorch id is compared with the
//!   criterion id equal to it and with its variants (the same id plus `_explicit` or `_native`:
//!   other implementations of the same work); the others (no-grad forward) stand in rows of
//!   their own.
//!
//! When the environment cannot be made (no network, no `python3`), the comparison is skipped
//! with a note and the candle column is still printed; a failing script is an error.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use criterion::{CRITERION_DIR, collect_candle, run_criterion};
use report::TorchReport;
use torch::{ensure_torch, run_torch_script};

mod criterion;
mod report;
mod torch;

const SUMMARY_FILE: &str = "target/bench/summary.md";

/// Environment variables that change how either side's CPU kernels run.
const THREAD_ENV_VARS: &[&str] = &[
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "RAYON_NUM_THREADS",
];

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Only run benchmarks whose id matches this regex (criterion's filter; the PyTorch script
    /// applies it with Python's `re.search`).
    filter: Option<String>,
    /// Skip the PyTorch comparison.
    #[arg(long)]
    no_torch: bool,
    /// Short runs: criterion's quick mode, and fewer PyTorch repetitions.
    #[arg(long)]
    quick: bool,
    /// PyTorch timed repetitions per benchmark (median) [default: 10, 3 with --quick].
    #[arg(long, value_name = "N")]
    torch_runs: Option<u32>,
    /// The Python that makes the virtual environment.
    #[arg(long, env = "DEBIASDD_BENCH_PYTHON", default_value = "python3")]
    python: String,
}

pub fn run(args: BenchArgs, root: &Path) -> Result<()> {
    let started = SystemTime::now();
    let load_before = load_average();
    let mut notes = vec![machine_note(), env_note()];
    notes.extend(busy_warning("the candle benchmarks"));
    run_criterion(&args, root)?;
    let candle = collect_candle(&root.join(CRITERION_DIR), started)?;
    notes.push(format!(
        "candle: criterion mean{}",
        if args.quick { " (--quick)" } else { "" }
    ));

    let (torch, script_error) = if args.no_torch {
        notes.push("PyTorch: skipped (--no-torch)".into());
        (None, None)
    } else {
        torch_side(&args, root, &mut notes)
    };
    notes.push(format!(
        "load average (1/5/15 min) before: {load_before}, after: {}",
        load_average()
    ));

    let torch_results = torch.as_ref().map_or(&[][..], |t| &t.results[..]);
    let table = format_table(&merge_rows(&candle, torch_results));
    println!();
    for note in &notes {
        println!("{note}");
    }
    println!();
    print!("{table}");
    let summary = write_summary(root, &notes, &table)?;
    println!("\nsummary: {}", summary.display());
    println!("criterion data: {}", root.join(CRITERION_DIR).display());

    match script_error {
        Some(e) => Err(e.context("the PyTorch reference script failed")),
        None => Ok(()),
    }
}

/// Makes the environment and runs the reference script, adding what happened to `notes`.
/// Returns the report, or the script's error (after which the table is still printed). An
/// environment that cannot be made only skips the comparison.
fn torch_side(
    args: &BenchArgs,
    root: &Path,
    notes: &mut Vec<String>,
) -> (Option<TorchReport>, Option<anyhow::Error>) {
    let python = match ensure_torch(&args.python, root) {
        Ok(python) => python,
        Err(reason) => {
            let note = format!("skipping the PyTorch comparison: {reason:#}");
            println!("{note}");
            notes.push(note);
            return (None, None);
        }
    };
    notes.extend(busy_warning("the PyTorch reference"));
    match run_torch_script(&python, args, root) {
        Ok(report) => {
            notes.push(report.note.clone());
            (Some(report), None)
        }
        Err(e) => {
            notes.push(format!("PyTorch: the reference script failed: {e:#}"));
            (None, Some(e))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The table

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    id: String,
    candle_ms: Option<f64>,
    torch_ms: Option<f64>,
}

/// candle's rows in their order, PyTorch's numbers joined by id; a PyTorch-only id goes after
/// the last row of its group (the part before `/`), or at the end.
/// Suffixes of candle benchmark ids that time another implementation of the same work as the
/// id without them (`convnet_.../forward_backward_native` is `forward_backward`).
const VARIANT_SUFFIXES: &[&str] = &["_explicit", "_native"];

fn merge_rows(candle: &[(String, f64)], torch: &[(String, f64)]) -> Vec<Row> {
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
fn format_table(rows: &[Row]) -> String {
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
fn write_summary(root: &Path, notes: &[String], table: &str) -> Result<PathBuf> {
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

fn machine_note() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    format!(
        "machine: {cpu}, {cpus} logical CPUs (candle's CPU backend uses all unless RAYON_NUM_THREADS says otherwise)"
    )
}

fn env_note() -> String {
    let set: Vec<String> = THREAD_ENV_VARS
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
        .collect();
    if set.is_empty() {
        format!(
            "thread/BLAS variables: none set ({})",
            THREAD_ENV_VARS.join(", ")
        )
    } else {
        format!("thread/BLAS variables: {}", set.join(" "))
    }
}

/// A warning when other processes kept the CPUs more than a quarter busy during the second
/// before `what` starts: both sides use every core, so timings taken beside a build are not
/// comparable (PyTorch's OpenMP threads in particular slow down several-fold when a core is
/// taken).
fn busy_warning(what: &str) -> Option<String> {
    let busy = cpu_busy_fraction(std::time::Duration::from_secs(1))?;
    let note = format!(
        "warning: the CPUs were {:.0}% busy just before {what}: its timings are not reliable",
        busy * 100.0
    );
    (busy > 0.25).then(|| {
        println!("{note}");
        note
    })
}

/// The fraction of CPU time, over all CPUs, spent other than idle or waiting for I/O during
/// `window` (Linux only).
fn cpu_busy_fraction(window: std::time::Duration) -> Option<f64> {
    let read = || -> Option<(u64, u64)> {
        let stat = fs::read_to_string("/proc/stat").ok()?;
        parse_cpu_times(stat.lines().next()?)
    };
    let (busy0, total0) = read()?;
    std::thread::sleep(window);
    let (busy1, total1) = read()?;
    let total = total1.checked_sub(total0).filter(|&t| t > 0)?;
    Some(busy1.saturating_sub(busy0) as f64 / total as f64)
}

/// (busy, total) jiffies of the aggregate `cpu` line of `/proc/stat`; idle and iowait are the
/// fourth and fifth numbers.
fn parse_cpu_times(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let times: Vec<u64> = fields.map(str::parse).collect::<Result<_, _>>().ok()?;
    if times.len() < 5 {
        return None;
    }
    let total: u64 = times.iter().take(8).sum();
    Some((total - times[3] - times[4], total))
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
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

    #[test]
    fn cpu_times_count_idle_and_iowait_as_free() {
        let line = "cpu  100 5 50 800 20 3 2 0 0 0";
        assert_eq!(parse_cpu_times(line), Some((160, 980)));
        assert_eq!(parse_cpu_times("cpu0 1 2 3 4 5"), None);
        assert_eq!(parse_cpu_times("cpu 1 2"), None);
    }
}
