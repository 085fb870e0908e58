//! Accuracy and fairness of one trained network on a labelled split, and their summary over
//! several networks.
//!
//! Every accuracy here is a **percentage in 0..=100**, as the DC and FairDD papers report them.
//!
//! * `accuracy`: correct / all samples.
//! * `aligned_accuracy` / `conflicting_accuracy`: over the samples whose attribute is their
//!   class's bias-aligned one (in Colored MNIST: colour == class) / is another.
//! * `worst_group_accuracy`: the minimum over the (class, attribute) groups that have at least one
//!   sample; empty groups are skipped, not counted as 0 %.
//! * `deo_max` / `deo_mean` (FairDD's DEO_M / DEO_A, "difference of equalized odds"): for each
//!   class y the gap `max_a acc(y, a) - min_a acc(y, a)` between its best and worst attribute,
//!   where acc(y, a) is the true-positive rate (accuracy) of the class-y samples with attribute
//!   a; DEO_M is the largest gap over the classes, DEO_A their mean.
//!
//! Source of the DEO definition: the official FairDD code (github.com/zqhang/FairDD, commit
//! 5e6af8e), `utils.py`, function `epoch_Fairness_Metric` (lines 389-443). It accumulates
//! `eval_true_count[a, y]` = correct predictions of class-y samples with attribute a and divides
//! by their count (line 436), takes `max - min` over the attribute axis (`dim=0`, line 437), then
//! `max_Equalized_Odds = max` and `mean_Equalized_Odds = mean` over classes (lines 438-439), and
//! `evaluate_synset` multiplies both by 100 (line 468). One difference at the edge: FairDD adds
//! 1e-8 to every group's count, so a group absent from the test split enters its max/min as 0 %
//! accuracy; here absent groups are left out of the gap (a class with a single present group has
//! gap 0, a class with no samples is left out of DEO_M and DEO_A). On the Colored MNIST test
//! split, where all 100 groups are present, the two agree.
//!
//! Summaries over several networks use the population standard deviation (divide by n, so one
//! run has std 0), as the DC evaluation prints `np.mean(accs), np.std(accs)` (official DC code
//! github.com/VICO-UoE/DatasetCondensation `main.py` lines 131 and 231; FairDD's `main_DC.py`
//! does the same and averages DEO_M / DEO_A over the networks, line 146).

use debiasdd_groups::GroupSpec;

use crate::error::EvalError;
use serde::{Deserialize, Serialize};

/// Accuracy and fairness of one network's predictions on one split (all values in percent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupMetrics {
    /// Samples evaluated.
    pub n_samples: usize,
    /// Overall accuracy, %.
    pub accuracy: f64,
    /// Accuracy over bias-aligned samples (the class's aligned attribute), %; `None` when there
    /// are none.
    pub aligned_accuracy: Option<f64>,
    /// Accuracy over bias-conflicting samples (attribute != class), %; `None` when there are none.
    pub conflicting_accuracy: Option<f64>,
    /// Minimum accuracy over the non-empty groups, %.
    pub worst_group_accuracy: f64,
    /// FairDD's DEO_M: the largest per-class gap between best and worst attribute accuracy, %.
    pub deo_max: f64,
    /// FairDD's DEO_A: the mean over classes of that gap, %.
    pub deo_mean: f64,
    /// `group_accuracy[class][attribute]`, %; `None` for groups with no samples.
    pub group_accuracy: Vec<Vec<Option<f64>>>,
    /// `group_counts[class][attribute]`: samples per group.
    pub group_counts: Vec<Vec<usize>>,
}

impl GroupMetrics {
    /// Scores `predictions` against `labels`, split by the `attributes` (bias labels) of the same
    /// samples, with Colored MNIST's convention that class `k`'s bias-aligned attribute is `k`.
    /// All three slices are indexed by sample.
    pub fn compute(
        predictions: &[u8],
        labels: &[u8],
        attributes: &[u8],
        spec: GroupSpec,
    ) -> Result<Self, EvalError> {
        let identity: Vec<Option<u8>> = (0..spec.n_classes())
            .map(|k| {
                u8::try_from(k)
                    .ok()
                    .filter(|&k| usize::from(k) < spec.n_attributes())
            })
            .collect();
        Self::compute_with_aligned(predictions, labels, attributes, spec, &identity)
    }

    /// [`GroupMetrics::compute`] where `aligned[k]` is class `k`'s bias-aligned attribute
    /// (`None`: the class has none, all its samples count as conflicting).
    pub fn compute_with_aligned(
        predictions: &[u8],
        labels: &[u8],
        attributes: &[u8],
        spec: GroupSpec,
        aligned_attribute: &[Option<u8>],
    ) -> Result<Self, EvalError> {
        if predictions.len() != labels.len() || labels.len() != attributes.len() {
            return Err(EvalError::LengthMismatch {
                predictions: predictions.len(),
                labels: labels.len(),
                attributes: attributes.len(),
            });
        }
        if labels.is_empty() {
            return Err(EvalError::NoSamples);
        }
        let (n_c, n_a) = (spec.n_classes(), spec.n_attributes());
        let mut counts = vec![vec![0usize; n_a]; n_c];
        let mut correct = vec![vec![0usize; n_a]; n_c];
        for (index, ((&p, &y), &a)) in predictions.iter().zip(labels).zip(attributes).enumerate() {
            let (p, y, a) = (usize::from(p), usize::from(y), usize::from(a));
            for (what, value, limit) in [
                ("prediction", p, n_c),
                ("label", y, n_c),
                ("attribute", a, n_a),
            ] {
                if value >= limit {
                    return Err(EvalError::OutOfRange {
                        index,
                        what,
                        value,
                        limit,
                    });
                }
            }
            counts[y][a] += 1;
            correct[y][a] += usize::from(p == y);
        }

        let percent = |hits: usize, total: usize| 100.0 * hits as f64 / total as f64;
        let group_accuracy: Vec<Vec<Option<f64>>> = (0..n_c)
            .map(|y| {
                (0..n_a)
                    .map(|a| (counts[y][a] > 0).then(|| percent(correct[y][a], counts[y][a])))
                    .collect()
            })
            .collect();

        let (mut hits, mut aligned, mut conflicting) = (0, (0, 0), (0, 0));
        for y in 0..n_c {
            for a in 0..n_a {
                hits += correct[y][a];
                let bucket = if aligned_attribute.get(y).copied().flatten() == Some(a as u8) {
                    &mut aligned
                } else {
                    &mut conflicting
                };
                bucket.0 += correct[y][a];
                bucket.1 += counts[y][a];
            }
        }
        let subset = |(h, n): (usize, usize)| (n > 0).then(|| percent(h, n));

        let worst_group_accuracy = group_accuracy
            .iter()
            .flatten()
            .flatten()
            .copied()
            .fold(f64::INFINITY, f64::min);

        // Per-class gap over the attributes present in the split (see the module docs).
        let gaps: Vec<f64> = group_accuracy
            .iter()
            .filter_map(|row| {
                let present = row.iter().flatten().copied();
                let max = present.clone().fold(f64::NEG_INFINITY, f64::max);
                let min = present.fold(f64::INFINITY, f64::min);
                (max >= min).then_some(max - min)
            })
            .collect();
        let deo_max = gaps.iter().copied().fold(0.0, f64::max);
        let deo_mean = gaps.iter().sum::<f64>() / gaps.len() as f64;

        Ok(Self {
            n_samples: labels.len(),
            accuracy: percent(hits, labels.len()),
            aligned_accuracy: subset(aligned),
            conflicting_accuracy: subset(conflicting),
            worst_group_accuracy,
            deo_max,
            deo_mean,
            group_accuracy,
            group_counts: counts,
        })
    }
}

/// Mean and standard deviation of one metric over several runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    pub mean: f64,
    /// Population standard deviation (divides by n, like `np.std`); 0 for a single run.
    pub std: f64,
}

impl Stat {
    /// Mean and population std of `values`; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        Some(Self {
            mean,
            std: var.sqrt(),
        })
    }
}

/// [`GroupMetrics`] of several networks (e.g. the DC protocol's models trained on one synthetic
/// set) summarised as mean and population std, in percent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricSummary {
    pub n_runs: usize,
    pub accuracy: Stat,
    /// Over the runs that have aligned samples; `None` when none has.
    pub aligned_accuracy: Option<Stat>,
    /// Over the runs that have conflicting samples; `None` when none has.
    pub conflicting_accuracy: Option<Stat>,
    pub worst_group_accuracy: Stat,
    pub deo_max: Stat,
    pub deo_mean: Stat,
    /// Per-cell mean of `group_accuracy` over the runs where the group is present.
    pub group_accuracy_mean: Vec<Vec<Option<f64>>>,
}

impl MetricSummary {
    /// Summarises runs evaluated on the same group layout.
    pub fn from_runs(runs: &[GroupMetrics]) -> Result<Self, EvalError> {
        let first = runs.first().ok_or(EvalError::NoRuns)?;
        let shape = |m: &GroupMetrics| {
            let rows = &m.group_accuracy;
            let cols = rows.first().map_or(0, Vec::len);
            rows.iter()
                .all(|r| r.len() == cols)
                .then_some((rows.len(), cols))
        };
        let (n_c, n_a) = shape(first)
            .ok_or_else(|| EvalError::BadMatrix("run 0 has ragged group rows".into()))?;
        for (run, m) in runs.iter().enumerate().skip(1) {
            let (found_classes, found_attributes) = shape(m).unwrap_or((m.group_accuracy.len(), 0));
            if shape(m) != Some((n_c, n_a)) {
                return Err(EvalError::RunShapeMismatch {
                    run,
                    classes: n_c,
                    attributes: n_a,
                    found_classes,
                    found_attributes,
                });
            }
        }

        let stat = |f: fn(&GroupMetrics) -> f64| {
            let values: Vec<f64> = runs.iter().map(f).collect();
            Stat::of(&values).expect("at least one run")
        };
        let optional = |f: fn(&GroupMetrics) -> Option<f64>| {
            let values: Vec<f64> = runs.iter().filter_map(f).collect();
            Stat::of(&values)
        };
        let group_accuracy_mean = (0..n_c)
            .map(|y| {
                (0..n_a)
                    .map(|a| {
                        let values: Vec<f64> =
                            runs.iter().filter_map(|m| m.group_accuracy[y][a]).collect();
                        Stat::of(&values).map(|s| s.mean)
                    })
                    .collect()
            })
            .collect();

        Ok(Self {
            n_runs: runs.len(),
            accuracy: stat(|m| m.accuracy),
            aligned_accuracy: optional(|m| m.aligned_accuracy),
            conflicting_accuracy: optional(|m| m.conflicting_accuracy),
            worst_group_accuracy: stat(|m| m.worst_group_accuracy),
            deo_max: stat(|m| m.deo_max),
            deo_mean: stat(|m| m.deo_mean),
            group_accuracy_mean,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPS: f64 = 1e-9;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < EPS
    }

    /// 2 classes x 2 attributes, 8 samples, two per group. Hand computation:
    ///
    /// | group (y, a) | preds | correct | acc    |
    /// |--------------|-------|---------|--------|
    /// | (0, 0) align | 0, 0  | 2 / 2   | 100 %  |
    /// | (0, 1) confl | 0, 1  | 1 / 2   |  50 %  |
    /// | (1, 0) confl | 0, 0  | 0 / 2   |   0 %  |
    /// | (1, 1) align | 1, 0  | 1 / 2   |  50 %  |
    ///
    /// accuracy 4/8 = 50; aligned (0,0)+(1,1) = 3/4 = 75; conflicting 1/4 = 25;
    /// worst group 0; gaps: class 0: 100 - 50 = 50, class 1: 50 - 0 = 50 -> DEO_M 50, DEO_A 50.
    fn toy() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let labels = vec![0, 0, 0, 0, 1, 1, 1, 1];
        let attributes = vec![0, 0, 1, 1, 0, 0, 1, 1];
        let predictions = vec![0, 0, 0, 1, 0, 0, 1, 0];
        (predictions, labels, attributes)
    }

    #[test]
    fn hand_computed_two_by_two() -> Result<(), EvalError> {
        let (p, y, a) = toy();
        let m = GroupMetrics::compute(&p, &y, &a, GroupSpec::new(2, 2).unwrap())?;
        assert_eq!(m.n_samples, 8);
        assert!(close(m.accuracy, 50.0));
        assert!(close(m.aligned_accuracy.unwrap(), 75.0));
        assert!(close(m.conflicting_accuracy.unwrap(), 25.0));
        assert!(close(m.worst_group_accuracy, 0.0));
        assert!(close(m.deo_max, 50.0));
        assert!(close(m.deo_mean, 50.0));
        assert_eq!(
            m.group_accuracy,
            vec![vec![Some(100.0), Some(50.0)], vec![Some(0.0), Some(50.0)]]
        );
        assert_eq!(m.group_counts, vec![vec![2, 2], vec![2, 2]]);
        Ok(())
    }

    /// Uneven gaps and an empty group. 2 classes x 3 attributes:
    ///
    /// | group (y, a) | predictions | acc     |
    /// |--------------|-------------|---------|
    /// | (0, 0) align | 0, 0, 0, 1  |  75 %   |
    /// | (0, 1) confl | 0           | 100 %   |
    /// | (0, 2) confl | 1, 0        |  50 %   |
    /// | (1, 0) confl | 0, 0        |   0 %   |
    /// | (1, 1) align | 1, 1        | 100 %   |
    /// | (1, 2)       | (none)      | None    |
    ///
    /// accuracy 3+1+1+0+2 = 7 of 11; aligned 5/6; conflicting 2/5 = 40; worst group 0;
    /// gaps: class 0: 100 - 50 = 50, class 1: 100 - 0 = 100 -> DEO_M 100, DEO_A 75.
    #[test]
    fn uneven_gaps_and_empty_group() -> Result<(), EvalError> {
        let labels = vec![0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1];
        let attributes = vec![0, 0, 0, 0, 1, 2, 2, 0, 0, 1, 1];
        let predictions = vec![0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 1];
        let m = GroupMetrics::compute(
            &predictions,
            &labels,
            &attributes,
            GroupSpec::new(2, 3).unwrap(),
        )?;
        assert!(close(m.accuracy, 700.0 / 11.0));
        assert!(close(m.aligned_accuracy.unwrap(), 500.0 / 6.0));
        assert!(close(m.conflicting_accuracy.unwrap(), 40.0));
        assert!(close(m.worst_group_accuracy, 0.0));
        assert!(close(m.deo_max, 100.0));
        assert!(close(m.deo_mean, 75.0));
        assert_eq!(m.group_accuracy[1][2], None);
        assert_eq!(m.group_counts, vec![vec![4, 1, 2], vec![2, 2, 0]]);
        Ok(())
    }

    /// Empty groups never count as 0 % for the worst group: here every present group is at least
    /// 50 % and the absent ones are skipped. Class 1 has a single present group (gap 0).
    /// Groups: (0,0) 1/1 = 100, (0,1) 1/2 = 50, (1,1) 2/2 = 100; (1,0) absent.
    /// worst 50; gaps 50 and 0 -> DEO_M 50, DEO_A 25.
    #[test]
    fn empty_groups_are_excluded_from_worst_group_and_deo() -> Result<(), EvalError> {
        let labels = vec![0, 0, 0, 1, 1];
        let attributes = vec![0, 1, 1, 1, 1];
        let predictions = vec![0, 0, 1, 1, 1];
        let m = GroupMetrics::compute(
            &predictions,
            &labels,
            &attributes,
            GroupSpec::new(2, 2).unwrap(),
        )?;
        assert!(close(m.worst_group_accuracy, 50.0));
        assert_eq!(m.group_accuracy[1][0], None);
        assert!(close(m.deo_max, 50.0));
        assert!(close(m.deo_mean, 25.0));
        Ok(())
    }

    /// A class with no samples at all is left out of DEO_A rather than counted as gap 0.
    #[test]
    fn absent_class_is_left_out_of_deo_mean() -> Result<(), EvalError> {
        // Class 0 only: (0,0) 1/1, (0,1) 0/1 -> gap 100; class 1 has no samples.
        let m = GroupMetrics::compute(&[0, 1], &[0, 0], &[0, 1], GroupSpec::new(2, 2).unwrap())?;
        assert!(close(m.deo_max, 100.0));
        assert!(close(m.deo_mean, 100.0));
        Ok(())
    }

    #[test]
    fn all_aligned_has_no_conflicting_accuracy() -> Result<(), EvalError> {
        let m = GroupMetrics::compute(&[0, 1], &[0, 1], &[0, 1], GroupSpec::new(2, 2).unwrap())?;
        assert!(close(m.aligned_accuracy.unwrap(), 100.0));
        assert_eq!(m.conflicting_accuracy, None);
        Ok(())
    }

    #[test]
    fn bad_inputs_are_errors() {
        let spec = GroupSpec::new(2, 2).unwrap();
        assert!(matches!(
            GroupMetrics::compute(&[0, 1], &[0, 1, 1], &[0, 1], spec),
            Err(EvalError::LengthMismatch {
                predictions: 2,
                labels: 3,
                attributes: 2
            })
        ));
        assert!(matches!(
            GroupMetrics::compute(&[0], &[0], &[0, 1], spec),
            Err(EvalError::LengthMismatch { .. })
        ));
        assert!(matches!(
            GroupMetrics::compute(&[], &[], &[], spec),
            Err(EvalError::NoSamples)
        ));
        let err = GroupMetrics::compute(&[0, 0], &[0, 2], &[0, 0], spec).unwrap_err();
        assert!(matches!(
            err,
            EvalError::OutOfRange {
                index: 1,
                what: "label",
                value: 2,
                limit: 2
            }
        ));
        assert!(err.to_string().contains("sample 1"));
        assert!(matches!(
            GroupMetrics::compute(&[0, 0], &[0, 0], &[0, 5], spec),
            Err(EvalError::OutOfRange {
                what: "attribute",
                ..
            })
        ));
        assert!(matches!(
            GroupMetrics::compute(&[3], &[0], &[0], spec),
            Err(EvalError::OutOfRange {
                what: "prediction",
                ..
            })
        ));
    }

    #[test]
    fn serialises_to_json() -> anyhow::Result<()> {
        let (p, y, a) = toy();
        let m = GroupMetrics::compute(&p, &y, &a, GroupSpec::new(2, 2)?)?;
        let json = serde_json::to_string(&m)?;
        assert!(json.contains("\"deo_max\":50.0"));
        let back: GroupMetrics = serde_json::from_str(&json)?;
        assert_eq!(back, m);
        Ok(())
    }

    fn run(accuracy: f64, worst: f64, cell: Option<f64>) -> GroupMetrics {
        GroupMetrics {
            n_samples: 10,
            accuracy,
            aligned_accuracy: Some(accuracy + 10.0),
            conflicting_accuracy: None,
            worst_group_accuracy: worst,
            deo_max: 100.0 - worst,
            deo_mean: 50.0,
            group_accuracy: vec![vec![cell, Some(accuracy)]],
            group_counts: vec![vec![5, 5]],
        }
    }

    /// Accuracies 60, 70, 80: mean 70, population std sqrt((100 + 0 + 100) / 3) = 8.1650;
    /// worst 10, 20, 30 -> mean 20, std 8.1650; DEO_M 90, 80, 70 -> mean 80;
    /// cell (0,0) present in runs 0 and 2 only: mean (40 + 60) / 2 = 50.
    #[test]
    fn summary_mean_and_population_std() -> Result<(), EvalError> {
        let runs = [
            run(60.0, 10.0, Some(40.0)),
            run(70.0, 20.0, None),
            run(80.0, 30.0, Some(60.0)),
        ];
        let s = MetricSummary::from_runs(&runs)?;
        let std = (200.0f64 / 3.0).sqrt();
        assert_eq!(s.n_runs, 3);
        assert!(close(s.accuracy.mean, 70.0) && close(s.accuracy.std, std));
        assert!(close(s.aligned_accuracy.unwrap().mean, 80.0));
        assert_eq!(s.conflicting_accuracy, None);
        assert!(close(s.worst_group_accuracy.mean, 20.0));
        assert!(close(s.worst_group_accuracy.std, std));
        assert!(close(s.deo_max.mean, 80.0));
        assert!(close(s.deo_mean.mean, 50.0) && close(s.deo_mean.std, 0.0));
        assert_eq!(s.group_accuracy_mean, vec![vec![Some(50.0), Some(70.0)]]);
        Ok(())
    }

    #[test]
    fn summary_of_one_run_has_zero_std() -> Result<(), EvalError> {
        let s = MetricSummary::from_runs(&[run(60.0, 10.0, None)])?;
        assert!(close(s.accuracy.mean, 60.0) && close(s.accuracy.std, 0.0));
        assert_eq!(s.group_accuracy_mean, vec![vec![None, Some(60.0)]]);
        Ok(())
    }

    #[test]
    fn summary_rejects_no_runs_and_mixed_layouts() {
        assert!(matches!(
            MetricSummary::from_runs(&[]),
            Err(EvalError::NoRuns)
        ));
        let mut other = run(50.0, 0.0, None);
        other.group_accuracy = vec![vec![None], vec![None]];
        assert!(matches!(
            MetricSummary::from_runs(&[run(50.0, 0.0, None), other]),
            Err(EvalError::RunShapeMismatch {
                run: 1,
                classes: 1,
                attributes: 2,
                found_classes: 2,
                found_attributes: 1
            })
        ));
    }
}
