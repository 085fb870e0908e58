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

use std::fs;
use std::path::Path;
use std::time::SystemTime;

use anyhow::Result;
use criterion::{CRITERION_DIR, collect_candle, run_criterion};
use report::TorchReport;
use table::{format_table, merge_rows, write_summary};
use torch::{ensure_torch, run_torch_script};

mod criterion;
mod report;
mod table;
mod torch;

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
    fn cpu_times_count_idle_and_iowait_as_free() {
        let line = "cpu  100 5 50 800 20 3 2 0 0 0";
        assert_eq!(parse_cpu_times(line), Some((160, 980)));
        assert_eq!(parse_cpu_times("cpu0 1 2 3 4 5"), None);
        assert_eq!(parse_cpu_times("cpu 1 2"), None);
    }
}
