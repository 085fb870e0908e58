//! The evaluation's data augmentation for MNIST (DC's, or DSA's through `debiasdd-augment`), seeded and parallel.
//!
//! [`Augment::Dsa`] trains with Differentiable Siamese Augmentation as the official DSA/DM
//! evaluation does (see `debiasdd_augment` for its semantics); the rest of this module is DC's.
//!
//! Reproduces `augment()` of the official DC code (github.com/VICO-UoE/DatasetCondensation,
//! commit 53f63a6, `utils.py` lines 365-425; parameters from `get_daparam`, lines 428-445:
//! `crop 4, scale 0.2, rotate 45, strategy 'crop_scale_rotate'` for MNIST). The DC protocol
//! applies it to every training mini-batch when it trains an evaluation network on a synthetic
//! set (`epoch(..., aug=True)`), never to the test split. Semantics, per batch:
//!
//! * Before anything changes, the per-channel mean of the whole batch is taken (`mean[c]`).
//! * Each image independently gets exactly one transform, uniform over the strategy's
//!   transforms (`np.random.permutation(augs)[0]`):
//!   - **crop**: pad by `crop` pixels filled with the per-channel batch mean, then cut the
//!     original size at offset (r, c), each uniform in `0..2*crop` (`permutation(crop*2)[0]`), so
//!     `out[y][x] = in[y + r - crop][x + c - crop]`: shifts of -4..=3 pixels per axis.
//!   - **scale**: new height `int(U(1-s, 1+s) * H)` and width `int(U(1-s, 1+s) * H)` (DC uses H
//!     for both; here the width uses W, the same on square images); resize with
//!     `F.interpolate`'s default **nearest** mode; paste centred on a zero canvas of side
//!     `max(h, w, H, W)` at `int((side - h) / 2)`, cut the original size at
//!     `int((side - H) / 2)`. The fill is **0**, not the mean.
//!   - **rotate**: `scipy.ndimage.rotate(img, angle, axes=(-2, -1), cval=mean(mean[c]))` with
//!     an **integer** angle from `np.random.randint(-45, 45)`, i.e. -45..=44 degrees; scipy's
//!     defaults `reshape=True, order=3, mode='constant'`: the plane is rotated into an enlarged
//!     canvas (side `int(ptp of the rotated corners + 0.5)`) about its centre, then the original
//!     size is cut at `int((side - H) / 2)` (which is why odd size differences shift the
//!     result by half a pixel; reproduced). Positive angles turn the picture counter-clockwise
//!     as displayed (row 0 at the top). The fill is the mean of the channel means, the same
//!     value for every channel.
//!
//! Deviations from the reference, on purpose:
//! * rotation samples bilinearly (scipy's default is a cubic spline, `order=3`); samples that
//!   fall outside the input (beyond `[0, n-1]` per axis) get the fill value, as scipy's
//!   `mode='constant'` does; with that, [`rotate`] equals scipy's `order=1` result to f32
//!   rounding (test `rotate_matches_scipy_order_1`);
//! * randomness: every image draws from its own ChaCha8 stream, `ChaCha8Rng::seed_from_u64(seed)`
//!   with `set_stream(image index)`, so the result depends only on (batch, seed) and not on the
//!   thread schedule; DC draws from numpy's global RNG, image by image;
//! * a transform whose parameter is 0 (`crop: 0`, `scale: 0.0`, `rotate_degrees < 1`) is left
//!   out of the draw instead of being drawn as a no-op (DC would crash on `crop: 0`).

use debiasdd_augment::{DsaConfig, ImageShape};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::EvalError;

/// The DC augmentation's parameters (defaults: `get_daparam` for MNIST).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Maximum shift in pixels (pad width) of the crop transform.
    pub crop: usize,
    /// Relative size change of the scale transform: factors in `[1 - scale, 1 + scale)`.
    pub scale: f64,
    /// Rotation range: integer angles in `-r..r` degrees with `r = trunc(rotate_degrees)`.
    pub rotate_degrees: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            crop: 4,
            scale: 0.2,
            rotate_degrees: 45.0,
        }
    }
}

impl AugmentConfig {
    /// Checks the ranges: `scale` in `[0, 1)`, `rotate_degrees` in `[0, 360]`.
    pub fn validate(&self) -> Result<(), EvalError> {
        if !(0.0..1.0).contains(&self.scale) {
            return Err(EvalError::BadAugment(format!(
                "scale {} must be in [0, 1)",
                self.scale
            )));
        }
        if !(0.0..=360.0).contains(&self.rotate_degrees) {
            return Err(EvalError::BadAugment(format!(
                "rotate_degrees {} must be in [0, 360]",
                self.rotate_degrees
            )));
        }
        Ok(())
    }

    /// The transforms the per-image draw chooses from, in DC's strategy order.
    fn transforms(&self) -> Vec<Transform> {
        let mut all = Vec::with_capacity(3);
        if self.crop > 0 {
            all.push(Transform::Crop);
        }
        if self.scale > 0.0 {
            all.push(Transform::Scale);
        }
        if self.rotate_range() > 0 {
            all.push(Transform::Rotate);
        }
        all
    }

    fn rotate_range(&self) -> i64 {
        self.rotate_degrees.trunc() as i64
    }
}

/// Whether and how training batches are augmented.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Augment {
    /// Images are used as they are.
    None,
    /// The DC augmentation (the default: the DC protocol augments on MNIST).
    Dc(AugmentConfig),
    /// Differentiable Siamese Augmentation as the official `epoch()` applies it when it
    /// trains an evaluation network (`DiffAugment(img, strategy, seed=-1, param)`): one family
    /// per batch, every image its own parameters (`debiasdd_augment::DsaConfig::draw_batch`).
    Dsa(DsaConfig),
}

impl Default for Augment {
    fn default() -> Self {
        Self::Dc(AugmentConfig::default())
    }
}

impl Augment {
    /// Augments a batch in place, `shape = (n, c, h, w)`, every random choice from `seed`: DC
    /// through [`augment_batch`], DSA with `draw_batch(n)` from `ChaCha8Rng::seed_from_u64(seed)`
    /// (non-Siamese); a no-op for [`Augment::None`].
    ///
    /// # Panics
    /// If `images.len() != n * c * h * w`.
    pub fn apply(&self, images: &mut [f32], shape: (usize, usize, usize, usize), seed: u64) {
        match self {
            Self::None => {}
            Self::Dc(config) => augment_batch(images, shape, config, seed),
            Self::Dsa(config) => {
                let (n, channels, height, width) = shape;
                assert_eq!(
                    images.len(),
                    n * channels * height * width,
                    "Augment::apply: {} values for a batch of shape {shape:?}",
                    images.len()
                );
                let transforms = config.draw_batch(n, &mut ChaCha8Rng::seed_from_u64(seed));
                let image = ImageShape {
                    channels,
                    height,
                    width,
                };
                debiasdd_augment::augment_slice(images, image, &transforms);
            }
        }
    }

    /// Checks the augmentation's parameters.
    pub fn validate(&self) -> Result<(), EvalError> {
        match self {
            Self::None => Ok(()),
            Self::Dc(config) => config.validate(),
            Self::Dsa(config) => config
                .validate()
                .map_err(|e| EvalError::BadAugment(e.to_string())),
        }
    }

    /// One line for reports: `none`, `DC crop 4, scale 0.2, rotate 45` or the DSA description.
    pub fn describe(&self) -> String {
        match self {
            Self::None => "none".into(),
            Self::Dc(c) => format!(
                "DC crop {}, scale {}, rotate {}",
                c.crop, c.scale, c.rotate_degrees
            ),
            Self::Dsa(c) => c.describe(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transform {
    Crop,
    Scale,
    Rotate,
}

/// Applies the DC augmentation in place to a batch of `n` images in NCHW layout,
/// `shape = (n, c, h, w)`; image `i` draws from its own stream of `seed` (see the module docs).
///
/// Expects a config that passes [`AugmentConfig::validate`]; out-of-range values do not panic
/// but give meaningless pictures.
///
/// # Panics
/// If `images.len() != n * c * h * w`.
pub fn augment_batch(
    images: &mut [f32],
    shape: (usize, usize, usize, usize),
    config: &AugmentConfig,
    seed: u64,
) {
    let (n, c, h, w) = shape;
    assert_eq!(
        images.len(),
        n * c * h * w,
        "augment_batch: {} values for a batch of shape {shape:?}",
        images.len()
    );
    let transforms = config.transforms();
    if n == 0 || c * h * w == 0 || transforms.is_empty() {
        return;
    }
    let channel_means = channel_means(images, shape);
    let rotate_fill = channel_means.iter().sum::<f32>() / c as f32;

    images
        .par_chunks_mut(c * h * w)
        .enumerate()
        .for_each(|(index, image)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(index as u64);
            match transforms[rng.random_range(0..transforms.len())] {
                Transform::Crop => {
                    let span = 2 * config.crop;
                    let r = rng.random_range(0..span) as isize;
                    let col = rng.random_range(0..span) as isize;
                    let pad = config.crop as isize;
                    crop_shift(image, (c, h, w), r - pad, col - pad, &channel_means);
                }
                Transform::Scale => {
                    let range = 1.0 - config.scale..1.0 + config.scale;
                    let new_h = (rng.random_range(range.clone()) * h as f64) as usize;
                    let new_w = (rng.random_range(range) * w as f64) as usize;
                    scale(image, (c, h, w), new_h, new_w, 0.0);
                }
                Transform::Rotate => {
                    let r = config.rotate_range();
                    let degrees = rng.random_range(-r..r) as f64;
                    rotate(image, (c, h, w), degrees, rotate_fill);
                }
            }
        });
}

/// Per-channel mean over all images of an NCHW batch (accumulated in f64).
fn channel_means(images: &[f32], (n, c, h, w): (usize, usize, usize, usize)) -> Vec<f32> {
    let plane = h * w;
    (0..c)
        .map(|ch| {
            let sum: f64 = (0..n)
                .map(|i| {
                    let start = (i * c + ch) * plane;
                    images[start..start + plane]
                        .iter()
                        .map(|&v| f64::from(v))
                        .sum::<f64>()
                })
                .sum();
            (sum / (n * plane) as f64) as f32
        })
        .collect()
}

/// DC's crop as a shift: `out[y][x] = in[y + dy][x + dx]` per channel, `fill[channel]` where that
/// falls outside the image. DC's offset (r, c) in the padded image is `dy = r - crop`.
///
/// # Panics
/// If `image.len() != c * h * w` or `fill.len() != c`.
pub fn crop_shift(
    image: &mut [f32],
    (c, h, w): (usize, usize, usize),
    dy: isize,
    dx: isize,
    fill: &[f32],
) {
    assert_eq!(image.len(), c * h * w, "crop_shift: image size");
    assert_eq!(fill.len(), c, "crop_shift: one fill value per channel");
    if h * w == 0 {
        return;
    }
    let src = image.to_vec();
    let planes = image.chunks_exact_mut(h * w).zip(src.chunks_exact(h * w));
    for ((dst, src), &fill) in planes.zip(fill) {
        for y in 0..h {
            for x in 0..w {
                let (sy, sx) = (y as isize + dy, x as isize + dx);
                dst[y * w + x] = if (0..h as isize).contains(&sy) && (0..w as isize).contains(&sx) {
                    src[sy as usize * w + sx as usize]
                } else {
                    fill
                };
            }
        }
    }
}

/// PyTorch's `F.interpolate(mode='nearest')` source index for output index `dst`.
fn nearest_source(dst: usize, input: usize, output: usize) -> usize {
    if output == input {
        dst
    } else {
        let ratio = input as f32 / output as f32;
        ((dst as f32 * ratio).floor() as usize).min(input - 1)
    }
}

/// DC's scale: resize to `new_h x new_w` (nearest neighbour, as PyTorch's default
/// `F.interpolate`), centre it on a `fill` canvas of side `max(new_h, new_w, h, w)` and cut the
/// original `h x w` back out (offsets rounded down as in DC).
///
/// # Panics
/// If `image.len() != c * h * w`.
pub fn scale(
    image: &mut [f32],
    (c, h, w): (usize, usize, usize),
    new_h: usize,
    new_w: usize,
    fill: f32,
) {
    assert_eq!(image.len(), c * h * w, "scale: image size");
    if new_h == 0 || new_w == 0 {
        image.fill(fill);
        return;
    }
    let side = new_h.max(new_w).max(h).max(w) as isize;
    // Output (y, x) is canvas (y + cut_r, x + cut_c), which is the resized image at
    // (y + cut_r - paste_r, x + cut_c - paste_c).
    let off_r = (side - h as isize) / 2 - (side - new_h as isize) / 2;
    let off_c = (side - w as isize) / 2 - (side - new_w as isize) / 2;
    let src = image.to_vec();
    for ch in 0..c {
        let plane = ch * h * w;
        for y in 0..h {
            let ry = y as isize + off_r;
            for x in 0..w {
                let rx = x as isize + off_c;
                image[plane + y * w + x] =
                    if (0..new_h as isize).contains(&ry) && (0..new_w as isize).contains(&rx) {
                        let sy = nearest_source(ry as usize, h, new_h);
                        let sx = nearest_source(rx as usize, w, new_w);
                        src[plane + sy * w + sx]
                    } else {
                        fill
                    };
            }
        }
    }
}

/// `(cos, sin)` of an angle in degrees, exact at multiples of 90 like scipy's `cosdg`/`sindg`.
fn cos_sin_degrees(degrees: f64) -> (f64, f64) {
    let turn = degrees.rem_euclid(360.0);
    match turn {
        0.0 => (1.0, 0.0),
        90.0 => (0.0, 1.0),
        180.0 => (-1.0, 0.0),
        270.0 => (0.0, -1.0),
        _ => {
            let rad = degrees.to_radians();
            (rad.cos(), rad.sin())
        }
    }
}

/// DC's rotate: `scipy.ndimage.rotate(image, degrees, axes=(-2, -1), reshape=True,
/// mode='constant', cval=fill)` followed by the centre cut back to `h x w`, with bilinear instead
/// of cubic-spline sampling. Positive `degrees` turn the picture counter-clockwise as displayed.
///
/// # Panics
/// If `image.len() != c * h * w`.
pub fn rotate(image: &mut [f32], (c, h, w): (usize, usize, usize), degrees: f64, fill: f32) {
    assert_eq!(image.len(), c * h * w, "rotate: image size");
    if h == 0 || w == 0 {
        return;
    }
    let (cos, sin) = cos_sin_degrees(degrees);
    // scipy: matrix [[cos, sin], [-sin, cos]] maps output (row, col) to input (row, col).
    let (hf, wf) = (h as f64, w as f64);
    let corners = [(0.0, 0.0), (0.0, wf), (hf, 0.0), (hf, wf)];
    let extent = |f: &dyn Fn(f64, f64) -> f64| {
        let values = corners.map(|(r, c)| f(r, c));
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        ((max - min) + 0.5).trunc()
    };
    let out_h = extent(&|r, c| cos * r + sin * c);
    let out_w = extent(&|r, c| -sin * r + cos * c);
    // DC cuts the original size out of the enlarged plane at int((out - in) / 2).
    let cut_r = ((out_h - hf) / 2.0).trunc();
    let cut_c = ((out_w - wf) / 2.0).trunc();
    let (out_cr, out_cc) = ((out_h - 1.0) / 2.0, (out_w - 1.0) / 2.0);
    let (in_cr, in_cc) = ((hf - 1.0) / 2.0, (wf - 1.0) / 2.0);

    const TOLERANCE: f64 = 1e-9;
    let src = image.to_vec();
    for y in 0..h {
        let oy = y as f64 + cut_r - out_cr;
        for x in 0..w {
            let ox = x as f64 + cut_c - out_cc;
            let sy = cos * oy + sin * ox + in_cr;
            let sx = -sin * oy + cos * ox + in_cc;
            let inside = (-TOLERANCE..=hf - 1.0 + TOLERANCE).contains(&sy)
                && (-TOLERANCE..=wf - 1.0 + TOLERANCE).contains(&sx);
            if !inside {
                for ch in 0..c {
                    image[ch * h * w + y * w + x] = fill;
                }
                continue;
            }
            let (sy, sx) = (sy.clamp(0.0, hf - 1.0), sx.clamp(0.0, wf - 1.0));
            let (y0, x0) = (sy.floor() as usize, sx.floor() as usize);
            let (y1, x1) = ((y0 + 1).min(h - 1), (x0 + 1).min(w - 1));
            let (fy, fx) = ((sy - y0 as f64) as f32, (sx - x0 as f64) as f32);
            for ch in 0..c {
                let p = &src[ch * h * w..(ch + 1) * h * w];
                let top = p[y0 * w + x0] * (1.0 - fx) + p[y0 * w + x1] * fx;
                let bottom = p[y1 * w + x0] * (1.0 - fx) + p[y1 * w + x1] * fx;
                image[ch * h * w + y * w + x] = top * (1.0 - fy) + bottom * fy;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of `n` images (c x h x w) with distinct, asymmetric values.
    fn batch(n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
        (0..n * c * h * w)
            .map(|i| ((i * 7919) % 101) as f32 / 100.0)
            .collect()
    }

    #[test]
    fn same_seed_same_output_different_seed_different() {
        let shape = (16, 3, 28, 28);
        let config = AugmentConfig::default();
        let original = batch(16, 3, 28, 28);
        let (mut a, mut b, mut d) = (original.clone(), original.clone(), original.clone());
        augment_batch(&mut a, shape, &config, 7);
        augment_batch(&mut b, shape, &config, 7);
        augment_batch(&mut d, shape, &config, 8);
        assert_eq!(a, b);
        assert_ne!(a, d);
        assert_ne!(a, original);
    }

    #[test]
    fn image_results_do_not_depend_on_batch_position_beyond_their_index() {
        // Image i's draw depends only on (seed, i): augmenting a batch of 4 equals the first 4
        // images of a batch of 8 when both batches have the same channel means (copies).
        let one = batch(4, 1, 12, 12);
        let mut four = one.clone();
        let mut eight = [one.clone(), one].concat();
        let config = AugmentConfig::default();
        augment_batch(&mut four, (4, 1, 12, 12), &config, 3);
        augment_batch(&mut eight, (8, 1, 12, 12), &config, 3);
        assert_eq!(four, eight[..four.len()]);
    }

    #[test]
    fn shape_is_preserved_and_values_stay_finite() {
        let shape = (64, 3, 28, 28);
        let mut images = batch(64, 3, 28, 28);
        let len = images.len();
        for seed in 0..4 {
            augment_batch(&mut images, shape, &AugmentConfig::default(), seed);
        }
        assert_eq!(images.len(), len);
        assert!(images.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn none_and_disabled_transforms_leave_images_alone() {
        let original = batch(4, 2, 8, 8);
        let mut images = original.clone();
        Augment::None.apply(&mut images, (4, 2, 8, 8), 1);
        assert_eq!(images, original);
        let off = AugmentConfig {
            crop: 0,
            scale: 0.0,
            rotate_degrees: 0.0,
        };
        augment_batch(&mut images, (4, 2, 8, 8), &off, 1);
        assert_eq!(images, original);
    }

    #[test]
    fn crop_only_shifts_pixels_and_fills_with_channel_means() {
        // Only crop enabled: every output pixel is an input pixel of the same image and
        // channel, or that channel's batch mean.
        let (n, c, h, w) = (8, 2, 6, 6);
        let original = batch(n, c, h, w);
        let means = channel_means(&original, (n, c, h, w));
        let mut images = original.clone();
        let config = AugmentConfig {
            crop: 2,
            scale: 0.0,
            rotate_degrees: 0.0,
        };
        augment_batch(&mut images, (n, c, h, w), &config, 11);
        let planes = images.chunks_exact(h * w).zip(original.chunks_exact(h * w));
        for (plane, (after, before)) in planes.enumerate() {
            let mean = means[plane % c];
            assert!(after.iter().all(|v| before.contains(v) || *v == mean));
        }
    }

    #[test]
    fn crop_shift_moves_pixels_and_fills_the_border() {
        // 1 x 3 x 3, shifted by dy = 1, dx = -1: out[y][x] = in[y + 1][x - 1].
        let mut image = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
        crop_shift(&mut image, (1, 3, 3), 1, -1, &[0.5]);
        assert_eq!(image, vec![0.5, 4.0, 5.0, 0.5, 7.0, 8.0, 0.5, 0.5, 0.5]);
        let mut same = vec![1.0, 2.0, 3.0, 4.0];
        crop_shift(&mut same, (1, 2, 2), 0, 0, &[9.0]);
        assert_eq!(same, vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn rotate_by_zero_and_scale_by_one_are_identity() {
        let original = batch(1, 3, 28, 28);
        let mut rotated = original.clone();
        rotate(&mut rotated, (3, 28, 28), 0.0, -1.0);
        assert_eq!(rotated, original);
        let mut scaled = original.clone();
        scale(&mut scaled, (3, 28, 28), 28, 28, -1.0);
        assert_eq!(scaled, original);
        let mut turned = original.clone();
        rotate(&mut turned, (3, 28, 28), 360.0, -1.0);
        assert_eq!(turned, original);
    }

    #[test]
    fn rotate_by_90_turns_counter_clockwise() {
        // np.rot90 of [[1,2,3],[4,5,6],[7,8,9]] (= scipy.ndimage.rotate(a, 90)).
        let mut image = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
        rotate(&mut image, (1, 3, 3), 90.0, 0.0);
        assert_eq!(image, vec![3.0, 6.0, 9.0, 2.0, 5.0, 8.0, 1.0, 4.0, 7.0]);
        // Even size, two channels, clockwise (-90).
        let a: Vec<f32> = (1..=16).map(|v| v as f32).collect();
        let mut image = [a.clone(), a.iter().map(|v| -v).collect()].concat();
        rotate(&mut image, (2, 4, 4), -90.0, 0.0);
        let expected: Vec<f32> = (0..4)
            .flat_map(|y| (0..4).map(move |x| (y, x)))
            .map(|(y, x)| a[(3 - x) * 4 + y])
            .collect();
        assert_eq!(image[..16], expected);
        assert_eq!(image[16..], expected.iter().map(|v| -v).collect::<Vec<_>>());
    }

    /// Bilinear `rotate` against scipy with `order=1` (DC's geometry: `reshape=True`, centre cut,
    /// `mode='constant'`), including an odd size difference (17 degrees: 6x6 -> 7x7, cut at 0).
    /// Reference (scipy 1.17.1, values rounded to 6 decimals):
    /// ```text
    /// a = np.array([((i * 7919) % 101) / 100 for i in range(36)], dtype=np.float32).reshape(1, 6, 6)
    /// r = scipy.ndimage.rotate(a, angle, axes=(-2, -1), cval=0.25, order=1)
    /// o = (r.shape[-1] - 6) // 2; np.round(r[0, o:o + 6, o:o + 6], 6)
    /// ```
    #[test]
    fn rotate_matches_scipy_order_1() {
        #[rustfmt::skip]
        let at_17: [f32; 36] = [
            0.250000, 0.250000, 0.250000, 0.250000, 0.250000, 0.250000,
            0.250000, 0.481279, 0.613047, 0.462921, 0.140380, 0.544654,
            0.250000, 0.782641, 0.417330, 0.378982, 0.366439, 0.754103,
            0.250000, 0.540554, 0.480256, 0.357500, 0.625728, 0.679446,
            0.250000, 0.465897, 0.517376, 0.405902, 0.802670, 0.432374,
            0.250000, 0.673133, 0.222549, 0.706803, 0.606953, 0.738721,
        ];
        #[rustfmt::skip]
        let at_minus_45: [f32; 36] = [
            0.250000, 0.250000, 0.600194, 0.578981, 0.250000, 0.250000,
            0.250000, 0.559025, 0.415279, 0.394065, 0.495386, 0.250000,
            0.517857, 0.568422, 0.424675, 0.403462, 0.504782, 0.411791,
            0.458553, 0.455285, 0.416127, 0.394914, 0.391645, 0.352487,
            0.250000, 0.724614, 0.825934, 0.804721, 0.660975, 0.250000,
            0.250000, 0.250000, 0.641019, 0.619806, 0.250000, 0.250000,
        ];
        for (degrees, want) in [(17.0, at_17), (-45.0, at_minus_45)] {
            let mut image = batch(1, 1, 6, 6);
            rotate(&mut image, (1, 6, 6), degrees, 0.25);
            for (got, want) in image.iter().zip(want) {
                assert!((got - want).abs() < 1e-5, "{degrees} deg: {got} vs {want}");
            }
        }
    }

    #[test]
    fn rotate_by_45_keeps_the_centre_and_fills_the_corners() {
        let (h, w) = (9, 9);
        let image: Vec<f32> = vec![1.0; h * w];
        let mut rotated = image.clone();
        rotate(&mut rotated, (1, h, w), 45.0, -2.0);
        assert_eq!(rotated[4 * w + 4], 1.0);
        assert_eq!(rotated[0], -2.0);
        assert_eq!(rotated[h * w - 1], -2.0);
    }

    #[test]
    fn scale_matches_nearest_resize_and_zero_canvas() {
        // Shrink 4x4 -> 2x2: nearest sources 0 and 2 per axis, pasted at offset
        // int((4-2)/2) = 1 on a 4x4 zero canvas.
        let a: Vec<f32> = (1..=16).map(|v| v as f32).collect();
        let mut image = a.clone();
        scale(&mut image, (1, 4, 4), 2, 2, 0.0);
        #[rustfmt::skip]
        let expected = vec![
            0.0, 0.0, 0.0, 0.0,
            0.0, 1.0, 3.0, 0.0,
            0.0, 9.0, 11.0, 0.0,
            0.0, 0.0, 0.0, 0.0,
        ];
        assert_eq!(image, expected);
        // Enlarge 4x4 -> 6x6 (canvas 6): sources floor(i * 4/6) = 0,0,1,2,2,3; cut at 1.
        let mut image = a.clone();
        scale(&mut image, (1, 4, 4), 6, 6, 0.0);
        let rows = [0usize, 1, 2, 2];
        let expected: Vec<f32> = rows
            .iter()
            .flat_map(|&r| rows.iter().map(move |&c| (r, c)))
            .map(|(r, c)| a[r * 4 + c])
            .collect();
        assert_eq!(image, expected);
    }

    #[test]
    fn validate_rejects_out_of_range_settings() {
        assert!(AugmentConfig::default().validate().is_ok());
        let bad_scale = AugmentConfig {
            scale: 1.5,
            ..AugmentConfig::default()
        };
        assert!(matches!(
            bad_scale.validate(),
            Err(EvalError::BadAugment(_))
        ));
        let bad_rotate = AugmentConfig {
            rotate_degrees: -1.0,
            ..AugmentConfig::default()
        };
        assert!(bad_rotate.validate().is_err());
    }

    #[test]
    fn dsa_is_seeded_one_family_per_batch_and_validated() -> anyhow::Result<()> {
        let shape = (8, 3, 10, 12);
        let original = batch(8, 3, 10, 12);
        let dsa = Augment::Dsa(DsaConfig::default());
        let (mut a, mut b, mut d) = (original.clone(), original.clone(), original.clone());
        dsa.apply(&mut a, shape, 7);
        dsa.apply(&mut b, shape, 7);
        dsa.apply(&mut d, shape, 8);
        assert_eq!(a, b);
        assert_ne!(a, d);
        // The same as drawing the batch from the seed and applying it by hand.
        let transforms = DsaConfig::default().draw_batch(8, &mut ChaCha8Rng::seed_from_u64(7));
        let mut by_hand = original.clone();
        let image = ImageShape {
            channels: 3,
            height: 10,
            width: 12,
        };
        debiasdd_augment::augment_slice(&mut by_hand, image, &transforms);
        assert_eq!(a, by_hand);
        // Per-image parameters: two copies of one image come out differently.
        let one = batch(1, 3, 10, 12);
        let mut twice = [one.clone(), one].concat();
        let rotate_only = Augment::Dsa(DsaConfig {
            families: vec![debiasdd_augment::Family::Rotate],
            ..DsaConfig::default()
        });
        rotate_only.apply(&mut twice, (2, 3, 10, 12), 1);
        assert_ne!(twice[..360], twice[360..]);
        let bad = Augment::Dsa(DsaConfig {
            crop: 2.0,
            ..DsaConfig::default()
        });
        let message = bad.validate().unwrap_err().to_string();
        assert!(message.contains("crop"), "{message}");
        assert!(dsa.validate().is_ok());
        let json = serde_json::to_string(&dsa)?;
        assert!(
            json.starts_with(r#"{"kind":"dsa","families":["color","crop""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Augment>(&json)?, dsa);
        assert!(dsa.describe().contains("color_crop_cutout_scale_rotate"));
        Ok(())
    }

    #[test]
    fn config_round_trips_through_json() -> anyhow::Result<()> {
        let json = serde_json::to_string(&Augment::default())?;
        assert_eq!(
            json,
            r#"{"kind":"dc","crop":4,"scale":0.2,"rotate_degrees":45.0}"#
        );
        assert_eq!(serde_json::from_str::<Augment>(&json)?, Augment::default());
        assert_eq!(
            serde_json::from_str::<Augment>(r#"{"kind":"none"}"#)?,
            Augment::None
        );
        Ok(())
    }
}
