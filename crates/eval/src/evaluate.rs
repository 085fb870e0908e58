//! Evaluation of a training set: train K independently initialised networks on it with the DC
//! protocol, score each on the (unbiased) test split, summarise as mean and std.
//!
//! Seeds: network `k` is initialised from `ChaCha8(seed)` on stream `2k` and trained (order,
//! augmentation, balanced draws) from a seed drawn on stream `2k + 1`, so models are independent
//! of each other and of how many are evaluated.

use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::{DType, Device};
use debiasdd_data::{Dataset, ImageSet, Normalization};
use debiasdd_model::{ModelConfig, Network};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::EvalError;
use crate::metrics::{GroupMetrics, MetricSummary};
use crate::train::{EpochReport, TrainConfig, predict, train_network};

/// Everything an evaluation depends on besides the data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    pub model: ModelConfig,
    pub train: TrainConfig,
    /// K: networks trained and scored.
    pub n_models: usize,
    pub seed: u64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            model: ModelConfig::default(),
            train: TrainConfig::default(),
            n_models: 5,
            seed: 0,
        }
    }
}

/// One trained and scored network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRun {
    pub index: usize,
    pub train_seconds: f64,
    pub final_train_loss: f64,
    pub final_train_accuracy: f64,
    pub metrics: GroupMetrics,
}

/// The result of [`evaluate`]: per model and summarised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub config: EvalConfig,
    pub n_train: usize,
    pub n_test: usize,
    pub runs: Vec<ModelRun>,
    pub summary: MetricSummary,
}

/// Progress of an evaluation, for bars and logs.
#[derive(Debug, Clone, Copy)]
pub enum EvalProgress<'a> {
    /// Network `model` of `n_models` finished an epoch.
    Epoch {
        model: usize,
        n_models: usize,
        report: &'a EpochReport,
    },
    /// Network `run.index` was scored.
    Scored { run: &'a ModelRun, n_models: usize },
}

/// Trains `config.n_models` networks on `train` and scores them on the test split of `data`
/// (the network's input and output sizes come from the data: `config.model`'s are replaced).
/// Every test image needs a known attribute, since the metrics are per group.
pub fn evaluate(
    train: &ImageSet,
    norm: &Normalization,
    data: &Dataset,
    config: &EvalConfig,
    device: &Device,
    progress: &mut dyn FnMut(EvalProgress<'_>),
) -> Result<EvalReport, EvalError> {
    evaluate_until(train, norm, data, config, device, &mut |p| {
        progress(p);
        ControlFlow::Continue(())
    })
}

/// [`evaluate`] whose `progress` may stop it after any epoch or model with `ControlFlow::Break`
/// (an interrupt): the evaluation then ends with [`EvalError::Stopped`].
pub fn evaluate_until(
    train: &ImageSet,
    norm: &Normalization,
    data: &Dataset,
    config: &EvalConfig,
    device: &Device,
    progress: &mut dyn FnMut(EvalProgress<'_>) -> ControlFlow<()>,
) -> Result<EvalReport, EvalError> {
    if config.n_models == 0 {
        return Err(EvalError::InvalidConfig(
            "0 models: evaluate at least 1 (--models K)".into(),
        ));
    }
    let test = &data.test;
    // Classes must agree; attributes may not (a set distilled over inferred groups has the
    // inferred attributes, the test split the annotated ones).
    if train.shape != test.shape || train.spec.n_classes() != test.spec.n_classes() {
        return Err(EvalError::InvalidConfig(format!(
            "the training set is {} images of {} classes, the test split {} of {}: score a set \
             on the dataset it was made from",
            train.shape,
            train.spec.n_classes(),
            test.shape,
            test.spec.n_classes(),
        )));
    }
    let unknown = test.attributes.iter().filter(|a| a.is_none()).count();
    if unknown > 0 {
        return Err(EvalError::InvalidConfig(format!(
            "{unknown} test images have no attribute; per-group metrics need every test image's \
             group (give the test split an attribute column)"
        )));
    }
    let side = train.shape.square_side()?;
    let config = &EvalConfig {
        model: config
            .model
            .for_input(train.shape.channels, side, train.spec.n_classes()),
        ..config.clone()
    };
    config.model.validate()?;
    config.train.validate()?;
    let attributes: Vec<u8> = test.attributes.iter().flatten().copied().collect();
    let aligned = data.aligned_attributes();
    let test_set = ImageSet::from_split(test);
    let mut runs = Vec::with_capacity(config.n_models);
    for k in 0..config.n_models {
        let mut init_rng = stream(config.seed, 2 * k as u64);
        let train_seed: u64 = stream(config.seed, 2 * k as u64 + 1).random();
        let net = Network::new(&config.model, &mut init_rng, device, DType::F32)?;
        let started = Instant::now();
        let last = train_network(
            &net,
            train,
            norm,
            &config.train,
            train_seed,
            &mut |report| {
                progress(EvalProgress::Epoch {
                    model: k,
                    n_models: config.n_models,
                    report,
                })
            },
        )?;
        let train_seconds = started.elapsed().as_secs_f64();
        let predictions = predict(&net, &test_set, norm)?;
        let metrics = GroupMetrics::compute_with_aligned(
            &predictions,
            &test.labels,
            &attributes,
            test.spec,
            &aligned,
        )?;
        let run = ModelRun {
            index: k,
            train_seconds,
            final_train_loss: last.loss,
            final_train_accuracy: last.accuracy,
            metrics,
        };
        if progress(EvalProgress::Scored {
            run: &run,
            n_models: config.n_models,
        })
        .is_break()
        {
            return Err(EvalError::Stopped);
        }
        runs.push(run);
    }
    let metrics: Vec<GroupMetrics> = runs.iter().map(|r| r.metrics.clone()).collect();
    Ok(EvalReport {
        config: config.clone(),
        n_train: train.len(),
        n_test: test.len(),
        summary: MetricSummary::from_runs(&metrics)?,
        runs,
    })
}

fn stream(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}
