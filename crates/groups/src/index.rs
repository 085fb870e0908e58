//! Per-group membership of a dataset, its counts table, the stratified sampler and balanced
//! weights.

use std::fmt;

use rand::Rng;
use rand::seq::index::sample as sample_indices;

use crate::{GroupError, GroupSpec};

/// Which samples of a dataset belong to which group.
///
/// Members of each group are kept in ascending sample order, so the index is a pure function of
/// the labels and everything drawn from it depends only on the RNG passed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupIndex {
    spec: GroupSpec,
    members: Vec<Vec<usize>>,
}

impl GroupIndex {
    /// Builds the index from per-sample class and attribute labels.
    pub fn from_pairs<C, A>(
        spec: GroupSpec,
        classes: &[C],
        attributes: &[A],
    ) -> Result<Self, GroupError>
    where
        C: Copy + Into<usize>,
        A: Copy + Into<usize>,
    {
        if classes.len() != attributes.len() {
            return Err(GroupError::LengthMismatch {
                n_classes: classes.len(),
                n_attributes: attributes.len(),
            });
        }
        let mut members = vec![Vec::new(); spec.n_groups()];
        for (index, (&class, &attribute)) in classes.iter().zip(attributes).enumerate() {
            let (class, attribute) = (class.into(), attribute.into());
            if class >= spec.n_classes() {
                return Err(GroupError::SampleOutOfRange {
                    index,
                    what: "class",
                    value: class,
                    limit: spec.n_classes(),
                });
            }
            if attribute >= spec.n_attributes() {
                return Err(GroupError::SampleOutOfRange {
                    index,
                    what: "attribute",
                    value: attribute,
                    limit: spec.n_attributes(),
                });
            }
            members[class * spec.n_attributes() + attribute].push(index);
        }
        Ok(Self { spec, members })
    }

    /// Builds the index from per-sample group ids.
    pub fn from_group_ids<G>(spec: GroupSpec, groups: &[G]) -> Result<Self, GroupError>
    where
        G: Copy + Into<usize>,
    {
        Self::from_ids(spec, groups.iter().map(|&g| Some(g.into())))
    }

    /// Builds the index from per-sample group ids where some are unknown (`None`): those samples
    /// belong to no group and are left out, while the others keep their sample index.
    pub fn from_optional_group_ids<G>(
        spec: GroupSpec,
        groups: &[Option<G>],
    ) -> Result<Self, GroupError>
    where
        G: Copy + Into<usize>,
    {
        Self::from_ids(spec, groups.iter().map(|g| g.map(Into::into)))
    }

    fn from_ids(
        spec: GroupSpec,
        groups: impl Iterator<Item = Option<usize>>,
    ) -> Result<Self, GroupError> {
        let mut members = vec![Vec::new(); spec.n_groups()];
        for (index, group) in groups.enumerate() {
            let Some(group) = group else {
                continue;
            };
            if group >= spec.n_groups() {
                return Err(GroupError::SampleOutOfRange {
                    index,
                    what: "group",
                    value: group,
                    limit: spec.n_groups(),
                });
            }
            members[group].push(index);
        }
        Ok(Self { spec, members })
    }

    pub fn spec(&self) -> GroupSpec {
        self.spec
    }

    /// Number of samples indexed.
    pub fn len(&self) -> usize {
        self.members.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The samples of one group, ascending. Panics on an id outside the layout, like slice
    /// indexing; use [`GroupSpec::class_and_attribute`] to validate untrusted ids.
    pub fn members(&self, group: usize) -> &[usize] {
        &self.members[group]
    }

    /// The samples of one class (all its groups), ascending.
    pub fn class_members(&self, class: usize) -> Result<Vec<usize>, GroupError> {
        let mut all: Vec<usize> = self
            .spec
            .groups_of_class(class)?
            .flat_map(|g| self.members[g].iter().copied())
            .collect();
        all.sort_unstable();
        Ok(all)
    }

    /// How many samples each group has.
    pub fn counts(&self) -> GroupCounts {
        GroupCounts {
            spec: self.spec,
            counts: self.members.iter().map(Vec::len).collect(),
        }
    }

    /// Ids of the groups with no samples, ascending.
    pub fn empty_groups(&self) -> Vec<usize> {
        (0..self.spec.n_groups())
            .filter(|&g| self.members[g].is_empty())
            .collect()
    }

    /// Draws up to `n` distinct samples of `group` without replacement, uniformly at random;
    /// all of the group's samples (in random order) when it has `n` or fewer.
    ///
    /// An empty group or `n == 0` is an error rather than an empty draw, so that a caller cannot
    /// silently train on nothing.
    pub fn sample<R: Rng + ?Sized>(
        &self,
        group: usize,
        n: usize,
        rng: &mut R,
    ) -> Result<Vec<usize>, GroupError> {
        let (class, attribute) = self.spec.class_and_attribute(group)?;
        let members = &self.members[group];
        if members.is_empty() {
            return Err(GroupError::EmptyGroup {
                group,
                class,
                attribute,
            });
        }
        if n == 0 {
            return Err(GroupError::ZeroDraw { group });
        }
        let amount = n.min(members.len());
        Ok(sample_indices(rng, members.len(), amount)
            .into_iter()
            .map(|i| members[i])
            .collect())
    }

    /// Per-sample weights that give every non-empty group the same total weight; they sum to 1.
    ///
    /// Sample `i` in group `g` gets `1 / (n_nonempty_groups * count(g))`. Used for
    /// group-balanced ERM (weighted loss, or weighted sampling with replacement).
    pub fn balanced_weights(&self) -> Vec<f64> {
        let mut weights = vec![0.0; self.len()];
        let non_empty = self.members.iter().filter(|m| !m.is_empty()).count();
        for members in self.members.iter().filter(|m| !m.is_empty()) {
            let w = 1.0 / (non_empty as f64 * members.len() as f64);
            for &i in members {
                weights[i] = w;
            }
        }
        weights
    }
}

/// Sample counts per group, printable as a classes x attributes table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCounts {
    spec: GroupSpec,
    counts: Vec<usize>,
}

impl GroupCounts {
    pub fn spec(&self) -> GroupSpec {
        self.spec
    }

    /// Count of one group by id.
    pub fn get(&self, group: usize) -> usize {
        self.counts[group]
    }

    /// Counts by group id.
    pub fn as_slice(&self) -> &[usize] {
        &self.counts
    }

    /// Total samples of one class.
    pub fn class_total(&self, class: usize) -> usize {
        let a = self.spec.n_attributes();
        self.counts[class * a..(class + 1) * a].iter().sum()
    }

    /// Total samples with one attribute.
    pub fn attribute_total(&self, attribute: usize) -> usize {
        (0..self.spec.n_classes())
            .map(|c| self.counts[c * self.spec.n_attributes() + attribute])
            .sum()
    }

    pub fn total(&self) -> usize {
        self.counts.iter().sum()
    }
}

impl fmt::Display for GroupCounts {
    /// Rows are classes, columns attributes, with totals on the right and at the bottom.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (n_c, n_a) = (self.spec.n_classes(), self.spec.n_attributes());
        let width = self.total().to_string().len().max(5);
        write!(f, "{:>5} |", "c\\a")?;
        for a in 0..n_a {
            write!(f, " {a:>width$}")?;
        }
        writeln!(f, " | {:>width$}", "total")?;
        writeln!(f, "{}", "-".repeat(8 + (n_a + 2) * (width + 1)))?;
        for c in 0..n_c {
            write!(f, "{c:>5} |")?;
            for a in 0..n_a {
                write!(f, " {:>width$}", self.counts[c * n_a + a])?;
            }
            writeln!(f, " | {:>width$}", self.class_total(c))?;
        }
        writeln!(f, "{}", "-".repeat(8 + (n_a + 2) * (width + 1)))?;
        write!(f, "{:>5} |", "total")?;
        for a in 0..n_a {
            write!(f, " {:>width$}", self.attribute_total(a))?;
        }
        writeln!(f, " | {:>width$}", self.total())
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// 2 classes x 3 attributes; group sizes 3, 0, 1 | 0, 2, 6.
    fn toy() -> GroupIndex {
        let classes: Vec<u8> = vec![0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1];
        let attrs: Vec<u8> = vec![0, 2, 0, 0, 1, 2, 2, 1, 2, 2, 2, 2];
        GroupIndex::from_pairs(GroupSpec::new(2, 3).unwrap(), &classes, &attrs).unwrap()
    }

    #[test]
    fn unknown_groups_are_left_out_and_indices_kept() {
        let spec = GroupSpec::new(2, 2).unwrap();
        let index = GroupIndex::from_optional_group_ids(spec, &[Some(3u8), None, Some(3), Some(0)])
            .unwrap();
        assert_eq!(index.members(3), &[0, 2]);
        assert_eq!(index.members(0), &[3]);
        assert_eq!(index.len(), 3);
        assert!(GroupIndex::from_optional_group_ids(spec, &[None, Some(4u8)]).is_err());
    }

    #[test]
    fn index_and_counts_are_hand_checked() {
        let idx = toy();
        assert_eq!(idx.members(0), &[0, 2, 3]);
        assert_eq!(idx.members(2), &[1]);
        assert_eq!(idx.members(4), &[4, 7]);
        assert_eq!(idx.members(5), &[5, 6, 8, 9, 10, 11]);
        assert_eq!(idx.counts().as_slice(), &[3, 0, 1, 0, 2, 6]);
        assert_eq!(idx.empty_groups(), vec![1, 3]);
        assert_eq!(idx.class_members(1).unwrap(), (4..12).collect::<Vec<_>>());
        let counts = idx.counts();
        assert_eq!(counts.class_total(0), 4);
        assert_eq!(counts.attribute_total(2), 7);
        assert_eq!(counts.total(), 12);
    }

    #[test]
    fn group_ids_and_pairs_give_the_same_index() {
        let idx = toy();
        let spec = idx.spec();
        let mut ids = vec![0usize; idx.len()];
        for g in 0..spec.n_groups() {
            for &i in idx.members(g) {
                ids[i] = g;
            }
        }
        assert_eq!(GroupIndex::from_group_ids(spec, &ids).unwrap(), idx);
    }

    #[test]
    fn bad_labels_name_the_sample() {
        let spec = GroupSpec::new(2, 3).unwrap();
        let err = GroupIndex::from_pairs(spec, &[0u8, 1], &[0u8, 3]).unwrap_err();
        assert_eq!(
            err,
            GroupError::SampleOutOfRange {
                index: 1,
                what: "attribute",
                value: 3,
                limit: 3
            }
        );
        assert!(err.to_string().contains("sample 1"));
        assert!(matches!(
            GroupIndex::from_pairs(spec, &[0u8], &[0u8, 1]),
            Err(GroupError::LengthMismatch { .. })
        ));
        assert!(matches!(
            GroupIndex::from_group_ids(spec, &[0u8, 6]),
            Err(GroupError::SampleOutOfRange { index: 1, .. })
        ));
    }

    #[test]
    fn sampler_draws_distinct_members_of_the_group() {
        let idx = toy();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..50 {
            let draw = idx.sample(5, 4, &mut rng).unwrap();
            assert_eq!(draw.len(), 4);
            let mut sorted = draw.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(
                sorted.len(),
                4,
                "draw without replacement repeated a sample"
            );
            assert!(draw.iter().all(|i| idx.members(5).contains(i)));
        }
    }

    #[test]
    fn sampler_returns_the_whole_group_when_it_is_small() {
        let idx = toy();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut draw = idx.sample(0, 256, &mut rng).unwrap();
        draw.sort_unstable();
        assert_eq!(draw, vec![0, 2, 3]);
    }

    #[test]
    fn sampler_is_seeded_and_covers_the_group() {
        let idx = toy();
        let draws = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..20)
                .map(|_| idx.sample(5, 2, &mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(3), draws(3));
        assert_ne!(draws(3), draws(4));
        // Over 20 draws of 2 from 6, every member shows up: the draw is not stuck on a prefix.
        let seen: std::collections::BTreeSet<usize> = draws(3).into_iter().flatten().collect();
        assert_eq!(seen.len(), 6);
    }

    #[test]
    fn sampler_refuses_empty_groups_and_zero_draws() {
        let idx = toy();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let err = idx.sample(3, 5, &mut rng).unwrap_err();
        assert_eq!(
            err,
            GroupError::EmptyGroup {
                group: 3,
                class: 1,
                attribute: 0
            }
        );
        assert_eq!(
            idx.sample(0, 0, &mut rng),
            Err(GroupError::ZeroDraw { group: 0 })
        );
        assert!(matches!(
            idx.sample(6, 1, &mut rng),
            Err(GroupError::GroupOutOfRange { .. })
        ));
    }

    #[test]
    fn balanced_weights_give_each_group_equal_mass() {
        let idx = toy();
        let w = idx.balanced_weights();
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        for g in [0, 2, 4, 5] {
            let mass: f64 = idx.members(g).iter().map(|&i| w[i]).sum();
            assert!((mass - 0.25).abs() < 1e-12, "group {g} has mass {mass}");
        }
        // Hand-computed: the lone member of group 2 carries a whole quarter.
        assert_eq!(w[1], 0.25);
    }

    #[test]
    fn counts_table_prints_rows_per_class() {
        let table = toy().counts().to_string();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 6, "{table}");
        assert!(lines[2].trim_start().starts_with("0 |"));
        assert!(lines[3].contains("6 |"), "{table}");
        assert!(lines[5].trim_end().ends_with("12"), "{table}");
    }
}
