//! The synthetic-set file: a distilled (or otherwise small) training set with the
//! normalisation it was made under.
//!
//! Safetensors: `images` F32 `N x C x H x W` in pixel space (the [0, 1] scale of the real
//! images, neither clamped nor normalised), `labels` I64 N, `groups` I64 N (`class *
//! n_attributes + attribute`, or -1 for an image with no group, as in class-wise distillation).
//! Metadata: `format` = [`SYNTHETIC_FORMAT`], `n_classes`, `n_attributes`, `norm_mean` and
//! `norm_std` (JSON lists of C floats: the normalisation the evaluator applies before training)
//! and optionally `config` (JSON of whatever produced the set). Files of the first version
//! (`debiasdd-synthetic/1`, Colored MNIST only) are read as 10 x 10 groups.

use std::collections::HashMap;
use std::path::Path;

use debiasdd_groups::GroupSpec;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::file::{class_labels, i64_vector, read_safetensors, typed_tensor};
use crate::{DataError, ImageSet, ImageShape, Normalization, serialize_sorted, write_atomically};

/// Value of the `format` metadata key of a synthetic-set file.
pub const SYNTHETIC_FORMAT: &str = "debiasdd-synthetic/2";
const SYNTHETIC_FORMAT_V1: &str = "debiasdd-synthetic/1";

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
        self.set.validate()?;
        self.norm.validate(self.set.shape.channels)?;
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
        let [c, h, w] = self.set.shape.dims();
        let views = [
            ("images", Dtype::F32, vec![n, c, h, w], &images),
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
        let floats = |v: &[f32]| serde_json::to_string(v).expect("floats serialise");
        let mut metadata = HashMap::from([
            ("format".to_owned(), SYNTHETIC_FORMAT.to_owned()),
            (
                "n_classes".to_owned(),
                self.set.spec.n_classes().to_string(),
            ),
            (
                "n_attributes".to_owned(),
                self.set.spec.n_attributes().to_string(),
            ),
            ("norm_mean".to_owned(), floats(&self.norm.mean)),
            ("norm_std".to_owned(), floats(&self.norm.std)),
        ]);
        if let Some(config) = &self.config {
            metadata.insert("config".to_owned(), config.clone());
        }
        let bytes = serialize_sorted(views, metadata).map_err(write_err)?;
        write_atomically(path, &bytes).map_err(|e| write_err(e.to_string()))
    }

    /// Reads a synthetic-set file, checking dtypes, shapes, label and group ranges.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let (bytes, meta) = read_safetensors(path)?;
        let bad = |problem: String| DataError::BadFile {
            path: path.to_owned(),
            problem,
        };
        let st =
            SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not safetensors ({e})")))?;
        let count = |key: &str| -> Result<usize, DataError> {
            meta.get(key)
                .ok_or_else(|| bad(format!("no `{key}` metadata")))?
                .parse()
                .map_err(|e| bad(format!("bad `{key}` metadata: {e}")))
        };
        let spec = match meta.get("format").map(String::as_str) {
            Some(SYNTHETIC_FORMAT) => GroupSpec::new(count("n_classes")?, count("n_attributes")?)
                .map_err(|e| bad(e.to_string()))?,
            Some(SYNTHETIC_FORMAT_V1) => GroupSpec::new(10, 10).expect("10 x 10"),
            Some(other) => {
                return Err(bad(format!(
                    "format {other:?}, expected {SYNTHETIC_FORMAT:?}; a dataset goes to --data, \
                     a distilled set to --synthetic"
                )));
            }
            None => return Err(bad("no `format` metadata".into())),
        };
        let floats = |key: &str| -> Result<Vec<f32>, DataError> {
            let text = meta
                .get(key)
                .ok_or_else(|| bad(format!("no `{key}` metadata")))?;
            serde_json::from_str(text).map_err(|e| bad(format!("bad `{key}` metadata: {e}")))
        };
        let norm = Normalization {
            mean: floats("norm_mean")?,
            std: floats("norm_std")?,
        };
        let images = typed_tensor(&st, "images", Dtype::F32, &bad)?;
        let &[n, c, h, w] = images.shape() else {
            return Err(bad(format!(
                "`images` has shape {:?}, expected [N, C, H, W]",
                images.shape()
            )));
        };
        let shape = ImageShape::new(c, h, w).map_err(|e| bad(e.to_string()))?;
        norm.validate(c).map_err(|e| bad(e.to_string()))?;
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
        let ints = |name: &str| i64_vector(&st, name, n, &bad);
        let labels = class_labels(ints("labels")?, "labels", spec.n_classes(), &bad)?;
        let n_a = spec.n_attributes() as i64;
        let groups = ints("groups")?
            .into_iter()
            .enumerate()
            .map(|(i, g)| match g {
                -1 => Ok(None),
                _ if (0..spec.n_groups() as i64).contains(&g)
                    && g / n_a == i64::from(labels[i]) =>
                {
                    Ok(Some(g as u16))
                }
                _ => Err(bad(format!(
                    "`groups`[{i}] = {g} is neither -1 nor a group of class {}",
                    labels[i]
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            set: ImageSet {
                shape,
                spec,
                images,
                labels,
                groups,
            },
            norm,
            config: meta.get("config").cloned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> SyntheticSet {
        let shape = ImageShape::new(2, 3, 5).unwrap();
        let spec = GroupSpec::new(4, 3).unwrap();
        SyntheticSet {
            set: ImageSet {
                shape,
                spec,
                images: (0..3 * 30).map(|i| i as f32 * 0.01 - 0.2).collect(),
                labels: vec![0, 3, 1],
                groups: vec![Some(2), None, Some(3)],
            },
            norm: Normalization {
                mean: vec![0.1, 0.2],
                std: vec![0.4, 0.5],
            },
            config: Some("{\"mode\":\"group\"}".into()),
        }
    }

    #[test]
    fn round_trips_and_rejects_bad_files() -> anyhow::Result<()> {
        let syn = toy();
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
        wrong_group.set.groups[0] = Some(5); // image 0 is class 0: groups 0..3
        let err = wrong_group.save(&path).unwrap_err();
        assert!(err.to_string().contains("groups[0]: 5 is neither"), "{err}");
        let mut wrong_norm = syn;
        wrong_norm.norm.std.pop();
        let err = wrong_norm.save(&path).unwrap_err();
        assert!(
            err.to_string().contains("for images of 2 channels"),
            "{err}"
        );
        Ok(())
    }
}
