//! `cargo xtask bench`: runs the workspace's criterion benchmarks in release mode and prints
//! where their reports are.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// (package, bench target) pairs, cheapest first.
const BENCHES: &[(&str, &str)] = &[("debiasdd-cmnist", "generate")];

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Only run benchmarks whose name contains this filter (passed to criterion).
    filter: Option<String>,
}

pub fn run(args: BenchArgs, root: &Path) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for (package, bench) in BENCHES {
        println!("== {package} / {bench}");
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(root)
            .args(["bench", "-p", package, "--bench", bench, "--"]);
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
    println!(
        "criterion reports: {}",
        root.join("target/criterion/report/index.html").display()
    );
    Ok(())
}
