//! Real labelled images as bytes: one [`Split`] per split and the [`Dataset`] that holds the
//! three with their [`DatasetInfo`].

use debiasdd_groups::{GroupIndex, GroupSpec};
use serde::{Deserialize, Serialize};

use crate::{DataError, ImageShape};

/// Names of the three splits, in file order.
pub const SPLIT_NAMES: [&str; 3] = ["train", "valid", "test"];

/// Most classes or attributes a dataset may have: labels and attributes are stored as bytes.
const MAX_LABELS: usize = 256;

/// One split of a real dataset: images as bytes (0-255, CHW per image, `len x C x H x W`), a
/// class label and a bias attribute per image. An attribute may be unknown (`None`); such an
/// image belongs to no group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub shape: ImageShape,
    pub spec: GroupSpec,
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub attributes: Vec<Option<u8>>,
}

impl Split {
    /// A split, checking that the parts describe the same images and every label and attribute
    /// is inside `spec`.
    pub fn new(
        shape: ImageShape,
        spec: GroupSpec,
        images: Vec<u8>,
        labels: Vec<u8>,
        attributes: Vec<Option<u8>>,
    ) -> Result<Self, DataError> {
        let split = Self {
            shape,
            spec,
            images,
            labels,
            attributes,
        };
        split.validate("split")?;
        Ok(split)
    }

    /// An empty split (a dataset without a validation split has one).
    pub fn empty(shape: ImageShape, spec: GroupSpec) -> Self {
        Self {
            shape,
            spec,
            images: Vec::new(),
            labels: Vec::new(),
            attributes: Vec::new(),
        }
    }

    /// Checks lengths and ranges; `name` prefixes the field in the message.
    pub fn validate(&self, name: &str) -> Result<(), DataError> {
        self.shape.validate()?;
        let n = self.labels.len();
        if self.images.len() != n * self.shape.numel() {
            return Err(DataError::invalid(
                format!("{name}.images"),
                format!(
                    "{} bytes, but {n} images of {} need {}",
                    self.images.len(),
                    self.shape,
                    n * self.shape.numel()
                ),
            ));
        }
        if self.attributes.len() != n {
            return Err(DataError::invalid(
                format!("{name}.attributes"),
                format!("{} attributes for {n} labels", self.attributes.len()),
            ));
        }
        if let Some(i) = self
            .labels
            .iter()
            .position(|&l| usize::from(l) >= self.spec.n_classes())
        {
            return Err(DataError::invalid(
                format!("{name}.labels[{i}]"),
                format!(
                    "{} is outside the {} classes 0..{}",
                    self.labels[i],
                    self.spec.n_classes(),
                    self.spec.n_classes()
                ),
            ));
        }
        check_attributes(&self.attributes, self.spec, &format!("{name}.attributes"))
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The CHW bytes of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.shape.numel();
        &self.images[i * n..(i + 1) * n]
    }

    /// The group of image `i` (`class * n_attributes + attribute`), `None` when its attribute
    /// is unknown.
    pub fn group_of(&self, i: usize) -> Option<u16> {
        self.attributes[i].map(|a| {
            (usize::from(self.labels[i]) * self.spec.n_attributes() + usize::from(a)) as u16
        })
    }

    /// The group of every image.
    pub fn group_ids(&self) -> Vec<Option<u16>> {
        (0..self.len()).map(|i| self.group_of(i)).collect()
    }

    /// Whether every image has a known attribute.
    pub fn attributes_known(&self) -> bool {
        self.attributes.iter().all(Option::is_some)
    }

    /// The per-group index of the images with a known attribute.
    pub fn group_index(&self) -> GroupIndex {
        GroupIndex::from_optional_group_ids(self.spec, &self.group_ids())
            .expect("labels and attributes are validated against the spec")
    }

    /// The images at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Self {
        Self {
            shape: self.shape,
            spec: self.spec,
            images: indices
                .iter()
                .flat_map(|&i| self.image(i).iter().copied())
                .collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            attributes: indices.iter().map(|&i| self.attributes[i]).collect(),
        }
    }
}

/// Checks that every known attribute is inside `spec`; `field` names the list in the message.
fn check_attributes(
    attributes: &[Option<u8>],
    spec: GroupSpec,
    field: &str,
) -> Result<(), DataError> {
    if let Some(i) = attributes
        .iter()
        .position(|a| a.is_some_and(|a| usize::from(a) >= spec.n_attributes()))
    {
        return Err(DataError::invalid(
            format!("{field}[{i}]"),
            format!(
                "{:?} is outside the {} attributes 0..{}",
                attributes[i],
                spec.n_attributes(),
                spec.n_attributes()
            ),
        ));
    }
    Ok(())
}

/// What a dataset is: its name, image shape, class and attribute names, which attribute each
/// class is biased towards (if known), display colours of the attributes (if they are
/// colours) and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// Short name, e.g. `cmnist-bg` or the importer's CSV file stem.
    pub name: String,
    pub shape: ImageShape,
    /// One name per class; their count is the number of classes.
    pub classes: Vec<String>,
    /// One name per bias attribute; their count is the number of attributes.
    pub attributes: Vec<String>,
    /// Per class, the attribute its training images mostly have (the bias-aligned one), when
    /// the dataset's recipe says so; `aligned` accuracy counts test images with this attribute.
    pub aligned: Vec<Option<u8>>,
    /// RGB of each attribute when the attributes are colours (drawn above heat-map columns).
    pub attribute_colours: Option<Vec<[u8; 3]>>,
    /// JSON of whatever made the dataset (a generator's config, an import's arguments).
    pub source: Option<String>,
    /// Set when the train split's groups were inferred from the class labels
    /// (`debiasdd infer-groups`) rather than annotated: the train split's attributes then index
    /// these attribute names, while valid and test keep the annotated ones (what the evaluator
    /// scores fairness on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inferred: Option<InferredGroups>,
}

/// How the train split's groups were inferred: the names of the inferred attributes and the
/// method's settings and report (JSON). The train split's annotated attributes, when there were
/// any, are kept apart in [`Dataset::true_train_attributes`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferredGroups {
    /// One name per inferred attribute (for example `looks like 3` or `cluster 1`).
    pub attributes: Vec<String>,
    /// JSON: the inference method, its settings and its agreement report.
    pub method: String,
}

impl DatasetInfo {
    /// Info with no aligned attributes, colours or source; checks the names.
    pub fn new(
        name: impl Into<String>,
        shape: ImageShape,
        classes: Vec<String>,
        attributes: Vec<String>,
    ) -> Result<Self, DataError> {
        let info = Self {
            name: name.into(),
            shape,
            aligned: vec![None; classes.len()],
            classes,
            attributes,
            attribute_colours: None,
            source: None,
            inferred: None,
        };
        info.validate()?;
        Ok(info)
    }

    /// The group layout of the annotated attributes (valid and test; train too unless its
    /// groups were inferred): classes x attributes.
    pub fn spec(&self) -> GroupSpec {
        GroupSpec::new(self.classes.len().max(1), self.attributes.len().max(1))
            .expect("at least one class and attribute")
    }

    /// The group layout of the train split: classes x inferred attributes when its groups were
    /// inferred, else [`DatasetInfo::spec`].
    pub fn train_spec(&self) -> GroupSpec {
        match &self.inferred {
            Some(inferred) => {
                GroupSpec::new(self.classes.len().max(1), inferred.attributes.len().max(1))
                    .expect("at least one class and attribute")
            }
            None => self.spec(),
        }
    }

    /// Checks counts against each other and the limits of the file format.
    pub fn validate(&self) -> Result<(), DataError> {
        self.shape.validate()?;
        for (field, n) in [
            ("classes", self.classes.len()),
            ("attributes", self.attributes.len()),
            (
                "inferred.attributes",
                self.inferred.as_ref().map_or(1, |i| i.attributes.len()),
            ),
        ] {
            if n == 0 {
                return Err(DataError::invalid(
                    field,
                    "empty; a dataset needs at least one (an attribute `unknown` if there is none)",
                ));
            }
            if n > MAX_LABELS {
                return Err(DataError::invalid(
                    field,
                    format!("{n} of them; at most {MAX_LABELS} are supported"),
                ));
            }
        }
        let inferred = self.inferred.as_ref().map_or(0, |i| i.attributes.len());
        for (field, n) in [
            ("attributes", self.attributes.len()),
            ("inferred.attributes", inferred),
        ] {
            if self.classes.len() * n > usize::from(u16::MAX) {
                return Err(DataError::invalid(
                    field,
                    format!(
                        "{} classes x {n} attributes is more groups than the {} supported",
                        self.classes.len(),
                        u16::MAX
                    ),
                ));
            }
        }
        if self.aligned.len() != self.classes.len() {
            return Err(DataError::invalid(
                "aligned",
                format!(
                    "{} entries for {} classes",
                    self.aligned.len(),
                    self.classes.len()
                ),
            ));
        }
        if let Some((class, a)) = self.aligned.iter().enumerate().find_map(|(c, a)| {
            a.filter(|&a| usize::from(a) >= self.attributes.len())
                .map(|a| (c, a))
        }) {
            return Err(DataError::invalid(
                format!("aligned[{class}]"),
                format!(
                    "attribute {a} does not exist ({} attributes)",
                    self.attributes.len()
                ),
            ));
        }
        if let Some(colours) = &self.attribute_colours
            && colours.len() != self.attributes.len()
        {
            return Err(DataError::invalid(
                "attribute_colours",
                format!(
                    "{} colours for {} attributes",
                    colours.len(),
                    self.attributes.len()
                ),
            ));
        }
        Ok(())
    }
}

/// A real dataset: its info and the train, valid and test splits (valid may be empty).
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub info: DatasetInfo,
    pub train: Split,
    pub valid: Split,
    pub test: Split,
    /// When the train split's groups were inferred (`info.inferred`): its annotated attributes,
    /// kept apart for reports (agreement of the inferred groups with the annotated ones). Never
    /// read by distillation or training. `None` otherwise.
    pub true_train_attributes: Option<Vec<Option<u8>>>,
}

impl Dataset {
    /// Checks that every split has the info's shape and group layout and is consistent.
    pub fn new(
        info: DatasetInfo,
        train: Split,
        valid: Split,
        test: Split,
    ) -> Result<Self, DataError> {
        let data = Self {
            info,
            train,
            valid,
            test,
            true_train_attributes: None,
        };
        data.validate()?;
        Ok(data)
    }

    /// This dataset with the train split's groups replaced by inferred ones: `attributes[i]` is
    /// the inferred attribute of train image `i` (indexing `inferred.attributes`). The annotated
    /// train attributes move to [`Dataset::true_train_attributes`]; valid and test are kept.
    pub fn with_inferred_train_groups(
        mut self,
        inferred: InferredGroups,
        attributes: Vec<Option<u8>>,
    ) -> Result<Self, DataError> {
        let truth = match self.true_train_attributes.take() {
            // Inferring again from an inferred dataset: the annotations stay the originals.
            Some(truth) => truth,
            None => std::mem::take(&mut self.train.attributes),
        };
        self.info.inferred = Some(inferred);
        self.train.spec = self.info.train_spec();
        self.train.attributes = attributes;
        self.true_train_attributes = Some(truth);
        self.validate()?;
        Ok(self)
    }

    /// See [`Dataset::new`].
    pub fn validate(&self) -> Result<(), DataError> {
        self.info.validate()?;
        match (&self.info.inferred, &self.true_train_attributes) {
            (Some(_), Some(truth)) => {
                if truth.len() != self.train.len() {
                    return Err(DataError::invalid(
                        "train.true_attributes",
                        format!("{} attributes for {} images", truth.len(), self.train.len()),
                    ));
                }
                check_attributes(truth, self.spec(), "train.true_attributes")?;
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(DataError::invalid(
                    "train.true_attributes",
                    "missing; a dataset with inferred groups keeps the annotated ones apart",
                ));
            }
            (None, Some(_)) => {
                return Err(DataError::invalid(
                    "info.inferred",
                    "missing, yet annotated train attributes are kept apart",
                ));
            }
        }
        for name in SPLIT_NAMES {
            let split = self.split(name).expect("known split");
            let spec = if name == "train" {
                self.info.train_spec()
            } else {
                self.spec()
            };
            if split.shape != self.info.shape {
                return Err(DataError::invalid(
                    format!("{name}.images"),
                    format!(
                        "images are {}, the dataset's are {}",
                        split.shape, self.info.shape
                    ),
                ));
            }
            if split.spec != spec {
                return Err(DataError::invalid(
                    name,
                    format!(
                        "{} x {} groups, the dataset has {} x {}",
                        split.spec.n_classes(),
                        split.spec.n_attributes(),
                        spec.n_classes(),
                        spec.n_attributes()
                    ),
                ));
            }
            split.validate(name)?;
        }
        if self.train.is_empty() {
            return Err(DataError::invalid(
                "train",
                "no images; a dataset needs a train split",
            ));
        }
        Ok(())
    }

    /// The group layout of valid and test (the annotated attributes); see
    /// [`DatasetInfo::train_spec`] for the train split's.
    pub fn spec(&self) -> GroupSpec {
        self.info.spec()
    }

    /// The annotated attributes of the train split: kept apart when its groups were inferred,
    /// the split's own otherwise.
    pub fn annotated_train_attributes(&self) -> &[Option<u8>] {
        self.true_train_attributes
            .as_deref()
            .unwrap_or(&self.train.attributes)
    }

    pub fn shape(&self) -> ImageShape {
        self.info.shape
    }

    /// The split by name: `train`, `valid` or `test`.
    pub fn split(&self, name: &str) -> Option<&Split> {
        match name {
            "train" => Some(&self.train),
            "valid" => Some(&self.valid),
            "test" => Some(&self.test),
            _ => None,
        }
    }

    /// Per class, its bias-aligned attribute: the info's where it says so, else the attribute
    /// most of the class's training images have (ties to the lower index); `None` for a class
    /// without a training image of known attribute.
    pub fn aligned_attributes(&self) -> Vec<Option<u8>> {
        let spec = self.spec();
        let mut counts = vec![0usize; spec.n_groups()];
        for (&label, attribute) in self
            .train
            .labels
            .iter()
            .zip(self.annotated_train_attributes())
        {
            if let Some(a) = attribute {
                counts[usize::from(label) * spec.n_attributes() + usize::from(*a)] += 1;
            }
        }
        (0..spec.n_classes())
            .map(|class| {
                self.info.aligned[class].or_else(|| {
                    let row: Vec<usize> = (0..spec.n_attributes())
                        .map(|a| counts[class * spec.n_attributes() + a])
                        .collect();
                    let best = row.iter().copied().max().unwrap_or(0);
                    (best > 0)
                        .then(|| row.iter().position(|&c| c == best).expect("max exists") as u8)
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> DatasetInfo {
        let shape = ImageShape::new(1, 2, 3).unwrap();
        DatasetInfo::new(
            "toy",
            shape,
            vec!["a".into(), "b".into()],
            vec!["x".into(), "y".into(), "z".into()],
        )
        .unwrap()
    }

    fn split(labels: Vec<u8>, attributes: Vec<Option<u8>>) -> Split {
        let info = info();
        let images = (0..labels.len() * 6).map(|i| i as u8).collect();
        Split::new(info.shape, info.spec(), images, labels, attributes).unwrap()
    }

    #[test]
    fn groups_follow_the_spec_and_skip_unknown_attributes() {
        let s = split(vec![0, 1, 1, 0], vec![Some(2), Some(0), None, Some(2)]);
        assert_eq!(s.group_ids(), vec![Some(2), Some(3), None, Some(2)]);
        let index = s.group_index();
        assert_eq!(index.members(2), &[0, 3]);
        assert_eq!(index.members(3), &[1]);
        assert_eq!(index.len(), 3, "the unknown one is in no group");
        assert!(!s.attributes_known());
        assert_eq!(s.image(1), &[6, 7, 8, 9, 10, 11]);
        let sub = s.subset(&[3, 1]);
        assert_eq!(sub.labels, vec![0, 1]);
        assert_eq!(sub.image(0), s.image(3));
    }

    #[test]
    fn bad_parts_name_the_field() {
        let info = info();
        let err = Split::new(info.shape, info.spec(), vec![0; 5], vec![0], vec![None]).unwrap_err();
        assert!(
            err.to_string().starts_with("split.images: 5 bytes"),
            "{err}"
        );
        let err = Split::new(info.shape, info.spec(), vec![0; 6], vec![2], vec![None]).unwrap_err();
        assert!(err.to_string().contains("labels[0]: 2 is outside"), "{err}");
        let err =
            Split::new(info.shape, info.spec(), vec![0; 6], vec![1], vec![Some(3)]).unwrap_err();
        assert!(err.to_string().contains("attributes[0]"), "{err}");
        let err = DatasetInfo::new("t", info.shape, vec![], vec!["x".into()]).unwrap_err();
        assert!(err.to_string().starts_with("classes: empty"), "{err}");
        let err = ImageShape::new(3, 0, 4).unwrap_err();
        assert!(err.to_string().contains("`height` is 0"), "{err}");
    }

    #[test]
    fn aligned_attributes_come_from_the_info_or_the_train_majority() {
        let train = split(vec![0, 0, 0, 1], vec![Some(1), Some(1), Some(0), None]);
        let mut data = Dataset::new(info(), train.clone(), train.clone(), train).unwrap();
        assert_eq!(data.aligned_attributes(), vec![Some(1), None]);
        data.info.aligned = vec![Some(2), Some(0)];
        assert_eq!(data.aligned_attributes(), vec![Some(2), Some(0)]);
    }

    #[test]
    fn splits_of_another_shape_are_refused() {
        let train = split(vec![0], vec![Some(0)]);
        let mut other = train.clone();
        other.shape = ImageShape::new(2, 1, 3).unwrap();
        let err = Dataset::new(info(), train.clone(), other, train).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("valid.images: images are 2x1x3"),
            "{err}"
        );
    }

    #[test]
    fn inferred_train_groups_replace_the_annotations_which_are_kept_apart() {
        let train = split(vec![0, 0, 1, 1], vec![Some(2), Some(0), None, Some(1)]);
        let data = Dataset::new(info(), train.clone(), train.clone(), train.clone()).unwrap();
        let inferred = InferredGroups {
            attributes: vec!["p".into(), "q".into()],
            method: "{}".into(),
        };
        let out = data
            .clone()
            .with_inferred_train_groups(inferred.clone(), vec![Some(1), Some(0), Some(0), Some(1)])
            .unwrap();
        assert_eq!(out.train.spec.n_attributes(), 2);
        assert_eq!(
            out.test.spec.n_attributes(),
            3,
            "valid and test keep theirs"
        );
        assert_eq!(
            out.train.group_ids(),
            vec![Some(1), Some(0), Some(2), Some(3)]
        );
        assert_eq!(out.annotated_train_attributes(), &train.attributes[..]);
        assert_eq!(out.aligned_attributes(), data.aligned_attributes());
        // Inferring again keeps the original annotations.
        let again = out
            .clone()
            .with_inferred_train_groups(inferred.clone(), vec![Some(0); 4])
            .unwrap();
        assert_eq!(again.true_train_attributes, out.true_train_attributes);
        // An inferred attribute outside the inferred names, or a count that does not match.
        let err = data
            .clone()
            .with_inferred_train_groups(inferred.clone(), vec![Some(2); 4])
            .unwrap_err();
        assert!(err.to_string().starts_with("train.attributes[0]"), "{err}");
        let err = data
            .clone()
            .with_inferred_train_groups(inferred, vec![Some(0); 3])
            .unwrap_err();
        assert!(
            err.to_string().contains("3 attributes for 4 labels"),
            "{err}"
        );
        // Annotations kept apart without the inferred marker are refused.
        let mut broken = out;
        broken.info.inferred = None;
        broken.train.spec = broken.info.spec();
        assert!(
            broken
                .validate()
                .unwrap_err()
                .to_string()
                .starts_with("info.inferred")
        );
    }
}
