//! The native CPU backend's backward pass (`backend/cpu`): cross-entropy per segment, then the
//! per-segment parameter gradients block by block, channels-last, from [`super::forward`]'s
//! caches.

use candle_core::{Result, Tensor};
use num_traits::Float;

use super::forward::{ForwardPass, forward_pass};
use super::gemm::{MatRef, matmul};
use super::im2col::{col2im, cols_to_weight, swap_last_two};
use super::norm::{bias_act_backward, instance_norm_act_backward, negative_slope, pool_backward};
use super::{Real, tensor_vec};
use crate::ConvNetConfig;
use crate::backend::{SegmentGradients, Segments};
use crate::convnet::{ConvNetLayout, ConvNetParams};

/// The forward and backward passes of a batch `xs` with `labels`: every segment's parameter
/// gradients, the logits and the losses.
pub(super) fn segment_gradients<T: Real>(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    labels: &[u32],
    segments: &Segments,
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
        let block = blocks.pop().expect("one cache per block");
        let at = b.params;
        let s = block.shape;
        let (o, hw, k, ho, wo) = (s.o, s.hw(), s.k(), s.ho(), s.wo());
        // Gradient at the activation output, (N*hw, O).
        let mut dz = if b.has_pool {
            pool_backward(&da, n, ho, wo, o)
        } else {
            da
        };
        // Through the activation and the norm: dz becomes the gradient at the conv output.
        let mut per_image_bias = vec![T::zero(); n * o];
        if let (Some((scale, shift)), Some((scale_at, shift_at))) = (p.norm, at.norm) {
            let gamma: Vec<T> = tensor_vec(scale)?;
            let beta: Vec<T> = tensor_vec(shift)?;
            let mut per_image_gamma = vec![T::zero(); n * o];
            let mut per_image_beta = vec![T::zero(); n * o];
            instance_norm_act_backward(
                &mut dz,
                (&block.pre, &block.inv_std),
                (&gamma, &beta),
                (
                    &mut per_image_gamma,
                    &mut per_image_beta,
                    &mut per_image_bias,
                ),
                (hw, o),
                negative,
            );
            grads[scale_at] = segment_sums(&per_image_gamma, &ranges, o);
            grads[shift_at] = segment_sums(&per_image_beta, &ranges, o);
        } else {
            bias_act_backward(&mut dz, &block.pre, &mut per_image_bias, (hw, o), negative);
        }
        drop(block.pre);
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

        if b.index > 0 {
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
