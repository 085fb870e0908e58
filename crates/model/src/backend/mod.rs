//! The ConvNet's hand-written passes, apart from the network definitions: one [`Backend`] trait,
//! its three implementations, and the one function that picks which runs ([`Route::select`]).
//!
//! It sits above [`crate::convnet`] (the typed description every pass reads) and below the
//! evaluator and the distillation engine. [`crate::Network`] uses it only for inference
//! ([`crate::Network::predict_logits`]).
//!
//! - [`cpu`]: native CPU kernels on plain slices, channels-last (untracked inputs only), with the
//!   second-order term of gradient matching forward-over-reverse;
//! - [`candle_ops`]: the backward pass written in differentiable candle ops, on any device, with
//!   either convolution ([`ConvPath`]); on tracked inputs its result is differentiable, which is
//!   how the synthetic side gets exact second-order gradients off the CPU;
//! - [`cuda`]: the fused CUDA path (norm, activation and pooling in one kernel per block) for
//!   untracked inputs;
//! - [`im2col`]: not a backend but the im2col / col2im custom ops (CPU and CUDA halves) that the
//!   candle-op im2col path and the fused path are built from.
//!
//! Segments: the batch is a concatenation of contiguous runs of samples (one per class, or one
//! per group); each run gets its own gradient of its own mean cross-entropy. Instance norm keeps
//! samples independent, so one forward and one backward pass over the whole batch serve every
//! segment: only the final weight-gradient products are split, and bias sums go through a
//! (segments x samples) indicator matrix. This is what makes group-wise matching (100 terms) cost
//! about as much as class-wise matching (10 terms).
//!
//! Module graph, no cycles between the backends: they import [`crate::convnet`], the types of
//! this file and the ops of [`im2col`] (which imports no backend; its CUDA half is launched by
//! `cuda/launch.rs`); [`cuda`] reaches the candle-op passes only through [`Route`] (its second
//! order); within the crate nothing imports [`candle_ops`] or [`cpu`] but this file's [`Route`].

use std::sync::OnceLock;

use candle_core::{DType, Device, Result, Tensor};

use crate::ConvNetConfig;
use crate::config::Norm;
use crate::convnet::unsupported_reason;

pub mod candle_ops;
pub mod cpu;
pub mod cuda;
pub mod im2col;

/// How the convolutions of the candle-op passes are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvPath {
    /// `im2col` + matrix products: the CPU, and CUDA in a build with the `cuda` feature (the
    /// [`im2col`] ops have kernels for both). The fastest path on each.
    Im2col,
    /// candle's `conv2d` for the forward pass and for both gradients (any device).
    Candle,
}

/// Environment variable that overrides the conv path [`Route::select`] picks on a GPU: `candle`
/// or `im2col`. For comparing the two paths on one machine; unset, the fastest path is taken.
/// Read once per process.
pub const CONV_PATH_ENV: &str = "DEBIASDD_CONV_PATH";

/// Environment variable that turns the fused CUDA norm kernels off (`off`), for comparing. Read
/// once per process.
pub const FUSED_NORM_ENV: &str = "DEBIASDD_FUSED_NORM";

/// Contiguous runs of samples whose gradients are taken separately, in batch order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segments {
    lens: Vec<usize>,
}

impl Segments {
    /// Runs of the given lengths; every length must be at least 1.
    pub fn new(lens: Vec<usize>) -> Result<Self> {
        if lens.is_empty() || lens.contains(&0) {
            candle_core::bail!("segments must be non-empty and of length >= 1, got {lens:?}")
        }
        Ok(Self { lens })
    }

    /// `count` runs of `len` samples each.
    pub fn uniform(count: usize, len: usize) -> Result<Self> {
        Self::new(vec![len; count])
    }

    /// Number of segments.
    pub fn count(&self) -> usize {
        self.lens.len()
    }

    /// Number of samples over all segments.
    pub fn total(&self) -> usize {
        self.lens.iter().sum()
    }

    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// `(start, len)` of every segment.
    pub fn ranges(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.lens.iter().scan(0, |start, &len| {
            let range = (*start, len);
            *start += len;
            Some(range)
        })
    }

    fn uniform_len(&self) -> Option<usize> {
        let first = self.lens[0];
        self.lens.iter().all(|&l| l == first).then_some(first)
    }

    /// The (segments x samples) 0/1 matrix: row s sums segment s.
    pub(crate) fn indicator(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let n = self.total();
        let mut m = vec![0f32; self.count() * n];
        for (s, (start, len)) in self.ranges().enumerate() {
            m[s * n + start..s * n + start + len].fill(1.0);
        }
        Tensor::from_vec(m, (self.count(), n), device)?.to_dtype(dtype)
    }

    /// 1 / (length of its segment) for every sample, as (N, 1).
    fn inverse_lens(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let v: Vec<f64> = self
            .lens
            .iter()
            .flat_map(|&l| std::iter::repeat_n(1.0 / l as f64, l))
            .collect();
        Tensor::from_vec(v, (self.total(), 1), device)?.to_dtype(dtype)
    }

    /// Mean cross-entropy of each segment of `logits` (N, K) with `labels` (N), as (S); candle
    /// ops, differentiable.
    pub(crate) fn losses_of_logits(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let max = logits.max_keepdim(1)?.detach();
        let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + &max)?;
        let picked = logits.gather(&labels.unsqueeze(1)?, 1)?;
        let per_sample = (lse - picked)?; // (N, 1)
        let m = self.indicator(logits.dtype(), logits.device())?;
        let inv = self.inverse_lens(logits.dtype(), logits.device())?;
        m.matmul(&(per_sample * inv)?)?.squeeze(1)
    }

    /// d (mean cross-entropy of its segment) / d logits, for every sample: (N, classes).
    pub(crate) fn logits_gradient(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let (dtype, device) = (logits.dtype(), logits.device());
        let n_classes = logits.dim(1)?;
        let one_hot = labels
            .unsqueeze(1)?
            .broadcast_eq(&Tensor::arange(0u32, n_classes as u32, device)?.unsqueeze(0)?)?
            .to_dtype(dtype)?;
        (softmax(logits)? - one_hot)?.broadcast_mul(&self.inverse_lens(dtype, device)?)
    }

    /// `lhs_s^T rhs_s` for every segment s of the rows of `lhs` (R, A) and `rhs` (R, B), where
    /// each sample owns `rows_per_sample` consecutive rows: (S, A, B).
    pub(crate) fn outer(
        &self,
        lhs: &Tensor,
        rhs: &Tensor,
        rows_per_sample: usize,
    ) -> Result<Tensor> {
        let (_, a) = lhs.dims2()?;
        let (_, b) = rhs.dims2()?;
        if let Some(len) = self.uniform_len() {
            let s = self.count();
            let rows = len * rows_per_sample;
            return lhs
                .reshape((s, rows, a))?
                .transpose(1, 2)?
                .matmul(&rhs.reshape((s, rows, b))?);
        }
        let parts = self
            .ranges()
            .map(|(start, len)| {
                let (r0, rn) = (start * rows_per_sample, len * rows_per_sample);
                lhs.narrow(0, r0, rn)?.t()?.matmul(&rhs.narrow(0, r0, rn)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&parts, 0)
    }
}

/// Row-wise softmax of (N, K) logits.
fn softmax(logits: &Tensor) -> Result<Tensor> {
    let shifted = logits.broadcast_sub(&logits.max_keepdim(1)?.detach())?;
    let e = shifted.exp()?;
    e.broadcast_div(&e.sum_keepdim(1)?)
}

/// The per-sample loss a training gradient is of.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SampleLoss {
    /// Cross-entropy.
    CrossEntropy,
    /// LfF's generalised cross-entropy as its code writes it: `CE * q * p_y^q` with `p_y` (the
    /// softmax probability of the label) held constant, so easy samples weigh most.
    GeneralizedCrossEntropy { q: f64 },
}

/// Gradients of every segment's mean cross-entropy, with the forward pass's results.
#[derive(Debug)]
pub struct SegmentGradients {
    /// One tensor per parameter, in [`crate::Network::parameters`] order, each
    /// (segments, *parameter shape).
    pub grads: Vec<Tensor>,
    /// (N, classes).
    pub logits: Tensor,
    /// Mean cross-entropy of every segment.
    pub losses: Vec<f64>,
}

/// The passes a backend offers over a ConvNet `config` with parameters `params` (in
/// [`crate::Network::parameters`] order) on images `xs` (N, C, H, W), integer `labels` (N).
///
/// The configuration must pass [`crate::convnet::unsupported_reason`]. Native and fused passes
/// need untracked inputs and detach them; the candle-op passes are differentiable with respect
/// to tracked inputs. Call them through a [`Route`], which picks the backend and detaches.
pub trait Backend {
    /// d (mean cross-entropy of segment s) / d theta for every segment s (one tensor per
    /// parameter, (S, *shape)), with the logits and every segment's loss.
    fn segment_gradients(
        &self,
        config: &ConvNetConfig,
        params: &[Tensor],
        xs: &Tensor,
        labels: &Tensor,
        segments: &Segments,
    ) -> Result<SegmentGradients>;

    /// The logits (N, classes).
    fn logits(&self, config: &ConvNetConfig, params: &[Tensor], xs: &Tensor) -> Result<Tensor>;

    /// The features entering the classifier, (N, feature_dim), in PyTorch's NCHW-flatten order.
    fn embeddings(&self, config: &ConvNetConfig, params: &[Tensor], xs: &Tensor) -> Result<Tensor>;

    /// `d/dx sum_i <V_i, phi(x_i)>`: the input gradient of the embeddings `phi` of
    /// [`Backend::embeddings`] contracted with `directions` `V` (N, feature_dim), as
    /// (N, C, H, W). With `V = dD / dphi` it is `dD / dx`: what distribution matching needs of
    /// the synthetic images.
    fn embedding_input_gradient(
        &self,
        config: &ConvNetConfig,
        params: &[Tensor],
        xs: &Tensor,
        directions: &Tensor,
    ) -> Result<Tensor>;

    /// `d/dx sum_s <V_s, g_s(x)>`: the input gradient of the per-segment parameter gradients
    /// `g_s` of [`Backend::segment_gradients`] contracted with `directions` `V` (one tensor per
    /// parameter, (S, *shape)), as (N, C, H, W). With `V = dD / dg_syn` it is `dD / dx_syn`, the
    /// second-order term of gradient matching.
    fn gradient_of_gradients(
        &self,
        config: &ConvNetConfig,
        params: &[Tensor],
        xs: &Tensor,
        labels: &Tensor,
        segments: &Segments,
        directions: &[Tensor],
    ) -> Result<Tensor>;
}

/// Which backend computes the untracked passes of a [`Route`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Untracked {
    /// The native CPU kernels ([`cpu::Native`]).
    Native,
    /// The candle-op passes with this conv path ([`candle_ops::CandleOps`]).
    CandleOps(ConvPath),
    /// The fused CUDA path ([`cuda::Fused`]; its gradient of gradients goes through the
    /// candle-op passes with the im2col path).
    Fused,
}

/// How the ConvNet's passes run for one device, dtype and network: which backend takes the
/// untracked passes, which conv path the tracked (differentiable, synthetic-side) candle-op
/// passes use, and whether the matching loss's second-order term runs natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    untracked: Untracked,
    tracked: ConvPath,
}

/// The environment overrides, read once.
#[derive(Debug, Clone, Copy)]
struct Overrides {
    conv_path: Option<ConvPath>,
    fused_norm_off: bool,
}

fn overrides() -> Overrides {
    static OVERRIDES: OnceLock<Overrides> = OnceLock::new();
    *OVERRIDES.get_or_init(|| Overrides {
        conv_path: match std::env::var(CONV_PATH_ENV).as_deref() {
            Ok("candle") => Some(ConvPath::Candle),
            Ok("im2col") => Some(ConvPath::Im2col),
            _ => None,
        },
        fused_norm_off: std::env::var(FUSED_NORM_ENV).as_deref() == Ok("off"),
    })
}

static NATIVE: cpu::Native = cpu::Native;
static FUSED: cuda::Fused = cuda::Fused;
static CANDLE_IM2COL: candle_ops::CandleOps = candle_ops::CandleOps {
    path: ConvPath::Im2col,
};
static CANDLE_CONV: candle_ops::CandleOps = candle_ops::CandleOps {
    path: ConvPath::Candle,
};

impl Route {
    /// The fastest route for a ConvNet `config` in `dtype` on `device`, or `None` where the
    /// hand-written passes do not apply (a configuration [`unsupported_reason`] refuses, or a
    /// dtype other than f32 and f64): callers then use [`crate::Network::forward_t`] and
    /// candle's autograd.
    ///
    /// - CPU: the native kernels, the im2col path for tracked passes, native second order.
    /// - CUDA: the im2col path in a `cuda` build (else candle's conv), [`CONV_PATH_ENV`] can
    ///   pick the other; untracked passes fused with instance norm on the im2col path in a
    ///   `cuda` build, unless [`FUSED_NORM_ENV`] is `off`.
    /// - Other devices: candle's conv (or [`CONV_PATH_ENV`]'s choice), candle-op passes.
    pub fn select(device: &Device, dtype: DType, config: &ConvNetConfig) -> Option<Self> {
        if unsupported_reason(config).is_some() || !matches!(dtype, DType::F32 | DType::F64) {
            return None;
        }
        if device.is_cpu() {
            return Some(Self::native());
        }
        let env = overrides();
        let path = match env.conv_path {
            Some(path) => path,
            None if device.is_cuda() && cuda::HAS_CUDA_KERNELS => ConvPath::Im2col,
            None => ConvPath::Candle,
        };
        if path == ConvPath::Im2col
            && cuda::HAS_CUDA_KERNELS
            && device.is_cuda()
            && config.norm == Norm::Instance
            && !env.fused_norm_off
        {
            return Some(Self::fused());
        }
        Some(Self::candle_ops(path))
    }

    /// The CPU route: native kernels, im2col for the tracked passes.
    pub fn native() -> Self {
        Self {
            untracked: Untracked::Native,
            tracked: ConvPath::Im2col,
        }
    }

    /// Every pass through the candle ops with conv path `path` (any device; for cross-checks).
    pub fn candle_ops(path: ConvPath) -> Self {
        Self {
            untracked: Untracked::CandleOps(path),
            tracked: path,
        }
    }

    /// The CUDA route of a `cuda` build: fused untracked passes, im2col for the tracked ones.
    pub fn fused() -> Self {
        Self {
            untracked: Untracked::Fused,
            tracked: ConvPath::Im2col,
        }
    }

    /// Which backend takes the untracked passes.
    pub fn untracked(&self) -> Untracked {
        self.untracked
    }

    /// The conv path of the tracked (differentiable) candle-op passes, e.g.
    /// [`candle_ops::forward`] on synthetic images.
    pub fn conv_path(&self) -> ConvPath {
        self.tracked
    }

    /// Whether the matching loss's second-order term runs on the native kernels (the CPU
    /// route) rather than through candle's autograd over the candle-op passes.
    pub fn native_second_order(&self) -> bool {
        self.untracked == Untracked::Native
    }

    /// The backend of the untracked passes.
    pub fn backend(&self) -> &'static dyn Backend {
        match self.untracked {
            Untracked::Native => &NATIVE,
            Untracked::Fused => &FUSED,
            Untracked::CandleOps(ConvPath::Im2col) => &CANDLE_IM2COL,
            Untracked::CandleOps(ConvPath::Candle) => &CANDLE_CONV,
        }
    }

    /// [`Backend::segment_gradients`] on detached inputs: for inputs that no gradient flows back
    /// into (the real images, the inner-loop and evaluation training).
    pub fn segment_gradients(
        &self,
        config: &ConvNetConfig,
        params: &[Tensor],
        xs: &Tensor,
        labels: &Tensor,
        segments: &Segments,
    ) -> Result<SegmentGradients> {
        let (xs, params) = detached(xs, params);
        self.backend()
            .segment_gradients(config, &params, &xs, labels, segments)
    }

    /// The gradient of the batch's mean cross-entropy (one segment), without the segment
    /// dimension, and that loss: what one training step of the network needs. Nothing is
    /// tracked.
    pub fn batch_gradients(
        &self,
        config: &ConvNetConfig,
        params: &[Tensor],
        xs: &Tensor,
        labels: &Tensor,
    ) -> Result<(Vec<Tensor>, f64)> {
        let segments = Segments::uniform(1, xs.dim(0)?)?;
        let out = self.segment_gradients(config, params, xs, labels, &segments)?;
        let grads = out
            .grads
            .into_iter()
            .map(|g| g.squeeze(0))
            .collect::<Result<Vec<_>>>()?;
        Ok((grads, out.losses[0]))
    }

    /// [`Route::batch_gradients`] for another per-sample `loss`, on the native CPU kernels (the
    /// loss enters only through d loss / d logits, computed from the same forward pass);
    /// `None` on other routes, whose callers use autograd.
    pub fn native_batch_gradients(
        &self,
        config: &ConvNetConfig,
        params: &[Tensor],
        xs: &Tensor,
        labels: &Tensor,
        loss: SampleLoss,
    ) -> Option<Result<(Vec<Tensor>, f64, Tensor)>> {
        if self.untracked != Untracked::Native {
            return None;
        }
        let (xs, params) = detached(xs, params);
        let run = || {
            let segments = Segments::uniform(1, xs.dim(0)?)?;
            let out = cpu::segment_gradients_of(config, &params, &xs, labels, &segments, loss)?;
            let grads = out
                .grads
                .into_iter()
                .map(|g| g.squeeze(0))
                .collect::<Result<Vec<_>>>()?;
            Ok((grads, out.losses[0], out.logits))
        };
        Some(run())
    }

    /// [`Backend::logits`] on detached inputs.
    pub fn logits(&self, config: &ConvNetConfig, params: &[Tensor], xs: &Tensor) -> Result<Tensor> {
        let (xs, params) = detached(xs, params);
        self.backend().logits(config, &params, &xs)
    }

    /// [`Backend::embeddings`] on detached inputs (for tracked embeddings, run
    /// [`candle_ops::forward`] with [`Route::conv_path`]).
    pub fn embeddings(
        &self,
        config: &ConvNetConfig,
        params: &[Tensor],
        xs: &Tensor,
    ) -> Result<Tensor> {
        let (xs, params) = detached(xs, params);
        self.backend().embeddings(config, &params, &xs)
    }

    /// [`Backend::embedding_input_gradient`] on detached inputs.
    pub fn embedding_input_gradient(
        &self,
        config: &ConvNetConfig,
        params: &[Tensor],
        xs: &Tensor,
        directions: &Tensor,
    ) -> Result<Tensor> {
        let (xs, params) = detached(xs, params);
        self.backend()
            .embedding_input_gradient(config, &params, &xs, &directions.detach())
    }

    /// [`Backend::gradient_of_gradients`] on detached inputs.
    pub fn gradient_of_gradients(
        &self,
        config: &ConvNetConfig,
        params: &[Tensor],
        xs: &Tensor,
        labels: &Tensor,
        segments: &Segments,
        directions: &[Tensor],
    ) -> Result<Tensor> {
        let (xs, params) = detached(xs, params);
        let directions: Vec<Tensor> = directions.iter().map(Tensor::detach).collect();
        self.backend()
            .gradient_of_gradients(config, &params, &xs, labels, segments, &directions)
    }
}

/// `xs` and `params` cut from any autograd graph.
fn detached(xs: &Tensor, params: &[Tensor]) -> (Tensor, Vec<Tensor>) {
    (xs.detach(), params.iter().map(Tensor::detach).collect())
}
