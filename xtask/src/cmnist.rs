//! `cargo xtask cmnist`: the first real output on a fresh machine. Verifies (or fetches) MNIST
//! into `data/mnist/`, then builds the Colored MNIST of every protocol ratio into
//! `data/cmnist/`, each with its class x colour preview PNG.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use debiasdd_cmnist::{ColoredMnistConfig, PROTOCOL_RATIOS, Preset};

use crate::download;

#[derive(Debug, clap::Args)]
pub struct CmnistArgs {
    /// Where the grey files come from (see `cargo xtask download`).
    #[command(flatten)]
    source: download::Args,
    /// Ratios to build (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = PROTOCOL_RATIOS)]
    ratios: Vec<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "seed")]
    preset: Preset,
    /// Output folder [default: data/cmnist under the project root].
    #[arg(long, value_name = "DIR")]
    cmnist_dir: Option<PathBuf>,
}

/// The file a (preset, ratio, seed) dataset is stored under.
pub fn dataset_path(dir: &Path, preset: Preset, ratio: f64, seed: u64) -> PathBuf {
    dir.join(ColoredMnistConfig::new(preset, ratio, seed).file_name())
}

pub fn run(args: CmnistArgs, root: &Path) -> Result<()> {
    let source = download::run(args.source.clone(), root)?;
    let out_dir = args
        .cmnist_dir
        .clone()
        .unwrap_or_else(|| root.join("data/cmnist"));
    println!();
    println!(
        "{:<8} {:>7} {:>12} {:>13}  file",
        "ratio", "train", "conflicting", "empty groups"
    );
    for &ratio in &args.ratios {
        let config = ColoredMnistConfig {
            source: args.source.dataset.grey().unwrap_or_default(),
            ..ColoredMnistConfig::new(args.preset, ratio, args.seed)
        };
        let started = Instant::now();
        let data = debiasdd_cmnist::build(&source, &config)
            .with_context(|| format!("building ratio {ratio}"))?;
        let path = dataset_path(&out_dir, args.preset, ratio, args.seed);
        debiasdd_data::file::save(&data, &path)?;
        let preview = path.with_extension("png");
        debiasdd_data::preview::write_preview(&data.train, Some(&config.palette), &preview)?;
        let conflicting = (0..data.train.len())
            .filter(|&i| !debiasdd_cmnist::is_aligned(&data.train, i))
            .count();
        let empty = data.train.group_index().empty_groups().len();
        println!(
            "{ratio:<8} {:>7} {conflicting:>12} {empty:>13}  {} (+ .png, {:.1} s)",
            data.train.len(),
            path.display(),
            started.elapsed().as_secs_f64()
        );
    }
    println!();
    println!(
        "Open the .png files in {} to see the bias: rows are digits, columns colours, the bar \
         under each cell grows with log(1 + samples).",
        out_dir.display()
    );
    Ok(())
}
