//! One image's DSA transform and its exact transpose, on plain CHW slices.
//!
//! Every transform is affine in the image, `y = A x + b`; `b` is non-zero only for the
//! brightness shift. The geometric families resolve, for a given [`ImageShape`], to a
//! [`PlaneMap`]: per output pixel at most four `(source pixel, weight)` taps, the same for
//! every channel (crop, flip: one tap of weight 1 or none; cutout: the pixel itself or none;
//! scale, rotate: the bilinear taps of `grid_sample`). `apply` gathers with the taps and
//! `apply_transpose` scatters with the same taps, so the backward is `A^T` exactly. Colour is
//! three channel-mixing maps (brightness, saturation, contrast), each symmetric in its linear
//! part; the transpose applies them in reverse order.

use num_traits::Float;
use rayon::prelude::*;

use crate::config::Family;

/// The size of one image: `channels x height x width`, stored CHW (row-major planes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageShape {
    /// Values in one image, `channels * height * width`.
    pub fn len(&self) -> usize {
        self.channels * self.plane()
    }

    /// Whether the image holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn plane(&self) -> usize {
        self.height * self.width
    }
}

/// One image's transform, drawn by [`crate::DsaConfig::draw_siamese`] or
/// [`crate::DsaConfig::draw_batch`].
///
/// Crop and cutout keep their uniform draws and resolve them to pixels against the image's
/// shape when applied (the official code sizes them from the tensor it is given), so one
/// Siamese transform serves any image size.
#[derive(Debug, Clone, PartialEq)]
pub struct Transform {
    pub(crate) kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    /// `x + shift`, then saturation factor, then contrast factor.
    Color {
        shift: f64,
        saturation: f64,
        contrast: f64,
    },
    /// Shift by `t = floor(unit * (2s + 1)) - s` per axis, `s = int(side * ratio + 0.5)`.
    Crop {
        ratio: f64,
        unit_h: f64,
        unit_w: f64,
    },
    /// Square of side `int(side * ratio + 0.5)` centred at `floor(unit * range)`.
    Cutout {
        ratio: f64,
        unit_h: f64,
        unit_w: f64,
    },
    Flip {
        flipped: bool,
    },
    Scale {
        sx: f64,
        sy: f64,
    },
    Rotate {
        radians: f64,
    },
}

impl Transform {
    pub(crate) fn color(shift: f64, saturation: f64, contrast: f64) -> Self {
        Self {
            kind: Kind::Color {
                shift,
                saturation,
                contrast,
            },
        }
    }

    pub(crate) fn crop(ratio: f64, unit_h: f64, unit_w: f64) -> Self {
        Self {
            kind: Kind::Crop {
                ratio,
                unit_h,
                unit_w,
            },
        }
    }

    pub(crate) fn cutout(ratio: f64, unit_h: f64, unit_w: f64) -> Self {
        Self {
            kind: Kind::Cutout {
                ratio,
                unit_h,
                unit_w,
            },
        }
    }

    pub(crate) fn flip(flipped: bool) -> Self {
        Self {
            kind: Kind::Flip { flipped },
        }
    }

    pub(crate) fn scale(sx: f64, sy: f64) -> Self {
        Self {
            kind: Kind::Scale { sx, sy },
        }
    }

    pub(crate) fn rotate(radians: f64) -> Self {
        Self {
            kind: Kind::Rotate { radians },
        }
    }

    /// The family this transform belongs to.
    pub fn family(&self) -> Family {
        match self.kind {
            Kind::Color { .. } => Family::Color,
            Kind::Crop { .. } => Family::Crop,
            Kind::Cutout { .. } => Family::Cutout,
            Kind::Flip { .. } => Family::Flip,
            Kind::Scale { .. } => Family::Scale,
            Kind::Rotate { .. } => Family::Rotate,
        }
    }

    /// `out = A x + b` for one CHW image.
    ///
    /// # Panics
    /// If `x` or `out` does not hold `shape.len()` values.
    pub fn apply<T: Float + Send + Sync>(&self, shape: ImageShape, x: &[T], out: &mut [T]) {
        check_lengths(shape, x.len(), out.len(), "apply");
        self.resolve(shape).apply(shape, x, out);
    }

    /// `grad_in = A^T grad_out` for one CHW image: the exact backward of [`Transform::apply`].
    ///
    /// # Panics
    /// If `grad_out` or `grad_in` does not hold `shape.len()` values.
    pub fn apply_transpose<T: Float + Send + Sync>(
        &self,
        shape: ImageShape,
        grad_out: &[T],
        grad_in: &mut [T],
    ) {
        check_lengths(shape, grad_out.len(), grad_in.len(), "apply_transpose");
        self.resolve(shape)
            .apply_transpose(shape, grad_out, grad_in);
    }

    /// The transform as a map for images of `shape`.
    fn resolve(&self, shape: ImageShape) -> Resolved {
        let (h, w) = (shape.height, shape.width);
        match self.kind {
            Kind::Color {
                shift,
                saturation,
                contrast,
            } => Resolved::Color {
                shift,
                saturation,
                contrast,
            },
            Kind::Crop {
                ratio,
                unit_h,
                unit_w,
            } => {
                let dy = shift_of(unit_h, h, ratio);
                let dx = shift_of(unit_w, w, ratio);
                Resolved::Plane(PlaneMap::gather(h, w, |i, j| {
                    let (si, sj) = (i as isize + dy, j as isize + dx);
                    let inside = (0..h as isize).contains(&si) && (0..w as isize).contains(&sj);
                    inside.then(|| si as usize * w + sj as usize)
                }))
            }
            Kind::Cutout {
                ratio,
                unit_h,
                unit_w,
            } => {
                let rows = cut_range(unit_h, h, ratio);
                let cols = cut_range(unit_w, w, ratio);
                Resolved::Plane(PlaneMap::gather(h, w, |i, j| {
                    let cut = rows.contains(&i) && cols.contains(&j);
                    (!cut).then_some(i * w + j)
                }))
            }
            Kind::Flip { flipped } => Resolved::Plane(PlaneMap::gather(h, w, |i, j| {
                Some(i * w + if flipped { w - 1 - j } else { j })
            })),
            Kind::Scale { sx, sy } => Resolved::Plane(PlaneMap::bilinear(h, w, [sx, 0.0, 0.0, sy])),
            Kind::Rotate { radians } => {
                let (sin, cos) = radians.sin_cos();
                Resolved::Plane(PlaneMap::bilinear(h, w, [cos, -sin, sin, cos]))
            }
        }
    }
}

fn check_lengths(shape: ImageShape, a: usize, b: usize, what: &str) {
    assert!(
        a == shape.len() && b == shape.len(),
        "Transform::{what}: {a} and {b} values for an image of {shape:?} ({} values)",
        shape.len()
    );
}

/// The official crop shift along a side: `randint(-s, s + 1)` with `s = int(side * ratio + 0.5)`,
/// as `floor(unit * (2s + 1)) - s`.
fn shift_of(unit: f64, side: usize, ratio: f64) -> isize {
    let s = (side as f64 * ratio + 0.5) as isize;
    let k = ((unit * (2 * s + 1) as f64).floor() as isize).clamp(0, 2 * s);
    k - s
}

/// The official cutout rows (or columns): size `int(side * ratio + 0.5)`, offset
/// `randint(0, side + (1 - size % 2))`, indices `clamp(offset - size / 2 + k, 0, side - 1)` for
/// `k < size`: a range clamped into the image (empty when size is 0).
fn cut_range(unit: f64, side: usize, ratio: f64) -> std::ops::Range<usize> {
    let size = (side as f64 * ratio + 0.5) as usize;
    if size == 0 || side == 0 {
        return 0..0;
    }
    let range = side + (1 - size % 2);
    let offset = ((unit * range as f64).floor() as usize).min(range - 1);
    let first = offset.saturating_sub(size / 2).min(side - 1);
    let last = (offset + size - 1 - size / 2).min(side - 1);
    first..last + 1
}

/// A transform resolved against one image shape.
enum Resolved {
    Color {
        shift: f64,
        saturation: f64,
        contrast: f64,
    },
    Plane(PlaneMap),
}

fn cast<T: Float>(v: f64) -> T {
    T::from(v).expect("f64 converts to every float type")
}

impl Resolved {
    fn apply<T: Float>(&self, shape: ImageShape, x: &[T], out: &mut [T]) {
        match self {
            Resolved::Plane(map) => map.apply(shape, x, out),
            Resolved::Color {
                shift,
                saturation,
                contrast,
            } => {
                let shift = cast::<T>(*shift);
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = v + shift;
                }
                mix_channels(shape, out, *saturation);
                mix_all(out, *contrast);
            }
        }
    }

    fn apply_transpose<T: Float>(&self, shape: ImageShape, g: &[T], out: &mut [T]) {
        match self {
            Resolved::Plane(map) => map.apply_transpose(shape, g, out),
            Resolved::Color {
                saturation,
                contrast,
                ..
            } => {
                // A = C S (brightness adds a constant only); A^T = S^T C^T = S C.
                out.copy_from_slice(g);
                mix_all(out, *contrast);
                mix_channels(shape, out, *saturation);
            }
        }
    }
}

/// Saturation, in place: `(x - m) * factor + m` with `m` the mean over channels per pixel
/// (the official `x.mean(dim=1)`). Its matrix `factor I + (1 - factor) P` is symmetric. On a
/// one-channel image `m = x`, so it is the identity.
fn mix_channels<T: Float>(shape: ImageShape, x: &mut [T], factor: f64) {
    let (c, plane) = (shape.channels, shape.plane());
    if c == 0 {
        return;
    }
    let factor = cast::<T>(factor);
    let inv_c = cast::<T>(1.0 / c as f64);
    for p in 0..plane {
        let mut sum = T::zero();
        for ch in 0..c {
            sum = sum + x[ch * plane + p];
        }
        let mean = sum * inv_c;
        for ch in 0..c {
            let v = &mut x[ch * plane + p];
            *v = (*v - mean) * factor + mean;
        }
    }
}

/// Contrast, in place: `(x - M) * factor + M` with `M` the mean over the whole image (the
/// official `x.mean(dim=[1, 2, 3])`); symmetric in its linear part like [`mix_channels`].
fn mix_all<T: Float>(x: &mut [T], factor: f64) {
    if x.is_empty() {
        return;
    }
    let sum = x
        .iter()
        .fold(0.0f64, |s, v| s + v.to_f64().unwrap_or(f64::NAN));
    let mean = cast::<T>(sum / x.len() as f64);
    let factor = cast::<T>(factor);
    for v in x {
        *v = (*v - mean) * factor + mean;
    }
}

/// Per output pixel of a plane, its taps `(source pixel, weight)`: output pixel `p` reads
/// `src[starts[p]..starts[p + 1]]`.
struct PlaneMap {
    starts: Vec<usize>,
    src: Vec<usize>,
    weight: Vec<f64>,
}

impl PlaneMap {
    /// An index map: output `(i, j)` copies source pixel `source(i, j)`, or is 0 for `None`.
    fn gather(h: usize, w: usize, source: impl Fn(usize, usize) -> Option<usize>) -> Self {
        let mut map = Self::with_capacity(h * w, h * w);
        for i in 0..h {
            for j in 0..w {
                if let Some(s) = source(i, j) {
                    map.src.push(s);
                    map.weight.push(1.0);
                }
                map.starts.push(map.src.len());
            }
        }
        map
    }

    /// `F.affine_grid(theta, align_corners=True)` + `F.grid_sample(bilinear, zeros,
    /// align_corners=True)` for `theta = [[m0, m1, 0], [m2, m3, 0]]`: output pixel (i, j) at
    /// normalised `(x, y)` (x along the width, -1 and +1 the centres of the corner pixels)
    /// samples the input at `(m0 x + m1 y, m2 x + m3 y)`; taps outside the image weigh 0.
    fn bilinear(h: usize, w: usize, m: [f64; 4]) -> Self {
        // torch.linspace(-1, 1, n): -1 alone for n = 1.
        let normalised = |k: usize, n: usize| {
            if n > 1 {
                2.0 * k as f64 / (n - 1) as f64 - 1.0
            } else {
                -1.0
            }
        };
        let half_w = w.saturating_sub(1) as f64 / 2.0;
        let half_h = h.saturating_sub(1) as f64 / 2.0;
        // Source positions within 1e-9 pixels of a pixel centre are snapped to it, so that
        // scale 1 and rotation 0 are exactly the identity (taps of weight 1e-16 otherwise).
        let snap = |v: f64| {
            let r = v.round();
            if (v - r).abs() < 1e-9 { r } else { v }
        };
        let mut map = Self::with_capacity(h * w, 4 * h * w);
        for i in 0..h {
            let y = normalised(i, h);
            for j in 0..w {
                let x = normalised(j, w);
                let ix = snap((m[0] * x + m[1] * y + 1.0) * half_w);
                let iy = snap((m[2] * x + m[3] * y + 1.0) * half_h);
                let (x0, y0) = (ix.floor(), iy.floor());
                let (fx, fy) = (ix - x0, iy - y0);
                for (dy, wy) in [(0.0, 1.0 - fy), (1.0, fy)] {
                    for (dx, wx) in [(0.0, 1.0 - fx), (1.0, fx)] {
                        let (sy, sx) = (y0 + dy, x0 + dx);
                        let weight = wy * wx;
                        let inside = (0.0..h as f64).contains(&sy) && (0.0..w as f64).contains(&sx);
                        if inside && weight != 0.0 {
                            map.src.push(sy as usize * w + sx as usize);
                            map.weight.push(weight);
                        }
                    }
                }
                map.starts.push(map.src.len());
            }
        }
        map
    }

    fn with_capacity(pixels: usize, taps: usize) -> Self {
        let mut starts = Vec::with_capacity(pixels + 1);
        starts.push(0);
        Self {
            starts,
            src: Vec::with_capacity(taps),
            weight: Vec::with_capacity(taps),
        }
    }

    fn weights<T: Float>(&self) -> Vec<T> {
        self.weight.iter().map(|&w| cast(w)).collect()
    }

    /// Gathers every channel plane through the taps.
    fn apply<T: Float>(&self, shape: ImageShape, x: &[T], out: &mut [T]) {
        let plane = shape.plane();
        if plane == 0 {
            return;
        }
        let weight = self.weights::<T>();
        for (x, out) in x.chunks_exact(plane).zip(out.chunks_exact_mut(plane)) {
            for (p, o) in out.iter_mut().enumerate() {
                let taps = self.starts[p]..self.starts[p + 1];
                *o = taps.fold(T::zero(), |acc, t| acc + weight[t] * x[self.src[t]]);
            }
        }
    }

    /// Scatters every channel plane back through the same taps: the transpose of [`Self::apply`].
    fn apply_transpose<T: Float>(&self, shape: ImageShape, g: &[T], out: &mut [T]) {
        out.fill(T::zero());
        let plane = shape.plane();
        if plane == 0 {
            return;
        }
        let weight = self.weights::<T>();
        for (g, out) in g.chunks_exact(plane).zip(out.chunks_exact_mut(plane)) {
            for (p, &gp) in g.iter().enumerate() {
                let taps = self.starts[p]..self.starts[p + 1];
                for (&s, &w) in self.src[taps.clone()].iter().zip(&weight[taps]) {
                    out[s] = out[s] + w * gp;
                }
            }
        }
    }
}

/// Augments a batch in place: image `i` of the NCHW slice `xs` gets `transforms[i]`, or
/// `transforms[0]` for every image when there is one (Siamese). Images run in parallel (rayon).
///
/// # Panics
/// If `xs.len()` is not a multiple of `shape.len()`, or `transforms.len()` is neither the number
/// of images nor 1 (while there are images).
pub fn augment_slice<T: Float + Send + Sync>(
    xs: &mut [T],
    shape: ImageShape,
    transforms: &[Transform],
) {
    for_each_image(xs, shape, transforms, false);
}

/// The transpose of [`augment_slice`] in place (the backward of the augmentation).
///
/// # Panics
/// As [`augment_slice`].
pub fn augment_transpose_slice<T: Float + Send + Sync>(
    grads: &mut [T],
    shape: ImageShape,
    transforms: &[Transform],
) {
    for_each_image(grads, shape, transforms, true);
}

fn for_each_image<T: Float + Send + Sync>(
    xs: &mut [T],
    shape: ImageShape,
    transforms: &[Transform],
    transpose: bool,
) {
    let per_image = shape.len();
    if per_image == 0 {
        return;
    }
    assert!(
        xs.len() % per_image == 0,
        "augment: {} values are not whole images of {shape:?}",
        xs.len()
    );
    let n = xs.len() / per_image;
    if n == 0 {
        return;
    }
    assert!(
        transforms.len() == n || transforms.len() == 1,
        "augment: {} transforms for {n} images: pass one per image or one for all",
        transforms.len()
    );
    // Resolve each run of equal consecutive transforms once (a Siamese term's images share
    // one), not once per image.
    let mut maps: Vec<Resolved> = Vec::new();
    let mut map_of: Vec<usize> = Vec::with_capacity(transforms.len());
    for (i, t) in transforms.iter().enumerate() {
        if i == 0 || *t != transforms[i - 1] {
            maps.push(t.resolve(shape));
        }
        map_of.push(maps.len() - 1);
    }
    xs.par_chunks_mut(per_image).enumerate().for_each_init(
        || vec![T::zero(); per_image],
        |buffer, (i, image)| {
            let map = &maps[map_of[if map_of.len() == 1 { 0 } else { i }]];
            if transpose {
                map.apply_transpose(shape, image, buffer);
            } else {
                map.apply(shape, image, buffer);
            }
            image.copy_from_slice(buffer);
        },
    );
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::config::DsaConfig;

    fn shape(channels: usize, height: usize, width: usize) -> ImageShape {
        ImageShape {
            channels,
            height,
            width,
        }
    }

    fn apply(t: &Transform, s: ImageShape, x: &[f64]) -> Vec<f64> {
        let mut out = vec![f64::NAN; s.len()];
        t.apply(s, x, &mut out);
        out
    }

    fn transpose(t: &Transform, s: ImageShape, g: &[f64]) -> Vec<f64> {
        let mut out = vec![f64::NAN; s.len()];
        t.apply_transpose(s, g, &mut out);
        out
    }

    fn random(len: usize, rng: &mut impl Rng) -> Vec<f64> {
        (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// The unit draw that makes the official crop shift `t` on a side with range `s`.
    fn crop_unit(t: isize, s: isize) -> f64 {
        (t + s) as f64 / (2 * s + 1) as f64 + 0.5 / (2 * s + 1) as f64
    }

    fn every_family_transforms(rng: &mut impl Rng) -> Vec<Transform> {
        let config = DsaConfig {
            flip: 1.0,
            ..DsaConfig::default()
        };
        crate::Family::ALL
            .iter()
            .flat_map(|&family| {
                let one = DsaConfig {
                    families: vec![family],
                    ..config.clone()
                };
                one.draw_batch(3, rng)
            })
            .collect()
    }

    #[test]
    fn transpose_is_the_adjoint_for_every_family() {
        // <A x, y> == <x, A^T y> with A the linear part (apply(x) - apply(0)), on non-square
        // images with 1, 2 and 3 channels.
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for s in [shape(3, 5, 7), shape(2, 6, 4), shape(1, 9, 8)] {
            for t in every_family_transforms(&mut rng) {
                let (x, y) = (random(s.len(), &mut rng), random(s.len(), &mut rng));
                let offset = apply(&t, s, &vec![0.0; s.len()]);
                let ax: Vec<f64> = apply(&t, s, &x)
                    .iter()
                    .zip(&offset)
                    .map(|(a, b)| a - b)
                    .collect();
                let aty = transpose(&t, s, &y);
                let (left, right) = (dot(&ax, &y), dot(&x, &aty));
                assert!(
                    (left - right).abs() < 1e-12 * (1.0 + left.abs()),
                    "{t:?} on {s:?}: {left} vs {right}"
                );
            }
        }
    }

    #[test]
    fn crop_shifts_by_whole_pixels_and_fills_zeros() {
        // 1 x 3 x 4: s = int(3 * 0.34 + 0.5) = 1 along the height, int(4 * 0.34 + 0.5) = 1
        // along the width. Shift +1 along the height, 0 along the width:
        // out[i][j] = x[i + 1][j], the last row 0.
        let s = shape(1, 3, 4);
        let x: Vec<f64> = (1..=12).map(f64::from).collect();
        let t = Transform::crop(0.34, crop_unit(1, 1), crop_unit(0, 1));
        #[rustfmt::skip]
        let want = [
            5.0, 6.0, 7.0, 8.0,
            9.0, 10.0, 11.0, 12.0,
            0.0, 0.0, 0.0, 0.0,
        ];
        assert_eq!(apply(&t, s, &x), want);
        // Shift -1 along the width: out[i][j] = x[i][j - 1], the first column 0.
        let t = Transform::crop(0.34, crop_unit(0, 1), crop_unit(-1, 1));
        #[rustfmt::skip]
        let want = [
            0.0, 1.0, 2.0, 3.0,
            0.0, 5.0, 6.0, 7.0,
            0.0, 9.0, 10.0, 11.0,
        ];
        assert_eq!(apply(&t, s, &x), want);
        // The official range on 28 x 28: s = 4, every shift in -4..=4 reachable.
        let shifts: Vec<isize> = (0..9)
            .map(|k| shift_of((k as f64 + 0.5) / 9.0, 28, 0.125))
            .collect();
        assert_eq!(shifts, (-4..=4).collect::<Vec<_>>());
        assert_eq!(shift_of(0.999_999_999_999, 28, 0.125), 4);
        // Non-square: 28 high, 12 wide -> s = 4 and int(12 * 0.125 + 0.5) = 2.
        assert_eq!(shift_of(0.0, 12, 0.125), -2);
    }

    #[test]
    fn cutout_zeroes_the_official_square() {
        // 1 x 4 x 6, ratio 0.5: size 2 x 3. Rows: offset floor(0.5 * 5) = 2, rows 2 - 1 + k
        // = 1, 2. Columns: offset 0, clamp(0 - 1 + k) = 0, 0, 1.
        let s = shape(2, 4, 6);
        let x = vec![1.0; s.len()];
        let t = Transform::cutout(0.5, 0.5, 0.0);
        let out = apply(&t, s, &x);
        for ch in 0..2 {
            for i in 0..4 {
                for j in 0..6 {
                    let cut = (1..=2).contains(&i) && j <= 1;
                    let want = if cut { 0.0 } else { 1.0 };
                    assert_eq!(out[ch * 24 + i * 6 + j], want, "({ch}, {i}, {j})");
                }
            }
        }
        assert_eq!(cut_range(0.5, 4, 0.5), 1..3);
        assert_eq!(cut_range(0.0, 6, 0.5), 0..2);
        // 28: size 14, offsets 0..=28, the last one clamps to rows 21..28.
        assert_eq!(cut_range(0.999_999, 28, 0.5), 21..28);
        assert_eq!(cut_range(0.5, 28, 0.0), 0..0);
    }

    #[test]
    fn scale_one_and_rotate_zero_are_the_identity() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for s in [shape(3, 5, 7), shape(1, 1, 4), shape(2, 28, 28)] {
            let x = random(s.len(), &mut rng);
            assert_eq!(apply(&Transform::scale(1.0, 1.0), s, &x), x);
            assert_eq!(apply(&Transform::rotate(0.0), s, &x), x);
            assert_eq!(transpose(&Transform::rotate(0.0), s, &x), x);
        }
    }

    #[test]
    fn rotate_by_90_degrees_turns_the_pixel_grid() {
        // align_corners: pixel centres map to pixel centres; out[i][j] = x[j][n - 1 - i],
        // counter-clockwise as displayed (the official comment: "90: anticlockwise").
        let s = shape(1, 3, 3);
        let x: Vec<f64> = (1..=9).map(f64::from).collect();
        let out = apply(&Transform::rotate(90f64.to_radians()), s, &x);
        let want = [3.0, 6.0, 9.0, 2.0, 5.0, 8.0, 1.0, 4.0, 7.0];
        for (got, want) in out.iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{out:?}");
        }
        let s = shape(2, 4, 4);
        let x: Vec<f64> = (0..32).map(f64::from).collect();
        let out = apply(&Transform::rotate(-90f64.to_radians()), s, &x);
        for ch in 0..2 {
            for i in 0..4 {
                for j in 0..4 {
                    // Clockwise: out[i][j] = x[n - 1 - j][i].
                    let want = x[ch * 16 + (3 - j) * 4 + i];
                    assert!((out[ch * 16 + i * 4 + j] - want).abs() < 1e-12);
                }
            }
        }
    }

    #[test]
    fn scale_samples_bilinearly_with_zero_padding() {
        // One row of 5 (H = 1 keeps y at the single row). sx = 0.5: source columns
        // (0.5 x + 1) * 2 for x = -1, -0.5, 0, 0.5, 1, i.e. 1, 1.5, 2, 2.5, 3.
        let s = shape(1, 1, 5);
        let x = [10.0, 20.0, 30.0, 40.0, 50.0];
        assert_eq!(
            apply(&Transform::scale(0.5, 1.0), s, &x),
            [20.0, 25.0, 30.0, 35.0, 40.0]
        );
        // sx = 2 zooms out: sources -2, 0, 2, 4, 6; outside the image is 0.
        assert_eq!(
            apply(&Transform::scale(2.0, 1.0), s, &x),
            [0.0, 10.0, 30.0, 50.0, 0.0]
        );
        // sx = 1.5: sources -1, 0.5, 2, 3.5, 5: half a tap inside at the ends is not there.
        assert_eq!(
            apply(&Transform::scale(1.5, 1.0), s, &x),
            [0.0, 15.0, 30.0, 45.0, 0.0]
        );
        // Along the height (a column of 3), sy = 2: sources -1 (0), 1, 3 (0).
        let s = shape(1, 3, 1);
        assert_eq!(
            apply(&Transform::scale(1.0, 2.0), s, &[1.0, 2.0, 3.0]),
            [0.0, 2.0, 0.0]
        );
    }

    #[test]
    fn flip_mirrors_the_width() {
        let s = shape(1, 2, 3);
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(
            apply(&Transform::flip(true), s, &x),
            [3.0, 2.0, 1.0, 6.0, 5.0, 4.0]
        );
        assert_eq!(apply(&Transform::flip(false), s, &x), x);
    }

    #[test]
    fn colour_on_hand_values() {
        // Brightness alone (saturation and contrast factors 1).
        let s = shape(2, 1, 2);
        let x = [1.0, 2.0, 3.0, 6.0];
        assert_eq!(
            apply(&Transform::color(0.25, 1.0, 1.0), s, &x),
            [1.25, 2.25, 3.25, 6.25]
        );
        // Saturation 2: pixel 0 has channels (1, 3), mean 2 -> (0, 4); pixel 1 (2, 6) -> (0, 8).
        assert_eq!(
            apply(&Transform::color(0.0, 2.0, 1.0), s, &x),
            [0.0, 0.0, 4.0, 8.0]
        );
        // Contrast 0.5 about the image mean 3: (1, 2, 3, 6) -> (2, 2.5, 3, 4.5).
        assert_eq!(
            apply(&Transform::color(0.0, 1.0, 0.5), s, &x),
            [2.0, 2.5, 3.0, 4.5]
        );
        // All three, in the official order: +1 -> (2, 3, 4, 7); saturation 0 -> channel means
        // (3, 5, 3, 5); contrast 2 about 4 -> (2, 6, 2, 6).
        assert_eq!(
            apply(&Transform::color(1.0, 0.0, 2.0), s, &x),
            [2.0, 6.0, 2.0, 6.0]
        );
        // One channel: saturation is the identity.
        let grey = shape(1, 2, 2);
        assert_eq!(apply(&Transform::color(0.0, 0.3, 1.0), grey, &x), x);
    }

    #[test]
    fn siamese_transform_is_shared_by_every_image() {
        // One transform for a batch of identical images gives identical outputs; per-image
        // draws do not.
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let s = shape(3, 6, 5);
        let image = random(s.len(), &mut rng);
        let batch: Vec<f64> = (0..4).flat_map(|_| image.clone()).collect();
        let config = DsaConfig {
            families: vec![crate::Family::Rotate],
            ..DsaConfig::default()
        };
        let mut shared = batch.clone();
        augment_slice(&mut shared, s, &[config.draw_siamese(&mut rng)]);
        assert!(shared.chunks(s.len()).all(|c| c == &shared[..s.len()]));
        assert_ne!(&shared[..s.len()], &image[..]);
        let mut own = batch.clone();
        augment_slice(&mut own, s, &config.draw_batch(4, &mut rng));
        assert_ne!(&own[..s.len()], &own[s.len()..2 * s.len()]);
        // The slice version agrees with image-by-image apply, and the transpose with
        // apply_transpose.
        let transforms = config.draw_batch(4, &mut rng);
        let mut back = batch.clone();
        augment_transpose_slice(&mut back, s, &transforms);
        for (k, t) in transforms.iter().enumerate() {
            let range = k * s.len()..(k + 1) * s.len();
            assert_eq!(back[range.clone()], transpose(t, s, &batch[range])[..]);
        }
    }

    #[test]
    fn siamese_draws_keep_the_official_independent_parameters() {
        // The official code reseeds with consecutive seeds, so sx and sy (and the two crop
        // shifts) of one Siamese draw are different numbers.
        let config = DsaConfig {
            families: vec![crate::Family::Scale],
            ..DsaConfig::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let t = config.draw_siamese(&mut rng);
        assert!(
            matches!(t.kind, Kind::Scale { sx, sy } if sx != sy),
            "{t:?}"
        );
        let mut again = ChaCha8Rng::seed_from_u64(8);
        assert_eq!(config.draw_siamese(&mut again), t);
    }

    #[test]
    fn f32_agrees_with_f64() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let s = shape(3, 7, 5);
        for t in every_family_transforms(&mut rng) {
            let x = random(s.len(), &mut rng);
            let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let mut out32 = vec![0f32; s.len()];
            t.apply(s, &x32, &mut out32);
            for (a, b) in out32.iter().zip(apply(&t, s, &x)) {
                assert!((f64::from(*a) - b).abs() < 1e-5, "{t:?}");
            }
        }
    }
}
