//! `debiasdd evaluate`: trains K fresh networks on a synthetic (distilled or subset) set with the
//! DC protocol (or, with `--dsa`, the DSA/DM one) and scores them on the unbiased test split of a
//! dataset file.

use std::path::PathBuf;

use clap::Args;
use debiasdd_data::SyntheticSet;
use debiasdd_eval::evaluate::evaluate;
use debiasdd_eval::train::TrainConfig;

use crate::net_args::{NetArgs, eval_config, write_outputs};
use crate::progress::EvalBar;

#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// Dataset file from `debiasdd generate` or `debiasdd import` (its test split is scored).
    #[arg(long)]
    data: PathBuf,
    /// Synthetic-set file (from `debiasdd distill`, or a real subset).
    #[arg(long)]
    synthetic: PathBuf,
    #[command(flatten)]
    net: NetArgs,
    /// K: networks trained and scored.
    #[arg(long, default_value_t = 5)]
    models: usize,
    /// Training epochs [default: the DC protocol's 1000 with augmentation, 300 without; 1000
    /// with --dsa].
    #[arg(long)]
    epochs: Option<usize>,
    /// Train without the DC augmentation.
    #[arg(long)]
    no_augment: bool,
    /// Train with Differentiable Siamese Augmentation (the DSA/DM evaluation protocol: strategy
    /// color_crop_cutout_scale_rotate, 1000 epochs) instead of DC's augmentation.
    #[arg(long, conflicts_with = "no_augment")]
    dsa: bool,
    /// Report as JSON.
    #[arg(long)]
    json: PathBuf,
    /// Per-group test accuracy heat map (PNG).
    #[arg(long)]
    heatmap: Option<PathBuf>,
}

pub fn run(args: EvaluateArgs) -> anyhow::Result<()> {
    let device = args.net.device()?;
    let data = debiasdd_data::file::load(&args.data)?;
    let synthetic = SyntheticSet::load(&args.synthetic)?;
    let mut config = eval_config(&args.net, args.models, args.epochs, !args.no_augment)?;
    if args.dsa {
        let dsa = TrainConfig::dsa();
        config.train = TrainConfig {
            epochs: args.epochs.unwrap_or(dsa.epochs),
            ..dsa
        };
    }
    tracing::info!(augment = %config.train.augment.describe(), "evaluation training");
    let bar = EvalBar::new(config.n_models, config.train.epochs);
    let report = evaluate(
        &synthetic.set,
        &synthetic.norm,
        &data,
        &config,
        &device,
        &mut |p| bar.update(p),
    )?;
    bar.finish();
    write_outputs(
        &report,
        &args.json,
        args.heatmap.as_deref(),
        data.info.attribute_colours.as_deref(),
    )
}
