//! The bias-capturing model: a ConvNet trained on the class labels with LfF's generalised
//! cross-entropy, and what it says of held-out images (predicted class, confidence, features).
//!
//! LfF (Nam et al., NeurIPS 2020) implements GCE as `CE(logits, y) * p_y.detach()^q * q`: the
//! gradient of `(1 - p_y^q) / q` up to the constant `q`, so samples the model already finds easy
//! weigh most and the model locks onto whatever shortcut predicts the class best.

use std::ops::ControlFlow;

use candle_core::{D, DType, Device, Tensor};
use debiasdd_data::{ImageSet, Normalization};
use debiasdd_model::backend::{Route, SampleLoss};
use debiasdd_model::optim::Sgd;
use debiasdd_model::{ModelConfig, Network};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::config::InferConfig;
use crate::error::InferError;

/// Images per forward pass when predicting.
const PREDICT_BATCH: usize = 500;

/// The GCE loss of a batch, LfF's form: `mean_i CE_i * q * p_{y_i}^q` with `p` detached.
pub fn gce_loss(logits: &Tensor, labels: &Tensor, q: f64) -> candle_core::Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let index = labels.unsqueeze(1)?;
    let log_py = log_p.gather(&index, 1)?.squeeze(1)?;
    let weight = (log_py.detach() * q)?.exp()?.affine(q, 0.0)?;
    (log_py.neg()? * weight)?.mean_all()
}

/// Trains a fresh bias model on `set` (its labels only) for `config.epochs` passes; `seed` fixes
/// its initialisation and batch order. `on_epoch(epoch, mean loss, train accuracy %)`; its
/// `ControlFlow::Break` stops the training ([`InferError::Stopped`]).
///
/// The step's gradient comes from the native CPU kernels where [`Route::select`] picks them
/// (GCE enters only through d loss / d logits), from candle's autograd through [`gce_loss`]
/// elsewhere; the two agree (tested).
pub fn train_bias_model(
    set: &ImageSet,
    norm: &Normalization,
    config: &InferConfig,
    fold: usize,
    seed: u64,
    device: &Device,
    on_epoch: &mut dyn FnMut(usize, f64, f64) -> ControlFlow<()>,
) -> Result<Network, InferError> {
    let side = set.shape.square_side()?;
    let model: ModelConfig = config
        .model
        .for_input(set.shape.channels, side, set.spec.n_classes());
    model.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let net = Network::new(&model, &mut rng, device, DType::F32)?;
    let (images, labels) = set.to_tensors(norm, device, DType::F32)?;
    let mut sgd = Sgd::new(net.vars(), config.sgd)?;
    // The native CPU kernels when they apply (about three times faster than autograd).
    let route = match net.config() {
        ModelConfig::ConvNet(c) => Route::select(net.device(), net.dtype(), c).map(|r| (r, c)),
        _ => None,
    };
    let n = set.len();
    for epoch in 0..config.epochs {
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.shuffle(&mut rng);
        let (mut loss_sum, mut correct) = (0.0f64, 0usize);
        for batch in order.chunks(config.batch_size) {
            let index = Tensor::new(batch, device)?;
            let xs = images.index_select(&index, 0)?;
            let ys = labels.index_select(&index, 0)?;
            let gce = SampleLoss::GeneralizedCrossEntropy { q: config.q };
            let native = route.and_then(|(route, c)| {
                let params: Vec<Tensor> =
                    net.vars().iter().map(|v| v.as_detached_tensor()).collect();
                route.native_batch_gradients(c, &params, &xs, &ys, gce)
            });
            let (logits, value) = match native {
                Some(out) => {
                    let (grads, value, logits) = out?;
                    check_finite(value, fold, epoch)?;
                    sgd.step_tensors(&grads)?;
                    (logits, value)
                }
                None => {
                    let logits = net.forward_t(&xs, true)?;
                    let loss = gce_loss(&logits, &ys, config.q)?;
                    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    check_finite(value, fold, epoch)?;
                    sgd.backward_step(&loss)?;
                    (logits, value)
                }
            };
            loss_sum += value * batch.len() as f64;
            correct += logits
                .argmax(D::Minus1)?
                .eq(&ys)?
                .to_dtype(DType::U32)?
                .sum_all()?
                .to_scalar::<u32>()? as usize;
        }
        if on_epoch(
            epoch,
            loss_sum / n as f64,
            100.0 * correct as f64 / n as f64,
        )
        .is_break()
        {
            return Err(InferError::Stopped);
        }
    }
    Ok(net)
}

fn check_finite(value: f64, fold: usize, epoch: usize) -> Result<(), InferError> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(InferError::NonFiniteLoss { fold, epoch })
    }
}

/// What the bias model says of a set of images.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdicts {
    /// Predicted class per image.
    pub predicted: Vec<u8>,
    /// Softmax probability of the predicted class.
    pub confidence: Vec<f32>,
    /// The features the classifier sees, `len x feature_dim`, row-major.
    pub features: Vec<f32>,
    pub feature_dim: usize,
}

/// Predictions, confidences and features of `set` under `net`, in eval mode.
pub fn judge(net: &Network, set: &ImageSet, norm: &Normalization) -> Result<Verdicts, InferError> {
    let route = match net.config() {
        ModelConfig::ConvNet(c) => Route::select(net.device(), net.dtype(), c).map(|r| (r, c)),
        _ => None,
    };
    let params: Vec<Tensor> = net.vars().iter().map(|v| v.as_detached_tensor()).collect();
    let [classifier_weight, classifier_bias] = &params[params.len() - 2..] else {
        unreachable!("every network ends with its classifier's weight and bias")
    };
    let mut out = Verdicts {
        predicted: Vec::with_capacity(set.len()),
        confidence: Vec::with_capacity(set.len()),
        features: Vec::new(),
        feature_dim: 0,
    };
    let indices: Vec<usize> = (0..set.len()).collect();
    for chunk in indices.chunks(PREDICT_BATCH) {
        let (xs, _) = set
            .subset(chunk)
            .to_tensors(norm, net.device(), net.dtype())?;
        let features = match route {
            Some((route, config)) => route.embeddings(config, &params, &xs)?,
            None => net.embed(&xs, false)?.detach(),
        };
        // The classifier on those features (the last two parameters of every network, in
        // `Network::parameters` order): no second pass through the conv blocks.
        let logits = features
            .matmul(&classifier_weight.t()?)?
            .broadcast_add(classifier_bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
        let predicted: Vec<u32> = probs.argmax(D::Minus1)?.to_vec1()?;
        let confidence: Vec<f32> = probs.max(D::Minus1)?.to_vec1()?;
        out.feature_dim = features.dim(1)?;
        out.features.extend(
            features
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
        out.predicted.extend(predicted.into_iter().map(|c| c as u8));
        out.confidence.extend(confidence);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The native kernels' GCE gradient equals autograd's through [`gce_loss`].
    #[test]
    fn native_gce_gradients_match_autograd() -> anyhow::Result<()> {
        use debiasdd_model::ConvNetConfig;
        use rand::Rng;
        let config = ConvNetConfig {
            in_channels: 3,
            image_size: 8,
            n_classes: 4,
            width: 4,
            depth: 2,
            ..ConvNetConfig::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let net = Network::new(
            &ModelConfig::ConvNet(config.clone()),
            &mut rng,
            &Device::Cpu,
            DType::F64,
        )?;
        let xs: Vec<f64> = (0..6 * 3 * 64)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let xs = Tensor::from_vec(xs, (6, 3, 8, 8), &Device::Cpu)?;
        let ys = Tensor::new(&[0u32, 1, 2, 3, 1, 0], &Device::Cpu)?;
        let params: Vec<Tensor> = net.vars().iter().map(|v| v.as_detached_tensor()).collect();
        let (native, loss, _) = Route::native()
            .native_batch_gradients(
                &config,
                &params,
                &xs,
                &ys,
                SampleLoss::GeneralizedCrossEntropy { q: 0.7 },
            )
            .expect("the CPU route is native")?;
        let reference = gce_loss(&net.forward_t(&xs, true)?, &ys, 0.7)?;
        assert!((loss - reference.to_scalar::<f64>()?).abs() < 1e-12);
        let grads = reference.backward()?;
        for (var, g) in net.vars().iter().zip(&native) {
            let want = grads.get(var.as_tensor()).expect("gradient");
            let diff = (want - g)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f64>()?;
            assert!(diff < 1e-10, "max difference {diff}");
        }
        Ok(())
    }

    /// GCE's gradient with respect to the logits is `q * p_y^q` times cross-entropy's, checked
    /// against a hand computation on one sample.
    #[test]
    fn gce_weights_cross_entropy_by_the_detached_confidence() -> candle_core::Result<()> {
        let logits = candle_core::Var::new(&[[1.0f64, 2.0, 0.5]], &Device::Cpu)?;
        let labels = Tensor::new(&[1u32], &Device::Cpu)?;
        let q = 0.7;
        let loss = gce_loss(logits.as_tensor(), &labels, q)?;
        let grads = loss.backward()?;
        let g: Vec<f64> = grads
            .get(logits.as_tensor())
            .expect("gradient")
            .flatten_all()?
            .to_vec1()?;
        let z = [1.0f64, 2.0, 0.5];
        let sum: f64 = z.iter().map(|v| v.exp()).sum();
        let p: Vec<f64> = z.iter().map(|v| v.exp() / sum).collect();
        let w = q * p[1].powf(q);
        assert!((loss.to_scalar::<f64>()? - w * -p[1].ln()).abs() < 1e-12);
        for (j, (&gj, &pj)) in g.iter().zip(&p).enumerate() {
            let expected = w * (pj - if j == 1 { 1.0 } else { 0.0 });
            assert!(
                (gj - expected).abs() < 1e-12,
                "logit {j}: {gj} vs {expected}"
            );
        }
        Ok(())
    }
}
