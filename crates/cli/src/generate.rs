//! `debiasdd generate`: a benchmark dataset file (+ preview PNG): Colored MNIST / Fashion-MNIST
//! from a grey IDX folder, or CIFAR10-S from the CIFAR-10 binary archive.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use debiasdd_cmnist::colored::N_COLOURS;
use debiasdd_cmnist::{
    Cifar10sConfig, CifarArchive, ColoredMnistConfig, GreySource, Preset, SourceKind, Verification,
    build_cifar10s, is_aligned,
};
use debiasdd_data::Split;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Folder with the four grey IDX files (.gz or raw), e.g. as stored by `cargo xtask download`
    /// [default: data/mnist, or data/fashion-mnist for the cfmnist presets].
    #[arg(long, env = "DEBIASDD_MNIST_DIR")]
    mnist_dir: Option<PathBuf>,
    /// Grey source in that folder: mnist or fashion-mnist [default: the preset's].
    #[arg(long)]
    dataset: Option<SourceKind>,
    /// Fraction of bias-conflicting training samples per class, in [0, 1] (smaller = more biased).
    #[arg(long)]
    ratio: f64,
    /// Seed of every random choice (split, conflicting samples, colours, jitter).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// seed: the project's protocol (45k/5k/10k, LfF palette); fairdd: FairDD's C-MNIST FG (60k
    /// train, ReBias palette, binarised digits); grey: plain MNIST in 3 channels (no bias, a
    /// control); cmnist-bg: FairDD's C-MNIST BG (the colour behind a white digit); cfmnist-fg /
    /// cfmnist-bg: FairDD's Colored Fashion-MNIST, colour on / behind the item.
    /// cifar10s: CIFAR10-S (Wang et al.; FairDD's split) from --cifar.
    #[arg(long, default_value = "seed")]
    preset: Benchmark,
    /// CIFAR-10 binary archive (cifar-10-binary.tar.gz) or the folder it unpacks to, for
    /// `--preset cifar10s` [default: data/cifar10, where `cargo xtask download --dataset
    /// cifar10` puts it].
    #[arg(long, value_name = "PATH")]
    cifar: Option<PathBuf>,
    /// Output file (.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Also write the class x colour preview grid of the train split as PNG.
    #[arg(long)]
    preview: Option<PathBuf>,
    /// Override the preset's number of training images.
    #[arg(long)]
    train_size: Option<usize>,
    /// Override the preset's number of validation images.
    #[arg(long)]
    valid_size: Option<usize>,
    /// Override the colour jitter std (per channel, [0, 1] units).
    #[arg(long)]
    jitter: Option<f64>,
    /// Accept grey files whose content differs from the published dataset.
    #[arg(long)]
    skip_checksum: bool,
}

/// A `--preset`: one of the Colored (Fashion-)MNIST generator's, or CIFAR10-S.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Benchmark {
    Colored(Preset),
    Cifar10s,
}

impl std::str::FromStr for Benchmark {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cifar10s" => Ok(Self::Cifar10s),
            other => other
                .parse()
                .map(Self::Colored)
                .map_err(|e: String| format!("{e}, or cifar10s")),
        }
    }
}

impl GenerateArgs {
    fn config(&self, preset: Preset) -> ColoredMnistConfig {
        let base = ColoredMnistConfig::new(preset, self.ratio, self.seed);
        ColoredMnistConfig {
            source: self.dataset.unwrap_or(base.source),
            train_size: self.train_size.unwrap_or(base.train_size),
            valid_size: self.valid_size.unwrap_or(base.valid_size),
            jitter_std: self.jitter.unwrap_or(base.jitter_std),
            ..base
        }
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let preset = match args.preset {
        Benchmark::Colored(preset) => preset,
        Benchmark::Cifar10s => return cifar10s(&args),
    };
    let config = args.config(preset);
    // Validate the cheap things before reading 50 MB of data.
    config.check(usize::MAX)?;
    let mnist_dir = args
        .mnist_dir
        .clone()
        .unwrap_or_else(|| match config.source {
            SourceKind::Mnist => "data/mnist".into(),
            SourceKind::FashionMnist => "data/fashion-mnist".into(),
        });
    if !mnist_dir.is_dir() {
        anyhow::bail!(
            "grey data folder {} does not exist; run `cargo xtask download --dataset {} --from \
             DIR` or pass --mnist-dir DIR (or set DEBIASDD_MNIST_DIR) to a folder with the four \
             {} IDX files",
            mnist_dir.display(),
            config.source,
            config.source
        );
    }
    let verification = if args.skip_checksum {
        Verification::Skip
    } else {
        Verification::Checksums
    };
    let started = Instant::now();
    let source = GreySource::load(&mnist_dir, config.source, verification)?;
    tracing::info!(elapsed = ?started.elapsed(), "loaded grey source");
    let built = Instant::now();
    let data = debiasdd_cmnist::build(&source, &config)?;
    tracing::info!(elapsed = ?built.elapsed(), "generated the dataset");
    debiasdd_data::file::save(&data, &args.out)?;
    if let Some(preview) = &args.preview {
        debiasdd_data::preview::write_preview(&data.train, Some(&config.palette), preview)
            .context("writing the preview")?;
    }

    println!(
        "wrote {} ({} preset, {}, ratio {}, seed {}) in {:.2} s",
        args.out.display(),
        config.preset.name(),
        config.source,
        config.ratio,
        config.seed,
        started.elapsed().as_secs_f64()
    );
    if let Some(preview) = &args.preview {
        println!("preview: {}", preview.display());
    }
    println!();
    println!(
        "{:<6} {:>8} {:>8} {:>12}",
        "split", "samples", "aligned", "conflicting"
    );
    for (name, split) in [
        ("train", &data.train),
        ("valid", &data.valid),
        ("test", &data.test),
    ] {
        let aligned = (0..split.len()).filter(|&i| is_aligned(split, i)).count();
        println!(
            "{name:<6} {:>8} {aligned:>8} {:>12}",
            split.len(),
            split.len() - aligned
        );
    }
    print_train_groups(&data.train);
    Ok(())
}

fn print_train_groups(train: &Split) {
    let index = train.group_index();
    println!();
    println!("train samples per group (rows = digit, columns = colour):");
    print!("{}", index.counts());
    let empty = index.empty_groups();
    if empty.is_empty() {
        println!("every group has samples");
    } else {
        let pairs: Vec<String> = empty
            .iter()
            .map(|g| format!("({}, {})", g / N_COLOURS, g % N_COLOURS))
            .collect();
        println!(
            "{} empty groups (digit, colour): {}",
            empty.len(),
            pairs.join(" ")
        );
    }
}

/// `--preset cifar10s`: reads the CIFAR-10 archive and writes CIFAR10-S.
fn cifar10s(args: &GenerateArgs) -> anyhow::Result<()> {
    let config = Cifar10sConfig {
        ratio: args.ratio,
        seed: args.seed,
    };
    if !(0.0..=1.0).contains(&config.ratio) {
        anyhow::bail!(
            "--ratio {} is outside [0, 1]: it is the share of each class's training images in the minority attribute (0.05 in the paper)",
            config.ratio
        );
    }
    let path = args.cifar.clone().unwrap_or_else(|| "data/cifar10".into());
    if !path.exists() {
        anyhow::bail!(
            "{} does not exist; pass --cifar with the CIFAR-10 binary archive (cifar-10-binary.tar.gz) or the folder it unpacks to, or fetch it with `cargo xtask download --dataset cifar10`",
            path.display()
        );
    }
    let started = Instant::now();
    let archive = CifarArchive::load(&path)?;
    let data = build_cifar10s(&archive, &config)?;
    debiasdd_data::file::save(&data, &args.out)?;
    if let Some(preview) = &args.preview {
        debiasdd_data::preview::write_preview(
            &data.train,
            data.info.attribute_colours.as_deref(),
            preview,
        )
        .context("writing the preview")?;
    }
    println!(
        "wrote {} (CIFAR10-S, ratio {}, seed {}) in {:.2} s: {} train, {} test images of {}",
        args.out.display(),
        config.ratio,
        config.seed,
        started.elapsed().as_secs_f64(),
        data.train.len(),
        data.test.len(),
        data.shape()
    );
    println!();
    println!("train images per group (rows = class, columns = grey, colour):");
    print!("{}", data.train.group_index().counts());
    Ok(())
}
