//! The native CPU backend's layout helpers (`backend/cpu`): its channels-last im2col / col2im
//! and the permutations of weights and images between PyTorch's layout and its own.
//!
//! This im2col is not the one of [`crate::backend::cuda`] (the candle custom op): that one maps
//! NCHW candle tensors to `(c, ky, kx)` columns so that PyTorch's weights multiply them as they
//! are; this one maps channels-last slices to `(ky, kx, c)` columns, so that each window copies
//! whole channel runs and activations never need a transpose between blocks.

use rayon::prelude::*;

use super::Real;
use crate::convnet::BlockLayout;

/// One convolution block's geometry.
#[derive(Debug, Clone, Copy)]
pub(super) struct BlockShape {
    pub n: usize,
    /// Input channels, height, width.
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub pad: usize,
    /// Output channels.
    pub o: usize,
}

impl BlockShape {
    /// Block `b` of the layout on a batch of `n` images.
    pub(super) fn new(n: usize, b: &BlockLayout) -> Self {
        Self {
            n,
            c: b.in_channels,
            h: b.input_side,
            w: b.input_side,
            pad: b.padding,
            o: b.out_channels,
        }
    }
    pub(super) fn ho(&self) -> usize {
        self.h + 2 * self.pad - 2
    }
    pub(super) fn wo(&self) -> usize {
        self.w + 2 * self.pad - 2
    }
    /// Output pixels of one image.
    pub(super) fn hw(&self) -> usize {
        self.ho() * self.wo()
    }
    /// Columns of the column matrix: a 3x3 window of every input channel.
    pub(super) fn k(&self) -> usize {
        9 * self.c
    }
}

/// Channels-last im2col: row (n, oy, ox) holds the 3x3 window around output pixel (oy, ox) in
/// (ky, kx, c) order, zeros outside the image.
pub(super) fn im2col<T: Real>(x: &[T], s: BlockShape) -> Vec<T> {
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
pub(super) fn col2im<T: Real>(cols: &[T], s: BlockShape) -> Vec<T> {
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
pub(super) fn weight_to_cols<T: Real>(w: &[T], o: usize, c: usize) -> Vec<T> {
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
pub(super) fn cols_to_weight<T: Real>(w: &[T], o: usize, c: usize, out: &mut [T]) {
    for oc in 0..o {
        for ci in 0..c {
            for p in 0..9 {
                out[(oc * c + ci) * 9 + p] = w[(oc * 9 + p) * c + ci];
            }
        }
    }
}

/// (K, C, P) (classifier weight over NCHW features, P pixels) <-> (K, P, C) (channels-last).
pub(super) fn swap_last_two<T: Real>(w: &[T], k: usize, a: usize, b: usize, out: &mut [T]) {
    for r in 0..k {
        for i in 0..a {
            for j in 0..b {
                out[(r * b + j) * a + i] = w[(r * a + i) * b + j];
            }
        }
    }
}

/// (N, H, W, C) <-> (N, C, H, W) for `n` images of `c` channels and `p` pixels: `to_last`
/// picks the direction.
pub(super) fn permute_channels<T: Real>(src: &[T], c: usize, p: usize, to_last: bool) -> Vec<T> {
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
