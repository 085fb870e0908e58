//! The cells of the grid: one method at one (ratio, seed), each producing one evaluation, and
//! the recipe of each (the settings its result depends on).

use debiasdd_data::Stratify;
use debiasdd_eval::evaluate::EvalConfig;
use debiasdd_eval::train::Sampling;
use serde::{Deserialize, Serialize};

use crate::config::{Distilled, ReproduceConfig};

/// What a cell trains its scored networks on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "variant")]
pub enum Method {
    /// A set distilled by a method over strata.
    Distill(Distilled),
    /// A random real subset of the distilled set's size: the floor.
    Floor(Stratify),
    /// The whole (biased) train split: plain or group-balanced ERM.
    Baseline(Sampling),
}

impl Method {
    /// Short, file-name-safe name (`dc-group`, `random-class`, `erm`).
    pub fn slug(self) -> String {
        match self {
            Method::Distill(d) => format!(
                "{}-{}{}",
                d.method.name(),
                d.mode.name(),
                d.groups.suffix("-inferred")
            ),
            Method::Floor(Stratify::Class) => "random-class".into(),
            Method::Floor(Stratify::Group) => "random-group".into(),
            Method::Baseline(Sampling::Shuffle) => "erm".into(),
            Method::Baseline(Sampling::GroupBalanced) => "balanced-erm".into(),
        }
    }

    /// Name in tables and legends (`DC group-wise (debiased)`).
    pub fn label(self) -> String {
        match self {
            Method::Distill(d) => format!(
                "{} {}{}",
                d.method.label(),
                d.mode.label(),
                d.groups.suffix(", inferred groups")
            ),
            Method::Floor(Stratify::Class) => "random real, class-stratified".into(),
            Method::Floor(Stratify::Group) => "random real, group-stratified".into(),
            Method::Baseline(Sampling::Shuffle) => "full data, ERM".into(),
            Method::Baseline(Sampling::GroupBalanced) => "full data, group-balanced ERM".into(),
        }
    }

    /// Every method of a grid, in table order: baselines (unless the grid has none), floors,
    /// distilled sets.
    pub fn all(config: &ReproduceConfig) -> Vec<Method> {
        let mut methods = Vec::new();
        if config.baselines {
            methods.extend([
                Method::Baseline(Sampling::Shuffle),
                Method::Baseline(Sampling::GroupBalanced),
            ]);
        }
        methods.extend([
            Method::Floor(Stratify::Class),
            Method::Floor(Stratify::Group),
        ]);
        methods.extend(config.distillations().into_iter().map(Method::Distill));
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
            Method::Distill(d) => {
                debiasdd_distill::method::relative_cost(&config.distill_config(d, self.seed))
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
            if config.baselines {
                methods.rotate_left(2);
            }
            cells.extend(methods.into_iter().map(|method| Cell {
                ratio,
                seed,
                method,
            }));
        }
    }
    cells
}

/// The settings a cell's result depends on, as stored in its `result.json`.
pub fn settings(config: &ReproduceConfig, cell: &Cell) -> serde_json::Value {
    let eval = eval_config(config, cell);
    let produce = match cell.method {
        Method::Distill(d) if !d.groups.is_annotated() => Ok(serde_json::json!({
            "distill": config.distill_config(d, cell.seed),
            "groups": { "inferred": config.infer },
        })),
        Method::Distill(d) => serde_json::to_value(config.distill_config(d, cell.seed)),
        Method::Floor(stratify) => Ok(serde_json::json!({
            "method": "random-real-subset",
            "stratify": stratify,
            "per_stratum": floor_size(config, stratify),
            "seed": cell.seed,
        })),
        Method::Baseline(sampling) => Ok(serde_json::json!({ "sampling": sampling })),
    }
    .expect("configs serialise");
    serde_json::json!({
        "data": match &config.data {
            Some(file) => serde_json::json!({ "file": file.path }),
            None => serde_json::to_value(config.cmnist_config(cell.ratio, cell.seed))
                .expect("configs serialise"),
        },
        "train_set": produce,
        "eval": eval,
    })
}

/// Images per class (class-stratified) or per group (group-stratified) of a floor: the size of
/// the distilled set.
pub fn floor_size(config: &ReproduceConfig, stratify: Stratify) -> usize {
    match stratify {
        Stratify::Class => config.distill.ipc,
        Stratify::Group => (config.distill.ipc / config.n_attributes()).max(1),
    }
}

/// How `cell`'s networks are trained and scored.
pub fn eval_config(config: &ReproduceConfig, cell: &Cell) -> EvalConfig {
    let mut eval = match cell.method {
        Method::Baseline(sampling) => {
            let mut e = config.baseline.clone();
            e.train.sampling = sampling;
            e
        }
        _ => config.eval.clone(),
    };
    eval.seed = cell.seed;
    eval
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ReproducePreset;
    use debiasdd_distill::{MatchMode, MethodKind};

    #[test]
    fn the_quick_grid_has_every_method_at_every_ratio_once() {
        let config = ReproduceConfig::preset(ReproducePreset::Quick);
        let cells = plan(&config);
        // 2 baselines, 2 floors, DC class and group, DM over the four strata, DC and DM
        // group-wise over inferred groups.
        assert_eq!(cells.len(), 5 * 12);
        let mut ids: Vec<String> = cells.iter().map(Cell::id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), cells.len());
        // The ids of the cells that existed before methods were pluggable are kept.
        assert!(ids.contains(&"r0.005-s0-dc-group".to_owned()));
        assert!(ids.contains(&"r0.1-s0-dc-class".to_owned()));
        assert_eq!(cells[0].method, Method::Floor(Stratify::Class));
        let paper = plan(&ReproduceConfig::preset(ReproducePreset::Paper));
        assert_eq!(paper.len(), 5 * 3 * 14);
        let demo = plan(&ReproduceConfig::preset(ReproducePreset::Demo));
        assert_eq!(demo.len(), 6, "floors and four distillations at one ratio");
        let smoke = plan(&ReproduceConfig::preset(ReproducePreset::Smoke));
        assert_eq!(
            smoke.len(),
            10,
            "baselines, floors, DC and DM class/group, both over inferred groups"
        );
        ReproduceConfig::preset(ReproducePreset::Smoke)
            .validate()
            .unwrap();
        assert!(
            demo.iter()
                .all(|c| !matches!(c.method, Method::Baseline(_)))
        );
        assert!(ids.contains(&"r0.01-s0-dm-class-vs-group-mean".to_owned()));
        let fairdd = Method::Distill(Distilled::annotated(
            MethodKind::Dc,
            MatchMode::ClassVsGroups,
        ));
        assert_eq!(fairdd.slug(), "dc-class-vs-groups");
        assert_eq!(fairdd.label(), "DC class-vs-groups (FairDD)");
        assert!(ids.contains(&"r0.01-s0-dm-group-inferred".to_owned()));
        let inferred = Method::Distill(Distilled {
            groups: crate::config::GroupSource::Inferred,
            ..Distilled::annotated(MethodKind::Dc, MatchMode::Group)
        });
        assert!(
            inferred.label().ends_with(", inferred groups"),
            "{}",
            inferred.label()
        );
        // Inferred cells record the inference settings; annotated ones keep theirs unchanged.
        let cell = |method| Cell {
            ratio: 0.01,
            seed: 0,
            method,
        };
        let annotated = Method::Distill(Distilled::annotated(MethodKind::Dc, MatchMode::Group));
        assert!(settings(&config, &cell(inferred))["train_set"]["groups"]["inferred"].is_object());
        assert!(settings(&config, &cell(annotated))["train_set"]["groups"].is_null());
        assert_eq!(
            serde_json::to_value(Distilled::annotated(MethodKind::Dc, MatchMode::Group)).unwrap(),
            serde_json::json!({ "method": "dc", "mode": "group" }),
            "annotated distillations serialise as before"
        );
    }

    #[test]
    fn a_distillation_weighs_more_than_a_subset() {
        let config = ReproduceConfig::preset(ReproducePreset::Quick);
        let cell = |method| Cell {
            ratio: 0.01,
            seed: 0,
            method,
        };
        let distill = cell(Method::Distill(Distilled::annotated(
            MethodKind::Dc,
            MatchMode::Class,
        )))
        .cost(&config);
        let floor = cell(Method::Floor(Stratify::Group)).cost(&config);
        assert!(distill > 2.0 * floor, "{distill} vs {floor}");
    }
}
