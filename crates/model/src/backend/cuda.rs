//! The CUDA backend, under [`crate::backend`]: convolution as `im2col` + matrix product with
//! `im2col` and `col2im` as candle custom ops that are each other's derivative (CPU and CUDA
//! halves), the fused instance-norm block ops, and the fused untracked passes built on them
//! ([`Fused`]).
//!
//! candle 0.11's CPU conv backward goes through `conv_transpose2d`, a direct loop several times
//! slower than the forward. Here a stride-1 convolution is `im2col(x) @ W^T`: the forward and
//! both gradients are matrix products (candle's `gemm`), plus one `im2col` or `col2im`. Because
//! the two custom ops are each other's backward, gradients of gradients stay inside the same
//! fast building blocks; the candle-op backend's im2col path ([`super::candle_ops`]) is made of
//! them, on the CPU as on CUDA.
//!
//! Layout: `im2col` maps an (N, C, H, W) input to an (N * Ho * Wo, C * k * k) matrix whose row
//! `(n, oy, ox)` holds the `k x k` window of every channel around output pixel `(oy, ox)`, in
//! `(c, ky, kx)` order — the order of a PyTorch weight `(O, C, k, k)` reshaped to `(O, C*k*k)`.
//! Zero padding `pad` on every side; `Ho = H + 2 pad - k + 1`. This is the one im2col of candle
//! tensors (NCHW); the native CPU backend keeps its own over channels-last slices
//! (`backend/cpu/im2col.rs`), a different layout that needs no transposes between blocks.
//!
//! With the `cuda` feature the two ops also run on CUDA tensors (gather kernels in
//! `cuda/kernels.cu`, launched by `cuda/launch.rs`, see [`HAS_CUDA_KERNELS`]).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, IndexOp, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::{Backend, ConvPath, Route, SegmentGradients, Segments};
use crate::ConvNetConfig;
use crate::config::{Activation, LEAKY_RELU_SLOPE, Norm, Pooling};
use crate::convnet::{ConvNetLayout, ConvNetParams, conv_output_side, unsupported_reason};
use crate::layers::NORM_EPS;

#[cfg(feature = "cuda")]
mod launch;

/// Whether `im2col` and `col2im` run on CUDA tensors in this build (the `cuda` feature).
pub const HAS_CUDA_KERNELS: bool = cfg!(feature = "cuda");

/// Geometry of a stride-1 square-kernel convolution on one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    pad: usize,
}

impl Geometry {
    fn out_h(&self) -> usize {
        self.h + 2 * self.pad + 1 - self.k
    }

    fn out_w(&self) -> usize {
        self.w + 2 * self.pad + 1 - self.k
    }

    /// Rows of one image's column matrix.
    fn rows(&self) -> usize {
        self.out_h() * self.out_w()
    }

    /// Columns of the column matrix.
    fn cols(&self) -> usize {
        self.c * self.k * self.k
    }

    fn image_len(&self) -> usize {
        self.c * self.h * self.w
    }

    fn cols_shape(&self) -> Shape {
        Shape::from((self.n * self.rows(), self.cols()))
    }

    fn image_shape(&self) -> Shape {
        Shape::from((self.n, self.c, self.h, self.w))
    }

    /// Calls `f(col_index, input_index)` for every in-bounds (column, input pixel) pair of
    /// output pixel `(oy, ox)`; out-of-bounds (padding) columns are skipped.
    #[inline]
    fn for_window(&self, oy: usize, ox: usize, mut f: impl FnMut(usize, usize)) {
        let (k, pad) = (self.k, self.pad);
        for c in 0..self.c {
            for ky in 0..k {
                let iy = oy + ky;
                if iy < pad || iy - pad >= self.h {
                    continue;
                }
                let row_base = c * self.h * self.w + (iy - pad) * self.w;
                for kx in 0..k {
                    let ix = ox + kx;
                    if ix < pad || ix - pad >= self.w {
                        continue;
                    }
                    f((c * k + ky) * k + kx, row_base + ix - pad);
                }
            }
        }
    }
}

fn im2col_slice<T: Copy + Default + Send + Sync>(src: &[T], g: Geometry) -> Vec<T> {
    let (rows, cols, ow) = (g.rows(), g.cols(), g.out_w());
    let mut dst = vec![T::default(); g.n * rows * cols];
    dst.par_chunks_mut(rows * cols)
        .zip(src.par_chunks(g.image_len()))
        .for_each(|(dst, img)| {
            for (r, row) in dst.chunks_mut(cols).enumerate() {
                g.for_window(r / ow, r % ow, |col, i| row[col] = img[i]);
            }
        });
    dst
}

fn col2im_slice<T>(src: &[T], g: Geometry) -> Vec<T>
where
    T: Copy + Default + Send + Sync + std::ops::AddAssign,
{
    let (rows, cols, ow) = (g.rows(), g.cols(), g.out_w());
    let mut dst = vec![T::default(); g.n * g.image_len()];
    dst.par_chunks_mut(g.image_len())
        .zip(src.par_chunks(rows * cols))
        .for_each(|(img, src)| {
            for (r, row) in src.chunks(cols).enumerate() {
                g.for_window(r / ow, r % ow, |col, i| img[i] += row[col]);
            }
        });
    dst
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &'static str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// (N, C, H, W) -> (N * Ho * Wo, C * k * k).
#[derive(Debug, Clone, Copy)]
struct Im2Col(Geometry);

/// (N * Ho * Wo, C * k * k) -> (N, C, H, W), summing overlapping windows: the adjoint of
/// [`Im2Col`].
#[derive(Debug, Clone, Copy)]
struct Col2Im(Geometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "debiasdd-im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        if layout.shape() != &g.image_shape() {
            candle_core::bail!(
                "im2col: got {:?}, expected {:?}",
                layout.shape(),
                g.image_shape()
            );
        }
        let out = match storage {
            CpuStorage::F32(d) => {
                CpuStorage::F32(im2col_slice(contiguous(d, layout, "im2col")?, g))
            }
            CpuStorage::F64(d) => {
                CpuStorage::F64(im2col_slice(contiguous(d, layout, "im2col")?, g))
            }
            _ => candle_core::bail!("im2col: only f32 and f64 are supported"),
        };
        Ok((out, g.cols_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = self.0;
        if layout.shape() != &g.image_shape() {
            candle_core::bail!(
                "im2col: got {:?}, expected {:?}",
                layout.shape(),
                g.image_shape()
            );
        }
        Ok((
            launch::run(storage, layout, g, launch::Kind::Im2col)?,
            g.cols_shape(),
        ))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "debiasdd-col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        if layout.shape() != &g.cols_shape() {
            candle_core::bail!(
                "col2im: got {:?}, expected {:?}",
                layout.shape(),
                g.cols_shape()
            );
        }
        let out = match storage {
            CpuStorage::F32(d) => {
                CpuStorage::F32(col2im_slice(contiguous(d, layout, "col2im")?, g))
            }
            CpuStorage::F64(d) => {
                CpuStorage::F64(col2im_slice(contiguous(d, layout, "col2im")?, g))
            }
            _ => candle_core::bail!("col2im: only f32 and f64 are supported"),
        };
        Ok((out, g.image_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = self.0;
        if layout.shape() != &g.cols_shape() {
            candle_core::bail!(
                "col2im: got {:?}, expected {:?}",
                layout.shape(),
                g.cols_shape()
            );
        }
        Ok((
            launch::run(storage, layout, g, launch::Kind::Col2im)?,
            g.image_shape(),
        ))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

/// One ConvNet block's instance norm + affine + ReLU / leaky ReLU (+ 2x2 average pooling), fused
/// into one CUDA kernel forward and one backward, for tensors that no gradient flows back into
/// (the real-image gradients and the inner-loop training). CUDA builds only: see
/// [`norm_act_forward`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormAct {
    /// Channels O of the block.
    pub channels: usize,
    /// Feature-map height and width before pooling.
    pub h: usize,
    pub w: usize,
    /// 2x2 average pooling after the activation (H and W even).
    pub pool: bool,
    /// Slope of the activation below zero (0 for ReLU).
    pub slope: f64,
    /// The norm's epsilon.
    pub eps: f64,
}

impl NormAct {
    fn rows(&self, z: &Tensor) -> Result<usize> {
        let (n, o, hw) = z.dims3()?;
        if o != self.channels
            || hw != self.h * self.w
            || (self.pool && (self.h % 2 + self.w % 2) != 0)
        {
            candle_core::bail!("fused norm: got {:?} for {self:?}", z.shape())
        }
        Ok(n * o)
    }

    fn out_hw(&self) -> usize {
        if self.pool {
            self.h * self.w / 4
        } else {
            self.h * self.w
        }
    }
}

/// The forward kernel as a candle op (the `usize` is N * O); its output is the packed buffer.
#[derive(Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct NormActFwd(NormAct, usize);

/// The backward kernel as a candle op (the `usize` is N * O).
#[derive(Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct NormActBwd(NormAct, usize);

impl CustomOp2 for NormActFwd {
    fn name(&self) -> &'static str {
        "debiasdd-norm-act-fwd"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused norm kernels run on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        z: &candle_core::CudaStorage,
        zl: &Layout,
        prm: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, rows) = (self.0, self.1);
        let len = rows * (n.h * n.w + 1 + n.out_hw());
        Ok((
            launch::norm_act_fwd((z, zl), (prm, pl), n, rows, len)?,
            Shape::from(len),
        ))
    }
}

impl CustomOp3 for NormActBwd {
    fn name(&self) -> &'static str {
        "debiasdd-norm-act-bwd"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused norm kernels run on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        da: &candle_core::CudaStorage,
        dal: &Layout,
        fwd: &candle_core::CudaStorage,
        fl: &Layout,
        prm: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, rows) = (self.0, self.1);
        let len = rows * (n.h * n.w + 3);
        Ok((
            launch::norm_act_bwd((da, dal), (fwd, fl), (prm, pl), n, rows, len)?,
            Shape::from(len),
        ))
    }
}

/// The fused forward of `z` (N, O, H*W), the conv output without its bias, with `prm` (3, O) =
/// conv bias, norm weight, norm bias. Returns `(packed, activation)`: `packed` is what
/// [`norm_act_backward`] needs (xhat and 1/std), `activation` is (N, O, H', W') (pooled or not).
pub fn norm_act_forward(z: &Tensor, prm: &Tensor, n: NormAct) -> Result<(Tensor, Tensor)> {
    let rows = n.rows(z)?;
    let batch = rows / n.channels;
    let packed = z
        .contiguous()?
        .apply_op2_no_bwd(&prm.contiguous()?, &NormActFwd(n, rows))?;
    let skip = rows * (n.h * n.w + 1);
    let (h, w) = if n.pool {
        (n.h / 2, n.w / 2)
    } else {
        (n.h, n.w)
    };
    let act = packed
        .narrow(0, skip, rows * n.out_hw())?
        .reshape((batch, n.channels, h, w))?;
    Ok((packed, act))
}

/// The fused backward: from `da`, the gradient of [`norm_act_forward`]'s activation, returns `dz`
/// (N, O, H*W), the gradient of its `z` (and of the conv bias per pixel), and the per-sample
/// gradients of the three parameters, (3, N, O): norm weight, norm bias, conv bias.
pub fn norm_act_backward(
    da: &Tensor,
    packed: &Tensor,
    prm: &Tensor,
    n: NormAct,
) -> Result<(Tensor, Tensor)> {
    let batch = da.dim(0)?;
    let rows = batch * n.channels;
    if da.elem_count() != rows * n.out_hw() {
        candle_core::bail!("fused norm backward: got {:?} for {n:?}", da.shape())
    }
    let out =
        da.contiguous()?
            .apply_op3_no_bwd(packed, &prm.contiguous()?, &NormActBwd(n, rows))?;
    let hw = n.h * n.w;
    let dz = out
        .narrow(0, 0, rows * hw)?
        .reshape((batch, n.channels, hw))?;
    let sums = out
        .narrow(0, rows * hw, 3 * rows)?
        .reshape((3, batch, n.channels))?;
    Ok((dz, sums))
}

fn geometry(xs: &Tensor, k: usize, pad: usize) -> Result<Geometry> {
    let (n, c, h, w) = xs.dims4()?;
    if h + 2 * pad < k || w + 2 * pad < k {
        candle_core::bail!("conv: a {k}x{k} kernel does not fit a {h}x{w} input padded by {pad}");
    }
    Ok(Geometry { n, c, h, w, k, pad })
}

/// The column matrix of `xs` (N, C, H, W) for a `k x k` window with zero padding `pad`.
pub fn im2col(xs: &Tensor, k: usize, pad: usize) -> Result<Tensor> {
    let g = geometry(xs, k, pad)?;
    xs.contiguous()?.apply_op1(Im2Col(g))
}

/// The adjoint of [`im2col`]: folds an (N * Ho * Wo, C * k * k) matrix back to (N, C, H, W).
pub fn col2im(
    cols: &Tensor,
    (n, c, h, w): (usize, usize, usize, usize),
    k: usize,
    pad: usize,
) -> Result<Tensor> {
    let g = Geometry { n, c, h, w, k, pad };
    cols.contiguous()?.apply_op1(Col2Im(g))
}

/// A 3x3 stride-1 convolution without bias as `im2col(a) @ W^T`: the output as (N, O, Ho*Wo) and
/// the column matrix (N*Ho*Wo, C*9) that the weight gradient needs.
pub fn im2col_conv(a: &Tensor, weight: &Tensor, pad: usize) -> Result<(Tensor, Tensor)> {
    let (n, c, h, w) = a.dims4()?;
    let o = weight.dim(0)?;
    let hw = conv_output_side(h, pad) * conv_output_side(w, pad);
    let cols = im2col(a, 3, pad)?;
    let z = cols
        .matmul(&weight.reshape((o, c * 9))?.t()?)?
        .reshape((n, hw, o))?
        .transpose(1, 2)?
        .contiguous()?;
    Ok((z, cols))
}

/// What the fused backward pass keeps of one block.
struct FusedBlock {
    input_dims: (usize, usize, usize, usize),
    cols: Tensor,
    packed: Tensor,
    prm: Tensor,
    norm: NormAct,
    pad: usize,
}

/// The fused forward pass: what the backward pass needs, the features and the logits.
struct FusedForward {
    blocks: Vec<FusedBlock>,
    features: Tensor,
    logits: Tensor,
}

/// The forward pass on CUDA: the im2col path's convolutions around one fused kernel per block for
/// instance norm + affine + activation (+ pooling) ([`norm_act_forward`]).
fn fused_forward(config: &ConvNetConfig, params: &[Tensor], xs: &Tensor) -> Result<FusedForward> {
    if let Some(reason) = unsupported_reason(config) {
        candle_core::bail!("{reason}")
    }
    if config.norm != Norm::Instance {
        candle_core::bail!(
            "the fused CUDA passes need instance norm, got `{}`; use `Route::candle_ops`",
            config.norm
        )
    }
    let layout = ConvNetLayout::new(config);
    let net = ConvNetParams::new(&layout, params)?;
    let slope = match config.activation {
        Activation::LeakyRelu => LEAKY_RELU_SLOPE,
        _ => 0.0,
    };
    let mut blocks = Vec::with_capacity(layout.blocks.len());
    let mut a = xs.clone();
    for (b, p) in layout.blocks.iter().zip(&net.blocks) {
        let Some((scale, shift)) = p.norm else {
            candle_core::bail!("the fused CUDA passes need instance norm")
        };
        let pad = b.padding;
        let (n, c, h, w) = a.dims4()?;
        let o = b.out_channels;
        let (ho, wo) = (conv_output_side(h, pad), conv_output_side(w, pad));
        let (z, cols) = im2col_conv(&a, p.conv_weight, pad)?;
        let prm = Tensor::stack(&[p.conv_bias, scale, shift], 0)?;
        let norm = NormAct {
            channels: o,
            h: ho,
            w: wo,
            pool: config.pooling == Pooling::Avg,
            slope,
            eps: NORM_EPS,
        };
        let (packed, act) = norm_act_forward(&z, &prm, norm)?;
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
    let logits = features
        .matmul(&net.classifier_weight.t()?)?
        .broadcast_add(net.classifier_bias)?;
    Ok(FusedForward {
        blocks,
        features,
        logits,
    })
}

/// The untracked segment gradients on CUDA: the fused forward pass, then the im2col path's
/// convolutions (matrix products, col2im) around one fused backward kernel per block
/// ([`norm_act_backward`]), in place of the dozen element-wise candle ops each of those takes.
/// Same results as [`super::candle_ops::segment_gradients`] up to float rounding; the GPU check
/// (`xtask/gpu/check.sh`) compares them.
pub fn fused_segment_gradients(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    labels: &Tensor,
    segments: &Segments,
) -> Result<SegmentGradients> {
    let n = xs.dim(0)?;
    if segments.total() != n {
        candle_core::bail!("segments cover {} samples, batch has {n}", segments.total())
    }
    let layout = ConvNetLayout::new(config);
    let net = ConvNetParams::new(&layout, params)?;
    let FusedForward {
        blocks,
        features,
        logits,
    } = fused_forward(config, params, xs)?;
    let losses = segments
        .losses_of_logits(&logits, labels)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;

    let indicator = segments.indicator(logits.dtype(), logits.device())?;
    let segment_sum = |per_sample: &Tensor| indicator.matmul(per_sample);
    let dlogits = segments.logits_gradient(&logits, labels)?;
    let mut grads: Vec<Option<Tensor>> = vec![None; layout.n_params()];
    grads[layout.classifier_weight] = Some(segments.outer(&dlogits, &features, 1)?);
    grads[layout.classifier_bias] = Some(segment_sum(&dlogits)?);
    let mut da = dlogits.matmul(net.classifier_weight)?;
    for ((b, p), block) in layout.blocks.iter().zip(&net.blocks).zip(&blocks).rev() {
        let at = b.params;
        let Some((scale_at, shift_at)) = at.norm else {
            candle_core::bail!("the fused CUDA passes need instance norm")
        };
        let (n, c, h, w) = block.input_dims;
        let o = block.norm.channels;
        let hw = block.norm.h * block.norm.w;
        let (dz, sums) = norm_act_backward(&da, &block.packed, &block.prm, block.norm)?;
        grads[scale_at] = Some(segment_sum(&sums.i(0)?)?);
        grads[shift_at] = Some(segment_sum(&sums.i(1)?)?);
        grads[at.conv_bias] = Some(segment_sum(&sums.i(2)?)?);
        let dz_rows = dz.transpose(1, 2)?.contiguous()?.reshape((n * hw, o))?;
        grads[at.conv_weight] = Some(segments.outer(&dz_rows, &block.cols, hw)?.reshape((
            segments.count(),
            o,
            c,
            3,
            3,
        ))?);
        if b.index > 0 {
            let dcols = dz_rows.matmul(&p.conv_weight.reshape((o, c * 9))?)?;
            da = col2im(&dcols, (n, c, h, w), 3, block.pad)?;
        }
    }
    let grads = grads
        .into_iter()
        .map(|g| g.ok_or_else(|| candle_core::Error::Msg("gradient not computed".into())))
        .collect::<Result<Vec<_>>>()?;
    Ok(SegmentGradients {
        grads,
        logits,
        losses,
    })
}

/// The fused CUDA backend (a `cuda` build, instance norm): untracked passes only, its inputs
/// detached; its gradient of gradients runs the candle-op passes with the im2col path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fused;

impl Backend for Fused {
    fn segment_gradients(
        &self,
        config: &ConvNetConfig,
        params: &[Tensor],
        xs: &Tensor,
        labels: &Tensor,
        segments: &Segments,
    ) -> Result<SegmentGradients> {
        let params: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
        fused_segment_gradients(config, &params, &xs.detach(), labels, segments)
    }

    fn logits(&self, config: &ConvNetConfig, params: &[Tensor], xs: &Tensor) -> Result<Tensor> {
        let params: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
        Ok(fused_forward(config, &params, &xs.detach())?.logits)
    }

    fn embeddings(&self, config: &ConvNetConfig, params: &[Tensor], xs: &Tensor) -> Result<Tensor> {
        let params: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
        Ok(fused_forward(config, &params, &xs.detach())?.features)
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
        Route::candle_ops(ConvPath::Im2col)
            .backend()
            .gradient_of_gradients(config, params, xs, labels, segments, directions)
    }
}
#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic pseudo-random values without a global RNG.
        let n: usize = shape.iter().product();
        let values: Vec<f64> = (0..n)
            .map(|i| {
                let x = (i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
                (x as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
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

    /// Stride-1 convolution of `xs` (N, C, H, W) with `weight` (O, C, k, k) by the two ops.
    fn conv2d(xs: &Tensor, weight: &Tensor, pad: usize) -> Result<Tensor> {
        let (o, c, k, _) = weight.dims4()?;
        let g = geometry(xs, k, pad)?;
        let cols = xs.contiguous()?.apply_op1(Im2Col(g))?;
        let out = cols.matmul(&weight.reshape((o, c * k * k))?.t()?)?;
        out.reshape((g.n, g.rows(), o))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((g.n, o, g.out_h(), g.out_w()))
    }

    #[test]
    fn conv_matches_candle_conv_forward_and_gradients() -> Result<()> {
        for (c, o, h, w, k, pad) in [
            (3, 4, 7, 6, 3, 1),
            (2, 3, 5, 5, 3, 3),
            (1, 2, 6, 4, 5, 2),
            (2, 2, 4, 4, 1, 0),
        ] {
            let x = Var::from_tensor(&rand(&[2, c, h, w], 1))?;
            let wt = Var::from_tensor(&rand(&[o, c, k, k], 2))?;
            let probe = rand(&[2, o, h + 2 * pad + 1 - k, w + 2 * pad + 1 - k], 3);
            let ours = conv2d(&x, &wt, pad)?;
            let theirs = x.conv2d(&wt, pad, 1, 1, 1)?;
            assert!(
                max_abs_diff(&ours, &theirs) < 1e-12,
                "forward {c} {o} {h} {w} {k} {pad}"
            );
            let g_ours = (ours * &probe)?.sum_all()?.backward()?;
            let g_theirs = (theirs * &probe)?.sum_all()?.backward()?;
            for v in [&x, &wt] {
                let d = max_abs_diff(g_ours.get(v).unwrap(), g_theirs.get(v).unwrap());
                assert!(d < 1e-12, "gradient differs by {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn col2im_is_the_adjoint_of_im2col() -> Result<()> {
        // <im2col(x), y> == <x, col2im(y)> for all x, y.
        let (n, c, h, w, k, pad) = (2, 3, 5, 4, 3, 1);
        let x = rand(&[n, c, h, w], 5);
        let y = rand(&[n * h * w, c * k * k], 6);
        let lhs = (im2col(&x, k, pad)? * &y)?.sum_all()?.to_scalar::<f64>()?;
        let rhs = (&x * col2im(&y, (n, c, h, w), k, pad)?)?
            .sum_all()?
            .to_scalar::<f64>()?;
        assert!((lhs - rhs).abs() < 1e-10, "{lhs} vs {rhs}");
        Ok(())
    }

    #[test]
    fn im2col_hand_checked() -> Result<()> {
        // One 1-channel 2x2 image, 3x3 window, padding 1: output pixel (0, 0) sees
        // [0 0 0; 0 a b; 0 c d].
        let x = Tensor::new(&[[[[1f64, 2.], [3., 4.]]]], &Device::Cpu)?;
        let cols = im2col(&x, 3, 1)?;
        assert_eq!(cols.dims(), &[4, 9]);
        let first: Vec<f64> = cols.get(0)?.to_vec1()?;
        assert_eq!(first, vec![0., 0., 0., 0., 1., 2., 0., 3., 4.]);
        let last: Vec<f64> = cols.get(3)?.to_vec1()?;
        assert_eq!(last, vec![1., 2., 0., 3., 4., 0., 0., 0., 0.]);
        Ok(())
    }
}
