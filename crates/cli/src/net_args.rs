//! Command-line options shared by every command that trains networks.

use std::path::Path;

use anyhow::Context;
use clap::Args;
use debiasdd_eval::augment::Augment;
use debiasdd_eval::evaluate::{EvalConfig, EvalReport};
use debiasdd_eval::train::TrainConfig;
use debiasdd_model::{ConvNetConfig, LeNetConfig, MlpConfig, ModelConfig, Norm};

/// Which network, how wide, on which device.
#[derive(Debug, Args)]
pub struct NetArgs {
    /// convnet (DC's ConvNet), mlp or lenet.
    #[arg(long, default_value = "convnet")]
    pub model: String,
    /// ConvNet width (channels per conv layer).
    #[arg(long, default_value_t = 128)]
    pub width: usize,
    /// ConvNet depth (blocks).
    #[arg(long, default_value_t = 3)]
    pub depth: usize,
    /// ConvNet normalisation: instance, batch, layer, group, none.
    #[arg(long, default_value = "instance")]
    pub norm: Norm,
    /// cpu, cuda[:N] or metal (the latter two need a build with --features cuda / metal).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Seed of every random choice (initialisation, order, augmentation).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl NetArgs {
    pub fn model_config(&self) -> anyhow::Result<ModelConfig> {
        Ok(match self.model.as_str() {
            "convnet" => ModelConfig::ConvNet(ConvNetConfig {
                width: self.width,
                depth: self.depth,
                norm: self.norm,
                ..ConvNetConfig::default()
            }),
            "mlp" => ModelConfig::Mlp(MlpConfig::default()),
            "lenet" => ModelConfig::LeNet(LeNetConfig::default()),
            other => anyhow::bail!("unknown model {other:?}: use convnet, mlp or lenet"),
        })
    }

    pub fn device(&self) -> anyhow::Result<candle_core::Device> {
        Ok(debiasdd_model::device::parse_device(&self.device)?)
    }
}

/// The evaluation config from the shared options plus the command's own.
pub fn eval_config(
    net: &NetArgs,
    n_models: usize,
    epochs: Option<usize>,
    augment: bool,
) -> anyhow::Result<EvalConfig> {
    let dc = TrainConfig::dc(augment);
    let train = TrainConfig {
        epochs: epochs.unwrap_or(dc.epochs),
        augment: if augment { dc.augment } else { Augment::None },
        ..dc
    };
    Ok(EvalConfig {
        model: net.model_config()?,
        train,
        n_models,
        seed: net.seed,
    })
}

/// What every evaluating command leaves behind: the JSON report, the optional per-group heat
/// map (with the dataset's attribute colours above its columns), and the summary on stdout.
pub fn write_outputs(
    report: &EvalReport,
    json: &Path,
    heatmap: Option<&Path>,
    colours: Option<&[[u8; 3]]>,
) -> anyhow::Result<()> {
    write_json(report, json)?;
    if let Some(path) = heatmap {
        debiasdd_eval::heatmap::write_group_heatmap(
            &report.summary.group_accuracy_mean,
            path,
            colours,
        )?;
    }
    crate::progress::print_summary(report);
    println!("report: {}", json.display());
    Ok(())
}

/// Writes the report as pretty JSON.
fn write_json(report: &EvalReport, path: &Path) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let json = serde_json::to_string_pretty(report).context("serialising the report")?;
    std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))
}
