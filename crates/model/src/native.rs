//! The ConvNet's forward pass and per-segment parameter gradients as hand-written CPU kernels,
//! for tensors that no gradient flows back into.
//!
//! Most of the arithmetic of a distillation run is untracked: the real images' gradients of
//! every outer step, the inner-loop training of the network on the synthetic set, and the
//! evaluator's training. [`crate::grads`] computes those with candle ops, one fresh buffer and one
//! strided copy per op; here the same mathematics runs on plain slices:
//!
//! - activations stay channels-last (N, H, W, C) from the first block to the classifier, so
//!   `im2col` copies whole channel runs, the convolution output needs no transpose, and instance
//!   norm, activation and pooling are vectorisable loops over channels;
//! - every convolution product (forward, weight gradient per segment, input gradient) is one call
//!   to the `gemm` crate on sub-slices, in parallel over rayon's threads;
//! - per-image work (im2col, col2im, norm statistics, pooling) runs in parallel over images;
//!   loops over channels first re-slice every operand to the channel count (`&x[..o]`), which
//!   lets the compiler drop the bounds checks and vectorise them (a width-32 batch of 256 went
//!   from about 170 to 145 ms here);
//! - a block keeps only its column matrix, its normalised output and its 1/std for the backward
//!   pass, and the column buffer is reused for the input gradient.
//!
//! Weights arrive in PyTorch's layout ((O, C, 3, 3) convolutions, (K, C*h*w) classifier) and
//! gradients leave in it; only the small weight matrices are permuted. Results equal
//! [`crate::grads::segment_gradients`] up to float rounding (tests compare both in f64), which
//! remains the implementation for tracked inputs and other devices; [`supports`] says which one
//! applies.

use crate::config::LEAKY_RELU_SLOPE;
use crate::grads::Segments;
use crate::layers::NORM_EPS;
use crate::{Activation, ConvNetConfig, Norm, Pooling};
use candle_core::{DType, Result, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

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

/// Whether [`segment_gradients`] can compute the gradients of a batch `xs` on a network
/// `params`: CPU tensors of f32 or f64 that are not tracked for autograd.
pub fn supports(xs: &Tensor, params: &[Tensor]) -> bool {
    xs.device().is_cpu()
        && matches!(xs.dtype(), DType::F32 | DType::F64)
        && !xs.track_op()
        && params
            .iter()
            .all(|p| p.device().is_cpu() && p.dtype() == xs.dtype() && !p.track_op())
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

/// d (mean cross-entropy of segment s) / d theta for every segment s of the batch `xs`
/// (N, C, H, W) with integer `labels` (N), on the ConvNet `params` (in parameter order). The
/// inputs must pass [`supports`]; the configuration must pass
/// [`crate::grads::unsupported_reason`].
pub fn segment_gradients(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    labels: &Tensor,
    segments: &Segments,
) -> Result<SegmentGradients> {
    let labels = check_inputs(config, params, xs, labels, segments)?;
    match xs.dtype() {
        DType::F32 => run::<f32>(config, params, xs, &labels, segments),
        DType::F64 => run::<f64>(config, params, xs, &labels, segments),
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
            let pass = forward_pass::<f32>(config, params, xs, false)?;
            Tensor::from_vec(pass.logits, (n, pass.n_classes), xs.device())
        }
        DType::F64 => {
            let pass = forward_pass::<f64>(config, params, xs, false)?;
            Tensor::from_vec(pass.logits, (n, pass.n_classes), xs.device())
        }
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
    if let Some(reason) = crate::grads::unsupported_reason(config) {
        candle_core::bail!("{reason}")
    }
    if !supports(xs, params) {
        candle_core::bail!(
            "the native kernels take untracked CPU tensors of f32 or f64 (got {:?} on {:?})",
            xs.dtype(),
            xs.device().location()
        )
    }
    let expected = crate::grads::n_params(config);
    if params.len() != expected {
        candle_core::bail!(
            "expected {expected} parameter tensors, got {}",
            params.len()
        )
    }
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

/// A strided view of a matrix: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A row-major (rows x cols) matrix.
    fn rows(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of this view.
    fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `dst (m x n, row-major) = lhs (m x k) @ rhs (k x n)`, through the `gemm` crate on all of
/// rayon's threads.
fn matmul<T: Real>(dst: &mut [T], lhs: MatRef<'_, T>, rhs: MatRef<'_, T>) {
    gemm_into(dst, lhs, rhs, false)
}

/// `dst += lhs @ rhs`, as [`matmul`].
fn matmul_add<T: Real>(dst: &mut [T], lhs: MatRef<'_, T>, rhs: MatRef<'_, T>) {
    gemm_into(dst, lhs, rhs, true)
}

#[allow(unsafe_code)]
fn gemm_into<T: Real>(dst: &mut [T], lhs: MatRef<'_, T>, rhs: MatRef<'_, T>, accumulate: bool) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "matmul: inner dimensions differ");
    assert_eq!(dst.len(), m * n, "matmul: destination size");
    assert!(
        lhs.in_bounds() && rhs.in_bounds(),
        "matmul: view out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(T::zero());
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every index that gemm reads or writes inside the slices:
    // dst is exactly m x n row-major, and `in_bounds` checks the largest index of each view.
    // Strides fit in isize because they index allocated slices. dst is read only when
    // accumulating (`read_dst`), and then it is initialised memory of the right size.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// One convolution block's geometry.
#[derive(Debug, Clone, Copy)]
struct BlockShape {
    n: usize,
    /// Input channels, height, width.
    c: usize,
    h: usize,
    w: usize,
    pad: usize,
    /// Output channels.
    o: usize,
}

impl BlockShape {
    fn ho(&self) -> usize {
        self.h + 2 * self.pad - 2
    }
    fn wo(&self) -> usize {
        self.w + 2 * self.pad - 2
    }
    /// Output pixels of one image.
    fn hw(&self) -> usize {
        self.ho() * self.wo()
    }
    /// Columns of the column matrix: a 3x3 window of every input channel.
    fn k(&self) -> usize {
        9 * self.c
    }
}

/// Channels-last im2col: row (n, oy, ox) holds the 3x3 window around output pixel (oy, ox) in
/// (ky, kx, c) order, zeros outside the image.
fn im2col<T: Real>(x: &[T], s: BlockShape) -> Vec<T> {
    let (hw, k, wo) = (s.hw(), s.k(), s.wo());
    let mut cols = vec![T::zero(); s.n * hw * k];
    cols.par_chunks_mut(hw * k)
        .zip(x.par_chunks(s.h * s.w * s.c))
        .for_each(|(dst, img)| {
            for (r, row) in dst.chunks_mut(k).enumerate() {
                let (oy, ox) = (r / wo, r % wo);
                for ky in 0..3 {
                    let Some(iy) = (oy + ky).checked_sub(s.pad).filter(|&y| y < s.h) else {
                        continue;
                    };
                    for kx in 0..3 {
                        let Some(ix) = (ox + kx).checked_sub(s.pad).filter(|&x| x < s.w) else {
                            continue;
                        };
                        let src = (iy * s.w + ix) * s.c;
                        let at = (ky * 3 + kx) * s.c;
                        row[at..at + s.c].copy_from_slice(&img[src..src + s.c]);
                    }
                }
            }
        });
    cols
}

/// The adjoint of [`im2col`]: sums every row's window back into a channels-last image.
fn col2im<T: Real>(cols: &[T], s: BlockShape) -> Vec<T> {
    let (hw, k, wo) = (s.hw(), s.k(), s.wo());
    let mut x = vec![T::zero(); s.n * s.h * s.w * s.c];
    x.par_chunks_mut(s.h * s.w * s.c)
        .zip(cols.par_chunks(hw * k))
        .for_each(|(img, src)| {
            for (r, row) in src.chunks(k).enumerate() {
                let (oy, ox) = (r / wo, r % wo);
                for ky in 0..3 {
                    let Some(iy) = (oy + ky).checked_sub(s.pad).filter(|&y| y < s.h) else {
                        continue;
                    };
                    for kx in 0..3 {
                        let Some(ix) = (ox + kx).checked_sub(s.pad).filter(|&x| x < s.w) else {
                            continue;
                        };
                        let dst = (iy * s.w + ix) * s.c;
                        let at = (ky * 3 + kx) * s.c;
                        for (d, v) in img[dst..dst + s.c].iter_mut().zip(&row[at..at + s.c]) {
                            *d += *v;
                        }
                    }
                }
            }
        });
    x
}

/// (O, C, 3, 3) -> (O, 3, 3, C), the column order of [`im2col`].
fn weight_to_cols<T: Real>(w: &[T], o: usize, c: usize) -> Vec<T> {
    let mut out = vec![T::zero(); w.len()];
    for oc in 0..o {
        for ci in 0..c {
            for p in 0..9 {
                out[(oc * 9 + p) * c + ci] = w[(oc * c + ci) * 9 + p];
            }
        }
    }
    out
}

/// The inverse of [`weight_to_cols`], written into `out`.
fn cols_to_weight<T: Real>(w: &[T], o: usize, c: usize, out: &mut [T]) {
    for oc in 0..o {
        for ci in 0..c {
            for p in 0..9 {
                out[(oc * c + ci) * 9 + p] = w[(oc * 9 + p) * c + ci];
            }
        }
    }
}

/// (K, C, P) (classifier weight over NCHW features, P pixels) <-> (K, P, C) (channels-last).
fn swap_last_two<T: Real>(w: &[T], k: usize, a: usize, b: usize, out: &mut [T]) {
    for r in 0..k {
        for i in 0..a {
            for j in 0..b {
                out[(r * b + j) * a + i] = w[(r * a + i) * b + j];
            }
        }
    }
}

/// What one block's backward pass needs.
struct BlockCache<T> {
    shape: BlockShape,
    /// im2col of the block input (N*hw, 9C); reused for the input gradient.
    cols: Vec<T>,
    /// Normalised conv output with instance norm, else the conv output (N*hw, O).
    pre: Vec<T>,
    /// 1/std per (image, channel) with instance norm (N*O).
    inv_std: Vec<T>,
    /// Weight in column order (O, 9C).
    weight: Vec<T>,
}

fn tensor_vec<T: Real>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// The activation's slope for negative inputs: 0 for ReLU, the leak for leaky ReLU.
fn negative_slope<T: Real>(activation: Activation) -> T {
    match activation {
        Activation::LeakyRelu => T::from(LEAKY_RELU_SLOPE).expect("slope fits the float type"),
        _ => T::zero(),
    }
}

/// The activation's derivative at `y` (1 above 0, `negative` at or below), as a select that
/// the compiler can vectorise.
#[inline(always)]
fn slope<T: Real>(y: T, negative: T) -> T {
    if y > T::zero() { T::one() } else { negative }
}

/// The forward pass, channels-last, and what the backward pass needs of it.
struct ForwardPass<T> {
    /// One cache per block when asked for, else none.
    blocks: Vec<BlockCache<T>>,
    /// The classifier's input, (N, h*w*c) channels-last.
    features: Vec<T>,
    /// The last block's output size: height, width, channels.
    feature_shape: (usize, usize, usize),
    /// The classifier weight permuted to channels-last features, (K, h*w*c).
    w_fc: Vec<T>,
    /// (N, K).
    logits: Vec<T>,
    n_classes: usize,
}

/// Runs the conv blocks and the classifier on `xs`; `keep` keeps each block's column matrix,
/// pre-activation and 1/std for a backward pass (without it, each block's buffers are freed as
/// soon as the next block has its input).
fn forward_pass<T: Real>(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    keep: bool,
) -> Result<ForwardPass<T>> {
    let (n, c0, h0, w0) = xs.dims4()?;
    let norm = config.norm == Norm::Instance;
    let pool = config.pooling == Pooling::Avg;
    let stride = if norm { 4 } else { 2 };
    let eps = T::from(NORM_EPS).expect("eps fits the float type");
    let negative = negative_slope::<T>(config.activation);

    // Channels-last input.
    let mut a = permute_channels(&tensor_vec::<T>(xs)?, c0, h0 * w0, true);

    // Forward.
    let (mut c, mut h, mut w) = (c0, h0, w0);
    let mut blocks: Vec<BlockCache<T>> = Vec::with_capacity(if keep { config.depth } else { 0 });
    for d in 0..config.depth {
        let p = &params[d * stride..(d + 1) * stride];
        let o = p[0].dim(0)?;
        let s = BlockShape {
            n,
            c,
            h,
            w,
            pad: config.block_padding(d),
            o,
        };
        let (hw, k) = (s.hw(), s.k());
        let weight = weight_to_cols(&tensor_vec::<T>(&p[0])?, o, c);
        let bias: Vec<T> = tensor_vec(&p[1])?;
        let cols = im2col(&a, s);
        let mut z = vec![T::zero(); n * hw * o];
        matmul(
            &mut z,
            MatRef::rows(&cols, n * hw, k),
            MatRef::rows(&weight, o, k).t(),
        );
        let mut inv_std = Vec::new();
        let mut act = vec![T::zero(); z.len()];
        if norm {
            let gamma: Vec<T> = tensor_vec(&p[2])?;
            let beta: Vec<T> = tensor_vec(&p[3])?;
            inv_std = vec![T::zero(); n * o];
            let count = T::from(hw).expect("pixel count fits");
            z.par_chunks_mut(hw * o)
                .zip(inv_std.par_chunks_mut(o))
                .zip(act.par_chunks_mut(hw * o))
                .for_each(|((img, inv), out)| {
                    // Mean and variance per channel over the image's pixels; the bias shifts
                    // the mean only, so it is added before the statistics as in the network.
                    let mut mean = vec![T::zero(); o];
                    for px in img.chunks_mut(o) {
                        for ((v, b), m) in px.iter_mut().zip(&bias).zip(mean.iter_mut()) {
                            *v += *b;
                            *m += *v;
                        }
                    }
                    mean.iter_mut().for_each(|m| *m /= count);
                    let mut var = vec![T::zero(); o];
                    for px in img.chunks(o) {
                        for ((v, m), s2) in px.iter().zip(&mean).zip(var.iter_mut()) {
                            let dv = *v - *m;
                            *s2 += dv * dv;
                        }
                    }
                    for (i, s2) in inv.iter_mut().zip(&var) {
                        *i = (*s2 / count + eps).sqrt().recip();
                    }
                    for (px, out) in img.chunks_mut(o).zip(out.chunks_mut(o)) {
                        let (px, mean, inv, gamma, beta, out) = (
                            &mut px[..o],
                            &mean[..o],
                            &inv[..o],
                            &gamma[..o],
                            &beta[..o],
                            &mut out[..o],
                        );
                        for ch in 0..o {
                            let xhat = (px[ch] - mean[ch]) * inv[ch];
                            px[ch] = xhat;
                            let y = xhat * gamma[ch] + beta[ch];
                            out[ch] = y * slope(y, negative);
                        }
                    }
                });
        } else {
            z.par_chunks_mut(o)
                .zip(act.par_chunks_mut(o))
                .for_each(|(px, out)| {
                    let (px, bias, out) = (&mut px[..o], &bias[..o], &mut out[..o]);
                    for ch in 0..o {
                        px[ch] += bias[ch];
                        out[ch] = px[ch] * slope(px[ch], negative);
                    }
                });
        }
        let (ho, wo) = (s.ho(), s.wo());
        a = if pool {
            (h, w) = (ho / 2, wo / 2);
            pool_forward(&act, n, ho, wo, o)
        } else {
            (h, w) = (ho, wo);
            act
        };
        c = o;
        if keep {
            blocks.push(BlockCache {
                shape: s,
                cols,
                pre: z,
                inv_std,
                weight,
            });
        }
    }

    // Classifier: features are channels-last (N, h*w*c); the weight is permuted to match.
    let n_params = params.len();
    let n_classes = params[n_params - 2].dim(0)?;
    let feat_dim = h * w * c;
    let mut w_fc = vec![T::zero(); n_classes * feat_dim];
    swap_last_two(
        &tensor_vec::<T>(&params[n_params - 2])?,
        n_classes,
        c,
        h * w,
        &mut w_fc,
    );
    let b_fc: Vec<T> = tensor_vec(&params[n_params - 1])?;
    let mut logits = vec![T::zero(); n * n_classes];
    matmul(
        &mut logits,
        MatRef::rows(&a, n, feat_dim),
        MatRef::rows(&w_fc, n_classes, feat_dim).t(),
    );
    for row in logits.chunks_mut(n_classes) {
        row.iter_mut().zip(&b_fc).for_each(|(l, b)| *l += *b);
    }
    Ok(ForwardPass {
        blocks,
        features: a,
        feature_shape: (h, w, c),
        w_fc,
        logits,
        n_classes,
    })
}

fn run<T: Real>(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    labels: &[u32],
    segments: &Segments,
) -> Result<SegmentGradients> {
    let n = xs.dim(0)?;
    let norm = config.norm == Norm::Instance;
    let pool = config.pooling == Pooling::Avg;
    let stride = if norm { 4 } else { 2 };
    let negative = negative_slope::<T>(config.activation);
    let n_params = params.len();
    let ForwardPass {
        mut blocks,
        features: a,
        feature_shape: (h, w, c),
        w_fc,
        logits,
        n_classes,
    } = forward_pass::<T>(config, params, xs, true)?;
    let feat_dim = h * w * c;

    // Cross-entropy per sample and d(segment mean)/d logits.
    let mut sample_segment = Vec::with_capacity(n);
    for (seg, (_, len)) in segments.ranges().enumerate() {
        sample_segment.extend(std::iter::repeat_n((seg, len), len));
    }
    let mut losses = vec![0f64; segments.count()];
    let mut dlogits = vec![T::zero(); n * n_classes];
    for (i, (row, drow)) in logits
        .chunks(n_classes)
        .zip(dlogits.chunks_mut(n_classes))
        .enumerate()
    {
        let max = row.iter().copied().fold(T::neg_infinity(), Float::max);
        let sum: T = row.iter().map(|&l| (l - max).exp()).sum();
        let label = labels[i] as usize;
        let (seg, len) = sample_segment[i];
        let inv_len = T::from(len).expect("length fits").recip();
        losses[seg] += ((sum.ln() + max - row[label]).to_f64()) / len as f64;
        for (j, (d, &l)) in drow.iter_mut().zip(row).enumerate() {
            let p = (l - max).exp() / sum;
            *d = (p - if j == label { T::one() } else { T::zero() }) * inv_len;
        }
    }

    // Backward.
    let s_count = segments.count();
    let ranges: Vec<(usize, usize)> = segments.ranges().collect();
    let mut grads: Vec<Vec<T>> = vec![Vec::new(); n_params];
    {
        let mut g_w = vec![T::zero(); s_count * n_classes * feat_dim];
        let mut tmp = vec![T::zero(); n_classes * feat_dim];
        let mut g_b = vec![T::zero(); s_count * n_classes];
        for (seg, &(start, len)) in ranges.iter().enumerate() {
            matmul(
                &mut tmp,
                MatRef::rows(&dlogits[start * n_classes..], len, n_classes).t(),
                MatRef::rows(&a[start * feat_dim..], len, feat_dim),
            );
            let dst = &mut g_w[seg * n_classes * feat_dim..(seg + 1) * n_classes * feat_dim];
            swap_last_two(&tmp, n_classes, h * w, c, dst);
            for row in dlogits[start * n_classes..(start + len) * n_classes].chunks(n_classes) {
                for (g, v) in g_b[seg * n_classes..].iter_mut().zip(row) {
                    *g += *v;
                }
            }
        }
        grads[n_params - 2] = g_w;
        grads[n_params - 1] = g_b;
    }
    let mut da = vec![T::zero(); n * feat_dim];
    matmul(
        &mut da,
        MatRef::rows(&dlogits, n, n_classes),
        MatRef::rows(&w_fc, n_classes, feat_dim),
    );

    for d in (0..config.depth).rev() {
        let block = blocks.pop().expect("one cache per block");
        let s = block.shape;
        let p = &params[d * stride..(d + 1) * stride];
        let (o, hw, k, ho, wo) = (s.o, s.hw(), s.k(), s.ho(), s.wo());
        // Gradient at the activation output, (N*hw, O).
        let mut dz = if pool {
            pool_backward(&da, n, ho, wo, o)
        } else {
            da
        };
        // Through the activation and the norm: dz becomes the gradient at the conv output.
        let mut per_image_bias = vec![T::zero(); n * o];
        if norm {
            let gamma: Vec<T> = tensor_vec(&p[2])?;
            let beta: Vec<T> = tensor_vec(&p[3])?;
            let mut per_image_gamma = vec![T::zero(); n * o];
            let mut per_image_beta = vec![T::zero(); n * o];
            let count = T::from(hw).expect("pixel count fits");
            dz.par_chunks_mut(hw * o)
                .zip(block.pre.par_chunks(hw * o))
                .zip(block.inv_std.par_chunks(o))
                .zip(per_image_gamma.par_chunks_mut(o))
                .zip(per_image_beta.par_chunks_mut(o))
                .zip(per_image_bias.par_chunks_mut(o))
                .for_each(|(((((g, xhat), inv), dgamma), dbeta), dbias)| {
                    // dy = dact * slope(y); dxhat = dy * gamma; sums per channel.
                    let mut m1 = vec![T::zero(); o];
                    let mut m2 = vec![T::zero(); o];
                    for (gp, xp) in g.chunks_mut(o).zip(xhat.chunks(o)) {
                        let (xp, gamma, beta, gp, dgamma, dbeta, m1, m2) = (
                            &xp[..o],
                            &gamma[..o],
                            &beta[..o],
                            &mut gp[..o],
                            &mut dgamma[..o],
                            &mut dbeta[..o],
                            &mut m1[..o],
                            &mut m2[..o],
                        );
                        for ch in 0..o {
                            let y = xp[ch] * gamma[ch] + beta[ch];
                            let dy = gp[ch] * slope(y, negative);
                            dgamma[ch] += dy * xp[ch];
                            dbeta[ch] += dy;
                            let dxhat = dy * gamma[ch];
                            gp[ch] = dxhat;
                            m1[ch] += dxhat;
                            m2[ch] += dxhat * xp[ch];
                        }
                    }
                    let (m1, m2) = (&mut m1[..o], &mut m2[..o]);
                    for ch in 0..o {
                        m1[ch] /= count;
                        m2[ch] /= count;
                    }
                    for (gp, xp) in g.chunks_mut(o).zip(xhat.chunks(o)) {
                        let (gp, m1, xp, m2, inv, dbias) = (
                            &mut gp[..o],
                            &m1[..o],
                            &xp[..o],
                            &m2[..o],
                            &inv[..o],
                            &mut dbias[..o],
                        );
                        for ch in 0..o {
                            let v = (gp[ch] - m1[ch] - xp[ch] * m2[ch]) * inv[ch];
                            gp[ch] = v;
                            dbias[ch] += v;
                        }
                    }
                });
            grads[d * stride + 2] = segment_sums(&per_image_gamma, &ranges, o);
            grads[d * stride + 3] = segment_sums(&per_image_beta, &ranges, o);
        } else {
            dz.par_chunks_mut(hw * o)
                .zip(block.pre.par_chunks(hw * o))
                .zip(per_image_bias.par_chunks_mut(o))
                .for_each(|((g, z), dbias)| {
                    for (gp, zp) in g.chunks_mut(o).zip(z.chunks(o)) {
                        let (gp, zp, dbias) = (&mut gp[..o], &zp[..o], &mut dbias[..o]);
                        for ch in 0..o {
                            gp[ch] *= slope(zp[ch], negative);
                            dbias[ch] += gp[ch];
                        }
                    }
                });
        }
        drop(block.pre);
        grads[d * stride + 1] = segment_sums(&per_image_bias, &ranges, o);

        // Weight gradient of every segment: dz_s^T cols_s.
        let mut g_w = vec![T::zero(); s_count * o * k];
        let mut tmp = vec![T::zero(); o * k];
        for (seg, &(start, len)) in ranges.iter().enumerate() {
            let (r0, rn) = (start * hw, len * hw);
            matmul(
                &mut tmp,
                MatRef::rows(&dz[r0 * o..(r0 + rn) * o], rn, o).t(),
                MatRef::rows(&block.cols[r0 * k..(r0 + rn) * k], rn, k),
            );
            cols_to_weight(&tmp, o, s.c, &mut g_w[seg * o * k..(seg + 1) * o * k]);
        }
        grads[d * stride] = g_w;

        if d > 0 {
            let mut dcols = block.cols;
            matmul(
                &mut dcols,
                MatRef::rows(&dz, n * hw, o),
                MatRef::rows(&block.weight, o, k),
            );
            da = col2im(&dcols, s);
        } else {
            da = Vec::new();
        }
    }
    drop(da);

    let device = xs.device();
    let grads = grads
        .into_iter()
        .zip(params)
        .map(|(g, p)| {
            let mut shape = vec![s_count];
            shape.extend_from_slice(p.dims());
            Tensor::from_vec(g, shape, device)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(SegmentGradients {
        grads,
        logits: Tensor::from_vec(logits, (n, n_classes), device)?,
        losses,
    })
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
    if directions.len() != params.len() {
        candle_core::bail!(
            "expected {} direction tensors, got {}",
            params.len(),
            directions.len()
        )
    }
    for (v, p) in directions.iter().zip(params) {
        let mut shape = vec![segments.count()];
        shape.extend_from_slice(p.dims());
        if v.dims() != shape.as_slice() {
            candle_core::bail!("direction of shape {:?}, expected {shape:?}", v.dims())
        }
    }
    let dx = match xs.dtype() {
        DType::F32 => Tensor::from_vec(
            second_order::<f32>(config, params, xs, &labels, segments, directions)?,
            xs.dims(),
            xs.device(),
        )?,
        DType::F64 => Tensor::from_vec(
            second_order::<f64>(config, params, xs, &labels, segments, directions)?,
            xs.dims(),
            xs.device(),
        )?,
        dtype => candle_core::bail!("native kernels: unsupported dtype {dtype:?}"),
    };
    Ok(dx)
}

/// (N, H, W, C) <-> (N, C, H, W) for `n` images of `c` channels and `p` pixels: `to_last`
/// picks the direction.
fn permute_channels<T: Real>(src: &[T], c: usize, p: usize, to_last: bool) -> Vec<T> {
    let mut dst = vec![T::zero(); src.len()];
    dst.par_chunks_mut(c * p)
        .zip(src.par_chunks(c * p))
        .for_each(|(d, s)| {
            for ch in 0..c {
                for px in 0..p {
                    if to_last {
                        d[px * c + ch] = s[ch * p + px];
                    } else {
                        d[ch * p + px] = s[px * c + ch];
                    }
                }
            }
        });
    dst
}

/// 2x2 average pooling of a channels-last (N, h, w, o) batch.
fn pool_forward<T: Real>(act: &[T], n: usize, h: usize, w: usize, o: usize) -> Vec<T> {
    let quarter = T::from(0.25).expect("0.25 fits");
    let (ph, pw) = (h / 2, w / 2);
    let mut pooled = vec![T::zero(); n * ph * pw * o];
    pooled
        .par_chunks_mut(ph * pw * o)
        .zip(act.par_chunks(h * w * o))
        .for_each(|(dst, img)| {
            for y in 0..ph {
                for x in 0..pw {
                    let out = &mut dst[(y * pw + x) * o..(y * pw + x + 1) * o];
                    for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                        let src = ((2 * y + dy) * w + 2 * x + dx) * o;
                        for (d, v) in out.iter_mut().zip(&img[src..src + o]) {
                            *d += *v;
                        }
                    }
                    out.iter_mut().for_each(|v| *v *= quarter);
                }
            }
        });
    pooled
}

/// The adjoint of [`pool_forward`].
fn pool_backward<T: Real>(g: &[T], n: usize, h: usize, w: usize, o: usize) -> Vec<T> {
    let quarter = T::from(0.25).expect("0.25 fits");
    let (ph, pw) = (h / 2, w / 2);
    let mut out = vec![T::zero(); n * h * w * o];
    out.par_chunks_mut(h * w * o)
        .zip(g.par_chunks(ph * pw * o))
        .for_each(|(img, g)| {
            for (r, px) in img.chunks_mut(o).enumerate() {
                let (y, x) = (r / w, r % w);
                let src = ((y / 2) * pw + x / 2) * o;
                for (v, gv) in px.iter_mut().zip(&g[src..src + o]) {
                    *v = *gv * quarter;
                }
            }
        });
    out
}

/// Adds `per_segment[seg]` (a row of `width`) to every row of every sample of each segment, where
/// a sample owns `rows` consecutive rows of `dst` (rows x width).
fn add_segment_rows<T: Real>(
    dst: &mut [T],
    per_segment: &[T],
    ranges: &[(usize, usize)],
    rows: usize,
    width: usize,
) {
    for (seg, &(start, len)) in ranges.iter().enumerate() {
        let v = &per_segment[seg * width..(seg + 1) * width];
        for row in dst[start * rows * width..(start + len) * rows * width].chunks_mut(width) {
            row.iter_mut().zip(v).for_each(|(d, x)| *d += *x);
        }
    }
}

/// What one block of [`second_order`] keeps from its forward pass.
struct TangentBlock<T> {
    shape: BlockShape,
    weight: Vec<T>,
    /// Direction of the weight per segment, column order (S, O, 9C).
    weight_dir: Vec<T>,
    /// Direction of gamma per segment (S, O), with instance norm.
    gamma_dir: Vec<T>,
    /// Activation slope at y, and (with instance norm) xhat, its tangent, 1/std and its
    /// tangent per (image, channel).
    slope: Vec<T>,
    xhat: Vec<T>,
    xhat_t: Vec<T>,
    inv: Vec<T>,
    inv_t: Vec<T>,
}

fn second_order<T: Real>(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    labels: &[u32],
    segments: &Segments,
    directions: &[Tensor],
) -> Result<Vec<T>> {
    let (n, c0, h0, w0) = xs.dims4()?;
    let norm = config.norm == Norm::Instance;
    let pool = config.pooling == Pooling::Avg;
    let stride = if norm { 4 } else { 2 };
    let eps = T::from(NORM_EPS).expect("eps fits the float type");
    let negative = negative_slope::<T>(config.activation);
    let ranges: Vec<(usize, usize)> = segments.ranges().collect();
    let s_count = ranges.len();
    let mut seg_of = Vec::with_capacity(n);
    for (seg, &(_, len)) in ranges.iter().enumerate() {
        seg_of.extend(std::iter::repeat_n(seg, len));
    }

    let mut a = permute_channels(&tensor_vec::<T>(xs)?, c0, h0 * w0, true);
    let mut a_t: Option<Vec<T>> = None; // the input has no tangent
    let (mut c, mut h, mut w) = (c0, h0, w0);
    let mut blocks: Vec<TangentBlock<T>> = Vec::with_capacity(config.depth);
    for d in 0..config.depth {
        let p = &params[d * stride..(d + 1) * stride];
        let v = &directions[d * stride..(d + 1) * stride];
        let o = p[0].dim(0)?;
        let s = BlockShape {
            n,
            c,
            h,
            w,
            pad: config.block_padding(d),
            o,
        };
        let (hw, k) = (s.hw(), s.k());
        let weight = weight_to_cols(&tensor_vec::<T>(&p[0])?, o, c);
        let weight_v: Vec<T> = tensor_vec(&v[0])?;
        let mut weight_dir = vec![T::zero(); weight_v.len()];
        for seg in 0..s_count {
            let range = seg * o * k..(seg + 1) * o * k;
            let permuted = weight_to_cols(&weight_v[range.clone()], o, c);
            weight_dir[range].copy_from_slice(&permuted);
        }
        let bias: Vec<T> = tensor_vec(&p[1])?;
        let bias_dir: Vec<T> = tensor_vec(&v[1])?;

        // z = cols W^T + b; z' = cols' W^T + cols V_W^T + V_b (per segment).
        let cols = im2col(&a, s);
        let mut z = vec![T::zero(); n * hw * o];
        matmul(
            &mut z,
            MatRef::rows(&cols, n * hw, k),
            MatRef::rows(&weight, o, k).t(),
        );
        z.par_chunks_mut(o)
            .for_each(|px| px.iter_mut().zip(&bias).for_each(|(v, b)| *v += *b));
        let mut z_t = vec![T::zero(); n * hw * o];
        if let Some(a_t) = &a_t {
            let cols_t = im2col(a_t, s);
            matmul(
                &mut z_t,
                MatRef::rows(&cols_t, n * hw, k),
                MatRef::rows(&weight, o, k).t(),
            );
        }
        for (seg, &(start, len)) in ranges.iter().enumerate() {
            let (r0, rn) = (start * hw, len * hw);
            matmul_add(
                &mut z_t[r0 * o..(r0 + rn) * o],
                MatRef::rows(&cols[r0 * k..(r0 + rn) * k], rn, k),
                MatRef::rows(&weight_dir[seg * o * k..(seg + 1) * o * k], o, k).t(),
            );
        }
        drop(cols);
        add_segment_rows(&mut z_t, &bias_dir, &ranges, hw, o);

        // Norm (with tangents), then the activation.
        let mut block = TangentBlock {
            shape: s,
            weight,
            weight_dir,
            gamma_dir: Vec::new(),
            slope: Vec::new(),
            xhat: Vec::new(),
            xhat_t: Vec::new(),
            inv: Vec::new(),
            inv_t: Vec::new(),
        };
        let (y, y_t) = if norm {
            let gamma: Vec<T> = tensor_vec(&p[2])?;
            let beta: Vec<T> = tensor_vec(&p[3])?;
            let gamma_dir: Vec<T> = tensor_vec(&v[2])?;
            let beta_dir: Vec<T> = tensor_vec(&v[3])?;
            let count = T::from(hw).expect("pixel count fits");
            let mut inv = vec![T::zero(); n * o];
            let mut inv_t = vec![T::zero(); n * o];
            // z becomes xhat and z_t becomes xhat'.
            z.par_chunks_mut(hw * o)
                .zip(z_t.par_chunks_mut(hw * o))
                .zip(inv.par_chunks_mut(o))
                .zip(inv_t.par_chunks_mut(o))
                .for_each(|(((img, img_t), inv), inv_t)| {
                    let mut mean = vec![T::zero(); o];
                    let mut mean_t = vec![T::zero(); o];
                    for (px, px_t) in img.chunks(o).zip(img_t.chunks(o)) {
                        let (mean, px, mean_t, px_t) =
                            (&mut mean[..o], &px[..o], &mut mean_t[..o], &px_t[..o]);
                        for ch in 0..o {
                            mean[ch] += px[ch];
                            mean_t[ch] += px_t[ch];
                        }
                    }
                    mean.iter_mut().for_each(|m| *m /= count);
                    mean_t.iter_mut().for_each(|m| *m /= count);
                    let mut var = vec![T::zero(); o];
                    for px in img.chunks(o) {
                        let (px, mean, var) = (&px[..o], &mean[..o], &mut var[..o]);
                        for ch in 0..o {
                            let dv = px[ch] - mean[ch];
                            var[ch] += dv * dv;
                        }
                    }
                    let (inv, var) = (&mut inv[..o], &var[..o]);
                    for ch in 0..o {
                        inv[ch] = (var[ch] / count + eps).sqrt().recip();
                    }
                    // mean(xhat z') per channel.
                    let mut mxz = vec![T::zero(); o];
                    for (px, px_t) in img.chunks_mut(o).zip(img_t.chunks(o)) {
                        let (px, mean, inv, mxz, px_t) = (
                            &mut px[..o],
                            &mean[..o],
                            &inv[..o],
                            &mut mxz[..o],
                            &px_t[..o],
                        );
                        for ch in 0..o {
                            px[ch] = (px[ch] - mean[ch]) * inv[ch];
                            mxz[ch] += px[ch] * px_t[ch];
                        }
                    }
                    mxz.iter_mut().for_each(|m| *m /= count);
                    let (inv_t, inv, mxz) = (&mut inv_t[..o], &inv[..o], &mxz[..o]);
                    for ch in 0..o {
                        inv_t[ch] = -inv[ch] * inv[ch] * mxz[ch];
                    }
                    for (px, px_t) in img.chunks(o).zip(img_t.chunks_mut(o)) {
                        let (px_t, inv, mean_t, px, mxz) =
                            (&mut px_t[..o], &inv[..o], &mean_t[..o], &px[..o], &mxz[..o]);
                        for ch in 0..o {
                            px_t[ch] = inv[ch] * (px_t[ch] - mean_t[ch] - px[ch] * mxz[ch]);
                        }
                    }
                });
            let mut y = vec![T::zero(); z.len()];
            let mut y_t = vec![T::zero(); z.len()];
            for (i, ((yi, yti), (xi, xti))) in y
                .chunks_mut(hw * o)
                .zip(y_t.chunks_mut(hw * o))
                .zip(z.chunks(hw * o).zip(z_t.chunks(hw * o)))
                .enumerate()
            {
                let seg = seg_of[i];
                let gd = &gamma_dir[seg * o..(seg + 1) * o];
                let bd = &beta_dir[seg * o..(seg + 1) * o];
                for (((yp, ytp), xp), xtp) in yi
                    .chunks_mut(o)
                    .zip(yti.chunks_mut(o))
                    .zip(xi.chunks(o))
                    .zip(xti.chunks(o))
                {
                    let (yp, xp, gamma, beta, ytp, xtp, gd, bd) = (
                        &mut yp[..o],
                        &xp[..o],
                        &gamma[..o],
                        &beta[..o],
                        &mut ytp[..o],
                        &xtp[..o],
                        &gd[..o],
                        &bd[..o],
                    );
                    for ch in 0..o {
                        yp[ch] = xp[ch] * gamma[ch] + beta[ch];
                        ytp[ch] = xtp[ch] * gamma[ch] + xp[ch] * gd[ch] + bd[ch];
                    }
                }
            }
            block.gamma_dir = gamma_dir;
            block.inv = inv;
            block.inv_t = inv_t;
            block.xhat = z;
            block.xhat_t = z_t;
            (y, y_t)
        } else {
            (z, z_t)
        };
        block.slope = y.iter().map(|&v| slope(v, negative)).collect();
        let act: Vec<T> = y.iter().zip(&block.slope).map(|(v, m)| *v * *m).collect();
        let act_t: Vec<T> = y_t.iter().zip(&block.slope).map(|(v, m)| *v * *m).collect();
        let (ho, wo) = (s.ho(), s.wo());
        if pool {
            a = pool_forward(&act, n, ho, wo, o);
            a_t = Some(pool_forward(&act_t, n, ho, wo, o));
            (h, w) = (ho / 2, wo / 2);
        } else {
            a = act;
            a_t = Some(act_t);
            (h, w) = (ho, wo);
        }
        c = o;
        blocks.push(block);
    }
    let a_t = a_t.expect("at least one block");

    // Classifier and softmax, with tangents.
    let n_params = params.len();
    let n_classes = params[n_params - 2].dim(0)?;
    let feat_dim = h * w * c;
    let mut w_fc = vec![T::zero(); n_classes * feat_dim];
    swap_last_two(
        &tensor_vec::<T>(&params[n_params - 2])?,
        n_classes,
        c,
        h * w,
        &mut w_fc,
    );
    let w_fc_v: Vec<T> = tensor_vec(&directions[n_params - 2])?;
    let mut w_fc_dir = vec![T::zero(); w_fc_v.len()];
    for seg in 0..s_count {
        let range = seg * n_classes * feat_dim..(seg + 1) * n_classes * feat_dim;
        swap_last_two(
            &w_fc_v[range.clone()],
            n_classes,
            c,
            h * w,
            &mut w_fc_dir[range],
        );
    }
    let b_fc: Vec<T> = tensor_vec(&params[n_params - 1])?;
    let b_fc_dir: Vec<T> = tensor_vec(&directions[n_params - 1])?;
    let mut logits = vec![T::zero(); n * n_classes];
    matmul(
        &mut logits,
        MatRef::rows(&a, n, feat_dim),
        MatRef::rows(&w_fc, n_classes, feat_dim).t(),
    );
    for row in logits.chunks_mut(n_classes) {
        row.iter_mut().zip(&b_fc).for_each(|(l, b)| *l += *b);
    }
    let mut logits_t = vec![T::zero(); n * n_classes];
    matmul(
        &mut logits_t,
        MatRef::rows(&a_t, n, feat_dim),
        MatRef::rows(&w_fc, n_classes, feat_dim).t(),
    );
    for (seg, &(start, len)) in ranges.iter().enumerate() {
        matmul_add(
            &mut logits_t[start * n_classes..(start + len) * n_classes],
            MatRef::rows(
                &a[start * feat_dim..(start + len) * feat_dim],
                len,
                feat_dim,
            ),
            MatRef::rows(
                &w_fc_dir[seg * n_classes * feat_dim..(seg + 1) * n_classes * feat_dim],
                n_classes,
                feat_dim,
            )
            .t(),
        );
    }
    add_segment_rows(&mut logits_t, &b_fc_dir, &ranges, 1, n_classes);
    let mut dlogits = vec![T::zero(); n * n_classes];
    let mut dlogits_t = vec![T::zero(); n * n_classes];
    for i in 0..n {
        let row = &logits[i * n_classes..(i + 1) * n_classes];
        let row_t = &logits_t[i * n_classes..(i + 1) * n_classes];
        let max = row.iter().copied().fold(T::neg_infinity(), Float::max);
        let sum: T = row.iter().map(|&l| (l - max).exp()).sum();
        let probs: Vec<T> = row.iter().map(|&l| (l - max).exp() / sum).collect();
        let mean_t: T = probs.iter().zip(row_t).map(|(p, l)| *p * *l).sum();
        let inv_len = T::from(ranges[seg_of[i]].1).expect("length fits").recip();
        let label = labels[i] as usize;
        for j in 0..n_classes {
            let onehot = if j == label { T::one() } else { T::zero() };
            dlogits[i * n_classes + j] = (probs[j] - onehot) * inv_len;
            dlogits_t[i * n_classes + j] = probs[j] * (row_t[j] - mean_t) * inv_len;
        }
    }

    // Backward to the input, with tangents.
    let mut da = vec![T::zero(); n * feat_dim];
    matmul(
        &mut da,
        MatRef::rows(&dlogits, n, n_classes),
        MatRef::rows(&w_fc, n_classes, feat_dim),
    );
    let mut da_t = vec![T::zero(); n * feat_dim];
    matmul(
        &mut da_t,
        MatRef::rows(&dlogits_t, n, n_classes),
        MatRef::rows(&w_fc, n_classes, feat_dim),
    );
    for (seg, &(start, len)) in ranges.iter().enumerate() {
        matmul_add(
            &mut da_t[start * feat_dim..(start + len) * feat_dim],
            MatRef::rows(
                &dlogits[start * n_classes..(start + len) * n_classes],
                len,
                n_classes,
            ),
            MatRef::rows(
                &w_fc_dir[seg * n_classes * feat_dim..(seg + 1) * n_classes * feat_dim],
                n_classes,
                feat_dim,
            ),
        );
    }
    for d in (0..config.depth).rev() {
        let b = blocks.pop().expect("one cache per block");
        let s = b.shape;
        let p = &params[d * stride..(d + 1) * stride];
        let (o, hw, k, ho, wo) = (s.o, s.hw(), s.k(), s.ho(), s.wo());
        let (mut dz, mut dz_t) = if pool {
            (
                pool_backward(&da, n, ho, wo, o),
                pool_backward(&da_t, n, ho, wo, o),
            )
        } else {
            (da, da_t)
        };
        for ((g, g_t), m) in dz.iter_mut().zip(dz_t.iter_mut()).zip(&b.slope) {
            *g *= *m;
            *g_t *= *m;
        }
        if norm {
            let gamma: Vec<T> = tensor_vec(&p[2])?;
            let count = T::from(hw).expect("pixel count fits");
            dz.par_chunks_mut(hw * o)
                .zip(dz_t.par_chunks_mut(hw * o))
                .zip(b.xhat.par_chunks(hw * o))
                .zip(b.xhat_t.par_chunks(hw * o))
                .zip(b.inv.par_chunks(o))
                .zip(b.inv_t.par_chunks(o))
                .enumerate()
                .for_each(|(i, (((((g, g_t), xh), xh_t), inv), inv_t))| {
                    let seg = seg_of[i];
                    let gd = &b.gamma_dir[seg * o..(seg + 1) * o];
                    let (mut m1, mut m2) = (vec![T::zero(); o], vec![T::zero(); o]);
                    let (mut m1_t, mut m2_t) = (vec![T::zero(); o], vec![T::zero(); o]);
                    for (((gp, gtp), xp), xtp) in g
                        .chunks_mut(o)
                        .zip(g_t.chunks_mut(o))
                        .zip(xh.chunks(o))
                        .zip(xh_t.chunks(o))
                    {
                        let (gp, gamma, gtp, gd, m1, m2, xp, m1_t, m2_t, xtp) = (
                            &mut gp[..o],
                            &gamma[..o],
                            &mut gtp[..o],
                            &gd[..o],
                            &mut m1[..o],
                            &mut m2[..o],
                            &xp[..o],
                            &mut m1_t[..o],
                            &mut m2_t[..o],
                            &xtp[..o],
                        );
                        for ch in 0..o {
                            // dxhat = dy gamma; dxhat' = dy' gamma + dy V_gamma.
                            let dx = gp[ch] * gamma[ch];
                            let dx_t = gtp[ch] * gamma[ch] + gp[ch] * gd[ch];
                            gp[ch] = dx;
                            gtp[ch] = dx_t;
                            m1[ch] += dx;
                            m2[ch] += dx * xp[ch];
                            m1_t[ch] += dx_t;
                            m2_t[ch] += dx_t * xp[ch] + dx * xtp[ch];
                        }
                    }
                    for v in [&mut m1, &mut m2, &mut m1_t, &mut m2_t] {
                        v.iter_mut().for_each(|m| *m /= count);
                    }
                    for (((gp, gtp), xp), xtp) in g
                        .chunks_mut(o)
                        .zip(g_t.chunks_mut(o))
                        .zip(xh.chunks(o))
                        .zip(xh_t.chunks(o))
                    {
                        let (gp, m1, xp, m2, gtp, m1_t, xtp, m2_t, inv, inv_t) = (
                            &mut gp[..o],
                            &m1[..o],
                            &xp[..o],
                            &m2[..o],
                            &mut gtp[..o],
                            &m1_t[..o],
                            &xtp[..o],
                            &m2_t[..o],
                            &inv[..o],
                            &inv_t[..o],
                        );
                        for ch in 0..o {
                            let u = gp[ch] - m1[ch] - xp[ch] * m2[ch];
                            let u_t = gtp[ch] - m1_t[ch] - xtp[ch] * m2[ch] - xp[ch] * m2_t[ch];
                            gp[ch] = inv[ch] * u;
                            gtp[ch] = inv_t[ch] * u + inv[ch] * u_t;
                        }
                    }
                });
        }
        // dcols' = dz' W + dz V_W (per segment); da' = col2im(dcols').
        let mut dcols_t = vec![T::zero(); n * hw * k];
        matmul(
            &mut dcols_t,
            MatRef::rows(&dz_t, n * hw, o),
            MatRef::rows(&b.weight, o, k),
        );
        for (seg, &(start, len)) in ranges.iter().enumerate() {
            let (r0, rn) = (start * hw, len * hw);
            matmul_add(
                &mut dcols_t[r0 * k..(r0 + rn) * k],
                MatRef::rows(&dz[r0 * o..(r0 + rn) * o], rn, o),
                MatRef::rows(&b.weight_dir[seg * o * k..(seg + 1) * o * k], o, k),
            );
        }
        da_t = col2im(&dcols_t, s);
        drop(dcols_t);
        if d > 0 {
            let mut dcols = vec![T::zero(); n * hw * k];
            matmul(
                &mut dcols,
                MatRef::rows(&dz, n * hw, o),
                MatRef::rows(&b.weight, o, k),
            );
            da = col2im(&dcols, s);
        } else {
            da = Vec::new();
        }
    }
    drop(da);
    Ok(permute_channels(&da_t, c0, h0 * w0, false))
}

/// Sums rows of a per-image (N, width) matrix over every segment's images: (S, width).
fn segment_sums<T: Real>(per_image: &[T], ranges: &[(usize, usize)], width: usize) -> Vec<T> {
    let mut out = vec![T::zero(); ranges.len() * width];
    for (seg, &(start, len)) in ranges.iter().enumerate() {
        let dst = &mut out[seg * width..(seg + 1) * width];
        for row in per_image[start * width..(start + len) * width].chunks(width) {
            dst.iter_mut().zip(row).for_each(|(d, v)| *d += *v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grads::{self, ConvPath};
    use crate::{ModelConfig, Network};
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
        let xs = Tensor::rand(0f32, 1., (n, config.in_channels, s, s), &Device::Cpu)
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
        assert!(!supports(var.as_tensor(), &params));
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
