//! The candle-op backend, under [`crate::backend`]: the ConvNet's parameter gradients as an
//! explicit backward pass written in differentiable candle ops, segment by segment, on any
//! device.
//!
//! Gradient matching needs d D(g_syn, g_real) / d x_syn, where g_syn = d CE / d theta: a gradient
//! of a gradient. candle's `Tensor::backward` detaches what it returns (unless an environment
//! variable is set before the process starts) and some of its backward passes are wrong at second
//! order, so the engine does not differentiate twice. Instead [`segment_gradients`] computes
//! d CE / d theta with ordinary tensor ops (conv input gradient = `col2im(dz W)`, weight gradient
//! = `dz^T im2col(x)`, instance-norm backward by formula, pooling backward by broadcast), which
//! candle records like any forward computation; one `backward()` on the matching loss then gives
//! the exact second-order derivative ([`CandleOps`]'s
//! [`Backend::gradient_of_gradients`] does exactly that). The same code, on untracked tensors,
//! gives the real-side gradients and the inner-loop training step at no graph cost where the
//! native and fused backends do not apply.
//!
//! Supported: what [`crate::convnet::unsupported_reason`] accepts. Two implementations of the
//! conv parts: im2col + matrix products ([`ConvPath::Im2col`], with the custom ops of
//! [`super::cuda`]: the CPU, and CUDA in a `cuda` build), and candle's `conv2d` on every device
//! ([`ConvPath::Candle`]); tests check them against each other and against candle's autograd.

use super::im2col::{col2im, im2col_conv};
use super::{Backend, ConvPath, SegmentGradients, Segments};
use crate::config::LEAKY_RELU_SLOPE;
use crate::convnet::{ConvNetLayout, ConvNetParams, conv_output_side, unsupported_reason};
use crate::layers::NORM_EPS;
use crate::ops::{self, flip};
use crate::{Activation, ConvNetConfig, Pooling};
use candle_core::{DType, IndexOp, Result, Tensor, Var};

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

impl Forward {
    /// The features entering the classifier, (N, feature_dim), NCHW-flattened.
    pub fn features(&self) -> &Tensor {
        &self.features
    }
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
    if let Some(reason) = unsupported_reason(config) {
        candle_core::bail!("{reason}")
    }
    let layout = ConvNetLayout::new(config);
    let net = ConvNetParams::new(&layout, params)?;
    let mut blocks = Vec::with_capacity(layout.blocks.len());
    let mut a = xs.clone();
    for (b, p) in layout.blocks.iter().zip(&net.blocks) {
        let pad = b.padding;
        let (n, _, h, w) = a.dims4()?;
        let o = b.out_channels;
        let (ho, wo) = (conv_output_side(h, pad), conv_output_side(w, pad));
        let hw = ho * wo;
        let (z, cols) = match path {
            ConvPath::Im2col => {
                let (z, cols) = im2col_conv(&a, p.conv_weight, pad)?;
                (z, Some(cols))
            }
            ConvPath::Candle => (
                a.conv2d(p.conv_weight, pad, 1, 1, 1)?.reshape((n, o, hw))?,
                None,
            ),
        };
        let z = (z + channels(p.conv_bias, n, hw)?)?;
        let (y, norm) = match p.norm {
            Some((scale, shift)) => {
                let mean = z.mean_keepdim(2)?;
                let centred = z.broadcast_sub(&mean)?;
                let inv_std = (centred.sqr()?.mean_keepdim(2)? + NORM_EPS)?
                    .sqrt()?
                    .recip()?;
                let xhat = centred.broadcast_mul(&inv_std)?;
                let y = ((&xhat * channels(scale, n, hw)?)? + channels(shift, n, hw)?)?;
                (y, Some((xhat, inv_std)))
            }
            None => (z, None),
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
    let logits = features
        .matmul(&net.classifier_weight.t()?)?
        .broadcast_add(net.classifier_bias)?;
    Ok(Forward {
        blocks,
        features,
        logits,
    })
}

/// Mean cross-entropy of each segment, as (S).
pub fn segment_losses(fwd: &Forward, labels: &Tensor, segments: &Segments) -> Result<Tensor> {
    segments.losses_of_logits(&fwd.logits, labels)
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
    let layout = ConvNetLayout::new(config);
    let net = ConvNetParams::new(&layout, params)?;
    let indicator = segments.indicator(fwd.logits.dtype(), fwd.logits.device())?;
    let segment_sum = |per_sample: &Tensor| indicator.matmul(per_sample);
    let dlogits = segments.logits_gradient(&fwd.logits, labels)?;

    let mut grads: Vec<Option<Tensor>> = vec![None; layout.n_params()];
    grads[layout.classifier_weight] = Some(segments.outer(&dlogits, &fwd.features, 1)?);
    grads[layout.classifier_bias] = Some(segment_sum(&dlogits)?);

    let mut da = dlogits.matmul(net.classifier_weight)?; // (N, D), reshaped below
    for ((b, p), block) in layout.blocks.iter().zip(&net.blocks).zip(&fwd.blocks).rev() {
        let at = b.params;
        let (_, c, h, w) = block.input.dims4()?;
        let o = b.out_channels;
        let (ho, wo) = block.out_hw;
        let hw = ho * wo;
        let dact = match config.pooling {
            Pooling::Avg => avg_pool_backward(&da.reshape((n, o, ho / 2, wo / 2))?)?,
            _ => da.reshape((n, o, ho, wo))?,
        };
        let dy = (dact.reshape((n, o, hw))? * &block.mask)?;
        let dz = match (&block.norm, p.norm, at.norm) {
            (Some((xhat, inv_std)), Some((scale, _)), Some((scale_at, shift_at))) => {
                grads[scale_at] = Some(segment_sum(&(&dy * xhat)?.sum(2)?)?);
                grads[shift_at] = Some(segment_sum(&dy.sum(2)?)?);
                let dxhat = (&dy * channels(scale, n, hw)?)?;
                let m1 = dxhat.mean_keepdim(2)?;
                let m2 = (&dxhat * xhat)?.mean_keepdim(2)?;
                dxhat
                    .broadcast_sub(&m1)?
                    .sub(&xhat.broadcast_mul(&m2)?)?
                    .broadcast_mul(inv_std)?
            }
            _ => dy,
        };
        grads[at.conv_bias] = Some(segment_sum(&dz.sum(2)?)?);
        let pad = b.padding;
        let need_input_grad = b.index > 0;
        match path {
            ConvPath::Im2col => {
                let Some(cols) = block.cols.as_ref() else {
                    candle_core::bail!("the forward pass ran on the other conv path")
                };
                let dz_rows = dz.transpose(1, 2)?.contiguous()?.reshape((n * hw, o))?;
                grads[at.conv_weight] = Some(segments.outer(&dz_rows, cols, hw)?.reshape((
                    segments.count(),
                    o,
                    c,
                    3,
                    3,
                ))?);
                if need_input_grad {
                    let dcols = dz_rows.matmul(&p.conv_weight.reshape((o, c * 9))?)?;
                    da = col2im(&dcols, (n, c, h, w), 3, pad)?;
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
                grads[at.conv_weight] = Some(Tensor::stack(&per_segment, 0)?);
                if need_input_grad {
                    if pad > 2 {
                        candle_core::bail!("input gradient with padding {pad} > 2 not needed")
                    }
                    let flipped = flip(&flip(p.conv_weight, 2)?, 3)?
                        .transpose(0, 1)?
                        .contiguous()?;
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

/// The candle-op backend with conv path `path`: its passes are differentiable with respect to
/// tracked inputs (they detach nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CandleOps {
    pub path: ConvPath,
}

impl Backend for CandleOps {
    fn segment_gradients(
        &self,
        config: &ConvNetConfig,
        params: &[Tensor],
        xs: &Tensor,
        labels: &Tensor,
        segments: &Segments,
    ) -> Result<SegmentGradients> {
        let fwd = forward(config, params, xs, self.path)?;
        let losses = segment_losses(&fwd, labels, segments)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let grads = segment_gradients(config, params, &fwd, labels, segments, self.path)?;
        Ok(SegmentGradients {
            grads,
            logits: fwd.logits,
            losses,
        })
    }

    fn logits(&self, config: &ConvNetConfig, params: &[Tensor], xs: &Tensor) -> Result<Tensor> {
        Ok(forward(config, params, xs, self.path)?.logits)
    }

    fn embeddings(&self, config: &ConvNetConfig, params: &[Tensor], xs: &Tensor) -> Result<Tensor> {
        Ok(forward(config, params, xs, self.path)?.features)
    }

    /// By candle's autograd: a tracked forward pass on a variable holding `xs`, the sum of the
    /// features' products with the directions, one `backward()`.
    fn embedding_input_gradient(
        &self,
        config: &ConvNetConfig,
        params: &[Tensor],
        xs: &Tensor,
        directions: &Tensor,
    ) -> Result<Tensor> {
        let x = Var::from_tensor(&xs.detach())?;
        let fwd = forward(config, params, x.as_tensor(), self.path)?;
        let total = (&fwd.features * directions.detach())?.sum_all()?;
        let grads = total.backward()?;
        match grads.get(x.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => x.as_tensor().zeros_like(),
        }
    }

    /// By candle's autograd: a tracked forward pass and [`segment_gradients`] on a variable
    /// holding `xs`, the sum of their products with the directions, one `backward()`.
    fn gradient_of_gradients(
        &self,
        config: &ConvNetConfig,
        params: &[Tensor],
        xs: &Tensor,
        labels: &Tensor,
        segments: &Segments,
        directions: &[Tensor],
    ) -> Result<Tensor> {
        let layout = ConvNetLayout::new(config);
        ConvNetParams::with_leading(&layout, directions, &[segments.count()])?;
        let x = Var::from_tensor(&xs.detach())?;
        let fwd = forward(config, params, x.as_tensor(), self.path)?;
        let g = segment_gradients(config, params, &fwd, labels, segments, self.path)?;
        let mut total: Option<Tensor> = None;
        for (g, v) in g.iter().zip(directions) {
            let term = (g * v)?.sum_all()?;
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        let Some(total) = total else {
            candle_core::bail!("a ConvNet has parameters")
        };
        match total.backward()?.get(x.as_tensor()) {
            Some(dx) => Ok(dx.clone()),
            None => x.as_tensor().zeros_like(),
        }
    }
}
