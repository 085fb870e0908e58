//! The DC training protocol for a fresh network on a (small or large) training set.
//!
//! As the official DC code's `evaluate_synset`: SGD (lr 0.01, momentum 0.9, weight decay 5e-4),
//! mini-batches of 256 reshuffled every epoch, epochs `0..=E` (E + 1 passes, as
//! `range(Epoch + 1)`), and after epoch `E / 2 + 1` the learning rate drops x0.1 with a fresh
//! optimiser (DC builds a new `torch.optim.SGD`, so momentum restarts). Each training batch is
//! augmented (DC's or DSA's augmentation, [`crate::augment`]) unless augmentation is off. Group-balanced
//! training draws each epoch's samples with replacement, weighted so that every non-empty group
//! has the same total weight (`debiasdd_groups::GroupIndex::balanced_weights`).

use std::ops::ControlFlow;

use candle_core::{D, DType, Device, Tensor};
use debiasdd_groups::GroupIndex;
use debiasdd_model::backend::{Route, Segments};
use debiasdd_model::optim::{Sgd, SgdConfig};
use debiasdd_model::{ModelConfig, Network};
use rand::distr::Distribution;
use rand::distr::weighted::WeightedIndex;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::augment::Augment;
use crate::error::EvalError;
use debiasdd_data::{ImageSet, Normalization};

/// How each epoch's samples are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sampling {
    /// Every sample once per epoch, in a fresh random order (plain ERM).
    #[default]
    Shuffle,
    /// As many draws as samples, with replacement, weighted so every non-empty group weighs
    /// the same (group-balanced ERM). Needs group annotations.
    GroupBalanced,
}

/// Hyper-parameters of one training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// E: the run makes E + 1 passes, as the DC code.
    pub epochs: usize,
    pub batch_size: usize,
    pub sgd: SgdConfig,
    /// Learning-rate factor applied after epoch `E / 2 + 1`.
    pub lr_decay: f64,
    pub augment: Augment,
    pub sampling: Sampling,
}

impl Default for TrainConfig {
    /// The DC protocol on MNIST: 1000 epochs with augmentation.
    fn default() -> Self {
        Self {
            epochs: 1000,
            batch_size: 256,
            sgd: SgdConfig {
                lr: 0.01,
                momentum: 0.9,
                weight_decay: 5e-4,
                nesterov: false,
            },
            lr_decay: 0.1,
            augment: Augment::default(),
            sampling: Sampling::Shuffle,
        }
    }
}

impl TrainConfig {
    /// The DC protocol: E = 1000 with augmentation, 300 without.
    pub fn dc(augment: bool) -> Self {
        if augment {
            Self::default()
        } else {
            Self {
                epochs: 300,
                augment: Augment::None,
                ..Self::default()
            }
        }
    }

    /// The DSA / DM evaluation protocol (the official `main.py` with `--method DSA` and
    /// `main_DM.py`): E = 1000 with DSA's augmentation (the digit strategy
    /// `color_crop_cutout_scale_rotate`), otherwise as [`TrainConfig::dc`]: the same
    /// `evaluate_synset` (SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, lr x0.1 with a
    /// fresh optimiser after epoch `E // 2 + 1`); only the augmentation in `epoch()` differs.
    pub fn dsa() -> Self {
        Self {
            epochs: 1000,
            augment: Augment::Dsa(debiasdd_augment::DsaConfig::default()),
            ..Self::default()
        }
    }

    /// The epoch after which the learning rate drops (DC: `Epoch // 2 + 1`).
    pub fn decay_epoch(&self) -> usize {
        self.epochs / 2 + 1
    }

    pub fn validate(&self) -> Result<(), EvalError> {
        if self.batch_size == 0 {
            return Err(EvalError::InvalidConfig(
                "batch size 0: use at least 1 (the protocol uses 256)".into(),
            ));
        }
        if !(self.lr_decay.is_finite() && self.lr_decay > 0.0) {
            return Err(EvalError::InvalidConfig(format!(
                "lr decay {} must be a positive factor",
                self.lr_decay
            )));
        }
        self.sgd.validate()?;
        self.augment.validate()?;
        Ok(())
    }
}

/// What a training run reports after each epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochReport {
    /// 0-based; the last epoch is `epochs` (E + 1 passes).
    pub epoch: usize,
    pub epochs: usize,
    pub lr: f64,
    /// Mean cross-entropy over the epoch's samples.
    pub loss: f64,
    /// Training accuracy over the epoch's (augmented) samples, percent.
    pub accuracy: f64,
}

/// Trains `net` in place on `set` with the DC protocol; every random choice (order, balanced
/// draws, augmentation) comes from `seed`. `on_epoch` sees each epoch's report (progress bars,
/// logs) and may stop the training there with `ControlFlow::Break` ([`EvalError::Stopped`]).
/// Returns the last epoch's report.
///
/// ConvNets for which `debiasdd_model::backend::Route::select` finds a route (instance norm or
/// none, ReLU, average pooling: the protocol's; f32 or f64) are trained with that explicit
/// backward pass, about three times faster on
/// the CPU than candle's autograd; other networks with autograd. Both give the same updates up to
/// rounding (tested).
pub fn train_network(
    net: &Network,
    set: &ImageSet,
    norm: &Normalization,
    config: &TrainConfig,
    seed: u64,
    on_epoch: &mut dyn FnMut(&EpochReport) -> ControlFlow<()>,
) -> Result<EpochReport, EvalError> {
    let route = match net.config() {
        ModelConfig::ConvNet(c) => Route::select(net.device(), net.dtype(), c),
        _ => None,
    };
    train_network_with(net, set, norm, config, seed, route, on_epoch)
}

/// [`train_network`] with the choice of backward pass made by the caller (`None`: autograd).
fn train_network_with(
    net: &Network,
    set: &ImageSet,
    norm: &Normalization,
    config: &TrainConfig,
    seed: u64,
    route: Option<Route>,
    on_epoch: &mut dyn FnMut(&EpochReport) -> ControlFlow<()>,
) -> Result<EpochReport, EvalError> {
    config.validate()?;
    if set.is_empty() {
        return Err(EvalError::EmptyTrainingSet);
    }
    let n = set.len();
    let (images, labels) = set.to_tensors(norm, &Device::Cpu, DType::F32)?;
    let images: Vec<f32> = images.flatten_all()?.to_vec1()?;
    let labels: Vec<u32> = labels.to_vec1()?;
    let weights = match config.sampling {
        Sampling::Shuffle => None,
        Sampling::GroupBalanced => Some(balanced_sampler(set)?),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut lr = config.sgd.lr;
    let mut sgd = Sgd::new(net.vars(), config.sgd)?;
    let per_image = images.len() / n;
    let mut last = None;
    for epoch in 0..=config.epochs {
        let order: Vec<usize> = match &weights {
            None => {
                let mut order: Vec<usize> = (0..n).collect();
                order.shuffle(&mut rng);
                order
            }
            Some(dist) => (0..n).map(|_| dist.sample(&mut rng)).collect(),
        };
        let (mut loss_sum, mut correct) = (0.0f64, 0usize);
        for batch in order.chunks(config.batch_size) {
            let mut xs = Vec::with_capacity(batch.len() * per_image);
            for &i in batch {
                xs.extend_from_slice(&images[i * per_image..(i + 1) * per_image]);
            }
            let [c, h, w] = set.shape.dims();
            let shape = (batch.len(), c, h, w);
            config.augment.apply(&mut xs, shape, rng.random());
            let xs = Tensor::from_vec(xs, shape, net.device())?.to_dtype(net.dtype())?;
            let ys: Vec<u32> = batch.iter().map(|&i| labels[i]).collect();
            let ys = Tensor::from_vec(ys, batch.len(), net.device())?;
            let (logits, loss) = match (route, net.config()) {
                (Some(route), ModelConfig::ConvNet(c)) => {
                    let params: Vec<Tensor> =
                        net.vars().iter().map(|v| v.as_detached_tensor()).collect();
                    let segments = Segments::uniform(1, batch.len())?;
                    let out = route.segment_gradients(c, &params, &xs, &ys, &segments)?;
                    let g = out
                        .grads
                        .into_iter()
                        .map(|g| g.squeeze(0))
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    sgd.step_tensors(&g)?;
                    let loss = Tensor::new(out.losses[0], net.device())?.to_dtype(net.dtype())?;
                    (out.logits, loss)
                }
                _ => {
                    let logits = net.forward_t(&xs, true)?;
                    let loss = candle_nn::loss::cross_entropy(&logits, &ys)?;
                    sgd.backward_step(&loss)?;
                    (logits, loss)
                }
            };
            let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !loss_value.is_finite() {
                return Err(EvalError::NonFiniteLoss { epoch, lr });
            }
            loss_sum += loss_value * batch.len() as f64;
            let predicted = logits.argmax(D::Minus1)?;
            correct += predicted
                .eq(&ys)?
                .to_dtype(DType::U32)?
                .sum_all()?
                .to_scalar::<u32>()? as usize;
        }
        let report = EpochReport {
            epoch,
            epochs: config.epochs,
            lr,
            loss: loss_sum / n as f64,
            accuracy: 100.0 * correct as f64 / n as f64,
        };
        if on_epoch(&report).is_break() {
            return Err(EvalError::Stopped);
        }
        last = Some(report);
        if epoch == config.decay_epoch() {
            lr *= config.lr_decay;
            sgd = Sgd::new(net.vars(), SgdConfig { lr, ..config.sgd })?;
        }
    }
    Ok(last.expect("at least one epoch runs"))
}

fn balanced_sampler(set: &ImageSet) -> Result<WeightedIndex<f64>, EvalError> {
    let groups: Vec<u16> = set
        .groups
        .iter()
        .map(|g| g.ok_or(EvalError::MissingGroups))
        .collect::<Result<_, _>>()?;
    let index = GroupIndex::from_group_ids(set.spec, &groups)
        .map_err(|e| EvalError::InvalidConfig(e.to_string()))?;
    WeightedIndex::new(index.balanced_weights())
        .map_err(|e| EvalError::InvalidConfig(format!("balanced weights: {e}")))
}

/// Predicted class of every image of `set`, in eval mode, batch by batch.
pub fn predict(net: &Network, set: &ImageSet, norm: &Normalization) -> Result<Vec<u8>, EvalError> {
    const BATCH: usize = 500;
    let mut predictions = Vec::with_capacity(set.len());
    let indices: Vec<usize> = (0..set.len()).collect();
    for chunk in indices.chunks(BATCH) {
        let part = set.subset(chunk);
        let (xs, _) = part.to_tensors(norm, net.device(), net.dtype())?;
        let logits = net.predict_logits(&xs)?;
        let classes: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        predictions.extend(classes.into_iter().map(|c| c as u8));
    }
    Ok(predictions)
}

#[cfg(test)]
mod tests {
    use debiasdd_model::{ConvNetConfig, ModelConfig};

    use super::*;

    /// The explicit backward pass and candle's autograd train a ConvNet to the same weights.
    #[test]
    fn explicit_backward_matches_autograd_training() -> Result<(), EvalError> {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let n = 12;
        let set = ImageSet {
            shape: debiasdd_data::ImageShape::new(3, 28, 28).unwrap(),
            spec: debiasdd_groups::GroupSpec::new(10, 10).unwrap(),
            images: (0..n * 3 * 28 * 28)
                .map(|_| rng.random_range(0.0..1.0))
                .collect(),
            labels: (0..n).map(|i| (i % 10) as u8).collect(),
            groups: vec![None; n],
        };
        let norm = Normalization {
            mean: vec![0.2; 3],
            std: vec![0.3; 3],
        };
        let config = TrainConfig {
            epochs: 2,
            batch_size: 5,
            ..TrainConfig::dc(false)
        };
        let model = ModelConfig::ConvNet(ConvNetConfig {
            width: 4,
            depth: 2,
            ..ConvNetConfig::default()
        });
        let build = || {
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            Network::new(&model, &mut rng, &Device::Cpu, DType::F64).unwrap()
        };
        let (a, b) = (build(), build());
        let route = Some(Route::native());
        let ra = train_network_with(&a, &set, &norm, &config, 3, route, &mut |_| {
            ControlFlow::Continue(())
        })?;
        let rb = train_network_with(&b, &set, &norm, &config, 3, None, &mut |_| {
            ControlFlow::Continue(())
        })?;
        assert!(
            (ra.loss - rb.loss).abs() < 1e-9,
            "{} vs {}",
            ra.loss,
            rb.loss
        );
        for ((name, va), (_, vb)) in a.parameters().iter().zip(b.parameters()) {
            let d = (va.as_tensor() - vb.as_tensor())?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f64>()?;
            assert!(d < 1e-9, "{name} differs by {d}");
        }
        Ok(())
    }
}
