//! `cargo xtask bench`, the candle side: runs the criterion bench targets of [`BENCHES`] and
//! reads back the mean of every benchmark this run measured from `target/criterion`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};

use super::BenchArgs;

/// (package, bench target) pairs, cheapest first.
const BENCHES: &[(&str, &str)] = &[
    ("debiasdd-cmnist", "generate"),
    ("debiasdd-model", "convnet"),
    ("debiasdd-distill", "matching"),
];

/// Criterion 0.5 flags for `--quick`. `--quick` stops sampling once the estimate is stable (at
/// the latest after the measurement time); the times apply to groups that do not set their own.
const QUICK_CRITERION_ARGS: &[&str] =
    &["--quick", "--warm-up-time", "1", "--measurement-time", "3"];

pub(super) const CRITERION_DIR: &str = "target/criterion";

/// Runs every criterion bench target of [`BENCHES`].
pub(super) fn run_criterion(args: &BenchArgs, root: &Path) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for (package, bench) in BENCHES {
        println!("== {package} / {bench}");
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(root)
            .args(["bench", "-p", package, "--bench", bench, "--"]);
        if args.quick {
            cmd.args(QUICK_CRITERION_ARGS);
        }
        if let Some(filter) = &args.filter {
            cmd.arg(filter);
        }
        let status = cmd
            .status()
            .with_context(|| format!("cannot run {cargo} bench"))?;
        if !status.success() {
            bail!("{package}/{bench} failed ({status})");
        }
    }
    Ok(())
}

/// `(benchmark id, mean ms)` of every criterion benchmark whose estimates were written at or
/// after `since`, oldest first (the order they ran in).
pub(super) fn collect_candle(
    criterion_dir: &Path,
    since: SystemTime,
) -> Result<Vec<(String, f64)>> {
    let mut found = Vec::new();
    let mut files = Vec::new();
    find_estimates(criterion_dir, &mut files)?;
    for estimates in files {
        let modified = fs::metadata(&estimates)?.modified()?;
        if modified < since {
            continue;
        }
        let new_dir = estimates.parent().unwrap_or(criterion_dir);
        let id = benchmark_id(new_dir, criterion_dir);
        let text = fs::read_to_string(&estimates)
            .with_context(|| format!("cannot read {}", estimates.display()))?;
        let ms = parse_estimates_ms(&text)
            .with_context(|| format!("cannot parse {}", estimates.display()))?;
        found.push((modified, id, ms));
    }
    found.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    Ok(found.into_iter().map(|(_, id, ms)| (id, ms)).collect())
}

/// Every `new/estimates.json` below `dir` (none when `dir` does not exist).
fn find_estimates(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            find_estimates(&path, out)?;
        } else if path.file_name().is_some_and(|n| n == "estimates.json")
            && path
                .parent()
                .and_then(Path::file_name)
                .is_some_and(|n| n == "new")
        {
            out.push(path);
        }
    }
    Ok(())
}

/// The id criterion gave a benchmark: `full_id` of the `benchmark.json` beside its estimates,
/// else its folder relative to the criterion folder.
fn benchmark_id(new_dir: &Path, criterion_dir: &Path) -> String {
    let from_json = fs::read_to_string(new_dir.join("benchmark.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|json| json.get("full_id")?.as_str().map(str::to_owned));
    from_json.unwrap_or_else(|| {
        let bench_dir = new_dir.parent().unwrap_or(new_dir);
        let relative = bench_dir.strip_prefix(criterion_dir).unwrap_or(bench_dir);
        relative.to_string_lossy().replace('\\', "/")
    })
}

/// `mean.point_estimate` (ns) of a criterion `estimates.json`, in milliseconds.
fn parse_estimates_ms(text: &str) -> Result<f64> {
    let json: serde_json::Value = serde_json::from_str(text)?;
    let ns = json
        .get("mean")
        .and_then(|mean| mean.get("point_estimate"))
        .and_then(serde_json::Value::as_f64)
        .context("no mean.point_estimate")?;
    Ok(ns / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A criterion 0.5 `estimates.json`, as written for a 1.58 s benchmark.
    const ESTIMATES: &str = r#"{"mean":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1530625857.0,"upper_bound":1635866044.75},"point_estimate":1584863814.2,"standard_error":26948285.99154696},"median":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1505105256.5,"upper_bound":1674734767.5},"point_estimate":1587073444.5,"standard_error":46341183.25692984},"slope":null,"std_dev":{"confidence_interval":{"confidence_level":0.95,"lower_bound":5.3e7,"upper_bound":1.07e8},"point_estimate":89705445.57,"standard_error":13768065.69}}"#;

    #[test]
    fn estimates_give_the_mean_in_ms() {
        let ms = parse_estimates_ms(ESTIMATES).unwrap();
        assert!((ms - 1584.8638142).abs() < 1e-6, "{ms}");
        assert!(parse_estimates_ms(r#"{"median":{"point_estimate":1}}"#).is_err());
        assert!(parse_estimates_ms("{\"mean\":").is_err());
    }

    #[test]
    fn estimates_are_found_only_in_new_folders() {
        let dir = tempfile::tempdir().unwrap();
        let new_dir = dir.path().join("grp/fun/new");
        fs::create_dir_all(&new_dir).unwrap();
        fs::create_dir_all(dir.path().join("grp/fun/base")).unwrap();
        fs::write(new_dir.join("estimates.json"), ESTIMATES).unwrap();
        fs::write(dir.path().join("grp/fun/base/estimates.json"), ESTIMATES).unwrap();
        let found = collect_candle(dir.path(), SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "grp/fun");
        assert!((found[0].1 - 1584.86).abs() < 0.01);
        let later = SystemTime::now() + std::time::Duration::from_secs(3600);
        assert!(collect_candle(dir.path(), later).unwrap().is_empty());
        assert!(
            collect_candle(&dir.path().join("missing"), SystemTime::UNIX_EPOCH)
                .unwrap()
                .is_empty()
        );
    }
}
