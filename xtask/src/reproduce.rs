//! `cargo xtask reproduce`: the source paper's experiment end to end (see `debiasdd-reproduce`).
//! This module resolves the grey MNIST files (local folder or download), wires Ctrl-C and draws
//! one progress bar over the whole grid.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use debiasdd_distill::{Init, MatchMode, MethodKind};
use debiasdd_reproduce::{
    Event, Outcome, Paths, ReproduceConfig, ReproduceError, ReproducePreset, Scope,
};
use indicatif::{ProgressBar, ProgressStyle};

use crate::download;

#[derive(Debug, clap::Args)]
pub struct ReproduceArgs {
    /// demo: the story in minutes (ratio 0.01; DC and DM, class- against group-wise; floors);
    /// quick: every ratio on a 2-core CPU (DC class/group, DM over all four strata);
    /// paper: the protocol (3 seeds, DC and DM over all four strata, width 128; a GPU job);
    /// smoke: the plumbing in seconds (10 tiny cells, numbers meaningless), for checking an
    /// install or a cluster setup.
    #[arg(long, default_value = "quick")]
    preset: ReproducePreset,
    /// The benchmark the grid runs on, a `debiasdd generate` preset: seed (the project's
    /// Colored MNIST), fairdd (FairDD's C-MNIST FG), cmnist-bg, cfmnist-fg, cfmnist-bg. Results
    /// go to <OUT>/<preset> for seed, <OUT>/<preset>-<benchmark> otherwise.
    #[arg(long, default_value = "seed")]
    benchmark: debiasdd_cmnist::Preset,
    /// Run the grid on this dataset file (from `debiasdd import` or `debiasdd generate`)
    /// instead of generating Colored MNIST: one column, labelled with the file's ratio if it
    /// records one (else 0). Results go to <OUT>/<preset>-<file stem>.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["benchmark", "ratios"])]
    data: Option<PathBuf>,
    /// Folder with the four grey IDX files (`NAME.gz` or raw; Fashion-MNIST for the cfmnist
    /// benchmarks), read where they are. Without it (and, for MNIST, without
    /// $DEBIASDD_MNIST_DIR) they are downloaded into data/mnist (data/fashion-mnist).
    #[arg(long, value_name = "DIR")]
    mnist_dir: Option<PathBuf>,
    /// cpu, cuda[:N] or metal (the latter two need `--features cuda` / `metal` on xtask).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// On CUDA, let f32 matrix products and convolutions use TF32 tensor cores.
    #[arg(long)]
    tf32: bool,
    /// Results root; the grid writes into <OUT>/<preset>.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Where generated Colored MNIST files are cached [default: data/cmnist].
    #[arg(long, value_name = "DIR")]
    datasets: Option<PathBuf>,
    /// Ratios of the grid (comma-separated) [preset: 0.005,0.01,0.02,0.05,0.1].
    #[arg(long, value_delimiter = ',')]
    ratios: Option<Vec<f64>>,
    /// Keep only these methods' distillations (comma-separated: dc, dm) [preset's].
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<MethodKind>>,
    /// Keep only these strata's distillations (comma-separated: class, group, class-vs-groups,
    /// class-vs-group-mean) [preset's].
    #[arg(long, value_delimiter = ',')]
    modes: Option<Vec<MatchMode>>,
    /// Seeds (comma-separated) [preset: quick 0, paper 0,1,2].
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
    /// Distillation iterations of every method [preset: per method].
    #[arg(long)]
    iterations: Option<usize>,
    /// Synthetic initialisation: noise or real [the method's: DC noise, DM real].
    #[arg(long)]
    init: Option<Init>,
    /// Differentiable Siamese augmentation for every method [the method's: DC off, DM on].
    #[arg(long, conflicts_with = "no_dsa")]
    dsa: bool,
    /// No differentiable Siamese augmentation for any method.
    #[arg(long)]
    no_dsa: bool,
    /// Accept MNIST files whose checksum differs from the published dataset.
    #[arg(long)]
    skip_checksum: bool,
    /// List the grid's cells (index, id, done or not) and exit.
    #[arg(long, conflicts_with_all = ["cell", "report_only", "emit_sbatch"])]
    list_cells: bool,
    /// Run only cell N of the grid (see --list-cells): one task of a job array. Without N the
    /// index is read from SLURM_ARRAY_TASK_ID (Slurm) or JOB_COMPLETION_INDEX (Kubernetes
    /// indexed jobs). A done cell is skipped; the report is not written (run --report-only
    /// once every task is done).
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "env",
          conflicts_with_all = ["report_only", "emit_sbatch"])]
    cell: Option<String>,
    /// Only rewrite the report (results.md, results.json, figures) from the finished cells.
    #[arg(long, conflicts_with = "emit_sbatch")]
    report_only: bool,
    /// Write a Slurm submission script for this grid and exit: a job array with one task per
    /// cell (one GPU each) and a job, dependent on it, that writes the report. Submit with
    /// `bash FILE`.
    #[arg(long, value_name = "FILE")]
    emit_sbatch: Option<PathBuf>,
    /// With --emit-sbatch: at most this many array tasks at once (--array=0-(N-1)%K).
    #[arg(long, default_value_t = 8, requires = "emit_sbatch")]
    max_parallel: usize,
    /// With --emit-sbatch: CPU cores per task (--cpus-per-task).
    #[arg(long, default_value_t = 4, requires = "emit_sbatch")]
    cpus_per_task: usize,
    /// With --emit-sbatch: GPUs per task (--gres=gpu:N); 0 for a CPU grid (then pass
    /// --device cpu, the default).
    #[arg(long, default_value_t = 1, requires = "emit_sbatch")]
    gpus_per_task: usize,
}

/// What each task of the job array asks Slurm for.
#[derive(Debug, Clone, Copy)]
struct Resources {
    /// At most this many tasks at once.
    max_parallel: usize,
    cpus_per_task: usize,
    gpus_per_task: usize,
}

/// The cell index of `--cell [N]`: N, or the job array's index from the environment.
fn cell_index(value: &str) -> Result<usize> {
    if value != "env" {
        return value
            .parse()
            .with_context(|| format!("--cell {value}: not a cell index (0, 1, ...)"));
    }
    for var in ["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"] {
        if let Ok(v) = std::env::var(var) {
            return v
                .parse()
                .with_context(|| format!("{var}={v}: not a cell index"));
        }
    }
    anyhow::bail!(
        "--cell without N reads the index from SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX, and \
         neither is set; pass --cell N (see --list-cells)"
    )
}

/// `arg` quoted for a POSIX shell.
fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', "'\\''"))
}

/// The Slurm submission script of the grid in `out` (`cells` cells): a job array running
/// `command --cell` per task and a dependent job running `command --report-only`.
fn sbatch_script(
    root: &std::path::Path,
    out: &std::path::Path,
    command: &[String],
    cells: usize,
    resources: Resources,
) -> String {
    let Resources {
        max_parallel,
        cpus_per_task,
        gpus_per_task,
    } = resources;
    let (gres, gpus) = match gpus_per_task {
        0 => (String::new(), "no GPU".to_owned()),
        1 => (
            "#SBATCH --gres=gpu:1\n".to_owned(),
            "one GPU each".to_owned(),
        ),
        n => (
            format!("#SBATCH --gres=gpu:{n}\n"),
            format!("{n} GPUs each"),
        ),
    };
    let line = |extra: &str| {
        let mut words: Vec<String> = command.iter().map(|w| shell_quote(w)).collect();
        words.push(extra.to_owned());
        words.join(" ")
    };
    let logs = out.join("slurm").display().to_string();
    format!(
        r#"#!/bin/bash
# Submits the grid {out} to Slurm: {cells} cells as a job array (at most {max_parallel} at once,
# {gpus}, {cpus_per_task} CPU cores each), then a job that writes the report once every task has ended. Written by
# `cargo xtask reproduce ... --emit-sbatch`; edit the #SBATCH lines for your cluster
# (partition, account, time), then run: bash THIS_FILE
set -euo pipefail
cd {root}
mkdir -p {logs_q}
array=$(sbatch --parsable <<'EOF'
#!/bin/bash
#SBATCH --job-name=debiasdd-grid
#SBATCH --array=0-{last}%{max_parallel}
{gres}#SBATCH --cpus-per-task={cpus_per_task}
#SBATCH --output={logs}/cell-%a.log
cd {root}
exec {cell_line}
EOF
)
report=$(sbatch --parsable --dependency=afterany:${{array%%;*}} <<'EOF'
#!/bin/bash
#SBATCH --job-name=debiasdd-report
#SBATCH --output={logs}/report.log
cd {root}
exec {report_line}
EOF
)
echo "submitted the job array ${{array%%;*}} ({cells} cells) and the report job ${{report%%;*}}; logs in {logs}"
"#,
        out = out.display(),
        root = shell_quote(&root.display().to_string()),
        last = cells.saturating_sub(1),
        logs_q = shell_quote(&logs),
        cell_line = line("--cell"),
        report_line = line("--report-only"),
    )
}

/// The flags that shape the submission script, not the tasks' command.
const SBATCH_ONLY: [&str; 4] = [
    "--emit-sbatch",
    "--max-parallel",
    "--cpus-per-task",
    "--gpus-per-task",
];

/// This invocation's command line without `--emit-sbatch FILE` / `--max-parallel K`: what
/// every task of the job array runs (the xtask binary itself, not `cargo`).
fn task_command() -> Result<Vec<String>> {
    let exe = std::env::current_exe().context("cannot find the xtask binary's path")?;
    let mut command = vec![exe.display().to_string()];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            a if SBATCH_ONLY.contains(&a) => {
                args.next();
            }
            a if SBATCH_ONLY.iter().any(|f| a.starts_with(&format!("{f}="))) => {}
            _ => command.push(arg),
        }
    }
    Ok(command)
}

impl ReproduceArgs {
    fn config(&self) -> Result<ReproduceConfig> {
        let mut c = ReproduceConfig::preset(self.preset);
        if let Some(path) = &self.data {
            // The header only: the grid loads the images once, when it runs.
            let info = debiasdd_data::file::read_info(path)?;
            c.ratios =
                vec![debiasdd_cmnist::ColoredMnistConfig::of_info(&info).map_or(0.0, |d| d.ratio)];
            c.data = Some(debiasdd_reproduce::config::DataFile {
                path: path.clone(),
                n_attributes: info.attributes.len(),
            });
        }
        if let Some(r) = &self.ratios {
            c.ratios = r.clone();
        }
        c.retain(self.methods.as_deref(), self.modes.as_deref());
        if let Some(s) = &self.seeds {
            c.seeds = s.clone();
        }
        if let Some(i) = self.iterations {
            c.distill.iterations = Some(i);
        }
        if self.init.is_some() {
            c.distill.init = self.init;
        }
        if self.dsa || self.no_dsa {
            c.distill.dsa = Some(self.dsa);
        }
        c.set_benchmark(self.benchmark);
        Ok(c)
    }

    /// The grid's folder under the results root.
    fn out_name(&self) -> String {
        if let Some(path) = &self.data {
            let stem = path.file_stem().unwrap_or_default().to_string_lossy();
            return format!("{}-{stem}", self.preset.name());
        }
        match self.benchmark {
            debiasdd_cmnist::Preset::Seed => self.preset.name().to_owned(),
            other => format!("{}-{}", self.preset.name(), other.name()),
        }
    }
}

/// Runs the grid; `Interrupted` when Ctrl-C stopped it (checkpoints and finished cells kept).
pub fn run(args: ReproduceArgs, root: &std::path::Path) -> Result<Outcome> {
    let config = args.config()?;
    config.validate()?;
    let device = debiasdd_model::device::parse_device(&args.device)?;
    debiasdd_model::device::set_tf32(args.tf32);
    let out = root.join(&args.out).join(args.out_name());
    let paths = Paths {
        out: out.clone(),
        datasets: args
            .datasets
            .clone()
            .unwrap_or_else(|| root.join("data/cmnist")),
    };
    let cells = debiasdd_reproduce::plan(&config);
    if args.list_cells {
        println!("{} cells of {}:", cells.len(), out.display());
        for (index, cell) in cells.iter().enumerate() {
            let done = debiasdd_reproduce::store::finished(&config, cell, &paths)?.is_some();
            println!(
                "{index:>4}  {:<40} {}",
                cell.id(),
                if done { "done" } else { "to do" }
            );
        }
        return Ok(Outcome::Complete);
    }
    if let Some(file) = &args.emit_sbatch {
        if args.max_parallel == 0 {
            anyhow::bail!("--max-parallel 0: let at least 1 task run at once");
        }
        if args.cpus_per_task == 0 {
            anyhow::bail!("--cpus-per-task 0: a task needs at least 1 CPU core");
        }
        let resources = Resources {
            max_parallel: args.max_parallel,
            cpus_per_task: args.cpus_per_task,
            gpus_per_task: args.gpus_per_task,
        };
        let script = sbatch_script(root, &out, &task_command()?, cells.len(), resources);
        std::fs::write(file, script).with_context(|| format!("cannot write {}", file.display()))?;
        println!(
            "wrote {}: {} cells as a Slurm job array (at most {} at once) and a report job; submit with `bash {}`",
            file.display(),
            cells.len(),
            args.max_parallel,
            file.display()
        );
        return Ok(Outcome::Complete);
    }
    let scope = match (&args.cell, args.report_only) {
        (Some(value), _) => Scope::Cell(cell_index(value)?),
        (None, true) => Scope::ReportOnly,
        (None, false) => Scope::All,
    };
    // A given folder is read where it is (its files as they are, with --skip-checksum); only
    // without one are the files fetched into data/<dataset>.
    let kind = config.cmnist.source;
    let local = args.mnist_dir.clone().or_else(|| match kind {
        debiasdd_cmnist::SourceKind::Mnist => std::env::var_os(download::MNIST_DIR_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from),
        debiasdd_cmnist::SourceKind::FashionMnist => None,
    });
    let source_args = download::Args {
        dataset: kind.into(),
        skip_checksum: args.skip_checksum,
        ..download::Args::default()
    };
    let source = move || -> Result<debiasdd_cmnist::GreySource, ReproduceError> {
        match &local {
            Some(dir) => {
                let verification = if source_args.skip_checksum {
                    debiasdd_cmnist::Verification::Skip
                } else {
                    debiasdd_cmnist::Verification::Checksums
                };
                let source = debiasdd_cmnist::GreySource::load(dir, kind, verification)?;
                println!(
                    "{kind}: {} train and {} test images read from {}",
                    source.train_images.count,
                    source.test_images.count,
                    dir.display()
                );
                Ok(source)
            }
            None => download::run(source_args.clone(), root)
                .map_err(|e| ReproduceError::SourceUnavailable(format!("{e:#}"))),
        }
    };

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting now (an unfinished evaluation is redone next time)");
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupt: stopping after this distillation iteration (with a checkpoint) or this evaluation; Ctrl-C again to quit now"
            );
        })
        .context("cannot install the Ctrl-C handler")?;
    }

    println!(
        "reproduce: preset {}, ratios {:?}, distillations {}, seeds {:?}, device {} -> {}",
        config.preset,
        config.ratios,
        config
            .distillations
            .iter()
            .map(|d| format!("{}-{}{}", d.method, d.mode, d.groups.suffix("-inferred")))
            .collect::<Vec<_>>()
            .join(", "),
        config.seeds,
        args.device,
        out.display()
    );
    let started = Instant::now();
    let bar = ProgressBar::new(1000);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {prefix}  {msg}  (ETA {eta})",
        )
        .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    // Progress is measured in the cells' relative costs, scaled to 1000 steps.
    let mut state = BarState::default();
    let outcome = debiasdd_reproduce::run_scope(
        &config,
        scope,
        &source,
        &paths,
        &device,
        &stop,
        &mut |event| state.update(&bar, &config, event),
    );
    bar.finish_and_clear();
    let outcome = outcome?;
    let elapsed = started.elapsed().as_secs_f64() / 60.0;
    match scope {
        Scope::ReportOnly => {
            println!(
                "reproduce: report rewritten: {}",
                out.join("results.md").display()
            );
            return Ok(outcome);
        }
        Scope::Cell(index) => {
            let id = cells[index].id();
            match outcome {
                Outcome::Complete if state.started == 0 => {
                    println!("reproduce: cell {index} ({id}) was already done; skipped")
                }
                Outcome::Complete => println!(
                    "reproduce: cell {index} ({id}) done ({elapsed:.1} min); write the report with --report-only once every cell is done"
                ),
                Outcome::Interrupted => println!(
                    "reproduce: cell {index} ({id}) interrupted after {elapsed:.1} min; run the same command again to continue"
                ),
            }
            return Ok(outcome);
        }
        Scope::All => {}
    }
    match outcome {
        Outcome::Complete => println!(
            "reproduce: all cells done ({elapsed:.1} min this session). Report: {}",
            out.join("results.md").display()
        ),
        Outcome::Interrupted => println!(
            "reproduce: interrupted after {elapsed:.1} min; finished cells are kept. Run the same \
             command again to continue. Partial report: {}",
            out.join("results.md").display()
        ),
    }
    Ok(outcome)
}

/// A log line above the bar, or on stdout when the bar is hidden (output is not a terminal).
fn say(bar: &ProgressBar, line: impl AsRef<str>) {
    if bar.is_hidden() {
        println!("{}", line.as_ref());
    } else {
        bar.println(line);
    }
}

/// Turns runner events into bar positions (in cost units) and log lines.
#[derive(Debug, Default)]
struct BarState {
    /// Cells started in this run.
    started: usize,
    total: usize,
    done: usize,
    total_cost: f64,
    done_cost: f64,
    current_cost: f64,
}

impl BarState {
    fn position(&self, fraction: f64) -> u64 {
        let cost = self.done_cost + fraction * self.current_cost;
        (1000.0 * cost / self.total_cost.max(1e-9)).round() as u64
    }

    fn update(&mut self, bar: &ProgressBar, config: &ReproduceConfig, event: Event<'_>) {
        match event {
            Event::Planned {
                total,
                done,
                total_cost,
                done_cost,
            } => {
                (self.total, self.done) = (total, done);
                (self.total_cost, self.done_cost) = (total_cost, done_cost);
                bar.set_position(self.position(0.0));
                bar.reset_eta();
                if done > 0 {
                    say(
                        bar,
                        format!("{done} of {total} cells already done; continuing"),
                    );
                }
            }
            Event::Dataset {
                path,
                generated,
                empty_groups,
            } => say(
                bar,
                format!(
                    "data: {} {}{}",
                    if generated { "generated" } else { "cached" },
                    path.display(),
                    if empty_groups > 0 {
                        format!(" ({empty_groups} empty groups, skipped by group-wise matching)")
                    } else {
                        String::new()
                    }
                ),
            ),
            Event::Inferred {
                path,
                computed,
                report,
            } => say(
                bar,
                format!(
                    "inferred groups: {} {} ({}; held-out accuracy {:.1} %, {} flagged conflicting{})",
                    if computed { "wrote" } else { "cached" },
                    path.display(),
                    report.method.name(),
                    report.held_out_accuracy,
                    report.flagged_conflicting,
                    report.agreement.as_ref().map_or(String::new(), |a| format!(
                        "; bias label {:.1} % right, {} on conflicting, ARI {:.3}",
                        a.bias_label_accuracy,
                        a.bias_label_accuracy_conflicting
                            .map_or("n/a".into(), |v| format!("{v:.1} %")),
                        a.adjusted_rand_index
                    ))
                ),
            ),
            Event::CellStarted { cell, .. } => {
                self.started += 1;
                self.current_cost = cell.cost(config);
                bar.set_prefix(format!("cells {}/{}  {}", self.done, self.total, cell.id()));
                if bar.is_hidden() {
                    println!("[{}/{}] {} ...", self.done + 1, self.total, cell.id());
                }
            }
            Event::Progress {
                fraction, message, ..
            } => {
                bar.set_position(self.position(fraction));
                bar.set_message(message);
            }
            Event::CellFinished { cell, result } => {
                self.done += 1;
                self.done_cost += self.current_cost;
                bar.set_position(self.position(0.0));
                let s = &result.report.summary;
                say(
                    bar,
                    format!(
                        "{:<28} unbiased {:5.1}%  worst group {:5.1}%  ({:.0} s + {:.0} s)",
                        cell.id(),
                        s.accuracy.mean,
                        s.worst_group_accuracy.mean,
                        result.produce_seconds,
                        result.eval_seconds
                    ),
                );
            }
            Event::Interrupted { cell, checkpoint } => say(
                bar,
                match checkpoint {
                    Some(path) => format!("{}: checkpoint {}", cell.id(), path.display()),
                    None => format!("stopped before {}", cell.id()),
                },
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sbatch_script_runs_one_cell_per_task_and_then_the_report() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        let command = [
            "/x/xtask",
            "reproduce",
            "--preset",
            "paper",
            "--out",
            "my results",
        ]
        .map(String::from);
        let script = sbatch_script(
            std::path::Path::new("/repo"),
            std::path::Path::new("/repo/results/paper"),
            &command,
            210,
            Resources {
                max_parallel: 8,
                cpus_per_task: 4,
                gpus_per_task: 1,
            },
        );
        assert!(script.contains("#SBATCH --array=0-209%8"), "{script}");
        assert!(script.contains("#SBATCH --gres=gpu:1\n#SBATCH --cpus-per-task=4\n"));
        let cpu_only = sbatch_script(
            std::path::Path::new("/repo"),
            std::path::Path::new("/repo/results/paper"),
            &command,
            3,
            Resources {
                max_parallel: 2,
                cpus_per_task: 1,
                gpus_per_task: 0,
            },
        );
        assert!(!cpu_only.contains("--gres"), "{cpu_only}");
        assert!(cpu_only.contains("#SBATCH --array=0-2%2\n#SBATCH --cpus-per-task=1\n"));
        assert!(script.contains(
            "exec '/x/xtask' 'reproduce' '--preset' 'paper' '--out' 'my results' --cell\n"
        ));
        assert!(script.contains("--dependency=afterany:${array%%;*}"));
        assert!(script.contains("' --report-only\n"));
        // The shell accepts it.
        let path = std::env::temp_dir().join(format!("sbatch-{}.sh", std::process::id()));
        std::fs::write(&path, &script).unwrap();
        let status = std::process::Command::new("bash")
            .arg("-n")
            .arg(&path)
            .status()
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(status.success());
    }

    #[test]
    fn the_cell_index_comes_from_the_flag_or_the_job_array() {
        assert_eq!(cell_index("7").unwrap(), 7);
        assert!(
            cell_index("seven")
                .unwrap_err()
                .to_string()
                .contains("not a cell index")
        );
    }
}
