//! What a reproduction runs: the grid (ratios x methods x seeds) and the settings of every step.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use debiasdd_cmnist::{ColoredMnistConfig, PROTOCOL_RATIOS};
use debiasdd_distill::{DistillConfig, Init, MatchMode, MethodKind, Preset};
use debiasdd_eval::augment::Augment;
use debiasdd_eval::evaluate::EvalConfig;
use debiasdd_eval::train::TrainConfig;
use debiasdd_infer::InferConfig;
use debiasdd_model::{ConvNetConfig, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::error::ReproduceError;

/// A named grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReproducePreset {
    /// The whole story in under 10 minutes on a 2-core CPU: one ratio (0.01), class- against
    /// group-wise for DC and DM at their quick presets shortened to [`DEMO_ITERATIONS`], the
    /// floors, the pictures; every set scored by one ConvNet as in `quick`; no full-data
    /// baselines.
    Demo,
    /// Every ratio on a 2-core CPU: one seed; DC class- and group-wise at its quick preset (20
    /// iterations); DM class-wise, group-wise, FairDD's class-vs-groups and COBRA's
    /// class-vs-group-mean at its quick preset (real init, DSA) shortened to
    /// [`QUICK_DM_ITERATIONS`]; sets scored by 2 ConvNets (width 32, 300 epochs, no
    /// augmentation), the protocol's small-scale comparison. Full-data baselines of one pass at
    /// width 16.
    Quick,
    /// The protocol (a GPU job): three seeds, DC and DM over all four strata at their paper
    /// presets (width 128; DC 1000 iterations, DM 20,000), sets scored by 5 ConvNets with DC's
    /// evaluation (width 128, 1000 epochs with augmentation), baselines of 5 passes at width 128.
    Paper,
    /// The plumbing in seconds, not a result: the quick grid's class- and group-wise cells
    /// (annotated and inferred groups) at one ratio (0.2) on 400 training images, two
    /// iterations at width 8, scored after 2 epochs. For checking an install, a cluster setup
    /// (`cargo xtask slurm-check` runs it as a job array) or a code change end to end.
    Smoke,
}

/// (DC, DM) iterations of the demo grid.
pub const DEMO_ITERATIONS: (usize, usize) = (10, 100);
/// Training images of the smoke grid's datasets.
pub const SMOKE_TRAIN_IMAGES: usize = 400;
/// DM iterations of the quick grid.
pub const QUICK_DM_ITERATIONS: usize = 200;

impl ReproducePreset {
    pub const ALL: [ReproducePreset; 4] = [
        ReproducePreset::Demo,
        ReproducePreset::Quick,
        ReproducePreset::Paper,
        ReproducePreset::Smoke,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ReproducePreset::Demo => "demo",
            ReproducePreset::Quick => "quick",
            ReproducePreset::Paper => "paper",
            ReproducePreset::Smoke => "smoke",
        }
    }
}

impl fmt::Display for ReproducePreset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ReproducePreset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown preset `{s}`; expected demo, quick, paper or smoke"))
    }
}

/// How each cell's synthetic set is distilled: a distillation preset plus the overrides the grid
/// applies to it. The method, the matching mode and the seed come from the cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSettings {
    pub preset: Preset,
    pub ipc: usize,
    /// Iterations of every method [the method's, see `iterations_by_method`].
    pub iterations: Option<usize>,
    /// Iterations of one method where `iterations` is unset [the method's preset].
    #[serde(default)]
    pub iterations_by_method: BTreeMap<MethodKind, usize>,
    /// ConvNet width [the preset's].
    pub width: Option<usize>,
    /// Outer and inner loops [the preset's].
    pub outer_loop: Option<usize>,
    pub inner_loop: Option<usize>,
    /// Real images per class or group [the preset's, which differs between modes].
    pub batch_real: Option<usize>,
    /// Synthetic initialisation [the method's: DC noise, DM real].
    pub init: Option<Init>,
    /// Differentiable Siamese augmentation on (`true`) or off [the method's: DC off, DM on].
    pub dsa: Option<bool>,
}

impl DistillSettings {
    /// `preset` at ipc 10 with the methods' own settings.
    pub fn of(preset: Preset) -> Self {
        Self {
            preset,
            ipc: 10,
            iterations: None,
            iterations_by_method: BTreeMap::new(),
            width: None,
            outer_loop: None,
            inner_loop: None,
            batch_real: None,
            init: None,
            dsa: None,
        }
    }
}

/// A distillation method over strata: what a distillation cell runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Distilled {
    pub method: MethodKind,
    pub mode: MatchMode,
    /// Whose groups the strata read: the dataset's annotations, or groups inferred from the
    /// class labels alone (`debiasdd_infer`, with the grid's `infer` settings).
    #[serde(default, skip_serializing_if = "GroupSource::is_annotated")]
    pub groups: GroupSource,
}

impl Distilled {
    /// `method` over `mode` with the annotated groups.
    pub fn annotated(method: MethodKind, mode: MatchMode) -> Self {
        Self {
            method,
            mode,
            groups: GroupSource::Annotated,
        }
    }
}

/// Where a distillation's groups come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupSource {
    /// The dataset's own attributes.
    #[default]
    Annotated,
    /// Inferred from the class labels (the annotations are only compared against).
    Inferred,
}

impl GroupSource {
    pub fn is_annotated(&self) -> bool {
        *self == GroupSource::Annotated
    }

    /// `inferred` for inferred groups, nothing for annotated ones (ids and labels of annotated
    /// cells stay as they were).
    pub fn suffix(self, inferred: &str) -> &str {
        match self {
            GroupSource::Annotated => "",
            GroupSource::Inferred => inferred,
        }
    }
}

/// Every setting of a reproduction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReproduceConfig {
    pub preset: ReproducePreset,
    /// Bias-conflicting ratios of the Colored MNIST train split.
    pub ratios: Vec<f64>,
    /// The distillations (method over strata) run at every ratio, in table order.
    pub distillations: Vec<Distilled>,
    /// Each seed gives its own dataset, distillation, subsets and evaluation.
    pub seeds: Vec<u64>,
    /// The Colored MNIST generator; ratio and seed are set per cell.
    pub cmnist: ColoredMnistConfig,
    /// A dataset file (from `debiasdd import` or `generate`) the grid runs on instead of
    /// generating one per ratio and seed: every cell reads it, and its one ratio is a label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataFile>,
    pub distill: DistillSettings,
    /// How distilled sets and random subsets are scored; the seed is set per cell.
    pub eval: EvalConfig,
    /// How the full-data baselines are trained and scored; sampling and seed are set per cell.
    pub baseline: EvalConfig,
    /// Whether the grid trains the full-data baselines at all.
    pub baselines: bool,
    /// Distillation checkpoints every this many iterations (and on Ctrl-C).
    pub checkpoint_every: usize,
    /// How the distillations over inferred groups infer them (once per ratio and seed).
    #[serde(default)]
    pub infer: InferConfig,
}

/// A given dataset file and its attribute count (the group floor draws `ipc / n_attributes`
/// images per group).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataFile {
    pub path: std::path::PathBuf,
    pub n_attributes: usize,
}

fn convnet(width: usize) -> ModelConfig {
    ModelConfig::ConvNet(ConvNetConfig {
        width,
        ..ConvNetConfig::default()
    })
}

impl ReproduceConfig {
    /// The settings of `preset`.
    pub fn preset(preset: ReproducePreset) -> Self {
        let no_augment = |epochs: usize| TrainConfig {
            epochs,
            augment: Augment::None,
            ..TrainConfig::default()
        };
        let cmnist = ColoredMnistConfig::new(debiasdd_cmnist::Preset::Seed, 0.0, 0);
        let quick_eval = EvalConfig {
            model: convnet(32),
            train: no_augment(300),
            n_models: 2,
            seed: 0,
        };
        let quick_baseline = EvalConfig {
            model: convnet(16),
            train: no_augment(0),
            n_models: 1,
            seed: 0,
        };
        let over = |method: MethodKind, modes: &[MatchMode]| -> Vec<Distilled> {
            modes
                .iter()
                .map(|&mode| Distilled::annotated(method, mode))
                .collect()
        };
        let class_group = [MatchMode::Class, MatchMode::Group];
        // Group-wise over inferred groups, for DC and DM.
        let inferred = [MethodKind::Dc, MethodKind::Dm].map(|method| Distilled {
            method,
            mode: MatchMode::Group,
            groups: GroupSource::Inferred,
        });
        match preset {
            ReproducePreset::Demo => Self {
                preset,
                ratios: vec![0.01],
                distillations: [
                    over(MethodKind::Dc, &class_group),
                    over(MethodKind::Dm, &class_group),
                ]
                .concat(),
                seeds: vec![0],
                cmnist,
                data: None,
                distill: DistillSettings {
                    iterations_by_method: [
                        (MethodKind::Dc, DEMO_ITERATIONS.0),
                        (MethodKind::Dm, DEMO_ITERATIONS.1),
                    ]
                    .into(),
                    ..DistillSettings::of(Preset::Quick)
                },
                eval: EvalConfig {
                    n_models: 1,
                    ..quick_eval.clone()
                },
                baseline: quick_baseline,
                baselines: false,
                checkpoint_every: 5,
                infer: InferConfig::default(),
            },
            ReproducePreset::Quick => Self {
                preset,
                ratios: PROTOCOL_RATIOS.to_vec(),
                distillations: [
                    over(MethodKind::Dc, &class_group),
                    over(MethodKind::Dm, &MatchMode::ALL),
                    inferred.to_vec(),
                ]
                .concat(),
                seeds: vec![0],
                cmnist,
                data: None,
                distill: DistillSettings {
                    iterations_by_method: [(MethodKind::Dm, QUICK_DM_ITERATIONS)].into(),
                    ..DistillSettings::of(Preset::Quick)
                },
                eval: quick_eval,
                baseline: quick_baseline,
                baselines: true,
                checkpoint_every: 5,
                infer: InferConfig::default(),
            },
            ReproducePreset::Paper => Self {
                preset,
                ratios: PROTOCOL_RATIOS.to_vec(),
                distillations: [
                    over(MethodKind::Dc, &MatchMode::ALL),
                    over(MethodKind::Dm, &MatchMode::ALL),
                    inferred.to_vec(),
                ]
                .concat(),
                seeds: vec![0, 1, 2],
                cmnist,
                data: None,
                distill: DistillSettings::of(Preset::Paper),
                eval: EvalConfig {
                    model: convnet(128),
                    train: TrainConfig::dc(true),
                    n_models: 5,
                    seed: 0,
                },
                baseline: EvalConfig {
                    model: convnet(128),
                    train: no_augment(4),
                    n_models: 1,
                    seed: 0,
                },
                baselines: true,
                checkpoint_every: 50,
                infer: InferConfig::default(),
            },
            ReproducePreset::Smoke => {
                let tiny = || convnet(8);
                let mut c = Self::preset(ReproducePreset::Quick);
                c.preset = preset;
                c.ratios = vec![0.2];
                c.retain(None, Some(&class_group));
                c.set_benchmark(debiasdd_cmnist::Preset::Seed);
                c.distill = DistillSettings {
                    iterations: Some(2),
                    width: Some(8),
                    outer_loop: Some(2),
                    inner_loop: Some(1),
                    batch_real: Some(8),
                    ..DistillSettings::of(Preset::Quick)
                };
                for eval in [&mut c.eval, &mut c.baseline] {
                    eval.model = tiny();
                    eval.n_models = 1;
                }
                c.eval.train.epochs = 2;
                c.baseline.train.epochs = 0;
                c.checkpoint_every = 1;
                c.infer.epochs = 1;
                c.infer.model = tiny();
                c
            }
        }
    }

    /// Runs the grid on the Colored MNIST benchmark `benchmark` (a `debiasdd generate`
    /// preset); the smoke grid keeps its 400 training images.
    pub fn set_benchmark(&mut self, benchmark: debiasdd_cmnist::Preset) {
        self.cmnist = ColoredMnistConfig::new(benchmark, 0.0, 0);
        if self.preset == ReproducePreset::Smoke {
            self.cmnist.train_size = SMOKE_TRAIN_IMAGES;
            self.cmnist.valid_size = 0;
        }
    }

    /// The distillations of the grid, in table order.
    pub fn distillations(&self) -> Vec<Distilled> {
        self.distillations.clone()
    }

    /// Keeps the distillations of these methods and modes (`None`: all).
    pub fn retain(&mut self, methods: Option<&[MethodKind]>, modes: Option<&[MatchMode]>) {
        self.distillations.retain(|d| {
            methods.is_none_or(|m| m.contains(&d.method))
                && modes.is_none_or(|m| m.contains(&d.mode))
        });
    }

    /// The distillation config of one cell: the method's preset for the cell's strata, with the
    /// grid's overrides (the loop counts only where the method has loops).
    pub fn distill_config(&self, distilled: Distilled, seed: u64) -> DistillConfig {
        let s = &self.distill;
        let mut config = DistillConfig::preset(distilled.method, s.preset, distilled.mode, s.ipc);
        let shared = &mut config.settings;
        if let Some(&iterations) = s
            .iterations
            .as_ref()
            .or(s.iterations_by_method.get(&distilled.method))
        {
            shared.iterations = iterations;
        }
        if let Some(width) = s.width {
            shared.model.width = width;
        }
        if let Some(batch_real) = s.batch_real {
            shared.batch_real = batch_real;
        }
        if let Some(init) = s.init {
            shared.init = init;
        }
        if let Some(dsa) = s.dsa {
            shared.set_dsa(dsa);
        }
        shared.seed = seed;
        if let Some(dc) = config.method.dc_mut() {
            for (value, field) in [
                (s.outer_loop, &mut dc.outer_loop),
                (s.inner_loop, &mut dc.inner_loop),
            ] {
                if let Some(v) = value {
                    *field = v;
                }
            }
        }
        config
    }

    /// Attributes per class of the grid's data: the given file's, else Colored MNIST's colours.
    pub fn n_attributes(&self) -> usize {
        self.data
            .as_ref()
            .map_or(debiasdd_cmnist::colored::N_COLOURS, |d| d.n_attributes)
    }

    /// The Colored MNIST config of one (ratio, seed).
    pub fn cmnist_config(&self, ratio: f64, seed: u64) -> ColoredMnistConfig {
        ColoredMnistConfig {
            ratio,
            seed,
            ..self.cmnist.clone()
        }
    }

    /// Checks the grid and every step's settings; the error names the setting and the fix.
    pub fn validate(&self) -> Result<(), ReproduceError> {
        let invalid = |problem: String| Err(ReproduceError::InvalidConfig(problem));
        if let Err(e) = self.infer.validate() {
            return invalid(format!("infer: {e}"));
        }
        if self.ratios.is_empty() || self.distillations.is_empty() || self.seeds.is_empty() {
            return invalid(
                "the grid needs at least one ratio, one distillation (method over strata) and one seed; check --methods and --modes against the preset's distillations".into(),
            );
        }
        if let Some(r) = self.ratios.iter().find(|r| !(0.0..=1.0).contains(*r)) {
            return invalid(format!("ratio {r} is outside [0, 1]"));
        }
        for (i, d) in self.distillations.iter().enumerate() {
            if self.distillations[..i].contains(d) {
                return invalid(format!(
                    "distillation {} over {} is listed twice",
                    d.method, d.mode
                ));
            }
        }
        for (i, r) in self.ratios.iter().enumerate() {
            if self.ratios[..i].contains(r) {
                return invalid(format!("ratio {r} is listed twice"));
            }
        }
        for (i, s) in self.seeds.iter().enumerate() {
            if self.seeds[..i].contains(s) {
                return invalid(format!("seed {s} is listed twice"));
            }
        }
        if self.checkpoint_every == 0 {
            return invalid("checkpoint_every must be at least 1".into());
        }
        for distilled in self.distillations() {
            self.distill_config(distilled, 0).validate()?;
        }
        for (what, eval) in [("eval", &self.eval), ("baseline", &self.baseline)] {
            if eval.n_models == 0 {
                return invalid(format!("{what}: 0 models; score at least 1"));
            }
            eval.model
                .validate()
                .map_err(|e| ReproduceError::InvalidConfig(format!("{what}: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate() {
        for preset in ReproducePreset::ALL {
            let config = ReproduceConfig::preset(preset);
            config.validate().unwrap();
            if matches!(preset, ReproducePreset::Quick | ReproducePreset::Paper) {
                assert_eq!(config.ratios, PROTOCOL_RATIOS);
            }
            assert_eq!(preset.name().parse::<ReproducePreset>(), Ok(preset));
        }
        // DM keeps its own init and augmentation, and the grid's iteration count.
        let quick = ReproduceConfig::preset(ReproducePreset::Quick);
        let dm = quick.distill_config(
            Distilled::annotated(MethodKind::Dm, MatchMode::ClassVsGroupMean),
            0,
        );
        assert_eq!(dm.settings.iterations, QUICK_DM_ITERATIONS);
        assert_eq!(dm.settings.init, Init::Real);
        assert!(dm.settings.dsa.is_some());
        let paper = ReproduceConfig::preset(ReproducePreset::Paper);
        assert_eq!(paper.seeds.len(), 3);
        let dc = |mode| Distilled::annotated(MethodKind::Dc, mode);
        let distill = paper.distill_config(dc(MatchMode::Group), 2).settings;
        assert_eq!((distill.model.width, distill.iterations), (128, 1000));
        assert_eq!(distill.seed, 2);
        // The quick grid is the protocol's small-scale comparison: width 32, loops 5/10, real
        // batch 64 per class, 20 iterations from noise; 2 ConvNets of width 32, 300 epochs, no
        // augmentation.
        let quick = ReproduceConfig::preset(ReproducePreset::Quick);
        let class = quick.distill_config(dc(MatchMode::Class), 0);
        let loops = class.method.dc().expect("a DC config");
        let class = class.settings;
        assert_eq!(
            (
                class.model.width,
                loops.outer_loop,
                loops.inner_loop,
                class.batch_real,
                class.iterations,
                class.init
            ),
            (32, 5, 10, 64, 20, Init::Noise)
        );
        assert_eq!(
            (
                quick.eval.model.clone(),
                quick.eval.n_models,
                quick.eval.train.epochs
            ),
            (convnet(32), 2, 300)
        );
        assert_eq!(quick.eval.train.augment, Augment::None);
    }

    #[test]
    fn bad_grids_are_named() {
        let base = ReproduceConfig::preset(ReproducePreset::Quick);
        let err = |c: ReproduceConfig| c.validate().unwrap_err().to_string();
        let mut c = base.clone();
        c.ratios = vec![1.5];
        assert!(err(c).contains("ratio 1.5"));
        let mut c = base.clone();
        c.seeds.clear();
        assert!(err(c).contains("at least one"));
        let mut c = base.clone();
        c.distillations.push(c.distillations[0]);
        assert!(err(c).contains("twice"));
        let mut c = base.clone();
        c.retain(None, Some(&[MatchMode::ClassVsGroups]));
        c.retain(Some(&[MethodKind::Dc]), None);
        assert!(err(c).contains("--methods"));
        let mut c = base.clone();
        c.ratios = vec![0.01, 0.01];
        assert!(err(c).contains("ratio 0.01 is listed twice"));
        let mut c = base;
        c.distill.ipc = 0;
        assert!(err(c).contains("ipc"));
    }
}
