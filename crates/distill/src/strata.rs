//! The strata of a run: which synthetic images and which real images form each matching term.
//!
//! Independent of the method: DC matches gradients over these terms, a distribution-matching
//! method would match embeddings over the same ones. A [`MatchingPlan`] orders the synthetic set
//! class by class (and by colour within a class in group mode), lists the real strata (classes
//! or non-empty groups) the real batches are drawn from, and pairs every term's synthetic
//! segment with its stratum. [`MatchingPlan::draw_real`] draws one step's real batch from every
//! stratum.

use std::fmt;
use std::str::FromStr;

use candle_core::{Device, Tensor};
use debiasdd_groups::{GroupIndex, GroupSpec};
use debiasdd_model::backend::Segments;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::DistillError;

/// Which real images each synthetic segment is matched against: the strata of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MatchMode {
    /// Vanilla: one term per class; the real batch of class c is drawn from the whole class
    /// (and so inherits its colour bias).
    Class,
    /// Debiased: every synthetic image belongs to a (class, colour) group; one term per group,
    /// its real batch drawn from that group only. Groups without real samples are skipped.
    Group,
    /// FairDD's variant: each class's synthetic statistic is matched against the real one of
    /// every non-empty group of that class, the terms summed.
    ClassVsGroups,
}

impl MatchMode {
    pub const ALL: [MatchMode; 3] = [MatchMode::Class, MatchMode::Group, MatchMode::ClassVsGroups];

    pub fn name(self) -> &'static str {
        match self {
            MatchMode::Class => "class",
            MatchMode::Group => "group",
            MatchMode::ClassVsGroups => "class-vs-groups",
        }
    }

    /// How tables and legends name the strata after the method ("DC class-wise").
    pub fn label(self) -> &'static str {
        match self {
            MatchMode::Class => "class-wise",
            MatchMode::Group => "group-wise (debiased)",
            MatchMode::ClassVsGroups => "class-vs-groups (FairDD)",
        }
    }
}

impl fmt::Display for MatchMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MatchMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|v| v.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("unknown value `{s}`; expected one of: class, group, class-vs-groups")
            })
    }
}

/// A set of real training images the real batches of one or more matching terms are drawn from.
#[derive(Debug, Clone)]
pub struct Stratum {
    pub class: u8,
    /// Indices into the train split.
    pub members: Vec<usize>,
}

/// One step's real images: `min(batch, size)` images of every stratum, stratum after stratum.
#[derive(Debug, Clone)]
pub struct RealBatch {
    /// (N, C, H, W), normalised, on the run's device.
    pub images: Tensor,
    /// Class labels (N), U32.
    pub labels: Tensor,
    /// One segment per stratum, in [`MatchingPlan::strata`] order.
    pub segments: Segments,
}

/// The terms of every step of a run, fixed by the strata and the train split's groups.
#[derive(Debug, Clone)]
pub struct MatchingPlan {
    mode: MatchMode,
    /// Synthetic images are ordered class by class; within a class, by colour in group mode.
    syn_segments: Segments,
    syn_labels: Vec<u8>,
    syn_groups: Vec<Option<u16>>,
    strata: Vec<Stratum>,
    /// (synthetic segment, stratum) of every term.
    pairs: Vec<(usize, usize)>,
    /// Groups without real samples (they contribute no term).
    empty_groups: Vec<u16>,
    /// Train-split indices of every group and of every class (for real initialisation).
    group_members: Vec<Vec<usize>>,
    class_members: Vec<Vec<usize>>,
    /// The synthetic labels as a U32 tensor, and the index tensors that expand per-segment and
    /// per-stratum rows into per-term rows (`None` where terms and rows coincide).
    syn_label_tensor: Tensor,
    syn_index: Option<Tensor>,
    real_index: Option<Tensor>,
}

impl MatchingPlan {
    /// The plan of `mode` at `ipc` synthetic images per class over the train split's `index`,
    /// with its tensors on `device`.
    pub fn new(
        mode: MatchMode,
        ipc: usize,
        index: &GroupIndex,
        device: &Device,
    ) -> Result<Self, DistillError> {
        let spec = GroupSpec::COLORED_MNIST;
        let (n_classes, n_attr) = (spec.n_classes(), spec.n_attributes());
        for class in 0..n_classes {
            if index.class_members(class).map_or(true, |m| m.is_empty()) {
                return Err(DistillError::EmptyClass { class });
            }
        }
        let empty_groups: Vec<u16> = index.empty_groups().iter().map(|&g| g as u16).collect();
        let group_members: Vec<Vec<usize>> = (0..spec.n_groups())
            .map(|g| index.members(g).to_vec())
            .collect();
        let class_members: Vec<Vec<usize>> = (0..n_classes)
            .map(|c| index.class_members(c).expect("class in range"))
            .collect();
        let syn_labels: Vec<u8> = (0..n_classes)
            .flat_map(|c| std::iter::repeat_n(c as u8, ipc))
            .collect();
        let group_strata = || {
            let mut strata = Vec::new();
            let mut stratum_of_group = vec![None; spec.n_groups()];
            for (group, slot) in stratum_of_group.iter_mut().enumerate() {
                let members = index.members(group);
                if !members.is_empty() {
                    *slot = Some(strata.len());
                    strata.push(Stratum {
                        class: (group / n_attr) as u8,
                        members: members.to_vec(),
                    });
                }
            }
            (strata, stratum_of_group)
        };
        let (syn_segments, syn_groups, strata, pairs): (_, _, _, Vec<(usize, usize)>) = match mode {
            MatchMode::Class => (
                Segments::uniform(n_classes, ipc)?,
                vec![None; n_classes * ipc],
                class_members
                    .iter()
                    .enumerate()
                    .map(|(c, members)| Stratum {
                        class: c as u8,
                        members: members.clone(),
                    })
                    .collect(),
                (0..n_classes).map(|c| (c, c)).collect(),
            ),
            MatchMode::Group => {
                let per_group = ipc / n_attr;
                let (strata, stratum_of_group) = group_strata();
                let pairs = stratum_of_group
                    .iter()
                    .enumerate()
                    .filter_map(|(g, s)| s.map(|s| (g, s)))
                    .collect();
                let syn_groups = (0..n_classes * ipc)
                    .map(|i| {
                        let (class, j) = (i / ipc, i % ipc);
                        Some((class * n_attr + j / per_group) as u16)
                    })
                    .collect();
                (
                    Segments::uniform(spec.n_groups(), per_group)?,
                    syn_groups,
                    strata,
                    pairs,
                )
            }
            MatchMode::ClassVsGroups => {
                let (strata, stratum_of_group) = group_strata();
                let pairs = stratum_of_group
                    .iter()
                    .enumerate()
                    .filter_map(|(g, s)| s.map(|s| (g / n_attr, s)))
                    .collect();
                (
                    Segments::uniform(n_classes, ipc)?,
                    vec![None; n_classes * ipc],
                    strata,
                    pairs,
                )
            }
        };
        let (syn_index, real_index) =
            pair_indices(&pairs, syn_segments.count(), strata.len(), device)?;
        Ok(Self {
            mode,
            syn_label_tensor: label_tensor(&syn_labels, device)?,
            syn_segments,
            syn_labels,
            syn_groups,
            strata,
            pairs,
            empty_groups,
            group_members,
            class_members,
            syn_index,
            real_index,
        })
    }

    pub fn mode(&self) -> MatchMode {
        self.mode
    }

    /// The synthetic set's segments: one per class, or one per group in group mode.
    pub fn syn_segments(&self) -> &Segments {
        &self.syn_segments
    }

    /// The class of every synthetic image.
    pub fn syn_labels(&self) -> &[u8] {
        &self.syn_labels
    }

    /// [`Self::syn_labels`] as a U32 tensor on the run's device.
    pub fn syn_label_tensor(&self) -> &Tensor {
        &self.syn_label_tensor
    }

    /// The group of every synthetic image (group mode), else `None`.
    pub fn syn_groups(&self) -> &[Option<u16>] {
        &self.syn_groups
    }

    /// The real strata, in the order of a [`RealBatch`]'s segments.
    pub fn strata(&self) -> &[Stratum] {
        &self.strata
    }

    /// (synthetic segment, stratum) of every matching term.
    pub fn pairs(&self) -> &[(usize, usize)] {
        &self.pairs
    }

    pub fn n_terms(&self) -> usize {
        self.pairs.len()
    }

    /// Groups with no real training images; in group modes they get no matching term.
    pub fn empty_groups(&self) -> &[u16] {
        &self.empty_groups
    }

    /// Index tensors (term -> synthetic segment, term -> stratum) that expand per-segment and
    /// per-stratum rows into per-term rows; `None` where terms and rows coincide, in order.
    pub fn term_indices(&self) -> (Option<&Tensor>, Option<&Tensor>) {
        (self.syn_index.as_ref(), self.real_index.as_ref())
    }

    /// Draws `min(batch, size)` images without replacement from every stratum of `images` (the
    /// train split on the run's device).
    pub fn draw_real(
        &self,
        images: &Tensor,
        batch: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<RealBatch, DistillError> {
        let device = images.device();
        let mut chosen: Vec<u32> = Vec::new();
        let mut labels = Vec::new();
        let mut lens = Vec::with_capacity(self.strata.len());
        for stratum in &self.strata {
            let k = batch.min(stratum.members.len());
            let picks = rand::seq::index::sample(rng, stratum.members.len(), k);
            chosen.extend(picks.iter().map(|i| stratum.members[i] as u32));
            labels.extend(std::iter::repeat_n(stratum.class, k));
            lens.push(k);
        }
        let idx = Tensor::new(chosen.as_slice(), device)?;
        Ok(RealBatch {
            images: images.index_select(&idx, 0)?,
            labels: label_tensor(&labels, device)?,
            segments: Segments::new(lens)?,
        })
    }

    /// The real images a synthetic image is initialised from: its group's (group mode, when
    /// the group has images), else its class's.
    pub(crate) fn init_pool(&self, image: usize) -> &[usize] {
        match self.syn_groups[image] {
            Some(g) if !self.group_members[g as usize].is_empty() => {
                &self.group_members[g as usize]
            }
            _ => &self.class_members[self.syn_labels[image] as usize],
        }
    }
}

/// Index tensors that expand per-segment (per-stratum) rows into per-term rows; `None` when the
/// terms are the segments themselves, in order.
fn pair_indices(
    pairs: &[(usize, usize)],
    n_segments: usize,
    n_strata: usize,
    device: &Device,
) -> Result<(Option<Tensor>, Option<Tensor>), DistillError> {
    let expand = |column: Vec<u32>, count: usize| -> Result<Option<Tensor>, DistillError> {
        if column.len() == count && column.iter().enumerate().all(|(i, &v)| i as u32 == v) {
            Ok(None)
        } else {
            Ok(Some(Tensor::new(column.as_slice(), device)?))
        }
    };
    let syn: Vec<u32> = pairs.iter().map(|&(s, _)| s as u32).collect();
    let real: Vec<u32> = pairs.iter().map(|&(_, r)| r as u32).collect();
    Ok((expand(syn, n_segments)?, expand(real, n_strata)?))
}

/// Class labels as a U32 tensor on `device`.
pub(crate) fn label_tensor(labels: &[u8], device: &Device) -> Result<Tensor, DistillError> {
    let v: Vec<u32> = labels.iter().map(|&l| u32::from(l)).collect();
    Ok(Tensor::from_vec(v, labels.len(), device)?)
}

/// `rows[p].index_select(index, 0)` for every tensor, or the tensors themselves.
pub fn select_rows(rows: Vec<Tensor>, index: Option<&Tensor>) -> Result<Vec<Tensor>, DistillError> {
    match index {
        None => Ok(rows),
        Some(index) => Ok(rows
            .iter()
            .map(|g| g.index_select(index, 0))
            .collect::<candle_core::Result<Vec<_>>>()?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in MatchMode::ALL {
            assert_eq!(m.name().parse::<MatchMode>(), Ok(m));
        }
        assert!(
            "pixel"
                .parse::<MatchMode>()
                .unwrap_err()
                .contains("class-vs-groups")
        );
    }
}
