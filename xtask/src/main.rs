//! Project automation, run as `cargo xtask <task>` from the project root. Each task lives in its
//! own module; this file only parses the command line and dispatches.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod cmnist;
mod download;
mod reproduce;

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
}

/// The workspace root: the parent of this crate's manifest directory.
fn project_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_owned()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Download(args) => download::run(args, &project_root()).map(drop),
        Task::Cmnist(args) => cmnist::run(args, &project_root()),
        Task::Bench(args) => bench::run(args, &project_root()),
        Task::Reproduce(args) => reproduce::run(args, &project_root()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
