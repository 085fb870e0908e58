//! What a distillation run does: the settings every method shares (strata, sizes, the images'
//! optimiser, network, seed) and one method's own section, validated once at the boundary.

use std::fmt;
use std::str::FromStr;

use debiasdd_augment::DsaConfig;
use debiasdd_data::ImageShape;
use debiasdd_groups::GroupSpec;
use debiasdd_model::ConvNetConfig;
use serde::{Deserialize, Serialize};

use crate::dc::Distance;
use crate::error::DistillError;
use crate::method::{MethodConfig, MethodKind};
use crate::strata::MatchMode;

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

/// A named starting point for a [`DistillConfig`], per method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Small enough for a 2-core CPU in minutes, large enough to show the debiasing effect.
    Quick,
    /// The protocol of the method's paper.
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

/// `Display` and case-insensitive `FromStr` through `ALL` and `name()`.
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

pub(crate) use name_traits;

name_traits!(Init, "noise, real");
name_traits!(Preset, "quick, paper");

/// The settings every method shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The strata: which real images each term matches against.
    pub mode: MatchMode,
    /// Synthetic images per class.
    pub ipc: usize,
    /// Iterations (each may draw fresh state, such as DC's fresh network).
    pub iterations: usize,
    /// Real images per class (or per group; all of a smaller group), per step.
    pub batch_real: usize,
    /// SGD learning rate and momentum of the synthetic images.
    pub lr_img: f64,
    pub momentum_img: f64,
    pub init: Init,
    /// The network matched through.
    pub model: ConvNetConfig,
    /// Seed of every random choice (initialisation, networks, real batches, training order,
    /// augmentation).
    pub seed: u64,
    /// Differentiable Siamese augmentation (DSA) of every matching term, `None` for none: one
    /// transform per synthetic segment and step, applied to the segment's synthetic images and
    /// to the real images of its strata alike. DC also augments its inner-loop training with it
    /// (per image, as the official code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsa: Option<DsaConfig>,
}

impl Settings {
    /// Turns DSA on (the official parameters for digits: no flip) or off.
    pub fn set_dsa(&mut self, on: bool) {
        self.dsa = on.then(DsaConfig::default);
    }

    /// Number of synthetic images.
    pub fn n_synthetic(&self) -> usize {
        self.ipc * self.model.n_classes
    }

    /// The settings for a train split of `shape` and group layout `spec`: the network's input
    /// and output sizes come from the data (the config's are replaced), and group mode needs
    /// `ipc` to be a multiple of the attribute count.
    pub fn for_data(mut self, shape: ImageShape, spec: GroupSpec) -> Result<Self, DistillError> {
        let side = shape
            .square_side()
            .map_err(|e| invalid("model.image_size", e.to_string()))?;
        self.model.in_channels = shape.channels;
        self.model.image_size = side;
        self.model.n_classes = spec.n_classes();
        let n_attributes = spec.n_attributes();
        if self.mode == MatchMode::Group && self.ipc % n_attributes != 0 {
            return Err(invalid(
                "ipc",
                format!(
                    "group mode gives every (class, attribute) group the same number of images, so ipc must be a multiple of {n_attributes} (the attribute count), got {}; use --mode class-vs-groups for other ipc",
                    self.ipc
                ),
            ));
        }
        self.validate()?;
        Ok(self)
    }

    /// Checks every shared setting; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), DistillError> {
        for (field, value) in [
            ("ipc", self.ipc),
            ("iterations", self.iterations),
            ("batch_real", self.batch_real),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1".to_owned()));
            }
        }
        for (field, value) in [("lr_img", self.lr_img), ("momentum_img", self.momentum_img)] {
            if !value.is_finite() || value < 0.0 {
                return Err(invalid(
                    field,
                    format!("must be a finite number >= 0, got {value}"),
                ));
            }
        }
        if self.momentum_img >= 1.0 {
            return Err(invalid(
                "momentum_img",
                format!("must be below 1, got {}", self.momentum_img),
            ));
        }
        if let Some(dsa) = &self.dsa {
            dsa.validate().map_err(|e| invalid("dsa", e.to_string()))?;
        }
        self.model
            .validate()
            .map_err(|e| invalid("model", e.to_string()))?;
        if let Some(reason) = debiasdd_model::convnet::unsupported_reason(&self.model) {
            return Err(invalid("model", reason));
        }
        Ok(())
    }
}

/// The error of an invalid setting.
pub(crate) fn invalid(field: &'static str, problem: String) -> DistillError {
    DistillError::InvalidConfig { field, problem }
}

/// Every setting of a distillation run: the shared [`Settings`] and the method's section.
/// [`DistillConfig::preset`] gives a method's published values; every field can be overridden.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    pub settings: Settings,
    pub method: MethodConfig,
}

impl DistillConfig {
    /// `method`'s `preset` for the strata `mode` at `ipc` images per class.
    pub fn preset(method: MethodKind, preset: Preset, mode: MatchMode, ipc: usize) -> Self {
        method.preset(preset, mode, ipc)
    }

    /// Number of synthetic images.
    pub fn n_synthetic(&self) -> usize {
        self.settings.n_synthetic()
    }

    /// Checks every setting, shared and the method's; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), DistillError> {
        self.settings.validate()?;
        self.method.validate(&self.settings)
    }
}

/// Settings a caller changes from a preset (the CLI's options, Python's keyword arguments);
/// `None` keeps the preset's value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub iterations: Option<usize>,
    pub batch_real: Option<usize>,
    pub lr_img: Option<f64>,
    pub init: Option<Init>,
    pub width: Option<usize>,
    pub depth: Option<usize>,
    pub seed: Option<u64>,
    /// Differentiable Siamese augmentation on or off.
    pub dsa: Option<bool>,
    /// DC only: synthetic updates per iteration.
    pub outer_loop: Option<usize>,
    /// DC only: network epochs on the synthetic set between updates.
    pub inner_loop: Option<usize>,
    /// DC only: learning rate of the inner-loop network training.
    pub lr_net: Option<f64>,
    /// DC only: gradient distance.
    pub distance: Option<Distance>,
}

impl DistillConfig {
    /// This config with `overrides` applied; a method's setting given to another method is an
    /// error that names it. Call [`DistillConfig::validate`] after.
    pub fn with_overrides(mut self, overrides: &Overrides) -> Result<Self, DistillError> {
        // `set!(target => value, ...)`: the value where one is given.
        macro_rules! set {
            ($($target:expr => $value:expr),* $(,)?) => {{ $(if let Some(v) = $value { $target = v; })* }};
        }
        let o = overrides;
        let s = &mut self.settings;
        set!(
            s.iterations => o.iterations,
            s.batch_real => o.batch_real,
            s.lr_img => o.lr_img,
            s.init => o.init,
            s.model.width => o.width,
            s.model.depth => o.depth,
            s.seed => o.seed,
        );
        if let Some(on) = o.dsa {
            s.set_dsa(on);
        }
        let kind = self.method.kind();
        match self.method.dc_mut() {
            Some(dc) => set!(
                dc.outer_loop => o.outer_loop,
                dc.inner_loop => o.inner_loop,
                dc.lr_net => o.lr_net,
                dc.distance => o.distance,
            ),
            None => {
                for (given, field) in [
                    (o.outer_loop.is_some(), "outer_loop"),
                    (o.inner_loop.is_some(), "inner_loop"),
                    (o.lr_net.is_some(), "lr_net"),
                    (o.distance.is_some(), "distance"),
                ] {
                    if given {
                        return Err(DistillError::InvalidConfig {
                            field,
                            problem: format!("is a DC setting; method {kind} does not take it"),
                        });
                    }
                }
            }
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Preset::ALL {
            assert_eq!(p.name().parse::<Preset>(), Ok(p));
        }
        assert!("pixel".parse::<Init>().unwrap_err().contains("noise, real"));
    }

    #[test]
    fn shared_settings_name_the_field() {
        let base = DistillConfig::preset(MethodKind::Dc, Preset::Quick, MatchMode::Group, 10);
        let err = |f: &dyn Fn(&mut Settings)| {
            let mut c = base.clone();
            f(&mut c.settings);
            c.validate().unwrap_err().to_string()
        };
        assert!(err(&|s| s.ipc = 0).contains("ipc"));
        let shape = ImageShape::new(3, 28, 28).unwrap();
        let for_data = |ipc: usize, spec: GroupSpec| {
            let mut s = base.settings.clone();
            s.ipc = ipc;
            s.for_data(shape, spec)
        };
        let err5 = for_data(5, GroupSpec::new(10, 10).unwrap()).unwrap_err();
        assert!(
            err5.to_string()
                .contains("multiple of 10 (the attribute count)"),
            "{err5}"
        );
        let two = for_data(4, GroupSpec::new(7, 2).unwrap()).unwrap();
        assert_eq!((two.model.n_classes, two.model.image_size), (7, 28));
        let wide = base.settings.clone().for_data(
            ImageShape::new(1, 28, 32).unwrap(),
            GroupSpec::new(10, 1).unwrap(),
        );
        assert!(wide.unwrap_err().to_string().contains("square"));
        assert!(err(&|s| s.lr_img = f64::NAN).contains("lr_img"));
        assert!(err(&|s| s.momentum_img = 1.0).contains("below 1"));
        assert!(err(&|s| s.model.pooling = debiasdd_model::Pooling::Max).contains("pooling"));
    }
}
