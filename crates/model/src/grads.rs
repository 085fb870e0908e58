//! The ConvNet's parameter gradients as an explicit backward pass written in differentiable candle
//! ops, segment by segment.
//!
//! Gradient matching needs d D(g_syn, g_real) / d x_syn, where g_syn = d CE / d theta: a gradient
//! of a gradient. candle's `Tensor::backward` detaches what it returns (unless an environment
//! variable is set before the process starts) and some of its backward passes are wrong at second
//! order, so the engine does not differentiate twice. Instead [`segment_gradients`] computes
//! d CE / d theta with ordinary tensor ops (conv input gradient = `col2im(dz W)`, weight gradient
//! = `dz^T im2col(x)`, instance-norm backward by formula, pooling backward by broadcast), which
//! candle records like any forward computation; one `backward()` on the matching loss then gives
//! the exact second-order derivative. The same code, on untracked tensors, gives the real-side
//! gradients and the inner-loop training step at no graph cost.
//!
//! Segments: the batch is a concatenation of contiguous runs of samples (one per class, or one
//! per group); each run gets its own gradient of its own mean cross-entropy. Instance norm keeps
//! samples independent, so one forward and one backward pass over the whole batch serve every
//! segment: only the final weight-gradient products are split, and bias sums go through a
//! (segments x samples) indicator matrix. This is what makes group-wise matching (100 terms) cost
//! about as much as class-wise matching (10 terms).
//!
//! Supported: the ConvNet family with norm `instance` or `none`, activation `relu` or
//! `leakyrelu`, pooling `avg` or `none`, and even feature-map sizes (28x28 input gives 32/16/8).
//! Two implementations of the conv parts: im2col + matrix products on the CPU and, in a `cuda`
//! build, on CUDA ([`ConvPath::Im2col`]), and candle's `conv2d` on every device
//! ([`ConvPath::Candle`]); tests check them against each other and against candle's autograd.
//! On CUDA the untracked passes also fuse each block's norm, activation and pooling
//! ([`fused_segment_gradients`]).

use crate::config::LEAKY_RELU_SLOPE;
use crate::layers::NORM_EPS;
use crate::ops::{self, flip};
use crate::{Activation, ConvNetConfig, Norm, Pooling, kernels};
use candle_core::{DType, Device, IndexOp, Result, Tensor};

pub use crate::convnet::unsupported_reason;

/// How the convolutions are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvPath {
    /// `im2col` + matrix products: the CPU, and CUDA in a build with the `cuda` feature (the
    /// [`kernels`] ops have kernels for both). The fastest path on each.
    Im2col,
    /// candle's `conv2d` for the forward pass and for both gradients (any device).
    Candle,
}

/// Environment variable that overrides [`ConvPath::for_device`] on a GPU: `candle` or `im2col`.
/// For comparing the two paths on one machine; unset, the fastest path is taken.
pub const CONV_PATH_ENV: &str = "DEBIASDD_CONV_PATH";

impl ConvPath {
    /// The fastest path for `device` (on a GPU, [`CONV_PATH_ENV`] can pick the other one).
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            return Self::Im2col;
        }
        match std::env::var(CONV_PATH_ENV).as_deref() {
            Ok("candle") => Self::Candle,
            Ok("im2col") => Self::Im2col,
            _ if device.is_cuda() && kernels::HAS_CUDA_KERNELS => Self::Im2col,
            _ => Self::Candle,
        }
    }
}

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
    fn indicator(&self, dtype: DType, device: &Device) -> Result<Tensor> {
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
}

/// What the backward pass of one block needs from its forward pass.
#[derive(Debug)]
struct BlockCache {
    /// The block's input (N, C, H, W).
    input: Tensor,
    /// `im2col(input)` (N*h*w, C*9), on the im2col path.
    cols: Option<Tensor>,
    /// Normalised conv output (N, O, h*w) and 1/std (N, O, 1), with instance norm.
    norm: Option<(Tensor, Tensor)>,
    /// The activation's derivative at the pre-activation (N, O, h*w), a constant.
    mask: Tensor,
    /// Conv output size.
    out_hw: (usize, usize),
}

/// The forward pass of a batch, with what the backward pass needs.
#[derive(Debug)]
pub struct Forward {
    blocks: Vec<BlockCache>,
    features: Tensor,
    /// (N, classes).
    pub logits: Tensor,
}

/// Number of parameter tensors per block.
fn per_block(config: &ConvNetConfig) -> usize {
    if config.norm == Norm::None { 2 } else { 4 }
}

/// Number of parameter tensors of the ConvNet (the length of [`crate::Network::parameters`]).
pub fn n_params(config: &ConvNetConfig) -> usize {
    per_block(config) * config.depth + 2
}

/// A per-channel vector (O) broadcast to (N, O, L) through an explicit (N, O, 1), so that its
/// backward reduces over the trailing dimension.
fn channels(t: &Tensor, n: usize, l: usize) -> Result<Tensor> {
    ops::expand_channels(t, n)?.broadcast_as((n, t.elem_count(), l))
}

/// 2x2 average pooling of (N, O, H, W) with even H, W.
fn avg_pool(x: &Tensor) -> Result<Tensor> {
    let (n, o, h, w) = x.dims4()?;
    let rows = x.reshape((n * o * h, w / 2, 2))?.sum(2)?; // (N*O*H, W/2)
    let pairs = rows.reshape((n * o * h / 2, 2, w / 2))?;
    ((pairs.i((.., 0, ..))? + pairs.i((.., 1, ..))?)? * 0.25)?.reshape((n, o, h / 2, w / 2))
}

/// The adjoint of [`avg_pool`]: each gradient value spread over its 2x2 window, times 1/4.
fn avg_pool_backward(g: &Tensor) -> Result<Tensor> {
    let (n, o, h2, w2) = g.dims4()?;
    (g * 0.25)?
        .reshape((n * o * h2, 1, w2, 1))?
        .broadcast_as((n * o * h2, 2, w2, 2))?
        .reshape((n, o, 2 * h2, 2 * w2))
}

/// The ConvNet forward pass on `xs` (N, C, H, W) with `params` in
/// [`crate::Network::parameters`] order.
pub fn forward(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    path: ConvPath,
) -> Result<Forward> {
    if params.len() != n_params(config) {
        candle_core::bail!(
            "expected {} parameter tensors, got {}",
            n_params(config),
            params.len()
        )
    }
    let stride = per_block(config);
    let mut blocks = Vec::with_capacity(config.depth);
    let mut a = xs.clone();
    for d in 0..config.depth {
        let p = &params[d * stride..(d + 1) * stride];
        let pad = config.block_padding(d);
        let (n, _, h, w) = a.dims4()?;
        let o = p[0].dim(0)?;
        let (ho, wo) = (h + 2 * pad - 2, w + 2 * pad - 2);
        let hw = ho * wo;
        let (z, cols) = match path {
            ConvPath::Im2col => {
                let (z, cols) = im2col_conv(&a, &p[0], pad)?;
                (z, Some(cols))
            }
            ConvPath::Candle => (a.conv2d(&p[0], pad, 1, 1, 1)?.reshape((n, o, hw))?, None),
        };
        let z = (z + channels(&p[1], n, hw)?)?;
        let (y, norm) = if config.norm == Norm::Instance {
            let mean = z.mean_keepdim(2)?;
            let centred = z.broadcast_sub(&mean)?;
            let inv_std = (centred.sqr()?.mean_keepdim(2)? + NORM_EPS)?
                .sqrt()?
                .recip()?;
            let xhat = centred.broadcast_mul(&inv_std)?;
            let y = ((&xhat * channels(&p[2], n, hw)?)? + channels(&p[3], n, hw)?)?;
            (y, Some((xhat, inv_std)))
        } else {
            (z, None)
        };
        let positive = y.gt(0.0)?.to_dtype(y.dtype())?;
        let mask = match config.activation {
            Activation::LeakyRelu => ((positive * (1.0 - LEAKY_RELU_SLOPE))? + LEAKY_RELU_SLOPE)?,
            _ => positive,
        };
        let act = (&y * &mask)?.reshape((n, o, ho, wo))?;
        let out = match config.pooling {
            Pooling::Avg => avg_pool(&act)?,
            _ => act,
        };
        blocks.push(BlockCache {
            input: a,
            cols,
            norm,
            mask,
            out_hw: (ho, wo),
        });
        a = out;
    }
    let features = a.flatten_from(1)?;
    let k = params.len();
    let logits = features
        .matmul(&params[k - 2].t()?)?
        .broadcast_add(&params[k - 1])?;
    Ok(Forward {
        blocks,
        features,
        logits,
    })
}

/// A 3x3 stride-1 convolution without bias as `im2col(a) @ W^T`: the output as (N, O, Ho*Wo) and
/// the column matrix (N*Ho*Wo, C*9) that the weight gradient needs.
fn im2col_conv(a: &Tensor, weight: &Tensor, pad: usize) -> Result<(Tensor, Tensor)> {
    let (n, c, h, w) = a.dims4()?;
    let o = weight.dim(0)?;
    let hw = (h + 2 * pad - 2) * (w + 2 * pad - 2);
    let cols = kernels::im2col(a, 3, pad)?;
    let z = cols
        .matmul(&weight.reshape((o, c * 9))?.t()?)?
        .reshape((n, hw, o))?
        .transpose(1, 2)?
        .contiguous()?;
    Ok((z, cols))
}

/// Row-wise softmax of (N, K) logits.
fn softmax(logits: &Tensor) -> Result<Tensor> {
    let shifted = logits.broadcast_sub(&logits.max_keepdim(1)?.detach())?;
    let e = shifted.exp()?;
    e.broadcast_div(&e.sum_keepdim(1)?)
}

/// Mean cross-entropy of each segment, as (S).
pub fn segment_losses(fwd: &Forward, labels: &Tensor, segments: &Segments) -> Result<Tensor> {
    losses_of_logits(&fwd.logits, labels, segments)
}

fn losses_of_logits(logits: &Tensor, labels: &Tensor, segments: &Segments) -> Result<Tensor> {
    let max = logits.max_keepdim(1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + &max)?;
    let picked = logits.gather(&labels.unsqueeze(1)?, 1)?;
    let per_sample = (lse - picked)?; // (N, 1)
    let m = segments.indicator(logits.dtype(), logits.device())?;
    let inv = segments.inverse_lens(logits.dtype(), logits.device())?;
    m.matmul(&(per_sample * inv)?)?.squeeze(1)
}

/// d (mean cross-entropy of its segment) / d logits, for every sample: (N, classes).
fn logits_gradient(logits: &Tensor, labels: &Tensor, segments: &Segments) -> Result<Tensor> {
    let (dtype, device) = (logits.dtype(), logits.device());
    let n_classes = logits.dim(1)?;
    let one_hot = labels
        .unsqueeze(1)?
        .broadcast_eq(&Tensor::arange(0u32, n_classes as u32, device)?.unsqueeze(0)?)?
        .to_dtype(dtype)?;
    (softmax(logits)? - one_hot)?.broadcast_mul(&segments.inverse_lens(dtype, device)?)
}

/// `lhs_s^T rhs_s` for every segment s of the rows of `lhs` (R, A) and `rhs` (R, B), where each
/// sample owns `rows_per_sample` consecutive rows: (S, A, B).
fn segment_outer(
    lhs: &Tensor,
    rhs: &Tensor,
    segments: &Segments,
    rows_per_sample: usize,
) -> Result<Tensor> {
    let (_, a) = lhs.dims2()?;
    let (_, b) = rhs.dims2()?;
    if let Some(len) = segments.uniform_len() {
        let s = segments.count();
        let rows = len * rows_per_sample;
        return lhs
            .reshape((s, rows, a))?
            .transpose(1, 2)?
            .matmul(&rhs.reshape((s, rows, b))?);
    }
    let parts = segments
        .ranges()
        .map(|(start, len)| {
            let (r0, rn) = (start * rows_per_sample, len * rows_per_sample);
            lhs.narrow(0, r0, rn)?.t()?.matmul(&rhs.narrow(0, r0, rn)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&parts, 0)
}

/// d (mean cross-entropy of segment s) / d theta for every segment s: one tensor per parameter,
/// in parameter order, each of shape (S, *parameter shape).
///
/// When `xs` (or `params`) are tracked variables, the result is differentiable with respect to
/// them; otherwise no graph is recorded.
pub fn segment_gradients(
    config: &ConvNetConfig,
    params: &[Tensor],
    fwd: &Forward,
    labels: &Tensor,
    segments: &Segments,
    path: ConvPath,
) -> Result<Vec<Tensor>> {
    let n = fwd.logits.dim(0)?;
    if segments.total() != n {
        candle_core::bail!("segments cover {} samples, batch has {n}", segments.total())
    }
    let indicator = segments.indicator(fwd.logits.dtype(), fwd.logits.device())?;
    let segment_sum = |per_sample: &Tensor| indicator.matmul(per_sample);
    let dlogits = logits_gradient(&fwd.logits, labels, segments)?;

    let stride = per_block(config);
    let k = params.len();
    let mut grads: Vec<Option<Tensor>> = vec![None; k];
    grads[k - 2] = Some(segment_outer(&dlogits, &fwd.features, segments, 1)?);
    grads[k - 1] = Some(segment_sum(&dlogits)?);

    let mut da = dlogits.matmul(&params[k - 2])?; // (N, D), reshaped below
    for d in (0..config.depth).rev() {
        let block = &fwd.blocks[d];
        let p = &params[d * stride..(d + 1) * stride];
        let (_, c, h, w) = block.input.dims4()?;
        let o = p[0].dim(0)?;
        let (ho, wo) = block.out_hw;
        let hw = ho * wo;
        let dact = match config.pooling {
            Pooling::Avg => avg_pool_backward(&da.reshape((n, o, ho / 2, wo / 2))?)?,
            _ => da.reshape((n, o, ho, wo))?,
        };
        let dy = (dact.reshape((n, o, hw))? * &block.mask)?;
        let dz = match &block.norm {
            Some((xhat, inv_std)) => {
                grads[d * stride + 2] = Some(segment_sum(&(&dy * xhat)?.sum(2)?)?);
                grads[d * stride + 3] = Some(segment_sum(&dy.sum(2)?)?);
                let dxhat = (&dy * channels(&p[2], n, hw)?)?;
                let m1 = dxhat.mean_keepdim(2)?;
                let m2 = (&dxhat * xhat)?.mean_keepdim(2)?;
                dxhat
                    .broadcast_sub(&m1)?
                    .sub(&xhat.broadcast_mul(&m2)?)?
                    .broadcast_mul(inv_std)?
            }
            None => dy,
        };
        grads[d * stride + 1] = Some(segment_sum(&dz.sum(2)?)?);
        let pad = config.block_padding(d);
        let need_input_grad = d > 0;
        match path {
            ConvPath::Im2col => {
                let cols = block.cols.as_ref().expect("im2col path keeps columns");
                let dz_rows = dz.transpose(1, 2)?.contiguous()?.reshape((n * hw, o))?;
                grads[d * stride] =
                    Some(segment_outer(&dz_rows, cols, segments, hw)?.reshape((
                        segments.count(),
                        o,
                        c,
                        3,
                        3,
                    ))?);
                if need_input_grad {
                    let dcols = dz_rows.matmul(&p[0].reshape((o, c * 9))?)?;
                    da = kernels::col2im(&dcols, (n, c, h, w), 3, pad)?;
                }
            }
            ConvPath::Candle => {
                let dz4 = dz.reshape((n, o, ho, wo))?;
                let per_segment = segments
                    .ranges()
                    .map(|(start, len)| {
                        let x = block.input.narrow(0, start, len)?.transpose(0, 1)?;
                        let g = dz4.narrow(0, start, len)?.transpose(0, 1)?;
                        x.contiguous()?
                            .conv2d(&g.contiguous()?, pad, 1, 1, 1)?
                            .transpose(0, 1)?
                            .narrow(2, 0, 3)?
                            .narrow(3, 0, 3)
                    })
                    .collect::<Result<Vec<_>>>()?;
                grads[d * stride] = Some(Tensor::stack(&per_segment, 0)?);
                if need_input_grad {
                    if pad > 2 {
                        candle_core::bail!("input gradient with padding {pad} > 2 not needed")
                    }
                    let flipped = flip(&flip(&p[0], 2)?, 3)?.transpose(0, 1)?.contiguous()?;
                    da = dz4.conv2d(&flipped, 2 - pad, 1, 1, 1)?;
                }
            }
        }
    }
    grads
        .into_iter()
        .map(|g| g.ok_or_else(|| candle_core::Error::Msg("gradient not computed".into())))
        .collect()
}

/// [`segment_gradients`] for inputs that no gradient flows back into (the real images, the
/// inner-loop and evaluation training), with the logits and every segment's mean
/// cross-entropy. On the im2col path with untracked CPU tensors it runs the native kernels of
/// [`crate::native`]; on CUDA [`fused_segment_gradients`]; elsewhere the candle ops of this
/// module.
pub fn untracked_segment_gradients(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    labels: &Tensor,
    segments: &Segments,
    path: ConvPath,
) -> Result<crate::native::SegmentGradients> {
    if path == ConvPath::Im2col && crate::native::supports(xs, params) {
        return crate::native::segment_gradients(config, params, xs, labels, segments);
    }
    let (xs, params) = (
        xs.detach(),
        params.iter().map(Tensor::detach).collect::<Vec<_>>(),
    );
    if fused_applies(config, &xs, path) {
        return fused_segment_gradients(config, &params, &xs, labels, segments);
    }
    let fwd = forward(config, &params, &xs, path)?;
    let losses = segment_losses(&fwd, labels, segments)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let grads = segment_gradients(config, &params, &fwd, labels, segments, path)?;
    Ok(crate::native::SegmentGradients {
        grads,
        logits: fwd.logits,
        losses,
    })
}

/// The gradient of the batch's mean cross-entropy (one segment), without the segment dimension,
/// and that loss: what one training step of the network needs. Nothing is tracked.
pub fn batch_gradients(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    labels: &Tensor,
    path: ConvPath,
) -> Result<(Vec<Tensor>, f64)> {
    let segments = Segments::uniform(1, xs.dim(0)?)?;
    let out = untracked_segment_gradients(config, params, xs, labels, &segments, path)?;
    let grads = out
        .grads
        .into_iter()
        .map(|g| g.squeeze(0))
        .collect::<Result<Vec<_>>>()?;
    Ok((grads, out.losses[0]))
}

/// Environment variable that turns the fused CUDA norm kernels off (`off`), for comparing.
pub const FUSED_NORM_ENV: &str = "DEBIASDD_FUSED_NORM";

/// Whether [`untracked_segment_gradients`] runs [`fused_segment_gradients`]: CUDA with the im2col
/// path (a `cuda` build), instance norm, ReLU or leaky ReLU, average or no pooling, f32 or f64.
fn fused_applies(config: &ConvNetConfig, xs: &Tensor, path: ConvPath) -> bool {
    path == ConvPath::Im2col
        && kernels::HAS_CUDA_KERNELS
        && xs.device().is_cuda()
        && matches!(xs.dtype(), DType::F32 | DType::F64)
        && config.norm == Norm::Instance
        && matches!(config.activation, Activation::Relu | Activation::LeakyRelu)
        && matches!(config.pooling, Pooling::Avg | Pooling::None)
        && std::env::var(FUSED_NORM_ENV).as_deref() != Ok("off")
}

/// What the fused backward pass keeps of one block.
struct FusedBlock {
    input_dims: (usize, usize, usize, usize),
    cols: Tensor,
    packed: Tensor,
    prm: Tensor,
    norm: kernels::NormAct,
    pad: usize,
}

/// [`untracked_segment_gradients`] on CUDA: the im2col path's convolutions (im2col, matrix
/// products, col2im) around one fused kernel per block for instance norm + affine + activation
/// (+ pooling) forward and one backward ([`kernels::norm_act_forward`]), in place of the dozen
/// element-wise candle ops each of those takes. Same results as [`segment_gradients`] up to
/// float rounding; the GPU check (`xtask/gpu/check.sh`) compares them.
pub fn fused_segment_gradients(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    labels: &Tensor,
    segments: &Segments,
) -> Result<crate::native::SegmentGradients> {
    let n = xs.dim(0)?;
    if segments.total() != n || params.len() != n_params(config) || config.norm != Norm::Instance {
        candle_core::bail!(
            "fused gradients: {n} samples, {} parameter tensors",
            params.len()
        )
    }
    let stride = per_block(config);
    let slope = match config.activation {
        Activation::LeakyRelu => LEAKY_RELU_SLOPE,
        _ => 0.0,
    };
    let mut blocks = Vec::with_capacity(config.depth);
    let mut a = xs.clone();
    for d in 0..config.depth {
        let p = &params[d * stride..(d + 1) * stride];
        let pad = config.block_padding(d);
        let (n, c, h, w) = a.dims4()?;
        let o = p[0].dim(0)?;
        let (ho, wo) = (h + 2 * pad - 2, w + 2 * pad - 2);
        let (z, cols) = im2col_conv(&a, &p[0], pad)?;
        let prm = Tensor::stack(&[&p[1], &p[2], &p[3]], 0)?;
        let norm = kernels::NormAct {
            channels: o,
            h: ho,
            w: wo,
            pool: config.pooling == Pooling::Avg,
            slope,
            eps: NORM_EPS,
        };
        let (packed, act) = kernels::norm_act_forward(&z, &prm, norm)?;
        blocks.push(FusedBlock {
            input_dims: (n, c, h, w),
            cols,
            packed,
            prm,
            norm,
            pad,
        });
        a = act;
    }
    let features = a.flatten_from(1)?;
    let k = params.len();
    let logits = features
        .matmul(&params[k - 2].t()?)?
        .broadcast_add(&params[k - 1])?;
    let losses = losses_of_logits(&logits, labels, segments)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;

    let indicator = segments.indicator(logits.dtype(), logits.device())?;
    let segment_sum = |per_sample: &Tensor| indicator.matmul(per_sample);
    let dlogits = logits_gradient(&logits, labels, segments)?;
    let mut grads: Vec<Option<Tensor>> = vec![None; k];
    grads[k - 2] = Some(segment_outer(&dlogits, &features, segments, 1)?);
    grads[k - 1] = Some(segment_sum(&dlogits)?);
    let mut da = dlogits.matmul(&params[k - 2])?;
    for (d, block) in blocks.iter().enumerate().rev() {
        let p = &params[d * stride..(d + 1) * stride];
        let (n, c, h, w) = block.input_dims;
        let o = block.norm.channels;
        let hw = block.norm.h * block.norm.w;
        let (dz, sums) = kernels::norm_act_backward(&da, &block.packed, &block.prm, block.norm)?;
        grads[d * stride + 2] = Some(segment_sum(&sums.i(0)?)?);
        grads[d * stride + 3] = Some(segment_sum(&sums.i(1)?)?);
        grads[d * stride + 1] = Some(segment_sum(&sums.i(2)?)?);
        let dz_rows = dz.transpose(1, 2)?.contiguous()?.reshape((n * hw, o))?;
        grads[d * stride] = Some(
            segment_outer(&dz_rows, &block.cols, segments, hw)?.reshape((
                segments.count(),
                o,
                c,
                3,
                3,
            ))?,
        );
        if d > 0 {
            let dcols = dz_rows.matmul(&p[0].reshape((o, c * 9))?)?;
            da = kernels::col2im(&dcols, (n, c, h, w), 3, block.pad)?;
        }
    }
    let grads = grads
        .into_iter()
        .map(|g| g.ok_or_else(|| candle_core::Error::Msg("gradient not computed".into())))
        .collect::<Result<Vec<_>>>()?;
    Ok(crate::native::SegmentGradients {
        grads,
        logits,
        losses,
    })
}
