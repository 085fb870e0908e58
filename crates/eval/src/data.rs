//! Training sets as the evaluator sees them: images in pixel space with labels and groups,
//! their normalisation, conversion to candle tensors, random real subsets (the floors a
//! distilled set must beat), and the synthetic-set file the distillation engine writes.
//!
//! Synthetic-set file (safetensors): `images` F32 N x 3 x 28 x 28 in pixel space (the [0, 1]
//! scale of the real images, neither clamped nor normalised), `labels` I64 N, `groups` I64 N
//! (`class * 10 + colour`, or -1 for an image with no group, as in class-wise distillation).
//! Metadata: `format` = [`SYNTHETIC_FORMAT`], `norm_mean` and `norm_std` (JSON lists of 3
//! floats: the normalisation the set was made under, which the evaluator applies before
//! training), and optionally `config` (JSON of whatever produced the set).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use debiasdd_cmnist::Split;
use debiasdd_cmnist::colored::{IMAGE_BYTES, SIDE};
use debiasdd_groups::{GroupIndex, GroupSpec};
use rand::Rng;
use rand::seq::index::sample as sample_indices;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

/// Value of the `format` metadata key of a synthetic-set file.
pub const SYNTHETIC_FORMAT: &str = "debiasdd-synthetic/1";

/// What can go wrong reading or writing image sets.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a synthetic-set file: {problem}")]
    BadFile { path: PathBuf, problem: String },
    #[error("cannot write {path}: {problem}")]
    Write { path: PathBuf, problem: String },
    #[error(
        "group {group} (class {class}, colour {colour}) has no real samples to draw from; \
         a group-stratified subset needs every group, or skip empty groups"
    )]
    EmptyGroup {
        group: usize,
        class: usize,
        colour: usize,
    },
    #[error("class {0} has no real samples to draw from")]
    EmptyClass(usize),
    #[error("asked for 0 images per class/group; ask for at least 1")]
    ZeroPerStratum,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Per-channel mean and std used to normalise pixel-space images (`(x - mean) / std`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalization {
    /// Mean and (population) std of each channel over all pixels of a split, in [0, 1] units.
    pub fn of_split(split: &Split) -> Self {
        let plane = SIDE * SIDE;
        let mut sum = [0f64; 3];
        let mut sum_sq = [0f64; 3];
        for image in split.images.chunks_exact(IMAGE_BYTES) {
            for ch in 0..3 {
                for &v in &image[ch * plane..(ch + 1) * plane] {
                    let x = f64::from(v) / 255.0;
                    sum[ch] += x;
                    sum_sq[ch] += x * x;
                }
            }
        }
        let n = (split.len() * plane).max(1) as f64;
        let mean = sum.map(|s| s / n);
        let std = std::array::from_fn(|ch| {
            ((sum_sq[ch] / n - mean[ch] * mean[ch]).max(0.0).sqrt()).max(1e-6) as f32
        });
        Self {
            mean: mean.map(|m| m as f32),
            std,
        }
    }
}

/// A labelled image set in pixel space ([0, 1] per channel), N x 3 x 28 x 28 row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    pub images: Vec<f32>,
    pub labels: Vec<u8>,
    /// Group of each image (`class * 10 + colour`), `None` when it has none.
    pub groups: Vec<Option<u16>>,
}

const IMAGE_FLOATS: usize = IMAGE_BYTES;

impl ImageSet {
    /// The images of a Colored MNIST split, scaled to [0, 1].
    pub fn from_split(split: &Split) -> Self {
        Self {
            images: split.images.iter().map(|&v| f32::from(v) / 255.0).collect(),
            labels: split.labels.clone(),
            groups: split.groups.iter().map(|&g| Some(g)).collect(),
        }
    }

    /// The samples of `split` at `indices`, in that order, scaled to [0, 1]; converts only those.
    pub fn from_split_indices(split: &Split, indices: &[usize]) -> Self {
        Self {
            images: indices
                .iter()
                .flat_map(|&i| split.image(i).iter().map(|&v| f32::from(v) / 255.0))
                .collect(),
            labels: indices.iter().map(|&i| split.labels[i]).collect(),
            groups: indices.iter().map(|&i| Some(split.groups[i])).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The samples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Self {
        let mut images = Vec::with_capacity(indices.len() * IMAGE_FLOATS);
        for &i in indices {
            images.extend_from_slice(&self.images[i * IMAGE_FLOATS..(i + 1) * IMAGE_FLOATS]);
        }
        Self {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            groups: indices.iter().map(|&i| self.groups[i]).collect(),
        }
    }

    /// Normalised images (N x 3 x 28 x 28, `dtype`) and labels (U32, N) on `device`.
    pub fn to_tensors(
        &self,
        norm: &Normalization,
        device: &Device,
        dtype: DType,
    ) -> Result<(Tensor, Tensor), DataError> {
        let n = self.len();
        let images = Tensor::from_slice(&self.images, (n, 3, SIDE, SIDE), &Device::Cpu)?;
        let mean = Tensor::new(&norm.mean, &Device::Cpu)?.reshape((1, 3, 1, 1))?;
        let std = Tensor::new(&norm.std, &Device::Cpu)?.reshape((1, 3, 1, 1))?;
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
    /// `n` images per (class, colour) group (all of a smaller group).
    Group,
}

/// A random subset of a real split, the floor a distilled set of the same size must beat.
/// Empty groups are skipped in group mode (they cannot be drawn from); an empty class is an
/// error in class mode.
pub fn random_real_subset<R: Rng + ?Sized>(
    split: &Split,
    stratify: Stratify,
    per_stratum: usize,
    rng: &mut R,
) -> Result<ImageSet, DataError> {
    if per_stratum == 0 {
        return Err(DataError::ZeroPerStratum);
    }
    let index = GroupIndex::from_group_ids(GroupSpec::COLORED_MNIST, &split.groups)
        .expect("Colored MNIST groups are in range");
    let mut chosen = Vec::new();
    match stratify {
        Stratify::Class => {
            for class in 0..10 {
                let members = index.class_members(class).expect("class in range");
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
            for group in 0..100 {
                if index.members(group).is_empty() {
                    continue;
                }
                chosen.extend(
                    index
                        .sample(group, per_stratum, rng)
                        .expect("non-empty group"),
                );
            }
        }
    }
    Ok(ImageSet::from_split_indices(split, &chosen))
}

/// A distilled (or otherwise small) training set with the normalisation it was made under.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSet {
    pub set: ImageSet,
    pub norm: Normalization,
    /// JSON of what produced the set (distillation config, subset recipe), if known.
    pub config: Option<String>,
}

impl SyntheticSet {
    /// Writes the set in the synthetic-set format (see the module docs).
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        let write_err = |problem: String| DataError::Write {
            path: path.to_owned(),
            problem,
        };
        let n = self.set.len();
        let images: Vec<u8> = self
            .set
            .images
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let labels: Vec<u8> = self
            .set
            .labels
            .iter()
            .flat_map(|&l| i64::from(l).to_le_bytes())
            .collect();
        let groups: Vec<u8> = self
            .set
            .groups
            .iter()
            .flat_map(|g| g.map_or(-1, i64::from).to_le_bytes())
            .collect();
        let views = [
            ("images", Dtype::F32, vec![n, 3, SIDE, SIDE], &images),
            ("labels", Dtype::I64, vec![n], &labels),
            ("groups", Dtype::I64, vec![n], &groups),
        ]
        .into_iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(dtype, shape, bytes)
                .map(|v| (name, v))
                .map_err(|e| write_err(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
        let mut metadata = HashMap::from([
            ("format".to_owned(), SYNTHETIC_FORMAT.to_owned()),
            ("norm_mean".to_owned(), json_floats(&self.norm.mean)),
            ("norm_std".to_owned(), json_floats(&self.norm.std)),
        ]);
        if let Some(config) = &self.config {
            metadata.insert("config".to_owned(), config.clone());
        }
        let bytes = debiasdd_cmnist::io::serialize_sorted(views, metadata).map_err(write_err)?;
        debiasdd_cmnist::io::write_atomically(path, &bytes).map_err(|e| write_err(e.to_string()))
    }

    /// Reads a synthetic-set file, checking dtypes, shapes, label and group ranges.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let bytes = std::fs::read(path).map_err(|source| DataError::Io {
            path: path.to_owned(),
            source,
        })?;
        let bad = |problem: String| DataError::BadFile {
            path: path.to_owned(),
            problem,
        };
        let st =
            SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not safetensors ({e})")))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        match meta.get("format").map(String::as_str) {
            Some(SYNTHETIC_FORMAT) => {}
            Some(other) => {
                return Err(bad(format!(
                    "format {other:?}, expected {SYNTHETIC_FORMAT:?}; a Colored MNIST dataset \
                     goes to --data, a distilled set to --synthetic"
                )));
            }
            None => return Err(bad("no `format` metadata".into())),
        }
        let floats3 = |key: &str| -> Result<[f32; 3], DataError> {
            let text = meta
                .get(key)
                .ok_or_else(|| bad(format!("no `{key}` metadata")))?;
            serde_json::from_str(text).map_err(|e| bad(format!("bad `{key}` metadata: {e}")))
        };
        let norm = Normalization {
            mean: floats3("norm_mean")?,
            std: floats3("norm_std")?,
        };
        if norm.std.iter().any(|&s| !(s.is_finite() && s > 0.0)) {
            return Err(bad(format!("norm_std {:?} must be positive", norm.std)));
        }
        let tensor = |name: &str, dtype: Dtype| {
            let view = st
                .tensor(name)
                .map_err(|_| bad(format!("tensor `{name}` is missing")))?;
            if view.dtype() != dtype {
                return Err(bad(format!(
                    "`{name}` is {:?}, expected {dtype:?}",
                    view.dtype()
                )));
            }
            Ok(view)
        };
        let images = tensor("images", Dtype::F32)?;
        let n = images.shape().first().copied().unwrap_or(0);
        if images.shape() != [n, 3, SIDE, SIDE] {
            return Err(bad(format!(
                "`images` has shape {:?}, expected [N, 3, 28, 28]",
                images.shape()
            )));
        }
        let images: Vec<f32> = images
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        if let Some(i) = images.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "`images` holds a non-finite value at flat index {i}"
            )));
        }
        let ints = |name: &str| -> Result<Vec<i64>, DataError> {
            let view = tensor(name, Dtype::I64)?;
            if view.shape() != [n] {
                return Err(bad(format!(
                    "`{name}` has shape {:?}, expected [{n}]",
                    view.shape()
                )));
            }
            Ok(view
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect())
        };
        let labels = ints("labels")?
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                u8::try_from(l)
                    .ok()
                    .filter(|&l| l < 10)
                    .ok_or_else(|| bad(format!("`labels`[{i}] = {l} is outside 0..10")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let groups = ints("groups")?
            .into_iter()
            .enumerate()
            .map(|(i, g)| match g {
                -1 => Ok(None),
                0..100 if g / 10 == i64::from(labels[i]) => Ok(Some(g as u16)),
                _ => Err(bad(format!(
                    "`groups`[{i}] = {g} is neither -1 nor a group of class {}",
                    labels[i]
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            set: ImageSet {
                images,
                labels,
                groups,
            },
            norm,
            config: meta.get("config").cloned(),
        })
    }
}

fn json_floats(values: &[f32; 3]) -> String {
    serde_json::to_string(values).expect("floats serialise")
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// 2 images per (class, colour) for colours {class, class+1 mod 10}: 40 images.
    fn toy_split() -> Split {
        let mut labels = Vec::new();
        let mut colours = Vec::new();
        for class in 0..10u8 {
            for colour in [class, (class + 1) % 10] {
                labels.extend([class, class]);
                colours.extend([colour, colour]);
            }
        }
        let n = labels.len();
        let images: Vec<u8> = (0..n * IMAGE_BYTES).map(|i| (i % 251) as u8).collect();
        let groups = labels
            .iter()
            .zip(&colours)
            .map(|(&l, &c)| u16::from(l) * 10 + u16::from(c))
            .collect();
        Split {
            images,
            labels,
            colours,
            groups,
        }
    }

    #[test]
    fn normalisation_is_hand_checked() {
        // One image: channel 0 all 255, channel 1 half 0 half 255, channel 2 all 51.
        let mut images = vec![0u8; IMAGE_BYTES];
        images[..784].fill(255);
        images[784..784 + 392].fill(255);
        images[1568..].fill(51);
        let split = Split {
            images,
            labels: vec![0],
            colours: vec![0],
            groups: vec![0],
        };
        let norm = Normalization::of_split(&split);
        assert!((norm.mean[0] - 1.0).abs() < 1e-6);
        assert!((norm.mean[1] - 0.5).abs() < 1e-6 && (norm.std[1] - 0.5).abs() < 1e-6);
        assert!((norm.mean[2] - 0.2).abs() < 1e-6);
        assert_eq!(
            norm.std[0], 1e-6,
            "a constant channel gets a floor, not a division by 0"
        );
    }

    #[test]
    fn tensors_are_normalised_per_channel() -> anyhow::Result<()> {
        let set = ImageSet::from_split(&toy_split());
        let norm = Normalization {
            mean: [0.5, 0.25, 0.0],
            std: [0.5, 0.25, 2.0],
        };
        let (x, y) = set.to_tensors(&norm, &Device::Cpu, DType::F32)?;
        assert_eq!(x.dims(), &[40, 3, 28, 28]);
        let first: Vec<f32> = x.flatten_all()?.to_vec1()?;
        for (k, ch) in [(0, 0), (784 + 5, 1), (1568 + 9, 2)] {
            let expected = (set.images[k] - norm.mean[ch]) / norm.std[ch];
            assert!((first[k] - expected).abs() < 1e-6);
        }
        assert_eq!(y.to_vec1::<u32>()?[..4], [0, 0, 0, 0]);
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

    #[test]
    fn synthetic_set_round_trips_and_rejects_bad_files() -> anyhow::Result<()> {
        let mut set = ImageSet::from_split(&toy_split()).subset(&[0, 5, 9]);
        set.groups[1] = None;
        set.images[7] = -3.5; // pixel space is not clamped
        let syn = SyntheticSet {
            set,
            norm: Normalization {
                mean: [0.1, 0.2, 0.3],
                std: [0.4, 0.5, 0.6],
            },
            config: Some("{\"mode\":\"group\"}".into()),
        };
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("syn.safetensors");
        syn.save(&path)?;
        assert_eq!(SyntheticSet::load(&path)?, syn);

        let mut nan = syn.clone();
        nan.set.images[3] = f32::NAN;
        nan.save(&path)?;
        let err = SyntheticSet::load(&path).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");

        let mut wrong_group = syn.clone();
        wrong_group.set.groups[0] = Some(55); // image 0 is class 0
        wrong_group.save(&path)?;
        let err = SyntheticSet::load(&path).unwrap_err();
        assert!(err.to_string().contains("`groups`[0] = 55"), "{err}");
        Ok(())
    }
}
