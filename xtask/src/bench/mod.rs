//! `cargo xtask bench [--no-torch] [--quick] [FILTER]`: runs the workspace's criterion
//! benchmarks in release mode, then the same work in PyTorch on the CPU, and prints one table
//! `benchmark | candle ms | PyTorch ms | candle/PyTorch` (also written, in markdown, to
//! `target/bench/summary.md`).
//!
//! - candle: the mean (`mean.point_estimate`) of every criterion benchmark that this run
//!   measured, read from `target/criterion/<group>/<function>/new/estimates.json`.
//! - PyTorch: `xtask/bench/torch_reference.py`, run in a virtual environment under
//!   `target/torch-venv` that is made, and given `torch`, on first use (see
//!   [`torch::ensure_torch`]). It prints median milliseconds per benchmark id as JSON. A PyTorch
//!   id is compared with the criterion id equal to it and with its variants (the same id plus
//!   `_explicit` or `_native`: other implementations of the same work); the others (no-grad
//!   forward) stand in rows of their own.
//!
//! When the environment cannot be made (no network, no `python3`), the comparison is skipped
//! with a note and the candle column is still printed; a failing script is an error.
//!
//! This file holds the arguments and the order of the steps; each concern has its module:
//! [`criterion`] (running the bench targets, reading their estimates), [`torch`] (the virtual
//! environment, pip, the import probe, running the script), [`report`] (the script's JSON),
//! [`table`] (joining rows, the table, the summary file) and [`machine`] (the machine and
//! thread-variable notes, the CPU-busy check, the load average).

use std::path::Path;
use std::time::SystemTime;

use anyhow::Result;
use criterion::{CRITERION_DIR, collect_candle, run_criterion};
use machine::{busy_warning, env_note, load_average, machine_note};
use report::TorchReport;
use table::{format_table, merge_rows, write_summary};
use torch::{ensure_torch, run_torch_script};

mod criterion;
mod machine;
mod report;
mod table;
mod torch;

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
