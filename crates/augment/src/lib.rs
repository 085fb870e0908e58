//! Differentiable Siamese Augmentation (DSA, Zhao & Bilen, ICML 2021): seeded image transforms with an exact backward, below the evaluator and the distillation engine.
//!
//! Reproduces `DiffAugment` and `ParamDiffAug` of the official code
//! (github.com/VICO-UoE/DatasetCondensation, commit 53f63a6, `utils.py` lines 474-640), which
//! pins torch 1.2 (`requirements.txt`), where `affine_grid` / `grid_sample` behave as
//! `align_corners=True`:
//!
//! * **families** ([`Family`]): `color` (brightness `x + (u - 0.5) * 1.0`, then saturation
//!   `(x - mean_C) * (2u) + mean_C`, then contrast `(x - mean_CHW) * (u + 0.5) + mean_CHW`),
//!   `crop` (shift by integers in `[-s, s]` per axis, `s = int(side * 0.125 + 0.5)`, zero fill:
//!   pad one zero pixel and clamp into it), `cutout` (a square of side `int(side * 0.5 + 0.5)`
//!   zeroed, centred at an offset in `[0, side + 1 - size % 2)`, clamped into the image),
//!   `flip` (along the width, probability 0.5), `scale` (`theta = [[sx, 0, 0], [0, sy, 0]]`,
//!   factors in `[1/1.2, 1.2]`), `rotate` (`theta = [[cos t, -sin t, 0], [sin t, cos t, 0]]`,
//!   `t` in `[-15, 15]` degrees); scale and rotate sample bilinearly with zeros outside, in
//!   normalised coordinates where -1 and +1 are the centres of the corner pixels, x along the
//!   width, y along the height (so on non-square images a rotation is one in normalised, not
//!   pixel, coordinates, as in the reference). Height and width are used separately
//!   everywhere: the crop's first shift moves along the height (the official `translation_x`
//!   indexes dim 2).
//! * **one family per call** (`aug_mode 'S'`): the family is drawn uniformly from
//!   [`DsaConfig::families`] once per call, for the whole batch.
//! * **Siamese** ([`DsaConfig::draw_siamese`], the official `seed >= 0`): one parameter set for
//!   every image of the call; the distillation applies the same draw to the real and the
//!   synthetic batch. The official code reseeds torch before every draw with consecutive
//!   seeds (`set_seed_DiffAug` increments `param.latestseed`: the family from `seed`, then `sx`
//!   from `seed + 1` and `sy` from `seed + 2`, brightness / saturation / contrast from
//!   `seed + 1, + 2, + 3`), so within one transform the parameters are distinct draws (`sx` and
//!   `sy` differ, the two crop shifts differ); what reseeding buys is that the real and the
//!   synthetic call with the same seed draw the same values. Here the caller gets the same by
//!   passing equal rng states; parameters are drawn one after another from that rng.
//! * **non-Siamese** ([`DsaConfig::draw_batch`], the official `seed = -1`, used by `epoch()` when
//!   training evaluation networks): one family for the batch, and every image draws its own
//!   parameters independently.
//!
//! A 1-channel image's channel mean is the image itself, so saturation is then the identity
//! (as in the reference). Every transform is affine in the image and its backward is the exact
//! transpose of its linear part ([`transform`]); [`augment`] is a candle custom op with that
//! backward (CPU only; other devices go through the CPU). All randomness comes from the rng the
//! caller passes in.

pub mod config;
pub mod error;
pub mod op;
pub mod transform;

pub use config::{DsaConfig, Family};
pub use error::DsaError;
pub use op::augment;
pub use transform::{ImageShape, Transform, augment_slice, augment_transpose_slice};
