//! Training sets as the networks see them: images in pixel space as floats with labels and
//! groups, their per-channel normalisation, conversion to candle tensors, and random real
//! subsets (the floors a distilled set must beat).

#[cfg(feature = "tensors")]
use candle_core::{DType, Device, Tensor};
use debiasdd_groups::GroupSpec;
use rand::Rng;
use rand::seq::index::sample as sample_indices;
use serde::{Deserialize, Serialize};

use crate::{DataError, ImageShape, Split};

/// Per-channel mean and std used to normalise pixel-space images (`(x - mean) / std`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalization {
    /// Mean and (population) std of each channel over all pixels of a split, in [0, 1] units.
    /// A constant channel gets std 1e-6, not a division by 0.
    pub fn of_split(split: &Split) -> Self {
        Self::of_values(split.shape, &split.images, |v| f64::from(v) / 255.0)
    }

    /// Mean and (population) std of each channel over all values of an image set (in its own
    /// units, [0, 1] for real images); [`Normalization::of_split`] for images that are not bytes
    /// (handed over as floats, e.g. from Python).
    pub fn of_images(set: &ImageSet) -> Self {
        Self::of_values(set.shape, &set.images, f64::from)
    }

    /// Per-channel mean and std of `len x C x H x W` values, each read through `value`.
    fn of_values<T: Copy>(shape: ImageShape, values: &[T], value: impl Fn(T) -> f64) -> Self {
        let (channels, plane) = (shape.channels, shape.plane());
        let mut sum = vec![0f64; channels];
        let mut sum_sq = vec![0f64; channels];
        for image in values.chunks_exact(shape.numel()) {
            for ch in 0..channels {
                for &v in &image[ch * plane..(ch + 1) * plane] {
                    let x = value(v);
                    sum[ch] += x;
                    sum_sq[ch] += x * x;
                }
            }
        }
        let n = (values.len() / shape.numel().max(1) * plane).max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let std = (0..channels)
            .map(|ch| ((sum_sq[ch] / n - mean[ch] * mean[ch]).max(0.0).sqrt()).max(1e-6) as f32)
            .collect();
        Self {
            mean: mean.iter().map(|&m| m as f32).collect(),
            std,
        }
    }

    /// Checks that there is one positive, finite std and one finite mean per channel.
    pub fn validate(&self, channels: usize) -> Result<(), DataError> {
        if self.mean.len() != channels || self.std.len() != channels {
            return Err(DataError::invalid(
                "normalization",
                format!(
                    "{} means and {} stds for images of {channels} channels",
                    self.mean.len(),
                    self.std.len()
                ),
            ));
        }
        if self.std.iter().any(|&s| !(s.is_finite() && s > 0.0))
            || self.mean.iter().any(|m| !m.is_finite())
        {
            return Err(DataError::invalid(
                "normalization",
                format!(
                    "mean {:?} / std {:?}: every std must be positive and all finite",
                    self.mean, self.std
                ),
            ));
        }
        Ok(())
    }
}

/// A labelled image set in pixel space ([0, 1] per channel for real images), `len x C x H x W`
/// row-major, with the group layout its group ids refer to.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    pub shape: ImageShape,
    pub spec: GroupSpec,
    pub images: Vec<f32>,
    pub labels: Vec<u8>,
    /// Group of each image (`class * n_attributes + attribute`), `None` when it has none.
    pub groups: Vec<Option<u16>>,
}

impl ImageSet {
    /// An empty set of this shape and layout.
    pub fn empty(shape: ImageShape, spec: GroupSpec) -> Self {
        Self {
            shape,
            spec,
            images: Vec::new(),
            labels: Vec::new(),
            groups: Vec::new(),
        }
    }

    /// The images of a real split, scaled to [0, 1].
    pub fn from_split(split: &Split) -> Self {
        Self {
            shape: split.shape,
            spec: split.spec,
            images: split.images.iter().map(|&v| f32::from(v) / 255.0).collect(),
            labels: split.labels.clone(),
            groups: split.group_ids(),
        }
    }

    /// The images of `split` at `indices`, in that order, scaled to [0, 1]; converts only those.
    pub fn from_split_indices(split: &Split, indices: &[usize]) -> Self {
        Self {
            shape: split.shape,
            spec: split.spec,
            images: indices
                .iter()
                .flat_map(|&i| split.image(i).iter().map(|&v| f32::from(v) / 255.0))
                .collect(),
            labels: indices.iter().map(|&i| split.labels[i]).collect(),
            groups: indices.iter().map(|&i| split.group_of(i)).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The values of image `i`.
    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.shape.numel();
        &self.images[i * n..(i + 1) * n]
    }

    /// The images at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Self {
        let mut images = Vec::with_capacity(indices.len() * self.shape.numel());
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        Self {
            shape: self.shape,
            spec: self.spec,
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            groups: indices.iter().map(|&i| self.groups[i]).collect(),
        }
    }

    /// Checks lengths, and labels and groups against the layout (a group must be one of its
    /// image's class).
    pub fn validate(&self) -> Result<(), DataError> {
        let n = self.labels.len();
        if self.images.len() != n * self.shape.numel() || self.groups.len() != n {
            return Err(DataError::invalid(
                "images",
                format!(
                    "{} values and {} groups for {n} labels of {} images",
                    self.images.len(),
                    self.groups.len(),
                    self.shape
                ),
            ));
        }
        let n_a = self.spec.n_attributes();
        for (i, (&label, group)) in self.labels.iter().zip(&self.groups).enumerate() {
            if usize::from(label) >= self.spec.n_classes() {
                return Err(DataError::invalid(
                    format!("labels[{i}]"),
                    format!("{label} is outside 0..{}", self.spec.n_classes()),
                ));
            }
            if let Some(g) = group
                && usize::from(*g) / n_a != usize::from(label)
            {
                return Err(DataError::invalid(
                    format!("groups[{i}]"),
                    format!("{g} is neither -1 nor a group of class {label}"),
                ));
            }
        }
        Ok(())
    }

    /// Checks that every value is finite (real images handed over as floats).
    pub fn check_finite(&self) -> Result<(), DataError> {
        if let Some(at) = self.images.iter().position(|v| !v.is_finite()) {
            let numel = self.shape.numel().max(1);
            return Err(DataError::invalid(
                format!("images[{}]", at / numel),
                format!(
                    "value {} of the image is {}; every pixel must be a finite number",
                    at % numel,
                    self.images[at]
                ),
            ));
        }
        Ok(())
    }

    /// Normalised images (`N x C x H x W`, `dtype`) and labels (U32, N) on `device`.
    #[cfg(feature = "tensors")]
    pub fn to_tensors(
        &self,
        norm: &Normalization,
        device: &Device,
        dtype: DType,
    ) -> Result<(Tensor, Tensor), DataError> {
        let n = self.len();
        let [c, h, w] = self.shape.dims();
        norm.validate(c)?;
        let images = Tensor::from_slice(&self.images, (n, c, h, w), &Device::Cpu)?;
        let mean = Tensor::new(norm.mean.as_slice(), &Device::Cpu)?.reshape((1, c, 1, 1))?;
        let std = Tensor::new(norm.std.as_slice(), &Device::Cpu)?.reshape((1, c, 1, 1))?;
        let images = images
            .broadcast_sub(&mean)?
            .broadcast_div(&std)?
            .to_dtype(dtype)?
            .to_device(device)?;
        let labels: Vec<u32> = self.labels.iter().map(|&l| u32::from(l)).collect();
        let labels = Tensor::from_vec(labels, n, device)?;
        Ok((images, labels))
    }
}

/// How a random real subset is stratified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stratify {
    /// `n` images per class, drawn uniformly within the class (inherits the bias).
    Class,
    /// `n` images per (class, attribute) group (all of a smaller group).
    Group,
}

/// A random subset of a real split, the floor a distilled set of the same size must beat.
/// Empty groups are skipped in group mode (they cannot be drawn from), as are images of
/// unknown attribute; an empty class is an error in class mode.
pub fn random_real_subset<R: Rng + ?Sized>(
    split: &Split,
    stratify: Stratify,
    per_stratum: usize,
    rng: &mut R,
) -> Result<ImageSet, DataError> {
    if per_stratum == 0 {
        return Err(DataError::ZeroPerStratum);
    }
    let mut chosen = Vec::new();
    match stratify {
        Stratify::Class => {
            for class in 0..split.spec.n_classes() {
                let members: Vec<usize> = (0..split.len())
                    .filter(|&i| usize::from(split.labels[i]) == class)
                    .collect();
                if members.is_empty() {
                    return Err(DataError::EmptyClass(class));
                }
                let k = per_stratum.min(members.len());
                chosen.extend(
                    sample_indices(rng, members.len(), k)
                        .iter()
                        .map(|i| members[i]),
                );
            }
        }
        Stratify::Group => {
            let index = split.group_index();
            for group in 0..split.spec.n_groups() {
                if index.members(group).is_empty() {
                    continue;
                }
                chosen.extend(index.sample(group, per_stratum, rng)?);
            }
        }
    }
    Ok(ImageSet::from_split_indices(split, &chosen))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// 3 x 4 x 4 images; 2 per (class, attribute) for attributes {class, class+1 mod 10}.
    fn toy_split() -> Split {
        let shape = ImageShape::new(3, 4, 4).unwrap();
        let spec = GroupSpec::new(10, 10).unwrap();
        let mut labels = Vec::new();
        let mut attributes = Vec::new();
        for class in 0..10u8 {
            for a in [class, (class + 1) % 10] {
                labels.extend([class, class]);
                attributes.extend([Some(a), Some(a)]);
            }
        }
        let images = (0..labels.len() * 48).map(|i| (i % 251) as u8).collect();
        Split::new(shape, spec, images, labels, attributes).unwrap()
    }

    #[test]
    fn normalisation_is_hand_checked() {
        // One 1 x 2 x 2 image per channel pattern: ch 0 all 255, ch 1 half 0 half 255.
        let shape = ImageShape::new(2, 2, 2).unwrap();
        let spec = GroupSpec::new(1, 1).unwrap();
        let split = Split::new(
            shape,
            spec,
            vec![255, 255, 255, 255, 0, 255, 0, 255],
            vec![0],
            vec![Some(0)],
        )
        .unwrap();
        let norm = Normalization::of_split(&split);
        assert!((norm.mean[0] - 1.0).abs() < 1e-6);
        assert_eq!(norm.std[0], 1e-6, "a constant channel gets a floor");
        assert!((norm.mean[1] - 0.5).abs() < 1e-6 && (norm.std[1] - 0.5).abs() < 1e-6);
    }

    #[cfg(feature = "tensors")]
    #[test]
    fn tensors_are_normalised_per_channel() -> anyhow::Result<()> {
        let set = ImageSet::from_split(&toy_split());
        let norm = Normalization {
            mean: vec![0.5, 0.25, 0.0],
            std: vec![0.5, 0.25, 2.0],
        };
        let (x, y) = set.to_tensors(&norm, &Device::Cpu, DType::F32)?;
        assert_eq!(x.dims(), &[40, 3, 4, 4]);
        let first: Vec<f32> = x.flatten_all()?.to_vec1()?;
        for (k, ch) in [(0, 0), (16 + 5, 1), (32 + 9, 2)] {
            let expected = (set.images[k] - norm.mean[ch]) / norm.std[ch];
            assert!((first[k] - expected).abs() < 1e-6);
        }
        assert_eq!(y.to_vec1::<u32>()?[..4], [0, 0, 0, 0]);
        let two = Normalization {
            mean: vec![0.0; 2],
            std: vec![1.0; 2],
        };
        let err = set.to_tensors(&two, &Device::Cpu, DType::F32).unwrap_err();
        assert!(
            err.to_string().contains("for images of 3 channels"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn stratified_subsets_cover_each_stratum() -> anyhow::Result<()> {
        let split = toy_split();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let by_group = random_real_subset(&split, Stratify::Group, 1, &mut rng)?;
        assert_eq!(by_group.len(), 20, "one per non-empty group");
        let mut groups: Vec<u16> = by_group.groups.iter().map(|g| g.unwrap()).collect();
        groups.sort_unstable();
        groups.dedup();
        assert_eq!(groups.len(), 20);
        let by_class = random_real_subset(&split, Stratify::Class, 3, &mut rng)?;
        assert_eq!(by_class.len(), 30);
        for class in 0..10u8 {
            assert_eq!(by_class.labels.iter().filter(|&&l| l == class).count(), 3);
        }
        assert!(matches!(
            random_real_subset(&split, Stratify::Group, 0, &mut rng),
            Err(DataError::ZeroPerStratum)
        ));
        Ok(())
    }
}
