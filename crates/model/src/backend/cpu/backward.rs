//! The native CPU backend's backward pass (`backend/cpu`): cross-entropy per segment, then the
//! per-segment parameter gradients block by block, channels-last, from [`super::forward`]'s
//! caches.

use candle_core::{Result, Tensor};
use num_traits::Float;

use super::forward::{BlockCache, ForwardPass, forward_pass};
use super::gemm::{MatRef, matmul};
use super::im2col::{col2im, cols_to_weight, permute_channels, swap_last_two};
use super::norm::{bias_act_backward, instance_norm_act_backward, negative_slope, pool_backward};
use super::{Real, tensor_vec};
use crate::ConvNetConfig;
use crate::backend::{SampleLoss, SegmentGradients, Segments};
use crate::convnet::{BlockParams, ConvNetLayout, ConvNetParams};

/// The forward and backward passes of a batch `xs` with `labels`: every segment's parameter
/// gradients, the logits and the losses.
pub(super) fn segment_gradients<T: Real>(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    labels: &[u32],
    segments: &Segments,
    loss: SampleLoss,
) -> Result<SegmentGradients> {
    let n = xs.dim(0)?;
    let layout = ConvNetLayout::new(config);
    let net = ConvNetParams::new(&layout, params)?;
    let negative = negative_slope::<T>(config.activation);
    let n_params = layout.n_params();
    let ForwardPass {
        mut blocks,
        features: a,
        feature_shape: (h, w, c),
        w_fc,
        logits,
        n_classes,
    } = forward_pass::<T>(config, params, xs, true)?;
    let feat_dim = h * w * c;

    // The loss per sample and d(segment mean)/d logits: cross-entropy, or GCE = w * CE with
    // w = q * p_y^q = q * exp(-q * CE) held constant.
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
        let ce = sum.ln() + max - row[label];
        let weight = match loss {
            SampleLoss::CrossEntropy => T::one(),
            SampleLoss::GeneralizedCrossEntropy { q } => {
                let q = T::from(q).expect("q fits");
                q * (-q * ce).exp()
            }
        };
        let scale = weight * T::from(len).expect("length fits").recip();
        losses[seg] += (weight * ce).to_f64() / len as f64;
        for (j, (d, &l)) in drow.iter_mut().zip(row).enumerate() {
            let p = (l - max).exp() / sum;
            *d = (p - if j == label { T::one() } else { T::zero() }) * scale;
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
        grads[layout.classifier_weight] = g_w;
        grads[layout.classifier_bias] = g_b;
    }
    let mut da = vec![T::zero(); n * feat_dim];
    matmul(
        &mut da,
        MatRef::rows(&dlogits, n, n_classes),
        MatRef::rows(&w_fc, n_classes, feat_dim),
    );

    for (b, p) in layout.blocks.iter().zip(&net.blocks).rev() {
        let mut block = blocks.pop().expect("one cache per block");
        let at = b.params;
        let s = block.shape;
        let (o, k, hw) = (s.o, s.k(), s.hw());
        let (dz, per_image) = conv_output_gradient(da, b.has_pool, &block, p, n, negative)?;
        block.pre = Vec::new();
        if let (Some((gamma, beta)), Some((scale_at, shift_at))) = (per_image.norm, at.norm) {
            grads[scale_at] = segment_sums(&gamma, &ranges, o);
            grads[shift_at] = segment_sums(&beta, &ranges, o);
        }
        let per_image_bias = per_image.bias;
        grads[at.conv_bias] = segment_sums(&per_image_bias, &ranges, o);

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
        grads[at.conv_weight] = g_w;

        da = if b.index > 0 {
            input_gradient(&dz, block)
        } else {
            Vec::new()
        };
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
pub(super) fn segment_sums<T: Real>(
    per_image: &[T],
    ranges: &[(usize, usize)],
    width: usize,
) -> Vec<T> {
    let mut out = vec![T::zero(); ranges.len() * width];
    for (seg, &(start, len)) in ranges.iter().enumerate() {
        let dst = &mut out[seg * width..(seg + 1) * width];
        for row in per_image[start * width..(start + len) * width].chunks(width) {
            dst.iter_mut().zip(row).for_each(|(d, v)| *d += *v);
        }
    }
    out
}

/// The gradients of one block's per-image norm and bias parameters (for segment sums).
struct PerImage<T> {
    /// d gamma and d beta per (image, channel), with instance norm.
    norm: Option<(Vec<T>, Vec<T>)>,
    /// d conv bias per (image, channel).
    bias: Vec<T>,
}

/// The gradient at a block's conv output (N*hw, O) from the gradient `da` at its output (after
/// pooling, if any), through the pooling, the activation and the norm; with the per-image
/// parameter gradients on the way.
fn conv_output_gradient<T: Real>(
    da: Vec<T>,
    has_pool: bool,
    block: &BlockCache<T>,
    p: &BlockParams<'_, Tensor>,
    n: usize,
    negative: T,
) -> Result<(Vec<T>, PerImage<T>)> {
    let s = block.shape;
    let (o, hw) = (s.o, s.hw());
    let mut dz = if has_pool {
        pool_backward(&da, n, s.ho(), s.wo(), o)
    } else {
        da
    };
    let mut bias = vec![T::zero(); n * o];
    let norm = if let Some((scale, shift)) = p.norm {
        let gamma: Vec<T> = tensor_vec(scale)?;
        let beta: Vec<T> = tensor_vec(shift)?;
        let mut d_gamma = vec![T::zero(); n * o];
        let mut d_beta = vec![T::zero(); n * o];
        instance_norm_act_backward(
            &mut dz,
            (&block.pre, &block.inv_std),
            (&gamma, &beta),
            (&mut d_gamma, &mut d_beta, &mut bias),
            (hw, o),
            negative,
        );
        Some((d_gamma, d_beta))
    } else {
        bias_act_backward(&mut dz, &block.pre, &mut bias, (hw, o), negative);
        None
    };
    Ok((dz, PerImage { norm, bias }))
}

/// The gradient at a block's input (channels-last) from the gradient `dz` at its conv output;
/// the block's column buffer is reused.
fn input_gradient<T: Real>(dz: &[T], block: BlockCache<T>) -> Vec<T> {
    let s = block.shape;
    let mut dcols = block.cols;
    let rows = dz.len() / s.o;
    matmul(
        &mut dcols,
        MatRef::rows(dz, rows, s.o),
        MatRef::rows(&block.weight, s.o, s.k()),
    );
    col2im(&dcols, s)
}

/// `d/dx sum_i <V_i, phi(x_i)>` for the embeddings `phi` (the features entering the
/// classifier) of the batch `xs`, with `directions` `V` (N, feature_dim) in NCHW-flatten order:
/// the forward pass with its caches, then the backward pass from the features to the input,
/// without any parameter gradient. Returns (N, C, H, W) values, NCHW.
pub(super) fn embedding_input_gradient<T: Real>(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    directions: &Tensor,
) -> Result<Vec<T>> {
    let (n, c0, h0, w0) = xs.dims4()?;
    let layout = ConvNetLayout::new(config);
    let net = ConvNetParams::new(&layout, params)?;
    let negative = negative_slope::<T>(config.activation);
    let ForwardPass {
        mut blocks,
        feature_shape: (h, w, c),
        ..
    } = forward_pass::<T>(config, params, xs, true)?;
    if directions.dims() != [n, h * w * c] {
        candle_core::bail!(
            "embedding directions: expected ({n}, {}), got {:?}",
            h * w * c,
            directions.dims()
        )
    }
    let mut da = permute_channels(&tensor_vec::<T>(directions)?, c, h * w, true);
    for (b, p) in layout.blocks.iter().zip(&net.blocks).rev() {
        let block = blocks.pop().expect("one cache per block");
        let (dz, _) = conv_output_gradient(da, b.has_pool, &block, p, n, negative)?;
        da = input_gradient(&dz, block);
    }
    Ok(permute_channels(&da, c0, h0 * w0, false))
}
