//! `cargo xtask bench [--no-torch] [--quick] [FILTER]`: runs the workspace's criterion
//! benchmarks in release mode, then the same work in PyTorch on the CPU, and prints one table
//! `benchmark | candle ms | PyTorch ms | candle/PyTorch` (also written, in markdown, to
//! `target/bench/summary.md`).
//!
//! - candle: the mean (`mean.point_estimate`) of every criterion benchmark that this run
//!   measured, read from `target/criterion/<group>/<function>/new/estimates.json`.
//! - PyTorch: `xtask/bench/torch_reference.py`, run in a virtual environment under
//!   `target/torch-venv` that is made, and given `torch`, on first use (see [`ensure_torch`]).
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
use std::process::{Command, Stdio};
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use criterion::{CRITERION_DIR, collect_candle, run_criterion};
use report::{TorchReport, last_line, parse_torch_report};

mod criterion;
mod report;

/// The pinned PyTorch and the pure-Python packages it imports (its other dependencies are the
/// CUDA runtime wheels, which a CPU run may not need).
const TORCH_REQUIREMENT: &str = "torch==2.15.0";
const TORCH_PURE_DEPS: &[&str] = &[
    "filelock",
    "typing-extensions",
    "sympy",
    "networkx",
    "jinja2",
    "fsspec",
    "mpmath",
    "markupsafe",
];
/// Imports torch and multiplies on the CPU; prints the version.
const TORCH_PROBE: &str = "import warnings; warnings.filterwarnings('ignore'); import torch; \
    assert float(torch.ones(2) @ torch.ones(2)) == 2.0; print(torch.__version__)";

const TORCH_SCRIPT: &str = "xtask/bench/torch_reference.py";
const VENV_DIR: &str = "target/torch-venv";
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
// PyTorch: the virtual environment and the reference script

/// Makes `target/torch-venv` if needed and installs torch there unless it already imports.
/// Returns the environment's Python. First tries `pip install --no-deps` of torch and its
/// pure-Python dependencies (no CUDA wheels); when torch does not import that way (the Linux
/// x86-64 wheel on PyPI is a CUDA build that links the CUDA runtime), installs it normally.
fn ensure_torch(python: &str, root: &Path) -> Result<PathBuf> {
    let venv = root.join(VENV_DIR);
    let venv_python = venv.join("bin/python");
    if !venv_python.exists() {
        println!("== making {}", venv.display());
        run_quiet(Command::new(python).args(["-m", "venv"]).arg(&venv))
            .with_context(|| format!("`{python} -m venv` failed"))?;
    }
    if let Ok(version) = torch_probe(&venv_python) {
        println!("== PyTorch {version} already in {}", venv.display());
        return Ok(venv_python);
    }

    println!(
        "== installing {TORCH_REQUIREMENT} (--no-deps) into {}",
        venv.display()
    );
    pip_install(&venv_python, &["--no-deps", TORCH_REQUIREMENT])?;
    pip_install(&venv_python, TORCH_PURE_DEPS)?;
    match torch_probe(&venv_python) {
        Ok(version) => {
            println!("== PyTorch {version} imports without its CUDA dependencies");
            return Ok(venv_python);
        }
        Err(e) => println!(
            "== torch does not import without its dependencies ({}); installing them (CUDA \
             runtime wheels, several GB)",
            last_line(&format!("{e:#}"))
        ),
    }
    pip_install(&venv_python, &[TORCH_REQUIREMENT])?;
    let version = torch_probe(&venv_python).context("torch still does not import")?;
    println!("== PyTorch {version} installed");
    Ok(venv_python)
}

fn pip_install(venv_python: &Path, packages: &[&str]) -> Result<()> {
    let status = Command::new(venv_python)
        .args(["-m", "pip", "install", "--disable-pip-version-check"])
        .args(packages)
        .status()
        .context("cannot run pip")?;
    if !status.success() {
        bail!(
            "`pip install {}` failed ({status}; is PyPI reachable?)",
            packages.join(" ")
        );
    }
    Ok(())
}

/// Imports torch with `venv_python` and multiplies two vectors; returns `torch.__version__`.
fn torch_probe(venv_python: &Path) -> Result<String> {
    let output = Command::new(venv_python)
        .args(["-c", TORCH_PROBE])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", venv_python.display()))?;
    if !output.status.success() {
        bail!("{}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Runs `cmd`, hiding its output unless it fails.
fn run_quiet(cmd: &mut Command) -> Result<()> {
    let output = cmd.stdin(Stdio::null()).output()?;
    if !output.status.success() {
        bail!(
            "{} ({})",
            last_line(&String::from_utf8_lossy(&output.stderr)),
            output.status
        );
    }
    Ok(())
}

fn run_torch_script(python: &Path, args: &BenchArgs, root: &Path) -> Result<TorchReport> {
    let runs = args.torch_runs.unwrap_or(if args.quick { 3 } else { 10 });
    let warmup = if args.quick { 1 } else { 3 };
    println!("== PyTorch reference ({TORCH_SCRIPT}, median of {runs} after {warmup} warm-up)");
    let mut cmd = Command::new(python);
    cmd.current_dir(root)
        .arg(TORCH_SCRIPT)
        .args(["--runs", &runs.to_string(), "--warmup", &warmup.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(filter) = &args.filter {
        cmd.args(["--filter", filter]);
    }
    let output = cmd.output().context("cannot run the PyTorch script")?;
    if !output.status.success() {
        bail!("{TORCH_SCRIPT} exited with {}", output.status);
    }
    parse_torch_report(&String::from_utf8_lossy(&output.stdout))
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
    fn requirements_note_pins_the_same_torch() {
        let note = include_str!("../../bench/requirements.txt");
        assert!(note.lines().any(|l| l.trim() == TORCH_REQUIREMENT));
    }

    #[test]
    fn cpu_times_count_idle_and_iowait_as_free() {
        let line = "cpu  100 5 50 800 20 3 2 0 0 0";
        assert_eq!(parse_cpu_times(line), Some((160, 980)));
        assert_eq!(parse_cpu_times("cpu0 1 2 3 4 5"), None);
        assert_eq!(parse_cpu_times("cpu 1 2"), None);
    }
}
