//! How far inferred groups agree with annotated ones, when the data has annotations: accuracy of
//! the inferred bias label, adjusted Rand index of the groups, precision and recall of the
//! flagged bias-conflicting samples.

use serde::{Deserialize, Serialize};

/// Agreement of the inferred attributes with the annotated ones over the train images whose
/// annotation is known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    /// Images compared (those with a known annotation).
    pub compared: usize,
    /// Annotated bias-conflicting images among them (attribute != the class's aligned one).
    pub conflicting: usize,
    /// Percent of images whose inferred attribute, mapped to an annotated one, is right.
    pub bias_label_accuracy: f64,
    /// The same over the annotated bias-conflicting images (`None` when there are none).
    pub bias_label_accuracy_conflicting: Option<f64>,
    /// Adjusted Rand index of inferred vs annotated groups (1: the same partition, ~0: chance).
    pub adjusted_rand_index: f64,
    /// Percent of the flagged bias-conflicting images that are annotated conflicting.
    pub conflicting_precision: Option<f64>,
    /// Percent of the annotated conflicting images that are flagged.
    pub conflicting_recall: Option<f64>,
}

/// Everything [`agreement`] compares, per image.
#[derive(Clone, Copy)]
pub struct Compared<'a> {
    pub labels: &'a [u8],
    /// The inferred attribute of each image.
    pub inferred: &'a [u8],
    /// Whether the inference flags the image as bias-conflicting.
    pub flagged: &'a [bool],
    /// The annotated attribute (`None`: unknown, skipped).
    pub annotated: &'a [Option<u8>],
    /// Per class, its bias-aligned annotated attribute.
    pub aligned: &'a [Option<u8>],
    /// The annotated attribute an inferred `(class, attribute)` stands for.
    pub mapping: &'a dyn Fn(u8, u8) -> Option<u8>,
    pub n_inferred: usize,
    pub n_annotated: usize,
}

impl std::fmt::Debug for Compared<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compared")
            .field("images", &self.labels.len())
            .field("n_inferred", &self.n_inferred)
            .field("n_annotated", &self.n_annotated)
            .finish_non_exhaustive()
    }
}

/// The agreement, or `None` when no image has a known annotation.
pub fn agreement(c: Compared<'_>) -> Option<Agreement> {
    let known: Vec<usize> = (0..c.labels.len())
        .filter(|&i| c.annotated[i].is_some())
        .collect();
    if known.is_empty() {
        return None;
    }
    let truth = |i: usize| c.annotated[i].expect("known");
    let is_conflicting =
        |i: usize| c.aligned[usize::from(c.labels[i])].is_some_and(|a| a != truth(i));
    let right = |i: usize| (c.mapping)(c.labels[i], c.inferred[i]) == Some(truth(i));
    let percent = |num: usize, den: usize| (den > 0).then(|| 100.0 * num as f64 / den as f64);
    let conflicting: Vec<usize> = known
        .iter()
        .copied()
        .filter(|&i| is_conflicting(i))
        .collect();
    let flagged: Vec<usize> = known.iter().copied().filter(|&i| c.flagged[i]).collect();
    let true_flags = flagged.iter().filter(|&&i| is_conflicting(i)).count();
    let inferred_group =
        |i: usize| usize::from(c.labels[i]) * c.n_inferred + usize::from(c.inferred[i]);
    let annotated_group =
        |i: usize| usize::from(c.labels[i]) * c.n_annotated + usize::from(truth(i));
    let pairs: Vec<(usize, usize)> = known
        .iter()
        .map(|&i| (inferred_group(i), annotated_group(i)))
        .collect();
    Some(Agreement {
        compared: known.len(),
        conflicting: conflicting.len(),
        bias_label_accuracy: percent(known.iter().filter(|&&i| right(i)).count(), known.len())
            .expect("known is not empty"),
        bias_label_accuracy_conflicting: percent(
            conflicting.iter().filter(|&&i| right(i)).count(),
            conflicting.len(),
        ),
        adjusted_rand_index: adjusted_rand_index(&pairs),
        conflicting_precision: percent(true_flags, flagged.len()),
        conflicting_recall: percent(true_flags, conflicting.len()),
    })
}

/// Hubert and Arabie's adjusted Rand index of two partitions given as (cluster in A, cluster
/// in B) per item; 1 when both partitions are trivial in the same way.
pub fn adjusted_rand_index(pairs: &[(usize, usize)]) -> f64 {
    use std::collections::HashMap;
    let choose2 = |n: usize| (n as f64) * (n as f64 - 1.0) / 2.0;
    let mut cells: HashMap<(usize, usize), usize> = HashMap::new();
    let mut rows: HashMap<usize, usize> = HashMap::new();
    let mut cols: HashMap<usize, usize> = HashMap::new();
    for &(a, b) in pairs {
        *cells.entry((a, b)).or_default() += 1;
        *rows.entry(a).or_default() += 1;
        *cols.entry(b).or_default() += 1;
    }
    let index: f64 = cells.values().map(|&n| choose2(n)).sum();
    let sum_rows: f64 = rows.values().map(|&n| choose2(n)).sum();
    let sum_cols: f64 = cols.values().map(|&n| choose2(n)).sum();
    let expected = sum_rows * sum_cols / choose2(pairs.len()).max(1.0);
    let max = (sum_rows + sum_cols) / 2.0;
    if (max - expected).abs() < 1e-12 {
        return 1.0;
    }
    (index - expected) / (max - expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(a: &[usize], b: &[usize]) -> Vec<(usize, usize)> {
        a.iter().copied().zip(b.iter().copied()).collect()
    }

    /// By hand: contingency [[2, 0, 0], [0, 1, 1]]: index 1, rows 1 + 1 = 2, columns
    /// 1 + 0 + 0 = 1, expected 2 * 1 / 6 = 1/3, max 3/2: (1 - 1/3) / (3/2 - 1/3) = 4/7.
    #[test]
    fn adjusted_rand_index_of_small_partitions() {
        let ari = adjusted_rand_index(&pairs(&[0, 0, 1, 1], &[0, 0, 1, 2]));
        assert!((ari - 4.0 / 7.0).abs() < 1e-12, "{ari}");
        let same = adjusted_rand_index(&pairs(&[0, 0, 1, 1], &[5, 5, 3, 3]));
        assert!((same - 1.0).abs() < 1e-12, "relabelled: {same}");
        // One cluster against all singletons: index 0, expected 0 (no pair in B).
        let apart = adjusted_rand_index(&pairs(&[0, 0, 0, 0], &[0, 1, 2, 3]));
        assert!(apart.abs() < 1e-12, "{apart}");
    }

    /// Two classes; class 0 aligned with attribute 0, class 1 with 1. Image 3 is conflicting and
    /// flagged right, image 1 flagged wrongly, image 5 conflicting and missed.
    #[test]
    fn counts_right_labels_and_flags() {
        let labels = [0, 0, 0, 1, 1, 1];
        let annotated = [Some(0), Some(0), Some(0), Some(0), Some(1), Some(0)];
        let inferred = [0, 1, 0, 0, 1, 1];
        let flagged: Vec<bool> = labels.iter().zip(&inferred).map(|(l, a)| l != a).collect();
        let aligned = [Some(0), Some(1)];
        let mapping = |_class: u8, a: u8| Some(a);
        let a = agreement(Compared {
            labels: &labels,
            inferred: &inferred,
            flagged: &flagged,
            annotated: &annotated,
            aligned: &aligned,
            mapping: &mapping,
            n_inferred: 2,
            n_annotated: 2,
        })
        .expect("annotations known");
        assert_eq!((a.compared, a.conflicting), (6, 2));
        assert!((a.bias_label_accuracy - 100.0 * 4.0 / 6.0).abs() < 1e-9);
        assert_eq!(a.bias_label_accuracy_conflicting, Some(50.0));
        assert_eq!(a.conflicting_precision, Some(50.0));
        assert_eq!(a.conflicting_recall, Some(50.0));
    }
}
