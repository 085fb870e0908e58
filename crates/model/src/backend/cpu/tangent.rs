//! The native CPU backend's second-order pass (`backend/cpu`): the gradient of the per-segment
//! parameter gradients contracted with directions, forward-over-reverse with tangents.

use candle_core::{Result, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use super::gemm::{MatRef, matmul, matmul_add};
use super::im2col::{BlockShape, col2im, im2col, permute_channels, swap_last_two, weight_to_cols};
use super::norm::{negative_slope, pool_backward, pool_forward, slope};
use super::{Real, tensor_vec};
use crate::ConvNetConfig;
use crate::backend::Segments;
use crate::convnet::{ConvNetLayout, ConvNetParams};
use crate::layers::NORM_EPS;

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

/// `d/dx sum_s <V_s, g_s(x)>` for the checked inputs of [`super::gradient_of_gradients`].
pub(super) fn second_order<T: Real>(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    labels: &[u32],
    segments: &Segments,
    directions: &[Tensor],
) -> Result<Vec<T>> {
    let layout = ConvNetLayout::new(config);
    let net = ConvNetParams::new(&layout, params)?;
    let dirs = ConvNetParams::split(&layout, directions)?;
    let (n, c0, h0, w0) = xs.dims4()?;
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
    let mut blocks: Vec<TangentBlock<T>> = Vec::with_capacity(layout.blocks.len());
    for ((bl, p), v) in layout.blocks.iter().zip(&net.blocks).zip(&dirs.blocks) {
        let s = BlockShape::new(n, bl);
        let (o, c) = (s.o, s.c);
        let (hw, k) = (s.hw(), s.k());
        let weight = weight_to_cols(&tensor_vec::<T>(p.conv_weight)?, o, c);
        let weight_v: Vec<T> = tensor_vec(v.conv_weight)?;
        let mut weight_dir = vec![T::zero(); weight_v.len()];
        for seg in 0..s_count {
            let range = seg * o * k..(seg + 1) * o * k;
            let permuted = weight_to_cols(&weight_v[range.clone()], o, c);
            weight_dir[range].copy_from_slice(&permuted);
        }
        let bias: Vec<T> = tensor_vec(p.conv_bias)?;
        let bias_dir: Vec<T> = tensor_vec(v.conv_bias)?;

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
        let (y, y_t) = if let (Some((scale, shift)), Some((scale_v, shift_v))) = (p.norm, v.norm) {
            let gamma: Vec<T> = tensor_vec(scale)?;
            let beta: Vec<T> = tensor_vec(shift)?;
            let gamma_dir: Vec<T> = tensor_vec(scale_v)?;
            let beta_dir: Vec<T> = tensor_vec(shift_v)?;
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
        if bl.has_pool {
            a = pool_forward(&act, n, ho, wo, o);
            a_t = Some(pool_forward(&act_t, n, ho, wo, o));
        } else {
            a = act;
            a_t = Some(act_t);
        }
        blocks.push(block);
    }
    let a_t = a_t.expect("at least one block");

    // Classifier and softmax, with tangents.
    let (h, w, c) = (
        layout.feature_side,
        layout.feature_side,
        layout.feature_channels,
    );
    let n_classes = layout.n_classes;
    let feat_dim = h * w * c;
    let mut w_fc = vec![T::zero(); n_classes * feat_dim];
    swap_last_two(
        &tensor_vec::<T>(net.classifier_weight)?,
        n_classes,
        c,
        h * w,
        &mut w_fc,
    );
    let w_fc_v: Vec<T> = tensor_vec(dirs.classifier_weight)?;
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
    let b_fc: Vec<T> = tensor_vec(net.classifier_bias)?;
    let b_fc_dir: Vec<T> = tensor_vec(dirs.classifier_bias)?;
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
    for (bl, p) in layout.blocks.iter().zip(&net.blocks).rev() {
        let b = blocks.pop().expect("one cache per block");
        let s = b.shape;
        let (o, hw, k, ho, wo) = (s.o, s.hw(), s.k(), s.ho(), s.wo());
        let (mut dz, mut dz_t) = if bl.has_pool {
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
        if let Some((scale, _)) = p.norm {
            let gamma: Vec<T> = tensor_vec(scale)?;
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
        if bl.index > 0 {
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
