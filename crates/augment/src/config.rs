//! DSA's parameters (`ParamDiffAug` of the official code), its families and the seeded draws.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::DsaError;
use crate::transform::Transform;

/// One DSA strategy family (a key of the official `AUGMENT_FNS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// Brightness, then saturation, then contrast (one draw of each).
    Color,
    /// Integer shift with zero fill (pad by one zero pixel, clamp into it).
    Crop,
    /// A zeroed square.
    Cutout,
    /// Horizontal flip (along the width) with probability [`DsaConfig::flip`].
    Flip,
    /// Bilinear scaling about the centre, independent factors along x and y.
    Scale,
    /// Bilinear rotation about the centre.
    Rotate,
}

impl Family {
    /// Every family, in the official strategy order `color_crop_cutout_flip_scale_rotate`.
    pub const ALL: [Family; 6] = [
        Family::Color,
        Family::Crop,
        Family::Cutout,
        Family::Flip,
        Family::Scale,
        Family::Rotate,
    ];

    /// The official strategy name: `color`, `crop`, `cutout`, `flip`, `scale`, `rotate`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Color => "color",
            Family::Crop => "crop",
            Family::Cutout => "cutout",
            Family::Flip => "flip",
            Family::Scale => "scale",
            Family::Rotate => "rotate",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Family {
    type Err = DsaError;

    /// Case-insensitive: `Crop`, `crop` and `CROP` all parse.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Family::ALL
            .into_iter()
            .find(|family| family.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| DsaError::UnknownFamily { name: s.to_owned() })
    }
}

/// DSA's parameters; the defaults are the official `ParamDiffAug` with the digit strategy
/// `color_crop_cutout_scale_rotate` (the official README: flip "is not good for digit datasets").
///
/// Every field is a ratio of the official code: `crop` and `cutout` are fractions of the image
/// side, `flip` a probability, `scale` the largest factor (factors in `[1/scale, scale]`),
/// `rotate_degrees` the largest angle (angles in `[-r, r]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DsaConfig {
    /// The strategy: one family is drawn per call, uniformly over this list (`aug_mode 'S'`).
    pub families: Vec<Family>,
    /// Brightness shift `(u - 0.5) * brightness` (official 1.0).
    pub brightness: f64,
    /// Saturation factor `u * saturation` (official 2.0).
    pub saturation: f64,
    /// Contrast factor `u + contrast` (official 0.5).
    pub contrast: f64,
    /// Largest shift as a fraction of the side: `int(side * crop + 0.5)` pixels (official 0.125).
    pub crop: f64,
    /// Cutout side as a fraction of the image side: `int(side * cutout + 0.5)` (official 0.5).
    pub cutout: f64,
    /// Probability of the horizontal flip (official 0.5).
    pub flip: f64,
    /// Largest scale factor, at least 1 (official 1.2).
    pub scale: f64,
    /// Largest rotation in degrees (official 15).
    pub rotate_degrees: f64,
}

impl Default for DsaConfig {
    fn default() -> Self {
        Self {
            families: vec![
                Family::Color,
                Family::Crop,
                Family::Cutout,
                Family::Scale,
                Family::Rotate,
            ],
            brightness: 1.0,
            saturation: 2.0,
            contrast: 0.5,
            crop: 0.125,
            cutout: 0.5,
            flip: 0.5,
            scale: 1.2,
            rotate_degrees: 15.0,
        }
    }
}

impl DsaConfig {
    /// Checks every field; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), DsaError> {
        if self.families.is_empty() {
            return Err(DsaError::NoFamilies);
        }
        let non_negative: [(&'static str, f64); 4] = [
            ("brightness", self.brightness),
            ("saturation", self.saturation),
            ("contrast", self.contrast),
            ("rotate_degrees", self.rotate_degrees),
        ];
        for (field, value) in non_negative {
            if !(value.is_finite() && value >= 0.0) {
                return Err(DsaError::BadValue {
                    field,
                    value,
                    fix: "use a finite value >= 0 (0 turns this part off)",
                });
            }
        }
        let ratios: [(&'static str, f64); 3] = [
            ("crop", self.crop),
            ("cutout", self.cutout),
            ("flip", self.flip),
        ];
        for (field, value) in ratios {
            if !(0.0..=1.0).contains(&value) {
                return Err(DsaError::BadValue {
                    field,
                    value,
                    fix: "use a ratio in [0, 1]",
                });
            }
        }
        if !(self.scale.is_finite() && self.scale >= 1.0) {
            return Err(DsaError::BadValue {
                field: "scale",
                value: self.scale,
                fix: "use the largest scale factor, a finite value >= 1 (1 turns scaling off; \
                      the official value is 1.2)",
            });
        }
        Ok(())
    }

    /// The official strategy string of the families, e.g. `color_crop_cutout_scale_rotate`.
    pub fn strategy(&self) -> String {
        let names: Vec<&str> = self.families.iter().map(|f| f.name()).collect();
        names.join("_")
    }

    /// One line for logs and reports.
    pub fn describe(&self) -> String {
        format!(
            "DSA {} (brightness {}, saturation {}, contrast {}, crop {}, cutout {}, flip {}, \
             scale {}, rotate {} deg)",
            self.strategy(),
            self.brightness,
            self.saturation,
            self.contrast,
            self.crop,
            self.cutout,
            self.flip,
            self.scale,
            self.rotate_degrees
        )
    }

    /// The Siamese draw (the official `DiffAugment(x, strategy, seed >= 0, param)`): one family
    /// and one parameter set, to be applied to every image of a call (and to the real and the
    /// synthetic batch alike). Equal rng states give equal transforms.
    ///
    /// # Panics
    /// If `families` is empty (see [`DsaConfig::validate`]).
    pub fn draw_siamese(&self, rng: &mut impl Rng) -> Transform {
        let family = self.draw_family(rng);
        self.draw_params(family, rng)
    }

    /// The non-Siamese draw (the official `DiffAugment(x, strategy, seed = -1, param)`, used
    /// when training evaluation networks): one family for the whole batch, and `n` independent
    /// parameter sets, one per image.
    ///
    /// # Panics
    /// If `families` is empty (see [`DsaConfig::validate`]).
    pub fn draw_batch(&self, n: usize, rng: &mut impl Rng) -> Vec<Transform> {
        let family = self.draw_family(rng);
        (0..n).map(|_| self.draw_params(family, rng)).collect()
    }

    fn draw_family(&self, rng: &mut impl Rng) -> Family {
        assert!(
            !self.families.is_empty(),
            "DsaConfig::families is empty; validate the config first"
        );
        self.families[rng.random_range(0..self.families.len())]
    }

    /// One parameter set of `family`, in the official order of draws.
    fn draw_params(&self, family: Family, rng: &mut impl Rng) -> Transform {
        let mut u = || rng.random::<f64>();
        match family {
            Family::Color => {
                let shift = (u() - 0.5) * self.brightness;
                let saturation = u() * self.saturation;
                let contrast = u() + self.contrast;
                Transform::color(shift, saturation, contrast)
            }
            Family::Crop => Transform::crop(self.crop, u(), u()),
            Family::Cutout => Transform::cutout(self.cutout, u(), u()),
            Family::Flip => Transform::flip(u() < self.flip),
            Family::Scale => {
                let low = 1.0 / self.scale;
                let sx = u() * (self.scale - low) + low;
                let sy = u() * (self.scale - low) + low;
                Transform::scale(sx, sy)
            }
            Family::Rotate => {
                let degrees = (u() - 0.5) * 2.0 * self.rotate_degrees;
                Transform::rotate(degrees.to_radians())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::transform::Kind;

    #[test]
    fn family_names_parse_back_case_insensitively() {
        for family in Family::ALL {
            assert_eq!(family.name().parse::<Family>(), Ok(family));
            assert_eq!(family.name().to_uppercase().parse::<Family>(), Ok(family));
            assert_eq!(family.to_string(), family.name());
        }
        let err = "blur".parse::<Family>().unwrap_err().to_string();
        assert!(err.contains("'blur'"), "{err}");
        for family in Family::ALL {
            assert!(err.contains(family.name()), "{err} lacks {family}");
        }
    }

    #[test]
    fn config_defaults_are_the_official_ones_and_round_trip() -> anyhow::Result<()> {
        let config = DsaConfig::default();
        assert_eq!(config.strategy(), "color_crop_cutout_scale_rotate");
        let json = serde_json::to_string(&config)?;
        assert!(json.contains(r#""families":["color","crop","cutout","scale","rotate"]"#));
        assert_eq!(serde_json::from_str::<DsaConfig>(&json)?, config);
        // Missing fields take the defaults; unknown fields are refused.
        let partial: DsaConfig = serde_json::from_str(r#"{"families":["flip"]}"#)?;
        assert_eq!(partial.families, vec![Family::Flip]);
        assert_eq!(partial.scale, 1.2);
        assert!(serde_json::from_str::<DsaConfig>(r#"{"scales":1.0}"#).is_err());
        assert!(config.describe().contains("color_crop_cutout_scale_rotate"));
        assert!(!config.describe().contains('\n'));
        Ok(())
    }

    #[test]
    fn validation_names_the_field_and_the_fix() {
        assert_eq!(DsaConfig::default().validate(), Ok(()));
        let empty = DsaConfig {
            families: vec![],
            ..DsaConfig::default()
        };
        assert!(
            empty
                .validate()
                .unwrap_err()
                .to_string()
                .contains("families")
        );
        let cases: [(&str, DsaConfig, &str); 6] = [
            (
                "scale",
                DsaConfig {
                    scale: 0.8,
                    ..DsaConfig::default()
                },
                ">= 1",
            ),
            (
                "crop",
                DsaConfig {
                    crop: 1.5,
                    ..DsaConfig::default()
                },
                "[0, 1]",
            ),
            (
                "cutout",
                DsaConfig {
                    cutout: -0.1,
                    ..DsaConfig::default()
                },
                "[0, 1]",
            ),
            (
                "flip",
                DsaConfig {
                    flip: f64::NAN,
                    ..DsaConfig::default()
                },
                "[0, 1]",
            ),
            (
                "brightness",
                DsaConfig {
                    brightness: -1.0,
                    ..DsaConfig::default()
                },
                ">= 0",
            ),
            (
                "rotate_degrees",
                DsaConfig {
                    rotate_degrees: f64::NAN,
                    ..DsaConfig::default()
                },
                ">= 0",
            ),
        ];
        for (field, config, fix) in cases {
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(field), "{message} should name {field}");
            assert!(message.contains(fix), "{message} should say {fix}");
        }
    }

    #[test]
    fn siamese_draws_repeat_for_equal_rng_states() {
        let config = DsaConfig {
            families: Family::ALL.to_vec(),
            ..DsaConfig::default()
        };
        let mut a = ChaCha8Rng::seed_from_u64(5);
        let mut b = ChaCha8Rng::seed_from_u64(5);
        let first: Vec<Transform> = (0..50).map(|_| config.draw_siamese(&mut a)).collect();
        let second: Vec<Transform> = (0..50).map(|_| config.draw_siamese(&mut b)).collect();
        assert_eq!(first, second);
        // 50 draws over 6 families reach every family, and no two draws are equal.
        for family in Family::ALL {
            assert!(
                first.iter().any(|t| t.family() == family),
                "{family} never drawn"
            );
        }
        let other: Vec<Transform> = {
            let mut c = ChaCha8Rng::seed_from_u64(6);
            (0..50).map(|_| config.draw_siamese(&mut c)).collect()
        };
        assert_ne!(first, other);
    }

    #[test]
    fn draws_stay_in_the_official_ranges() {
        let config = DsaConfig::default();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for family in Family::ALL {
            for _ in 0..200 {
                match config.draw_params(family, &mut rng).kind {
                    Kind::Color {
                        shift,
                        saturation,
                        contrast,
                    } => {
                        assert!((-0.5..0.5).contains(&shift));
                        assert!((0.0..2.0).contains(&saturation));
                        assert!((0.5..1.5).contains(&contrast));
                    }
                    Kind::Scale { sx, sy } => {
                        assert!((1.0 / 1.2..=1.2).contains(&sx));
                        assert!((1.0 / 1.2..=1.2).contains(&sy));
                    }
                    Kind::Rotate { radians } => {
                        assert!(radians.abs() <= 15f64.to_radians());
                    }
                    Kind::Crop { unit_h, unit_w, .. } | Kind::Cutout { unit_h, unit_w, .. } => {
                        assert!((0.0..1.0).contains(&unit_h) && (0.0..1.0).contains(&unit_w));
                    }
                    Kind::Flip { .. } => {}
                }
            }
        }
    }

    #[test]
    fn batch_draws_share_the_family_but_not_the_parameters() {
        let config = DsaConfig {
            families: Family::ALL.to_vec(),
            ..DsaConfig::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut seen = Vec::new();
        for _ in 0..30 {
            let batch = config.draw_batch(16, &mut rng);
            assert_eq!(batch.len(), 16);
            let family = batch[0].family();
            assert!(batch.iter().all(|t| t.family() == family));
            if family != Family::Flip {
                assert!(
                    batch[1..].iter().any(|t| *t != batch[0]),
                    "{family}: all equal"
                );
            }
            seen.push(family);
        }
        assert!(Family::ALL.iter().all(|f| seen.contains(f)));
        // Non-Siamese scale draws sx and sy independently.
        let scale = DsaConfig {
            families: vec![Family::Scale],
            ..DsaConfig::default()
        };
        let batch = scale.draw_batch(8, &mut rng);
        assert!(
            batch
                .iter()
                .all(|t| matches!(t.kind, Kind::Scale { sx, sy } if sx != sy))
        );
        // Deterministic under a seed.
        let again = |seed| config.draw_batch(5, &mut ChaCha8Rng::seed_from_u64(seed));
        assert_eq!(again(9), again(9));
    }
}
