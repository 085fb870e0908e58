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
    let (n, c, h, w) = xs.dims4()?;
    if c != config.in_channels || h != config.image_size || w != config.image_size {
        candle_core::bail!(
            "input ({c}, {h}, {w}) does not match the network's ({}, {s}, {s})",
            config.in_channels,
            s = config.image_size
        )
    }
    if segments.total() != n {
        candle_core::bail!("segments cover {} samples, batch has {n}", segments.total())
    }
    let labels: Vec<u32> = labels.to_dtype(DType::U32)?.to_vec1()?;
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= config.n_classes) {
        candle_core::bail!("label {bad} out of range for {} classes", config.n_classes)
    }
    match xs.dtype() {
        DType::F32 => run::<f32>(config, params, xs, &labels, segments),
        DType::F64 => run::<f64>(config, params, xs, &labels, segments),
        dtype => candle_core::bail!("native kernels: unsupported dtype {dtype:?}"),
    }
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
#[allow(unsafe_code)]
fn matmul<T: Real>(dst: &mut [T], lhs: MatRef<'_, T>, rhs: MatRef<'_, T>) {
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
        dst.fill(T::zero());
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
    // Strides fit in isize because they index allocated slices. `read_dst = false`, so dst's
    // previous contents are never read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            T::zero(),
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

fn run<T: Real>(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    labels: &[u32],
    segments: &Segments,
) -> Result<SegmentGradients> {
    let (n, c0, h0, w0) = xs.dims4()?;
    let norm = config.norm == Norm::Instance;
    let pool = config.pooling == Pooling::Avg;
    let stride = if norm { 4 } else { 2 };
    let eps = T::from(NORM_EPS).expect("eps fits the float type");
    let quarter = T::from(0.25).expect("0.25 fits");
    let negative = negative_slope::<T>(config.activation);

    // Channels-last input.
    let nchw: Vec<T> = tensor_vec(xs)?;
    let mut a = vec![T::zero(); nchw.len()];
    a.par_chunks_mut(c0 * h0 * w0)
        .zip(nchw.par_chunks(c0 * h0 * w0))
        .for_each(|(dst, src)| {
            for ch in 0..c0 {
                for p in 0..h0 * w0 {
                    dst[p * c0 + ch] = src[ch * h0 * w0 + p];
                }
            }
        });
    drop(nchw);

    // Forward.
    let (mut c, mut h, mut w) = (c0, h0, w0);
    let mut blocks: Vec<BlockCache<T>> = Vec::with_capacity(config.depth);
    for d in 0..config.depth {
        let p = &params[d * stride..(d + 1) * stride];
        let o = p[0].dim(0)?;
        let s = BlockShape {
            n,
            c,
            h,
            w,
            pad: if d == 0 { config.first_padding() } else { 1 },
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
                    for ch in 0..o {
                        px[ch] += bias[ch];
                        out[ch] = px[ch] * slope(px[ch], negative);
                    }
                });
        }
        let (ho, wo) = (s.ho(), s.wo());
        a = if pool {
            let (ph, pw) = (ho / 2, wo / 2);
            let mut pooled = vec![T::zero(); n * ph * pw * o];
            pooled
                .par_chunks_mut(ph * pw * o)
                .zip(act.par_chunks(hw * o))
                .for_each(|(dst, img)| {
                    for y in 0..ph {
                        for x in 0..pw {
                            let out = &mut dst[(y * pw + x) * o..(y * pw + x + 1) * o];
                            for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                                let src = ((2 * y + dy) * wo + 2 * x + dx) * o;
                                for (d, v) in out.iter_mut().zip(&img[src..src + o]) {
                                    *d += *v;
                                }
                            }
                            out.iter_mut().for_each(|v| *v *= quarter);
                        }
                    }
                });
            (h, w) = (ph, pw);
            pooled
        } else {
            (h, w) = (ho, wo);
            act
        };
        c = o;
        blocks.push(BlockCache {
            shape: s,
            cols,
            pre: z,
            inv_std,
            weight,
        });
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
            let (ph, pw) = (ho / 2, wo / 2);
            let mut out = vec![T::zero(); n * hw * o];
            out.par_chunks_mut(hw * o)
                .zip(da.par_chunks(ph * pw * o))
                .for_each(|(img, g)| {
                    for (r, px) in img.chunks_mut(o).enumerate() {
                        let (y, x) = (r / wo, r % wo);
                        let src = ((y / 2) * pw + x / 2) * o;
                        for (v, gv) in px.iter_mut().zip(&g[src..src + o]) {
                            *v = *gv * quarter;
                        }
                    }
                });
            out
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
                    for ch in 0..o {
                        m1[ch] /= count;
                        m2[ch] /= count;
                    }
                    for (gp, xp) in g.chunks_mut(o).zip(xhat.chunks(o)) {
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

    fn network(config: &ConvNetConfig, dtype: DType, seed: u64) -> Vec<Tensor> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let net = Network::new(
            &ModelConfig::ConvNet(config.clone()),
            &mut rng,
            &Device::Cpu,
            dtype,
        )
        .unwrap();
        net.vars().iter().map(|v| v.as_detached_tensor()).collect()
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

    /// Native gradients, logits and losses against the candle-op implementation, in f64, for
    /// every supported norm, activation and pooling and uneven segments.
    #[test]
    fn matches_the_candle_backward_in_f64() {
        let base = ConvNetConfig {
            width: 6,
            depth: 2,
            image_size: 12,
            ..ConvNetConfig::default()
        };
        let variants = [
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
                ..base.clone()
            },
        ];
        for (v, config) in variants.iter().enumerate() {
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
    }
}
