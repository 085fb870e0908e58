//! The cells of the grid: one method at one (ratio, seed), each producing one evaluation.

use debiasdd_distill::MatchMode;
use debiasdd_eval::data::Stratify;
use debiasdd_eval::train::Sampling;
use serde::{Deserialize, Serialize};

use crate::config::ReproduceConfig;

/// What a cell trains its scored networks on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "variant")]
pub enum Method {
    /// A set distilled by DC in this matching mode.
    Distill(MatchMode),
    /// A random real subset of the distilled set's size: the floor.
    Floor(Stratify),
    /// The whole (biased) train split: plain or group-balanced ERM.
    Baseline(Sampling),
}

impl Method {
    /// Short, file-name-safe name.
    pub fn slug(self) -> &'static str {
        match self {
            Method::Distill(MatchMode::Class) => "dc-class",
            Method::Distill(MatchMode::Group) => "dc-group",
            Method::Distill(MatchMode::ClassVsGroups) => "dc-class-vs-groups",
            Method::Floor(Stratify::Class) => "random-class",
            Method::Floor(Stratify::Group) => "random-group",
            Method::Baseline(Sampling::Shuffle) => "erm",
            Method::Baseline(Sampling::GroupBalanced) => "balanced-erm",
        }
    }

    /// Name in tables and legends.
    pub fn label(self) -> &'static str {
        match self {
            Method::Distill(MatchMode::Class) => "DC class-wise",
            Method::Distill(MatchMode::Group) => "DC group-wise (debiased)",
            Method::Distill(MatchMode::ClassVsGroups) => "DC class-vs-groups (FairDD)",
            Method::Floor(Stratify::Class) => "random real, class-stratified",
            Method::Floor(Stratify::Group) => "random real, group-stratified",
            Method::Baseline(Sampling::Shuffle) => "full data, ERM",
            Method::Baseline(Sampling::GroupBalanced) => "full data, group-balanced ERM",
        }
    }

    /// Every method of a grid, in table order: baselines, floors, distilled sets.
    pub fn all(config: &ReproduceConfig) -> Vec<Method> {
        let mut methods = vec![
            Method::Baseline(Sampling::Shuffle),
            Method::Baseline(Sampling::GroupBalanced),
            Method::Floor(Stratify::Class),
            Method::Floor(Stratify::Group),
        ];
        methods.extend(
            MatchMode::ALL
                .into_iter()
                .filter(|m| config.modes.contains(m))
                .map(Method::Distill),
        );
        methods
    }
}

/// One method at one (ratio, seed).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub ratio: f64,
    pub seed: u64,
    pub method: Method,
}

impl Cell {
    /// Unique, file-name-safe identifier, also the cell's folder name.
    pub fn id(&self) -> String {
        format!("r{}-s{}-{}", self.ratio, self.seed, self.method.slug())
    }

    /// A rough relative cost (about seconds of the quick preset on a 2-core CPU), so that
    /// progress and ETA weigh a distillation more than a subset: producing the training set
    /// plus scoring it.
    pub fn cost(&self, config: &ReproduceConfig) -> f64 {
        self.produce_cost(config) + self.eval_cost(config)
    }

    /// The distillation's share of [`Cell::cost`] (0 for subsets and baselines).
    pub fn produce_cost(&self, config: &ReproduceConfig) -> f64 {
        match self.method {
            Method::Distill(mode) => {
                let d = config.distill_config(mode, self.seed);
                let per_iteration = d.outer_loop as f64 * 1.5 + d.inner_loop as f64 * 0.8;
                let group = if mode == MatchMode::Class { 1.0 } else { 1.3 };
                let width_factor = (d.model.width as f64 / 32.0).powi(2);
                d.iterations as f64 * per_iteration * group * width_factor
            }
            Method::Floor(_) | Method::Baseline(_) => 0.0,
        }
    }

    /// The scoring's share of [`Cell::cost`].
    pub fn eval_cost(&self, config: &ReproduceConfig) -> f64 {
        let (eval, per_epoch) = match self.method {
            Method::Baseline(_) => (&config.baseline, 40.0),
            Method::Distill(_) | Method::Floor(_) => (&config.eval, 0.2),
        };
        eval.n_models as f64 * (eval.train.epochs + 1) as f64 * per_epoch
    }
}

/// Every cell of the grid, ratio by ratio (so that an interrupted run has whole ratios done),
/// cheap cells first within a ratio.
pub fn plan(config: &ReproduceConfig) -> Vec<Cell> {
    let mut cells = Vec::new();
    for &ratio in &config.ratios {
        for &seed in &config.seeds {
            let mut methods = Method::all(config);
            // Floors, then distillations, then the full-data baselines.
            methods.rotate_left(2);
            cells.extend(methods.into_iter().map(|method| Cell {
                ratio,
                seed,
                method,
            }));
        }
    }
    cells
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ReproducePreset;

    #[test]
    fn the_quick_grid_has_every_method_at_every_ratio_once() {
        let config = ReproduceConfig::preset(ReproducePreset::Quick);
        let cells = plan(&config);
        assert_eq!(cells.len(), 5 * 6);
        let mut ids: Vec<String> = cells.iter().map(Cell::id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), cells.len());
        assert!(ids.contains(&"r0.005-s0-dc-group".to_owned()));
        assert_eq!(cells[0].method, Method::Floor(Stratify::Class));
        let paper = plan(&ReproduceConfig::preset(ReproducePreset::Paper));
        assert_eq!(paper.len(), 5 * 3 * 7);
    }

    #[test]
    fn a_distillation_weighs_more_than_a_subset() {
        let config = ReproduceConfig::preset(ReproducePreset::Quick);
        let cell = |method| Cell {
            ratio: 0.01,
            seed: 0,
            method,
        };
        let distill = cell(Method::Distill(MatchMode::Class)).cost(&config);
        let floor = cell(Method::Floor(Stratify::Group)).cost(&config);
        assert!(distill > 2.0 * floor, "{distill} vs {floor}");
    }
}
