//! The strata of a run: which synthetic images and which real images form each matching term.
//!
//! Independent of the method: DC matches gradients over these terms, DM embeddings over the
//! same ones. A [`MatchingPlan`] orders the synthetic set class by class (and by colour within a
//! class in group mode), lists the real strata (classes or non-empty groups) the real batches
//! are drawn from, and gives every [`Term`] its synthetic segment and its strata (one, or in
//! COBRA's mode all of the class's groups, whose statistics are averaged unweighted).
//! [`MatchingPlan::draw_real`] draws one step's real batch from every stratum, so in the group
//! modes every present group, minorities included, is in every step.

use std::fmt;
use std::str::FromStr;

use candle_core::{Device, Tensor};
use debiasdd_groups::GroupIndex;
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
    /// COBRA's barycenter: each class's synthetic statistic is matched against the unweighted
    /// mean of the real statistics of the class's non-empty groups (one term per class).
    ClassVsGroupMean,
}

impl MatchMode {
    pub const ALL: [MatchMode; 4] = [
        MatchMode::Class,
        MatchMode::Group,
        MatchMode::ClassVsGroups,
        MatchMode::ClassVsGroupMean,
    ];

    /// Whether the real batches are drawn per (class, colour) group.
    pub fn per_group(self) -> bool {
        self != MatchMode::Class
    }

    pub fn name(self) -> &'static str {
        match self {
            MatchMode::Class => "class",
            MatchMode::Group => "group",
            MatchMode::ClassVsGroups => "class-vs-groups",
            MatchMode::ClassVsGroupMean => "class-vs-group-mean",
        }
    }

    /// How tables and legends name the strata after the method ("DC class-wise").
    pub fn label(self) -> &'static str {
        match self {
            MatchMode::Class => "class-wise",
            MatchMode::Group => "group-wise (debiased)",
            MatchMode::ClassVsGroups => "class-vs-groups (FairDD)",
            MatchMode::ClassVsGroupMean => "class-vs-group-mean (COBRA)",
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
                format!(
                    "unknown value `{s}`; expected one of: class, group, class-vs-groups, class-vs-group-mean"
                )
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

/// One matching term: a synthetic segment against the unweighted mean of the real statistics
/// of one or more strata (one stratum in every mode but [`MatchMode::ClassVsGroupMean`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    /// Index into [`MatchingPlan::syn_segments`].
    pub syn_segment: usize,
    /// Indices into [`MatchingPlan::strata`], at least one.
    pub strata: Vec<usize>,
}

/// How per-stratum real rows become per-term rows.
#[derive(Debug, Clone)]
enum RealMix {
    /// Terms and strata coincide, in order.
    Identity,
    /// Term t takes the row of stratum `index[t]`.
    Select(Tensor),
    /// Term t takes row t of `weights` (terms x strata) times the strata's rows: the unweighted
    /// mean of its strata.
    Mean(Tensor),
}

/// What a [`MatchingPlan`] is built from.
struct Parts {
    mode: MatchMode,
    syn_segments: Segments,
    syn_labels: Vec<u8>,
    syn_groups: Vec<Option<u16>>,
    strata: Vec<Stratum>,
    terms: Vec<Term>,
    empty_groups: Vec<u16>,
    group_members: Vec<Vec<usize>>,
    class_members: Vec<Vec<usize>>,
}

/// Some synthetic segments of a plan with their terms and strata ([`MatchingPlan::part`]).
#[derive(Debug, Clone)]
pub struct PlanPart {
    /// A plan of its own over those segments, terms and strata, renumbered.
    pub plan: MatchingPlan,
    /// The rows of the whole synthetic set its segments hold, U32, in order.
    pub syn_rows: Tensor,
    /// Its synthetic segments and strata as indices into the whole plan's, ascending.
    pub segments: Vec<usize>,
    pub strata: Vec<usize>,
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
    terms: Vec<Term>,
    /// The synthetic segment of every stratum's term.
    stratum_segments: Vec<usize>,
    /// Groups without real samples (they contribute no term).
    empty_groups: Vec<u16>,
    /// Train-split indices of every group and of every class (for real initialisation).
    group_members: Vec<Vec<usize>>,
    class_members: Vec<Vec<usize>>,
    /// The synthetic labels as a U32 tensor, the index tensor that expands per-segment rows
    /// into per-term rows (`None` where terms and segments coincide), and how per-stratum rows
    /// become per-term rows.
    syn_label_tensor: Tensor,
    syn_index: Option<Tensor>,
    real_mix: RealMix,
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
        let spec = index.spec();
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
        // The non-empty groups as strata, and (group, stratum) of each.
        let group_strata = || {
            let mut strata = Vec::new();
            let mut present = Vec::new();
            for group in 0..spec.n_groups() {
                let members = index.members(group);
                if !members.is_empty() {
                    present.push((group, strata.len()));
                    strata.push(Stratum {
                        class: (group / n_attr) as u8,
                        members: members.to_vec(),
                    });
                }
            }
            (strata, present)
        };
        let one = |syn_segment: usize, stratum: usize| Term {
            syn_segment,
            strata: vec![stratum],
        };
        let per_class = || Segments::uniform(n_classes, ipc);
        let (syn_segments, syn_groups, strata, terms): (_, _, _, Vec<Term>) = match mode {
            MatchMode::Class => (
                per_class()?,
                vec![None; n_classes * ipc],
                class_members
                    .iter()
                    .enumerate()
                    .map(|(c, members)| Stratum {
                        class: c as u8,
                        members: members.clone(),
                    })
                    .collect(),
                (0..n_classes).map(|c| one(c, c)).collect(),
            ),
            MatchMode::Group => {
                let per_group = ipc / n_attr;
                let (strata, present) = group_strata();
                let terms = present.iter().map(|&(g, s)| one(g, s)).collect();
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
                    terms,
                )
            }
            MatchMode::ClassVsGroups => {
                let (strata, present) = group_strata();
                let terms = present.iter().map(|&(g, s)| one(g / n_attr, s)).collect();
                (per_class()?, vec![None; n_classes * ipc], strata, terms)
            }
            MatchMode::ClassVsGroupMean => {
                let (strata, present) = group_strata();
                let terms = (0..n_classes)
                    .map(|c| Term {
                        syn_segment: c,
                        strata: present
                            .iter()
                            .filter(|&&(g, _)| g / n_attr == c)
                            .map(|&(_, s)| s)
                            .collect(),
                    })
                    .collect();
                (per_class()?, vec![None; n_classes * ipc], strata, terms)
            }
        };
        Self::assemble(
            Parts {
                mode,
                syn_segments,
                syn_labels,
                syn_groups,
                strata,
                terms,
                empty_groups,
                group_members,
                class_members,
            },
            device,
        )
    }

    /// The plan of `parts`, with its index tensors on `device`.
    fn assemble(parts: Parts, device: &Device) -> Result<Self, DistillError> {
        let Parts {
            mode,
            syn_segments,
            syn_labels,
            syn_groups,
            strata,
            terms,
            empty_groups,
            group_members,
            class_members,
        } = parts;
        let syn_index = expand_index(
            terms.iter().map(|t| t.syn_segment as u32).collect(),
            syn_segments.count(),
            device,
        )?;
        let real_mix = real_mix(&terms, strata.len(), device)?;
        let mut stratum_segments = vec![0; strata.len()];
        for term in &terms {
            for &s in &term.strata {
                stratum_segments[s] = term.syn_segment;
            }
        }
        Ok(Self {
            mode,
            syn_label_tensor: label_tensor(&syn_labels, device)?,
            syn_segments,
            syn_labels,
            syn_groups,
            strata,
            terms,
            stratum_segments,
            empty_groups,
            group_members,
            class_members,
            syn_index,
            real_mix,
        })
    }

    /// The part of this plan that holds the synthetic segments `segments` (ascending indices
    /// into [`Self::syn_segments`]), every term of theirs and every stratum of those terms,
    /// renumbered in the same order: what one rank of a sharded run computes
    /// ([`crate::ranks`]). `None` when `segments` is empty.
    pub fn part(
        &self,
        segments: &[usize],
        device: &Device,
    ) -> Result<Option<PlanPart>, DistillError> {
        if segments.is_empty() {
            return Ok(None);
        }
        let ranges: Vec<(usize, usize)> = self.syn_segments.ranges().collect();
        let lens = self.syn_segments.lens();
        let mut rows: Vec<u32> = Vec::new();
        for &s in segments {
            let (start, len) = ranges[s];
            rows.extend((start..start + len).map(|r| r as u32));
        }
        let new_segment = |s: usize| segments.iter().position(|&k| k == s);
        let kept_terms: Vec<&Term> = self
            .terms
            .iter()
            .filter(|t| new_segment(t.syn_segment).is_some())
            .collect();
        let mut strata: Vec<usize> = kept_terms
            .iter()
            .flat_map(|t| t.strata.iter().copied())
            .collect();
        strata.sort_unstable();
        strata.dedup();
        let new_stratum = |s: usize| strata.binary_search(&s).expect("a kept stratum");
        let terms = kept_terms
            .iter()
            .map(|t| Term {
                syn_segment: new_segment(t.syn_segment).expect("a kept segment"),
                strata: t.strata.iter().map(|&s| new_stratum(s)).collect(),
            })
            .collect();
        let plan = Self::assemble(
            Parts {
                mode: self.mode,
                syn_segments: Segments::new(segments.iter().map(|&s| lens[s]).collect())?,
                syn_labels: rows.iter().map(|&r| self.syn_labels[r as usize]).collect(),
                syn_groups: rows.iter().map(|&r| self.syn_groups[r as usize]).collect(),
                strata: strata.iter().map(|&s| self.strata[s].clone()).collect(),
                terms,
                empty_groups: self.empty_groups.clone(),
                group_members: self.group_members.clone(),
                class_members: self.class_members.clone(),
            },
            device,
        )?;
        Ok(Some(PlanPart {
            plan,
            syn_rows: Tensor::new(rows.as_slice(), device)?,
            segments: segments.to_vec(),
            strata,
        }))
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

    /// The matching terms: each a synthetic segment against the mean of its strata.
    pub fn terms(&self) -> &[Term] {
        &self.terms
    }

    pub fn n_terms(&self) -> usize {
        self.terms.len()
    }

    /// The synthetic segment every stratum is matched against (each stratum belongs to exactly
    /// one term in every mode), in [`Self::strata`] order.
    pub fn stratum_segments(&self) -> &[usize] {
        &self.stratum_segments
    }

    /// Groups with no real training images; in group modes they get no matching term.
    pub fn empty_groups(&self) -> &[u16] {
        &self.empty_groups
    }

    /// The index tensor (term -> synthetic segment) that expands per-segment rows into per-term
    /// rows; `None` where terms and segments coincide, in order.
    pub fn syn_index(&self) -> Option<&Tensor> {
        self.syn_index.as_ref()
    }

    /// Per-segment synthetic rows (one tensor per statistic, each (segments, ...)) as per-term
    /// rows (terms, ...).
    pub fn syn_terms(&self, rows: Vec<Tensor>) -> Result<Vec<Tensor>, DistillError> {
        select_rows(rows, self.syn_index.as_ref())
    }

    /// Per-stratum real rows (one tensor per statistic, each (strata, ...)) as per-term rows
    /// (terms, ...): a term's row is its stratum's, or the unweighted mean of its strata's.
    pub fn real_terms(&self, rows: Vec<Tensor>) -> Result<Vec<Tensor>, DistillError> {
        match &self.real_mix {
            RealMix::Identity => Ok(rows),
            RealMix::Select(index) => select_rows(rows, Some(index)),
            RealMix::Mean(weights) => rows
                .iter()
                .map(|r| {
                    let dims = r.dims();
                    let flat = r.flatten_from(1)?;
                    let mixed = weights.to_dtype(r.dtype())?.matmul(&flat)?;
                    let mut shape = dims.to_vec();
                    shape[0] = weights.dim(0)?;
                    Ok(mixed.reshape(shape)?)
                })
                .collect(),
        }
    }

    /// Draws `min(batch, size)` images without replacement from every stratum of `images` (the
    /// train split on the run's device).
    pub fn draw_real(
        &self,
        images: &Tensor,
        batch: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<RealBatch, DistillError> {
        self.draw_real_of(images, batch, rng, None)?
            .ok_or_else(|| candle_core::Error::Msg("a plan without strata".into()).into())
    }

    /// [`Self::draw_real`], keeping only the strata `keep` (ascending indices into
    /// [`Self::strata`]; `None`: all) in the batch; `None` when that keeps none. The generator
    /// advances as for the whole batch, so every rank of a sharded run draws the same images
    /// as one rank would.
    pub fn draw_real_of(
        &self,
        images: &Tensor,
        batch: usize,
        rng: &mut ChaCha8Rng,
        keep: Option<&[usize]>,
    ) -> Result<Option<RealBatch>, DistillError> {
        let device = images.device();
        let mut chosen: Vec<u32> = Vec::new();
        let mut labels = Vec::new();
        let mut lens = Vec::with_capacity(self.strata.len());
        for (s, stratum) in self.strata.iter().enumerate() {
            let k = batch.min(stratum.members.len());
            let picks = rand::seq::index::sample(rng, stratum.members.len(), k);
            if keep.is_some_and(|keep| keep.binary_search(&s).is_err()) {
                continue;
            }
            chosen.extend(picks.iter().map(|i| stratum.members[i] as u32));
            labels.extend(std::iter::repeat_n(stratum.class, k));
            lens.push(k);
        }
        if lens.is_empty() {
            return Ok(None);
        }
        let idx = Tensor::new(chosen.as_slice(), device)?;
        Ok(Some(RealBatch {
            images: images.index_select(&idx, 0)?,
            labels: label_tensor(&labels, device)?,
            segments: Segments::new(lens)?,
        }))
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

/// The index tensor of `column` (one row index per term), or `None` when it is `0..count`.
fn expand_index(
    column: Vec<u32>,
    count: usize,
    device: &Device,
) -> Result<Option<Tensor>, DistillError> {
    if column.len() == count && column.iter().enumerate().all(|(i, &v)| i as u32 == v) {
        Ok(None)
    } else {
        Ok(Some(Tensor::new(column.as_slice(), device)?))
    }
}

/// How the terms take their real rows from the strata's.
fn real_mix(terms: &[Term], n_strata: usize, device: &Device) -> Result<RealMix, DistillError> {
    if terms.iter().all(|t| t.strata.len() == 1) {
        let column = terms.iter().map(|t| t.strata[0] as u32).collect();
        return Ok(match expand_index(column, n_strata, device)? {
            None => RealMix::Identity,
            Some(index) => RealMix::Select(index),
        });
    }
    let mut weights = vec![0f64; terms.len() * n_strata];
    for (t, term) in terms.iter().enumerate() {
        for &s in &term.strata {
            weights[t * n_strata + s] = 1.0 / term.strata.len() as f64;
        }
    }
    Ok(RealMix::Mean(Tensor::from_vec(
        weights,
        (terms.len(), n_strata),
        device,
    )?))
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
