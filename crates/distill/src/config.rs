//! What a distillation run does: matching mode, sizes, loops, learning rates, network, seed.

use std::fmt;
use std::str::FromStr;

use debiasdd_model::ConvNetConfig;
use serde::{Deserialize, Serialize};

use crate::distance::Distance;
use crate::error::DistillError;

/// What the synthetic gradients are matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MatchMode {
    /// Vanilla DC: one term per class; the real batch of class c is drawn from the whole class
    /// (and so inherits its colour bias).
    Class,
    /// Debiased DC: every synthetic image belongs to a (class, colour) group; one term per group,
    /// its real batch drawn from that group only. Groups without real samples are skipped.
    Group,
    /// FairDD's variant: each class's synthetic gradient is matched against the real gradient of
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
}

/// How the synthetic images start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Init {
    /// N(0, 1) in normalised space (DC's default).
    Noise,
    /// Random real training images: of the image's group in group mode (of its class when the
    /// group is empty), of its class otherwise.
    Real,
}

impl Init {
    pub const ALL: [Init; 2] = [Init::Noise, Init::Real];

    pub fn name(self) -> &'static str {
        match self {
            Init::Noise => "noise",
            Init::Real => "real",
        }
    }
}

macro_rules! name_traits {
    ($ty:ty, $expected:literal) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $ty {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                <$ty>::ALL
                    .into_iter()
                    .find(|v| v.name().eq_ignore_ascii_case(s))
                    .ok_or_else(|| format!("unknown value `{s}`; expected one of: {}", $expected))
            }
        }
    };
}

name_traits!(MatchMode, "class, group, class-vs-groups");
name_traits!(Init, "noise, real");

/// A named starting point for [`DistillConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Small enough for a 2-core CPU in minutes, large enough to show the debiasing effect:
    /// width 32, outer 5 / inner 10 loops, 20 iterations (the protocol's small-scale comparison);
    /// real batch 64 per class, or 16 per group in the group-based modes (a class has up to 10
    /// groups, so that is up to 160 real images per class; 64 per group made a group-wise
    /// iteration 2.6x a class-wise one at ratio 0.05 and more at 0.1).
    Quick,
    /// The protocol: width 128, real batch 256, loops from the ipc table, 1000 iterations.
    Paper,
}

impl Preset {
    pub const ALL: [Preset; 2] = [Preset::Quick, Preset::Paper];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Quick => "quick",
            Preset::Paper => "paper",
        }
    }
}

name_traits!(Preset, "quick, paper");

/// DC's (outer_loop, inner_loop) for a number of images per class, from the official code's
/// table; `None` for an ipc the table does not list.
pub fn loops_for_ipc(ipc: usize) -> Option<(usize, usize)> {
    match ipc {
        1 => Some((1, 1)),
        10 => Some((10, 50)),
        20 => Some((20, 25)),
        30 => Some((30, 20)),
        40 => Some((40, 15)),
        50 => Some((50, 10)),
        _ => None,
    }
}

/// Every setting of a distillation run. [`DistillConfig::preset`] gives the protocol's values;
/// every field can be overridden.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    pub mode: MatchMode,
    /// Synthetic images per class.
    pub ipc: usize,
    /// Outer iterations, each with a fresh network.
    pub iterations: usize,
    /// Synthetic-image updates per iteration.
    pub outer_loop: usize,
    /// Epochs of network training on the synthetic set between two updates.
    pub inner_loop: usize,
    /// Real images per class (or per group; all of a smaller group).
    pub batch_real: usize,
    /// Batch size of the inner-loop network training.
    pub batch_train: usize,
    /// SGD learning rate and momentum of the synthetic images.
    pub lr_img: f64,
    pub momentum_img: f64,
    /// SGD learning rate of the inner-loop network training (no momentum, as DC).
    pub lr_net: f64,
    pub distance: Distance,
    pub init: Init,
    /// The network matched through (a fresh one every iteration).
    pub model: ConvNetConfig,
    /// Seed of every random choice (initialisation, networks, real batches, inner-loop order).
    pub seed: u64,
}

impl DistillConfig {
    /// The preset's values for `mode` at `ipc` images per class. The paper preset takes its loops
    /// from [`loops_for_ipc`] (for an ipc outside the table, set `outer_loop` and `inner_loop`
    /// yourself: they are 0 and [`DistillConfig::validate`] says so).
    pub fn preset(preset: Preset, mode: MatchMode, ipc: usize) -> Self {
        let (outer_loop, inner_loop) = match preset {
            Preset::Quick => (5, 10),
            Preset::Paper => loops_for_ipc(ipc).unwrap_or((0, 0)),
        };
        let (width, batch_real, iterations) = match (preset, mode) {
            (Preset::Quick, MatchMode::Class) => (32, 64, 20),
            (Preset::Quick, MatchMode::Group | MatchMode::ClassVsGroups) => (32, 16, 20),
            (Preset::Paper, _) => (128, 256, 1000),
        };
        Self {
            mode,
            ipc,
            iterations,
            outer_loop,
            inner_loop,
            batch_real,
            batch_train: 256,
            lr_img: 0.1,
            momentum_img: 0.5,
            lr_net: 0.01,
            distance: Distance::Ours,
            init: Init::Noise,
            model: ConvNetConfig {
                width,
                ..ConvNetConfig::default()
            },
            seed: 0,
        }
    }

    /// Number of synthetic images.
    pub fn n_synthetic(&self) -> usize {
        self.ipc * self.model.n_classes
    }

    /// Checks every setting; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), DistillError> {
        let invalid = |field: &'static str, problem: String| {
            Err(DistillError::InvalidConfig { field, problem })
        };
        for (field, value) in [
            ("ipc", self.ipc),
            ("iterations", self.iterations),
            ("outer_loop", self.outer_loop),
            ("batch_real", self.batch_real),
            ("batch_train", self.batch_train),
        ] {
            if value == 0 {
                let hint = if field == "outer_loop" {
                    format!(
                        "must be at least 1 (DC's table covers ipc 1, 10, 20, 30, 40, 50; for ipc {} set the outer and inner loops)",
                        self.ipc
                    )
                } else {
                    "must be at least 1".to_owned()
                };
                return invalid(field, hint);
            }
        }
        for (field, value) in [
            ("lr_img", self.lr_img),
            ("lr_net", self.lr_net),
            ("momentum_img", self.momentum_img),
        ] {
            if !value.is_finite() || value < 0.0 {
                return invalid(field, format!("must be a finite number >= 0, got {value}"));
            }
        }
        if self.momentum_img >= 1.0 {
            return invalid(
                "momentum_img",
                format!("must be below 1, got {}", self.momentum_img),
            );
        }
        if self.model.n_classes != debiasdd_groups::GroupSpec::COLORED_MNIST.n_classes() {
            return invalid(
                "model.n_classes",
                format!(
                    "must be {} for Colored MNIST",
                    debiasdd_groups::GroupSpec::COLORED_MNIST.n_classes()
                ),
            );
        }
        let n_attributes = debiasdd_groups::GroupSpec::COLORED_MNIST.n_attributes();
        if self.mode == MatchMode::Group && self.ipc % n_attributes != 0 {
            return invalid(
                "ipc",
                format!(
                    "group mode gives every (class, colour) group the same number of images, so ipc must be a multiple of {n_attributes}, got {}; use --mode class-vs-groups for other ipc",
                    self.ipc
                ),
            );
        }
        self.model
            .validate()
            .map_err(|e| DistillError::InvalidConfig {
                field: "model",
                problem: e.to_string(),
            })?;
        if let Some(reason) = debiasdd_model::convnet::unsupported_reason(&self.model) {
            return invalid("model", reason);
        }
        Ok(())
    }

    /// The settings that must agree between a checkpoint and the run that resumes it: all but
    /// `iterations`, as JSON.
    pub(crate) fn identity(&self) -> String {
        let mut same = self.clone();
        same.iterations = 0;
        serde_json::to_string(&same).expect("config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_follow_the_protocol() {
        for mode in MatchMode::ALL {
            let paper = DistillConfig::preset(Preset::Paper, mode, 10);
            paper.validate().unwrap();
            assert_eq!((paper.outer_loop, paper.inner_loop), (10, 50));
            assert_eq!((paper.model.width, paper.batch_real), (128, 256));
            assert_eq!(
                (paper.lr_img, paper.momentum_img, paper.lr_net),
                (0.1, 0.5, 0.01)
            );
            let quick = DistillConfig::preset(Preset::Quick, mode, 10);
            quick.validate().unwrap();
            let per_term = if mode == MatchMode::Class { 64 } else { 16 };
            assert_eq!((quick.model.width, quick.batch_real), (32, per_term));
        }
    }

    #[test]
    fn bad_settings_name_the_field() {
        let base = DistillConfig::preset(Preset::Quick, MatchMode::Group, 10);
        let err = |c: DistillConfig| c.validate().unwrap_err().to_string();
        assert!(
            err(DistillConfig {
                ipc: 0,
                ..base.clone()
            })
            .contains("ipc")
        );
        assert!(
            err(DistillConfig {
                ipc: 5,
                ..base.clone()
            })
            .contains("multiple of 10")
        );
        let paper7 = DistillConfig::preset(Preset::Paper, MatchMode::Class, 7);
        assert!(err(paper7).contains("outer_loop"));
        assert!(
            err(DistillConfig {
                lr_img: f64::NAN,
                ..base.clone()
            })
            .contains("lr_img")
        );
        let mut max_pool = base.clone();
        max_pool.model.pooling = debiasdd_model::Pooling::Max;
        assert!(err(max_pool).contains("pooling"));
    }

    #[test]
    fn names_round_trip() {
        for m in MatchMode::ALL {
            assert_eq!(m.name().parse::<MatchMode>(), Ok(m));
        }
        assert!("pixel".parse::<Init>().unwrap_err().contains("noise, real"));
    }
}
