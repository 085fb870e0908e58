//! The registry of methods: the one place that names every method, its config section and its
//! presets, and turns a section into a [`Matcher`]. A new method adds its module, one variant to
//! [`MethodKind`] and [`MethodConfig`], and the match arms here; the loop, checkpoints, the
//! driver and the callers stay as they are.

use serde::{Deserialize, Serialize};

use crate::config::{DistillConfig, Preset, Settings, name_traits};
use crate::dc::{self, Dc, DcConfig};
use crate::dm::{self, Dm, DmConfig};
use crate::error::DistillError;
use crate::matcher::Matcher;
use crate::strata::MatchMode;

use std::fmt;
use std::str::FromStr;

/// Which method distils.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MethodKind {
    /// Dataset condensation by gradient matching (Zhao, Mopuri & Bilen, ICLR 2021).
    Dc,
    /// Dataset condensation with distribution matching (Zhao & Bilen, WACV 2023).
    Dm,
}

impl MethodKind {
    pub const ALL: [MethodKind; 2] = [MethodKind::Dc, MethodKind::Dm];

    /// Short name (`dc`), as the command line and file names write it.
    pub fn name(self) -> &'static str {
        match self {
            MethodKind::Dc => "dc",
            MethodKind::Dm => "dm",
        }
    }

    /// Name in tables and legends (`DC`).
    pub fn label(self) -> &'static str {
        match self {
            MethodKind::Dc => "DC",
            MethodKind::Dm => "DM",
        }
    }

    /// The method's `preset` for the strata `mode` at `ipc` images per class.
    pub fn preset(self, preset: Preset, mode: MatchMode, ipc: usize) -> DistillConfig {
        match self {
            MethodKind::Dc => dc::preset(preset, mode, ipc),
            MethodKind::Dm => dm::preset(preset, mode, ipc),
        }
    }
}

name_traits!(MethodKind, "dc, dm");

/// A method's own settings, tagged with its name (`{"name": "dc", "outer_loop": 10, ...}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum MethodConfig {
    Dc(DcConfig),
    Dm(DmConfig),
}

impl MethodConfig {
    pub fn kind(&self) -> MethodKind {
        match self {
            MethodConfig::Dc(_) => MethodKind::Dc,
            MethodConfig::Dm(_) => MethodKind::Dm,
        }
    }

    /// DC's section, if this is DC.
    pub fn dc(&self) -> Option<&DcConfig> {
        match self {
            MethodConfig::Dc(c) => Some(c),
            MethodConfig::Dm(_) => None,
        }
    }

    /// DC's section, if this is DC, to change.
    pub fn dc_mut(&mut self) -> Option<&mut DcConfig> {
        match self {
            MethodConfig::Dc(c) => Some(c),
            MethodConfig::Dm(_) => None,
        }
    }

    /// DM's section, if this is DM.
    pub fn dm(&self) -> Option<&DmConfig> {
        match self {
            MethodConfig::Dm(c) => Some(c),
            MethodConfig::Dc(_) => None,
        }
    }

    /// Checks the method's settings against the shared ones; the error names the field.
    pub fn validate(&self, settings: &Settings) -> Result<(), DistillError> {
        match self {
            MethodConfig::Dc(c) => c.validate(settings),
            MethodConfig::Dm(c) => c.validate(settings),
        }
    }

    /// The method, ready for [`crate::Distiller::with_matcher`].
    pub fn matcher(&self) -> Box<dyn Matcher> {
        match self {
            MethodConfig::Dc(c) => Box::new(Dc::new(c.clone())),
            MethodConfig::Dm(c) => Box::new(Dm::new(c.clone())),
        }
    }

    /// A rough cost of one iteration relative to others (about seconds of a quick-preset
    /// class-wise iteration at width 32 on a 2-core CPU, before the width and strata factors
    /// that [`relative_cost`] applies), for progress bars and ETAs.
    pub fn cost_per_iteration(&self) -> f64 {
        match self {
            MethodConfig::Dc(c) => c.outer_loop as f64 * 1.5 + c.inner_loop as f64 * 0.8,
            // One first-order step: about a tenth of a DC outer step (to be measured).
            MethodConfig::Dm(_) => 0.15,
        }
    }

    /// One line for reports: the method's settings that matter to a reader.
    pub fn describe(&self) -> String {
        match self {
            MethodConfig::Dc(c) => c.describe(),
            MethodConfig::Dm(c) => c.describe(),
        }
    }
}

/// A rough relative cost of the whole distillation `config` (see
/// [`MethodConfig::cost_per_iteration`]): iterations, network width and strata.
pub fn relative_cost(config: &DistillConfig) -> f64 {
    let s = &config.settings;
    let strata = if s.mode == MatchMode::Class { 1.0 } else { 1.3 };
    let width = (s.model.width as f64 / 32.0).powi(2);
    s.iterations as f64 * config.method.cost_per_iteration() * strata * width
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_tag_their_sections() {
        for kind in MethodKind::ALL {
            assert_eq!(kind.name().parse::<MethodKind>(), Ok(kind));
            let config = kind.preset(Preset::Quick, MatchMode::Class, 10);
            assert_eq!(config.method.kind(), kind);
            let json = serde_json::to_value(&config.method).unwrap();
            assert_eq!(json["name"], kind.name());
            let back: MethodConfig = serde_json::from_value(json).unwrap();
            assert_eq!(back, config.method);
            assert_eq!(config.method.matcher().name(), kind.name());
        }
        assert!("dm2".parse::<MethodKind>().unwrap_err().contains("dc, dm"));
    }
}
