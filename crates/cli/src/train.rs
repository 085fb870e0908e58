//! `debiasdd train`: the full-data baselines. Trains networks on the whole train split of a
//! dataset file (plain ERM, or group-balanced ERM) and scores them on its test split.

use std::path::PathBuf;

use clap::Args;
use debiasdd_data::{ImageSet, Normalization};
use debiasdd_eval::evaluate::evaluate;
use debiasdd_eval::train::Sampling;

use crate::net_args::{NetArgs, eval_config, write_outputs};
use crate::progress::EvalBar;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Dataset file from `debiasdd generate` or `debiasdd import`.
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    net: NetArgs,
    /// Passes over the train split (the run makes E + 1, as the DC protocol).
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    /// Networks to train and score.
    #[arg(long, default_value_t = 1)]
    models: usize,
    /// Group-balanced ERM: draw samples so that every (digit, colour) group weighs the same.
    #[arg(long)]
    balanced: bool,
    /// Apply the DC augmentation to training batches (off by default for full data).
    #[arg(long)]
    augment: bool,
    /// Use only the first N training images (quick checks).
    #[arg(long)]
    limit: Option<usize>,
    /// Report as JSON.
    #[arg(long)]
    json: PathBuf,
    /// Per-group test accuracy heat map (PNG).
    #[arg(long)]
    heatmap: Option<PathBuf>,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let device = args.net.device()?;
    let data = debiasdd_data::file::load(&args.data)?;
    let norm = Normalization::of_split(&data.train);
    let mut train = ImageSet::from_split(&data.train);
    if let Some(limit) = args.limit {
        let keep: Vec<usize> = (0..limit.min(train.len())).collect();
        train = train.subset(&keep);
    }
    let mut config = eval_config(&args.net, args.models, Some(args.epochs), args.augment)?;
    if args.balanced {
        config.train.sampling = Sampling::GroupBalanced;
    }
    let bar = EvalBar::new(config.n_models, config.train.epochs);
    let report = evaluate(&train, &norm, &data, &config, &device, &mut |p| {
        bar.update(p)
    })?;
    bar.finish();
    write_outputs(
        &report,
        &args.json,
        args.heatmap.as_deref(),
        data.info.attribute_colours.as_deref(),
    )
}
