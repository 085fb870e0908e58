//! The native CPU backend's per-pixel loops (`backend/cpu`): instance norm + affine +
//! activation forward and backward over channels-last images, the activation alone (norm
//! `none`), and 2x2 average pooling. Loops over channels first re-slice every operand to the
//! channel count (`&x[..o]`), which lets the compiler drop the bounds checks and vectorise them.

use rayon::prelude::*;

use super::Real;
use crate::config::{Activation, LEAKY_RELU_SLOPE};

/// The activation's slope for negative inputs: 0 for ReLU, the leak for leaky ReLU.
pub(super) fn negative_slope<T: Real>(activation: Activation) -> T {
    match activation {
        Activation::LeakyRelu => T::from(LEAKY_RELU_SLOPE).expect("slope fits the float type"),
        _ => T::zero(),
    }
}

/// The activation's derivative at `y` (1 above 0, `negative` at or below), as a select that
/// the compiler can vectorise.
#[inline(always)]
pub(super) fn slope<T: Real>(y: T, negative: T) -> T {
    if y > T::zero() { T::one() } else { negative }
}

/// 2x2 average pooling of a channels-last (N, h, w, o) batch.
pub(super) fn pool_forward<T: Real>(act: &[T], n: usize, h: usize, w: usize, o: usize) -> Vec<T> {
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
pub(super) fn pool_backward<T: Real>(g: &[T], n: usize, h: usize, w: usize, o: usize) -> Vec<T> {
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

/// Instance norm + affine + activation of the conv outputs `z` (N*hw, O), channels-last: adds
/// the conv bias, then per image and channel normalises (`z` becomes xhat, `inv_std` (N*O) gets
/// 1/std) and writes the activation of `xhat * gamma + beta` to `act`.
pub(super) fn instance_norm_act_forward<T: Real>(
    z: &mut [T],
    inv_std: &mut [T],
    act: &mut [T],
    (bias, gamma, beta): (&[T], &[T], &[T]),
    (hw, o): (usize, usize),
    eps: T,
    negative: T,
) {
    let count = T::from(hw).expect("pixel count fits");
    z.par_chunks_mut(hw * o)
        .zip(inv_std.par_chunks_mut(o))
        .zip(act.par_chunks_mut(hw * o))
        .for_each(|((img, inv), out)| {
            // Mean and variance per channel over the image's pixels; the bias shifts
            // the mean only, so it is added before the statistics as in the network.
            let mut mean = vec![T::zero(); o];
            for px in img.chunks_mut(o) {
                for ((v, b), m) in px.iter_mut().zip(bias).zip(mean.iter_mut()) {
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
}

/// Without norm: adds the conv bias to `z` (N*hw, O) and writes its activation to `act`.
pub(super) fn bias_act_forward<T: Real>(
    z: &mut [T],
    act: &mut [T],
    bias: &[T],
    o: usize,
    negative: T,
) {
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

/// The backward of [`instance_norm_act_forward`]: `dz` (N*hw, O) arrives as the gradient at the
/// activation and leaves as the gradient at the conv output; per image and channel, the
/// gradients of gamma, beta and the conv bias are written to `per_image` (each N*O).
pub(super) fn instance_norm_act_backward<T: Real>(
    dz: &mut [T],
    (xhat, inv_std): (&[T], &[T]),
    (gamma, beta): (&[T], &[T]),
    per_image: (&mut [T], &mut [T], &mut [T]),
    (hw, o): (usize, usize),
    negative: T,
) {
    let (per_image_gamma, per_image_beta, per_image_bias) = per_image;
    let count = T::from(hw).expect("pixel count fits");
    dz.par_chunks_mut(hw * o)
        .zip(xhat.par_chunks(hw * o))
        .zip(inv_std.par_chunks(o))
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
}

/// The backward of [`bias_act_forward`]: `dz` (N*hw, O) becomes the gradient at the conv output
/// (`z` is the conv output plus bias); the conv bias's gradient per image goes to
/// `per_image_bias` (N*O).
pub(super) fn bias_act_backward<T: Real>(
    dz: &mut [T],
    z: &[T],
    per_image_bias: &mut [T],
    (hw, o): (usize, usize),
    negative: T,
) {
    dz.par_chunks_mut(hw * o)
        .zip(z.par_chunks(hw * o))
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
