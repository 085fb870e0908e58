//! Project automation, run as `cargo xtask <task>` from the project root. Each task lives in its
//! own module; this file only parses the command line and dispatches.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod cifar;
mod cmnist;
mod download;
mod reproduce;
mod slurm;

/// The grid runs candle on many small buffers; mimalloc keeps them instead of returning them to
/// the OS after every op (see the binary's allocator note).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Project automation for debiasdd.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Fetch (or copy from a local folder) and verify the grey MNIST / Fashion-MNIST files.
    Download(download::Args),
    /// Verify MNIST, then build Colored MNIST for every protocol ratio with preview PNGs.
    Cmnist(cmnist::CmnistArgs),
    /// Run the criterion benchmarks (release mode) next to PyTorch CPU on the same network.
    Bench(bench::BenchArgs),
    /// The source paper's experiment: ratios x methods x seeds, each cell generate -> distill ->
    /// evaluate, plus floors and full-data baselines; writes results/<preset>/ (resumable).
    Reproduce(reproduce::ReproduceArgs),
    /// Check the grid's job-array path against a real Slurm on this machine (root): install
    /// slurm-wlm and munge if missing, start private daemons, run the smoke grid serially and
    /// as a job array, compare the reports, stop the daemons.
    SlurmCheck(slurm::SlurmCheckArgs),
}

/// The workspace root: the parent of this crate's manifest directory.
fn project_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_owned()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let done = ExitCode::SUCCESS;
    let result = match cli.task {
        Task::Download(args) => match args.dataset {
            download::Dataset::Cifar10 => cifar::run(args, &project_root()).map(|_| done),
            download::Dataset::Grey(_) => download::run(args, &project_root()).map(|_| done),
        },
        Task::Cmnist(args) => cmnist::run(args, &project_root()).map(|()| done),
        Task::Bench(args) => bench::run(args, &project_root()).map(|()| done),
        Task::SlurmCheck(args) => slurm::run(args, &project_root()).map(|()| done),
        Task::Reproduce(args) => {
            reproduce::run(args, &project_root()).map(|outcome| match outcome {
                debiasdd_reproduce::Outcome::Complete => done,
                // 128 + SIGINT: what shells and schedulers expect of a run stopped by Ctrl-C.
                debiasdd_reproduce::Outcome::Interrupted => ExitCode::from(130),
            })
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each once: a cause that a message already quotes (a
/// cell's error, an OS error in "cannot read F: ...") is not repeated after it.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
