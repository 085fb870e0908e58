//! Which rank computes which matching terms: the synthetic segments (each with all of its terms
//! and their strata) split over the ranks by an estimate of their cost.

use std::sync::Arc;

use candle_core::Device;

use super::Collective;
use crate::error::DistillError;
use crate::strata::{MatchingPlan, PlanPart};

/// Cost of a synthetic image relative to a real one in a matching step. DC: a real image
/// costs a forward and a backward pass, a synthetic one those plus the second-order pass; DM:
/// a real image a forward pass, a synthetic one a forward and a backward pass. Both about 2.
pub const SYNTHETIC_WEIGHT: f64 = 2.0;

/// The estimated cost of every synthetic segment of `plan` in a step with `batch` real images
/// per stratum: the real images of its strata plus [`SYNTHETIC_WEIGHT`] per synthetic image;
/// 0 for a segment without a term (its images get no gradient and it goes to no rank).
pub fn segment_costs(plan: &MatchingPlan, batch: usize) -> Vec<f64> {
    let mut costs = vec![0.0; plan.syn_segments().count()];
    let mut has_term = vec![false; costs.len()];
    for term in plan.terms() {
        has_term[term.syn_segment] = true;
        for &s in &term.strata {
            costs[term.syn_segment] += batch.min(plan.strata()[s].members.len()) as f64;
        }
    }
    for ((cost, &len), has) in costs
        .iter_mut()
        .zip(plan.syn_segments().lens())
        .zip(has_term)
    {
        if has {
            *cost += SYNTHETIC_WEIGHT * len as f64;
        }
    }
    costs
}

/// The synthetic segments of each of `ranks` ranks (ascending within a rank): longest
/// processing time first over `costs`, a segment to the least loaded rank (the lowest on ties),
/// segments of cost 0 to none. Deterministic.
pub fn assign(costs: &[f64], ranks: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..costs.len()).filter(|&s| costs[s] > 0.0).collect();
    order.sort_by(|&a, &b| costs[b].total_cmp(&costs[a]).then(a.cmp(&b)));
    let mut load = vec![0f64; ranks];
    let mut parts = vec![Vec::new(); ranks];
    for s in order {
        let rank = (0..ranks)
            .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)))
            .expect("at least one rank");
        load[rank] += costs[s];
        parts[rank].push(s);
    }
    for part in &mut parts {
        part.sort_unstable();
    }
    parts
}

/// How `plan`'s terms split over `ranks` ranks at `batch` real images per stratum: per rank,
/// its number of terms and its share of the estimated cost (for reports).
pub fn describe(plan: &MatchingPlan, batch: usize, ranks: usize) -> Vec<(usize, f64)> {
    let costs = segment_costs(plan, batch);
    let total: f64 = costs.iter().sum();
    assign(&costs, ranks)
        .iter()
        .map(|segments| {
            let terms = plan
                .terms()
                .iter()
                .filter(|t| segments.contains(&t.syn_segment))
                .count();
            let cost: f64 = segments.iter().map(|&s| costs[s]).sum();
            (terms, if total > 0.0 { cost / total } else { 0.0 })
        })
        .collect()
}

/// One rank's share of a run: the collective, and its part of the plan (`None` when it got
/// no segment: it then adds zeros).
#[derive(Debug, Clone)]
pub(crate) struct Shard {
    pub collective: Arc<dyn Collective>,
    pub part: Option<PlanPart>,
}

impl Shard {
    /// Rank `collective.rank()`'s share of `plan` at `batch` real images per stratum.
    pub fn new(
        collective: Arc<dyn Collective>,
        plan: &MatchingPlan,
        batch: usize,
        device: &Device,
    ) -> Result<Self, DistillError> {
        let parts = assign(&segment_costs(plan, batch), collective.size());
        let part = plan.part(&parts[collective.rank()], device)?;
        Ok(Self { collective, part })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_go_to_the_least_loaded_rank_longest_first() {
        // 10 class segments of one cost: 4 / 3 / 3 over three ranks.
        let parts = assign(&[1.0; 10], 3);
        assert_eq!(parts, vec![vec![0, 3, 6, 9], vec![1, 4, 7], vec![2, 5, 8]]);
        // Unequal costs: the big one alone, the rest balanced against it.
        let parts = assign(&[10.0, 1.0, 2.0, 3.0, 4.0], 2);
        assert_eq!(parts, vec![vec![0], vec![1, 2, 3, 4]]);
        // Segments without terms go nowhere; ranks beyond the segments get none.
        let parts = assign(&[0.0, 5.0, 0.0, 5.0], 3);
        assert_eq!(parts, vec![vec![1], vec![3], vec![]]);
        // One rank takes everything with a cost, in order.
        assert_eq!(assign(&[3.0, 0.0, 1.0], 1), vec![vec![0, 2]]);
        // Every segment with a cost exactly once, for any rank count.
        let costs: Vec<f64> = (0..37).map(|i| ((i * 7) % 11) as f64).collect();
        for ranks in 1..6 {
            let mut all: Vec<usize> = assign(&costs, ranks).concat();
            all.sort_unstable();
            let expected: Vec<usize> = (0..37).filter(|&s| costs[s] > 0.0).collect();
            assert_eq!(all, expected, "{ranks} ranks");
        }
    }
}
