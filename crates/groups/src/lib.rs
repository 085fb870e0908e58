//! Group annotations for debiased training and distillation.
//!
//! This is the lowest layer of debiasdd next to the data generator: it knows nothing about
//! images, tensors or candle. A *group* is a pair (class, bias attribute) — in Colored MNIST
//! (digit, colour) — numbered `class * n_attributes + attribute`. Everything above (the
//! generator, the evaluator, the distillation engine) asks this crate how samples split into
//! groups, which groups are empty, and how to draw from one group.
//!
//! ```
//! use debiasdd_groups::{GroupIndex, GroupSpec};
//! let spec = GroupSpec::new(2, 3)?;
//! assert_eq!(spec.group_id(1, 2)?, 5);
//! let index = GroupIndex::from_pairs(spec, &[0u8, 1, 1], &[0u8, 2, 2])?;
//! assert_eq!(index.members(5), &[1, 2]);
//! assert_eq!(index.empty_groups().len(), 4);
//! # Ok::<(), debiasdd_groups::GroupError>(())
//! ```

mod index;

pub use index::{GroupCounts, GroupIndex};

/// What can go wrong when annotating or sampling groups.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GroupError {
    #[error(
        "a group layout needs at least one class and one attribute, got {n_classes} x {n_attributes}"
    )]
    EmptySpec {
        n_classes: usize,
        n_attributes: usize,
    },
    #[error("class {class} is out of range: this layout has classes 0..{n_classes}")]
    ClassOutOfRange { class: usize, n_classes: usize },
    #[error("attribute {attribute} is out of range: this layout has attributes 0..{n_attributes}")]
    AttributeOutOfRange {
        attribute: usize,
        n_attributes: usize,
    },
    #[error("group {group} is out of range: this layout has groups 0..{n_groups}")]
    GroupOutOfRange { group: usize, n_groups: usize },
    #[error(
        "sample {index} has {what} {value}, outside the layout's range 0..{limit}; \
         check that the dataset and the group layout agree"
    )]
    SampleOutOfRange {
        index: usize,
        what: &'static str,
        value: usize,
        limit: usize,
    },
    #[error(
        "{n_classes} class labels but {n_attributes} attribute labels: every sample needs both"
    )]
    LengthMismatch {
        n_classes: usize,
        n_attributes: usize,
    },
    #[error(
        "group {group} (class {class}, attribute {attribute}) has no samples; \
         skip empty groups (see GroupIndex::empty_groups) before drawing from them"
    )]
    EmptyGroup {
        group: usize,
        class: usize,
        attribute: usize,
    },
    #[error("asked to draw 0 samples from group {group}; ask for at least one")]
    ZeroDraw { group: usize },
}

/// The shape of a group annotation: `n_classes` x `n_attributes` groups.
///
/// Group ids are `class * n_attributes + attribute`, so that the groups of one class are
/// contiguous and a `n_classes x n_attributes` table reads row by row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupSpec {
    n_classes: usize,
    n_attributes: usize,
}

impl GroupSpec {
    pub fn new(n_classes: usize, n_attributes: usize) -> Result<Self, GroupError> {
        if n_classes == 0 || n_attributes == 0 {
            return Err(GroupError::EmptySpec {
                n_classes,
                n_attributes,
            });
        }
        Ok(Self {
            n_classes,
            n_attributes,
        })
    }

    pub fn n_classes(&self) -> usize {
        self.n_classes
    }

    pub fn n_attributes(&self) -> usize {
        self.n_attributes
    }

    pub fn n_groups(&self) -> usize {
        self.n_classes * self.n_attributes
    }

    /// The id of group (class, attribute).
    pub fn group_id(&self, class: usize, attribute: usize) -> Result<usize, GroupError> {
        if class >= self.n_classes {
            return Err(GroupError::ClassOutOfRange {
                class,
                n_classes: self.n_classes,
            });
        }
        if attribute >= self.n_attributes {
            return Err(GroupError::AttributeOutOfRange {
                attribute,
                n_attributes: self.n_attributes,
            });
        }
        Ok(class * self.n_attributes + attribute)
    }

    /// The (class, attribute) pair of a group id; inverse of [`GroupSpec::group_id`].
    pub fn class_and_attribute(&self, group: usize) -> Result<(usize, usize), GroupError> {
        if group >= self.n_groups() {
            return Err(GroupError::GroupOutOfRange {
                group,
                n_groups: self.n_groups(),
            });
        }
        Ok((group / self.n_attributes, group % self.n_attributes))
    }

    /// The ids of the groups of one class, in attribute order.
    pub fn groups_of_class(&self, class: usize) -> Result<std::ops::Range<usize>, GroupError> {
        let first = self.group_id(class, 0)?;
        Ok(first..first + self.n_attributes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_for_every_group() -> Result<(), GroupError> {
        let spec = GroupSpec::new(4, 7)?;
        let mut seen = vec![false; spec.n_groups()];
        for class in 0..4 {
            for attribute in 0..7 {
                let id = spec.group_id(class, attribute)?;
                assert!(!seen[id], "id {id} given twice");
                seen[id] = true;
                assert_eq!(spec.class_and_attribute(id)?, (class, attribute));
            }
        }
        assert!(seen.iter().all(|&s| s));
        Ok(())
    }

    #[test]
    fn ten_by_ten_layout_reads_row_by_row() -> Result<(), GroupError> {
        let spec = GroupSpec::new(10, 10)?;
        assert_eq!(spec.n_groups(), 100);
        // group = class * 10 + colour
        assert_eq!(spec.group_id(3, 7)?, 37);
        assert_eq!(spec.class_and_attribute(90)?, (9, 0));
        assert_eq!(spec.groups_of_class(2)?, 20..30);
        Ok(())
    }

    #[test]
    fn out_of_range_inputs_are_errors() {
        let spec = GroupSpec::new(10, 10).unwrap();
        assert_eq!(
            spec.group_id(10, 0),
            Err(GroupError::ClassOutOfRange {
                class: 10,
                n_classes: 10
            })
        );
        assert!(matches!(
            spec.group_id(0, 10),
            Err(GroupError::AttributeOutOfRange { .. })
        ));
        assert!(matches!(
            spec.class_and_attribute(100),
            Err(GroupError::GroupOutOfRange { .. })
        ));
        assert!(matches!(
            GroupSpec::new(0, 3),
            Err(GroupError::EmptySpec { .. })
        ));
    }
}
