//! The CUDA backend, under [`crate::backend`]: the fused instance-norm block ops (one kernel
//! forward and one backward per ConvNet block for instance norm + affine + activation + pooling)
//! and the fused untracked passes built on them and on the im2col ops of [`super::im2col`]
//! ([`Fused`]). Its gradient of gradients goes through the candle-op passes with the im2col path
//! (via [`Route`]).
//!
//! With the `cuda` feature the kernels of `cuda/kernels.cu` run on CUDA tensors, launched by
//! `cuda/launch.rs` (also the CUDA half of the im2col ops); see [`HAS_CUDA_KERNELS`].

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, IndexOp, Layout, Result, Shape, Tensor,
};

use super::im2col::{col2im, im2col_conv};
use super::{Backend, ConvPath, Route, SegmentGradients, Segments};
use crate::ConvNetConfig;
use crate::config::{Activation, LEAKY_RELU_SLOPE, Norm, Pooling};
use crate::convnet::{ConvNetLayout, ConvNetParams, conv_output_side, unsupported_reason};
use crate::layers::NORM_EPS;

#[cfg(feature = "cuda")]
pub(super) mod launch;

/// Whether this build has the CUDA kernels (the `cuda` feature): the fused block ops and the
/// CUDA halves of the im2col ops.
pub const HAS_CUDA_KERNELS: bool = cfg!(feature = "cuda");

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

    /// Through the candle-op passes with the im2col path (its CUDA kernels), by autograd: no
    /// fused backward to the input yet.
    fn embedding_input_gradient(
        &self,
        config: &ConvNetConfig,
        params: &[Tensor],
        xs: &Tensor,
        directions: &Tensor,
    ) -> Result<Tensor> {
        Route::candle_ops(ConvPath::Im2col)
            .backend()
            .embedding_input_gradient(config, params, xs, directions)
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
