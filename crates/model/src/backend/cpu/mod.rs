//! The native CPU backend, under [`crate::backend`]: the ConvNet's forward pass, per-segment
//! parameter gradients and second-order term as hand-written kernels on plain slices, for
//! tensors that no gradient flows back into.
//!
//! Most of the arithmetic of a distillation run is untracked: the real images' gradients of
//! every outer step, the inner-loop training of the network on the synthetic set, and the
//! evaluator's training. [`crate::backend::candle_ops`] computes those with candle ops, one
//! fresh buffer and one strided copy per op; here the same mathematics runs on plain slices:
//!
//! - activations stay channels-last (N, H, W, C) from the first block to the classifier, so
//!   `im2col` copies whole channel runs, the convolution output needs no transpose, and instance
//!   norm, activation and pooling are vectorisable loops over channels (`im2col.rs`, `norm.rs`);
//! - every convolution product (forward, weight gradient per segment, input gradient) is one call
//!   to the `gemm` crate on sub-slices, in parallel over rayon's threads (`gemm.rs`, the only
//!   `unsafe` code here);
//! - per-image work (im2col, col2im, norm statistics, pooling) runs in parallel over images;
//!   loops over channels first re-slice every operand to the channel count (`&x[..o]`), which
//!   lets the compiler drop the bounds checks and vectorise them (a width-32 batch of 256 went
//!   from about 170 to 145 ms here);
//! - a block keeps only its column matrix, its normalised output and its 1/std for the backward
//!   pass, and the column buffer is reused for the input gradient (`forward.rs`, `backward.rs`);
//! - the second-order term of gradient matching runs forward-over-reverse (`tangent.rs`).
//!
//! Weights arrive in PyTorch's layout ((O, C, 3, 3) convolutions, (K, C*h*w) classifier) and
//! gradients leave in it; only the small weight matrices are permuted. Results equal
//! [`crate::backend::candle_ops::segment_gradients`] up to float rounding (tests compare both in
//! f64), which remains the implementation for tracked inputs and other devices.

mod backward;
mod forward;
mod gemm;
mod im2col;
mod norm;
mod tangent;

use candle_core::{DType, Result, Tensor, WithDType};
use num_traits::Float;

use super::{Backend, SampleLoss, SegmentGradients, Segments};
use crate::ConvNetConfig;
use crate::convnet::{ConvNetLayout, ConvNetParams, unsupported_reason};

/// The element types the kernels run in.
pub trait Real:
    Float
    + WithDType
    + Send
    + Sync
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::MulAssign
    + std::ops::DivAssign
{
}
impl Real for f32 {}
impl Real for f64 {}

/// The native CPU backend: untracked CPU tensors of f32 or f64 (its trait passes detach them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Native;

impl Backend for Native {
    fn segment_gradients(
        &self,
        config: &ConvNetConfig,
        params: &[Tensor],
        xs: &Tensor,
        labels: &Tensor,
        segments: &Segments,
    ) -> Result<SegmentGradients> {
        let params: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
        segment_gradients(config, &params, &xs.detach(), labels, segments)
    }

    fn logits(&self, config: &ConvNetConfig, params: &[Tensor], xs: &Tensor) -> Result<Tensor> {
        let params: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
        logits(config, &params, &xs.detach())
    }

    fn embeddings(&self, config: &ConvNetConfig, params: &[Tensor], xs: &Tensor) -> Result<Tensor> {
        let params: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
        embeddings(config, &params, &xs.detach())
    }

    fn embedding_input_gradient(
        &self,
        config: &ConvNetConfig,
        params: &[Tensor],
        xs: &Tensor,
        directions: &Tensor,
    ) -> Result<Tensor> {
        let params: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
        embedding_input_gradient(config, &params, &xs.detach(), &directions.detach())
    }

    fn gradient_of_gradients(
        &self,
        config: &ConvNetConfig,
        params: &[Tensor],
        xs: &Tensor,
        labels: &Tensor,
        segments: &Segments,
        directions: &[Tensor],
    ) -> Result<Tensor> {
        let params: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
        let directions: Vec<Tensor> = directions.iter().map(Tensor::detach).collect();
        gradient_of_gradients(config, &params, &xs.detach(), labels, segments, &directions)
    }
}

/// Whether `xs` and `params` are CPU tensors of one dtype, f32 or f64, not tracked for autograd.
fn untracked_cpu(xs: &Tensor, params: &[Tensor]) -> bool {
    xs.device().is_cpu()
        && matches!(xs.dtype(), DType::F32 | DType::F64)
        && !xs.track_op()
        && params
            .iter()
            .all(|p| p.device().is_cpu() && p.dtype() == xs.dtype() && !p.track_op())
}

/// d (mean cross-entropy of segment s) / d theta for every segment s of the batch `xs`
/// (N, C, H, W) with integer `labels` (N), on the ConvNet `params` (in parameter order). The
/// inputs must be untracked CPU tensors of f32 or f64; the configuration must pass
/// [`crate::convnet::unsupported_reason`].
pub fn segment_gradients(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    labels: &Tensor,
    segments: &Segments,
) -> Result<SegmentGradients> {
    segment_gradients_of(
        config,
        params,
        xs,
        labels,
        segments,
        SampleLoss::CrossEntropy,
    )
}

/// [`segment_gradients`] of another per-sample loss (the segment means of `loss`).
pub fn segment_gradients_of(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    labels: &Tensor,
    segments: &Segments,
    loss: SampleLoss,
) -> Result<SegmentGradients> {
    let labels = check_inputs(config, params, xs, labels, segments)?;
    match xs.dtype() {
        DType::F32 => {
            backward::segment_gradients::<f32>(config, params, xs, &labels, segments, loss)
        }
        DType::F64 => {
            backward::segment_gradients::<f64>(config, params, xs, &labels, segments, loss)
        }
        dtype => candle_core::bail!("native kernels: unsupported dtype {dtype:?}"),
    }
}

/// The logits (N, classes) of the batch `xs` (N, C, H, W) on the ConvNet `params`: the forward
/// pass alone, keeping no buffer for a backward pass. Same preconditions as
/// [`segment_gradients`].
pub fn logits(config: &ConvNetConfig, params: &[Tensor], xs: &Tensor) -> Result<Tensor> {
    check_network(config, params, xs)?;
    let n = xs.dim(0)?;
    match xs.dtype() {
        DType::F32 => {
            let pass = forward::forward_pass::<f32>(config, params, xs, false)?;
            Tensor::from_vec(pass.logits, (n, pass.n_classes), xs.device())
        }
        DType::F64 => {
            let pass = forward::forward_pass::<f64>(config, params, xs, false)?;
            Tensor::from_vec(pass.logits, (n, pass.n_classes), xs.device())
        }
        dtype => candle_core::bail!("native kernels: unsupported dtype {dtype:?}"),
    }
}

/// The features entering the classifier, (N, feature_dim) in PyTorch's NCHW-flatten order, of
/// the batch `xs` on the ConvNet `params`: the forward pass alone. Same preconditions as
/// [`segment_gradients`].
pub fn embeddings(config: &ConvNetConfig, params: &[Tensor], xs: &Tensor) -> Result<Tensor> {
    check_network(config, params, xs)?;
    fn go<T: Real>(config: &ConvNetConfig, params: &[Tensor], xs: &Tensor) -> Result<Tensor> {
        let n = xs.dim(0)?;
        let pass = forward::forward_pass::<T>(config, params, xs, false)?;
        let (h, w, c) = pass.feature_shape;
        let nchw = im2col::permute_channels(&pass.features, c, h * w, false);
        Tensor::from_vec(nchw, (n, c * h * w), xs.device())
    }
    match xs.dtype() {
        DType::F32 => go::<f32>(config, params, xs),
        DType::F64 => go::<f64>(config, params, xs),
        dtype => candle_core::bail!("native kernels: unsupported dtype {dtype:?}"),
    }
}

/// `d/dx sum_i <V_i, phi(x_i)>` for the embeddings `phi` of [`embeddings`] and `directions` `V`
/// (N, feature_dim, NCHW-flatten order) of the same dtype: one forward pass keeping its caches
/// and one backward pass to the input, no parameter gradient. Same preconditions as
/// [`segment_gradients`].
pub fn embedding_input_gradient(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    directions: &Tensor,
) -> Result<Tensor> {
    check_network(config, params, xs)?;
    if directions.dtype() != xs.dtype() {
        candle_core::bail!(
            "embedding directions are {:?}, the images {:?}",
            directions.dtype(),
            xs.dtype()
        )
    }
    match xs.dtype() {
        DType::F32 => Tensor::from_vec(
            backward::embedding_input_gradient::<f32>(config, params, xs, directions)?,
            xs.dims(),
            xs.device(),
        ),
        DType::F64 => Tensor::from_vec(
            backward::embedding_input_gradient::<f64>(config, params, xs, directions)?,
            xs.dims(),
            xs.device(),
        ),
        dtype => candle_core::bail!("native kernels: unsupported dtype {dtype:?}"),
    }
}

/// The checks shared by the public entry points; returns the labels.
fn check_inputs(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    labels: &Tensor,
    segments: &Segments,
) -> Result<Vec<u32>> {
    check_network(config, params, xs)?;
    let n = xs.dim(0)?;
    if segments.total() != n {
        candle_core::bail!("segments cover {} samples, batch has {n}", segments.total())
    }
    let labels: Vec<u32> = labels.to_dtype(DType::U32)?.to_vec1()?;
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= config.n_classes) {
        candle_core::bail!("label {bad} out of range for {} classes", config.n_classes)
    }
    Ok(labels)
}

/// The checks on the network and the input batch.
fn check_network(config: &ConvNetConfig, params: &[Tensor], xs: &Tensor) -> Result<()> {
    if let Some(reason) = unsupported_reason(config) {
        candle_core::bail!("{reason}")
    }
    if !untracked_cpu(xs, params) {
        candle_core::bail!(
            "the native kernels take untracked CPU tensors of f32 or f64 (got {:?} on {:?})",
            xs.dtype(),
            xs.device().location()
        )
    }
    ConvNetParams::new(&ConvNetLayout::new(config), params)?;
    let (_, c, h, w) = xs.dims4()?;
    if c != config.in_channels || h != config.image_size || w != config.image_size {
        candle_core::bail!(
            "input ({c}, {h}, {w}) does not match the network's ({}, {s}, {s})",
            config.in_channels,
            s = config.image_size
        )
    }
    Ok(())
}

/// The values of `t`, flattened.
fn tensor_vec<T: Real>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// `d/dx sum_s <V_s, g_s(x)>` for the batch `xs` (N, C, H, W): the input gradient of the
/// per-segment parameter gradients `g_s` of [`segment_gradients`] contracted with `directions`
/// `V` (one tensor per parameter, (segments, *parameter shape), in parameter order). This is
/// the second-order term of gradient matching: with `V = dD / dg_syn` it is `dD / dx_syn`.
///
/// Computed forward-over-reverse: by symmetry of second derivatives it equals the derivative of
/// `dL_s/dx` along `theta + eps V_s`, so the forward pass and the backward pass to the input run
/// once each with tangents (a second value per activation, carried through every linear op, the
/// norm, the activation mask and the softmax). Segments keep their own direction, as samples of
/// different segments never mix. Same preconditions as [`segment_gradients`].
pub fn gradient_of_gradients(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    labels: &Tensor,
    segments: &Segments,
    directions: &[Tensor],
) -> Result<Tensor> {
    let labels = check_inputs(config, params, xs, labels, segments)?;
    ConvNetParams::with_leading(&ConvNetLayout::new(config), directions, &[segments.count()])?;
    let dx = match xs.dtype() {
        DType::F32 => Tensor::from_vec(
            tangent::second_order::<f32>(config, params, xs, &labels, segments, directions)?,
            xs.dims(),
            xs.device(),
        )?,
        DType::F64 => Tensor::from_vec(
            tangent::second_order::<f64>(config, params, xs, &labels, segments, directions)?,
            xs.dims(),
            xs.device(),
        )?,
        dtype => candle_core::bail!("native kernels: unsupported dtype {dtype:?}"),
    };
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ConvPath;
    use crate::backend::candle_ops as grads;
    use crate::{Activation, ModelConfig, Network, Norm, Pooling};
    use candle_core::Device;
    use rand::SeedableRng;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    fn convnet(config: &ConvNetConfig, dtype: DType, seed: u64) -> Network {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        Network::new(
            &ModelConfig::ConvNet(config.clone()),
            &mut rng,
            &Device::Cpu,
            dtype,
        )
        .unwrap()
    }

    fn detached(net: &Network) -> Vec<Tensor> {
        net.vars().iter().map(|v| v.as_detached_tensor()).collect()
    }

    fn network(config: &ConvNetConfig, dtype: DType, seed: u64) -> Vec<Tensor> {
        detached(&convnet(config, dtype, seed))
    }

    fn batch(config: &ConvNetConfig, n: usize, dtype: DType) -> (Tensor, Tensor) {
        let s = config.image_size;
        // Seeded, so that every run checks the same batch.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(n as u64);
        let values: Vec<f32> = (0..n * config.in_channels * s * s)
            .map(|_| rand::Rng::random_range(&mut rng, 0f32..1.))
            .collect();
        let xs = Tensor::from_vec(values, (n, config.in_channels, s, s), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let labels: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % 10).collect();
        (xs, Tensor::new(labels, &Device::Cpu).unwrap())
    }

    /// Every supported norm, activation and pooling, depths 1 to 3, the protocol's input size.
    fn variants() -> Vec<ConvNetConfig> {
        let base = ConvNetConfig {
            width: 5,
            depth: 2,
            image_size: 12,
            ..ConvNetConfig::default()
        };
        vec![
            base.clone(),
            ConvNetConfig {
                activation: Activation::LeakyRelu,
                norm: Norm::None,
                ..base.clone()
            },
            ConvNetConfig {
                pooling: Pooling::None,
                depth: 1,
                ..base.clone()
            },
            ConvNetConfig {
                depth: 3,
                in_channels: 1,
                width: 4,
                image_size: 28,
                ..base
            },
        ]
    }

    /// Native gradients, logits and losses against the candle-op implementation, in f64, for
    /// every supported norm, activation and pooling and uneven segments.
    #[test]
    fn matches_the_candle_backward_in_f64() {
        for (v, config) in variants().iter().enumerate() {
            let params = network(config, DType::F64, v as u64);
            let (xs, labels) = batch(config, 7, DType::F64);
            let segments = Segments::new(vec![3, 1, 3]).unwrap();
            let ours = segment_gradients(config, &params, &xs, &labels, &segments).unwrap();
            let fwd = grads::forward(config, &params, &xs, ConvPath::Im2col).unwrap();
            let theirs = grads::segment_gradients(
                config,
                &params,
                &fwd,
                &labels,
                &segments,
                ConvPath::Im2col,
            )
            .unwrap();
            assert!(
                max_abs_diff(&ours.logits, &fwd.logits) < 1e-10,
                "variant {v}: logits"
            );
            let losses: Vec<f64> = grads::segment_losses(&fwd, &labels, &segments)
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, b) in ours.losses.iter().zip(&losses) {
                assert!((a - b).abs() < 1e-10, "variant {v}: loss {a} vs {b}");
            }
            assert_eq!(ours.grads.len(), theirs.len());
            for (i, (a, b)) in ours.grads.iter().zip(&theirs).enumerate() {
                assert_eq!(a.dims(), b.dims(), "variant {v}: parameter {i} shape");
                let scale = max_abs_diff(b, &b.zeros_like().unwrap()).max(1e-3);
                let diff = max_abs_diff(a, b);
                assert!(
                    diff < 1e-9 * scale.max(1.0),
                    "variant {v}: parameter {i} differs by {diff} (scale {scale})"
                );
            }
        }
    }

    /// The gradient against central finite differences of the segment loss, in f64.
    #[test]
    fn gradient_matches_finite_differences() {
        let config = ConvNetConfig {
            width: 3,
            depth: 2,
            image_size: 8,
            ..ConvNetConfig::default()
        };
        let params = network(&config, DType::F64, 11);
        let (xs, labels) = batch(&config, 3, DType::F64);
        let segments = Segments::new(vec![2, 1]).unwrap();
        let ours = segment_gradients(&config, &params, &xs, &labels, &segments).unwrap();
        let h = 1e-5;
        for (pi, p) in params.iter().enumerate() {
            let values: Vec<f64> = p.flatten_all().unwrap().to_vec1().unwrap();
            let analytic: Vec<f64> = ours.grads[pi].flatten_all().unwrap().to_vec1().unwrap();
            // A few coordinates of every parameter, segment 0.
            for j in [0, values.len() / 2, values.len() - 1] {
                let loss_at = |delta: f64| {
                    let mut v = values.clone();
                    v[j] += delta;
                    let mut moved = params.clone();
                    moved[pi] = Tensor::from_vec(v, p.dims(), &Device::Cpu).unwrap();
                    segment_gradients(&config, &moved, &xs, &labels, &segments)
                        .unwrap()
                        .losses[0]
                };
                let numeric = (loss_at(h) - loss_at(-h)) / (2.0 * h);
                let a = analytic[j];
                assert!(
                    (a - numeric).abs() < 1e-6 * (1.0 + numeric.abs()),
                    "parameter {pi} coordinate {j}: analytic {a}, numeric {numeric}"
                );
            }
        }
    }

    /// f32 agrees with f64 to float tolerance at the protocol's size.
    #[test]
    fn f32_agrees_with_f64() {
        let config = ConvNetConfig {
            width: 16,
            ..ConvNetConfig::default()
        };
        let params = network(&config, DType::F64, 5);
        let (xs, labels) = batch(&config, 12, DType::F64);
        let segments = Segments::uniform(2, 6).unwrap();
        let wide = segment_gradients(&config, &params, &xs, &labels, &segments).unwrap();
        let params32: Vec<Tensor> = params
            .iter()
            .map(|p| p.to_dtype(DType::F32).unwrap())
            .collect();
        let narrow = segment_gradients(
            &config,
            &params32,
            &xs.to_dtype(DType::F32).unwrap(),
            &labels,
            &segments,
        )
        .unwrap();
        for (i, (a, b)) in wide.grads.iter().zip(&narrow.grads).enumerate() {
            let scale = max_abs_diff(a, &a.zeros_like().unwrap());
            let diff = max_abs_diff(a, b);
            // The conv biases feed instance norm, which removes them: their exact gradient is 0
            // and f32 leaves rounding noise of ~1e-6, hence the absolute floor.
            assert!(
                diff <= 1e-4 * scale + 1e-5,
                "parameter {i}: {diff} of {scale}"
            );
        }
    }

    /// The second-order term against candle's autograd through the candle-op backward pass,
    /// in f64, for every supported variant and uneven segments.
    #[test]
    fn gradient_of_gradients_matches_autograd_in_f64() {
        for (v, config) in variants().iter().enumerate() {
            let params = network(config, DType::F64, 20 + v as u64);
            let (xs, labels) = batch(config, 6, DType::F64);
            let segments = Segments::new(vec![2, 3, 1]).unwrap();
            let directions: Vec<Tensor> = params
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let mut shape = vec![3];
                    shape.extend_from_slice(p.dims());
                    Tensor::randn(0f64, 1., shape, &Device::Cpu)
                        .unwrap()
                        .affine(1.0 + i as f64, 0.0)
                        .unwrap()
                })
                .collect();
            let ours = gradient_of_gradients(config, &params, &xs, &labels, &segments, &directions)
                .unwrap();
            let x = candle_core::Var::from_tensor(&xs).unwrap();
            let fwd = grads::forward(config, &params, x.as_tensor(), ConvPath::Im2col).unwrap();
            let g = grads::segment_gradients(
                config,
                &params,
                &fwd,
                &labels,
                &segments,
                ConvPath::Im2col,
            )
            .unwrap();
            let total = g
                .iter()
                .zip(&directions)
                .map(|(g, d)| (g * d).unwrap().sum_all().unwrap())
                .reduce(|a, b| (a + b).unwrap())
                .unwrap();
            let theirs = total
                .backward()
                .unwrap()
                .get(x.as_tensor())
                .unwrap()
                .clone();
            let scale = max_abs_diff(&theirs, &theirs.zeros_like().unwrap());
            let diff = max_abs_diff(&ours, &theirs);
            assert!(scale > 0.0, "variant {v}: zero reference");
            assert!(
                diff < 1e-9 * scale.max(1.0),
                "variant {v}: {diff} of {scale}"
            );
        }
    }

    /// The forward pass alone against the network's own candle layers, in f64.
    #[test]
    fn logits_match_the_network_forward_in_f64() {
        for (v, config) in variants().iter().enumerate() {
            let net = convnet(config, DType::F64, v as u64);
            let params = detached(&net);
            let (xs, _) = batch(config, 5, DType::F64);
            let ours = logits(config, &params, &xs).unwrap();
            let theirs = net.forward_t(&xs, false).unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "variant {v}");
            let diff = max_abs_diff(&ours, &theirs);
            assert!(diff < 1e-10, "variant {v}: logits differ by {diff}");
        }
    }

    #[test]
    fn refuses_tracked_inputs_and_bad_labels() {
        let config = ConvNetConfig {
            width: 2,
            depth: 1,
            image_size: 4,
            ..ConvNetConfig::default()
        };
        let params = network(&config, DType::F32, 0);
        let (xs, labels) = batch(&config, 2, DType::F32);
        let segments = Segments::uniform(1, 2).unwrap();
        let var = candle_core::Var::from_tensor(&xs).unwrap();
        assert!(!untracked_cpu(var.as_tensor(), &params));
        let err = segment_gradients(&config, &params, var.as_tensor(), &labels, &segments)
            .unwrap_err()
            .to_string();
        assert!(err.contains("untracked"), "{err}");
        let bad = Tensor::new(&[0u32, 10], &Device::Cpu).unwrap();
        let err = segment_gradients(&config, &params, &xs, &bad, &segments)
            .unwrap_err()
            .to_string();
        assert!(err.contains("label 10"), "{err}");
        let wrong = Tensor::zeros((2, 3, 5, 5), DType::F32, &Device::Cpu).unwrap();
        let err = logits(&config, &params, &wrong).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
    }
}
