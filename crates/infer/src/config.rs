//! The settings of group inference and how the groups are formed from the bias model.

use debiasdd_model::optim::SgdConfig;
use debiasdd_model::{ConvNetConfig, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::error::InferError;

/// How a train image's inferred attribute is formed from its held-out bias model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupingMethod {
    /// `prediction`, unless the bias model flags fewer than `min_conflicting_share` of the
    /// samples as bias-conflicting (it learned the classes themselves, or there is no bias it
    /// can see): then `kmeans`. The choice and its reason are reported.
    Auto,
    /// The pseudo-attribute is the bias model's predicted class (LfF's view: what the shortcut
    /// says the image is); groups are (class, predicted class).
    Prediction,
    /// k-means (k = `clusters`, k-means++ seeding) on the bias model's features, per class;
    /// cluster ids are arbitrary within each class.
    Kmeans,
    /// JTT's split: attribute 0 = the bias model is right (aligned), 1 = it is wrong
    /// (conflicting).
    Jtt,
}

impl GroupingMethod {
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Prediction => "prediction",
            Self::Kmeans => "kmeans",
            Self::Jtt => "jtt",
        }
    }
}

impl std::str::FromStr for GroupingMethod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "prediction" => Ok(Self::Prediction),
            "kmeans" | "k-means" => Ok(Self::Kmeans),
            "jtt" => Ok(Self::Jtt),
            _ => Err(format!(
                "unknown grouping method `{s}`; expected auto, prediction, kmeans or jtt"
            )),
        }
    }
}

/// Every setting of group inference. The bias model is a ConvNet trained on the class labels
/// alone with LfF's generalised cross-entropy; it is never told what the bias is.
///
/// The defaults (width 16, 2 epochs, SGD lr 0.05 with momentum 0.9) were chosen on Colored MNIST
/// at ratio 0.01 (README): a small model trained briefly takes the shortcut and little else;
/// width 32 learned more digit shape (80 % of the conflicting images labelled right against
/// 88 %), lr 0.01 left colours confused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InferConfig {
    /// GCE's q: the loss is `CE * p_y^q * q` with `p_y` detached (LfF's implementation), so
    /// easy (bias-aligned) samples dominate the gradient.
    pub q: f64,
    /// Cross-fitting folds: each fold is labelled by a model trained on the others, so a
    /// memorised minority sample is never labelled by the model that memorised it.
    pub folds: usize,
    /// The bias model (input size and classes are set from the data).
    pub model: ModelConfig,
    /// Passes over the model's training folds. Few on purpose: a shortcut is learned first.
    pub epochs: usize,
    pub batch_size: usize,
    pub sgd: SgdConfig,
    pub method: GroupingMethod,
    /// k of `kmeans` (per class).
    pub clusters: usize,
    /// Least share of flagged bias-conflicting samples (prediction != label) for `auto` to keep
    /// `prediction`.
    pub min_conflicting_share: f64,
    /// Every random choice (folds, initialisation, batch order, k-means seeding).
    pub seed: u64,
}

/// Settings a caller changes from [`InferConfig::default`] (the CLI's options, Python's keyword
/// arguments); `None` keeps the default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InferOverrides {
    /// The bias model's ConvNet width.
    pub width: Option<usize>,
    pub clusters: Option<usize>,
    pub epochs: Option<usize>,
    pub folds: Option<usize>,
    pub q: Option<f64>,
    /// The bias model's SGD learning rate.
    pub lr: Option<f64>,
    pub min_conflicting_share: Option<f64>,
}

impl InferConfig {
    /// This config with `overrides` applied (call [`InferConfig::validate`] after).
    pub fn with_overrides(mut self, overrides: &InferOverrides) -> Self {
        let o = overrides;
        if let (Some(width), ModelConfig::ConvNet(c)) = (o.width, &mut self.model) {
            c.width = width;
        }
        for (value, field) in [
            (o.clusters, &mut self.clusters),
            (o.epochs, &mut self.epochs),
            (o.folds, &mut self.folds),
        ] {
            if let Some(v) = value {
                *field = v;
            }
        }
        for (value, field) in [
            (o.q, &mut self.q),
            (o.lr, &mut self.sgd.lr),
            (o.min_conflicting_share, &mut self.min_conflicting_share),
        ] {
            if let Some(v) = value {
                *field = v;
            }
        }
        self
    }
}

impl Default for InferConfig {
    fn default() -> Self {
        Self {
            q: 0.7,
            folds: 2,
            model: ModelConfig::ConvNet(ConvNetConfig {
                width: 16,
                depth: 3,
                ..ConvNetConfig::default()
            }),
            epochs: 2,
            batch_size: 256,
            sgd: SgdConfig {
                lr: 0.05,
                momentum: 0.9,
                weight_decay: 5e-4,
                nesterov: false,
            },
            method: GroupingMethod::Auto,
            clusters: 2,
            min_conflicting_share: 0.001,
            seed: 0,
        }
    }
}

impl InferConfig {
    /// Checks every field; the error names it.
    pub fn validate(&self) -> Result<(), InferError> {
        if !(self.q.is_finite() && self.q > 0.0 && self.q <= 1.0) {
            return Err(InferError::config(
                "q",
                format!("{} is outside (0, 1]; LfF uses 0.7", self.q),
            ));
        }
        if self.folds < 2 {
            return Err(InferError::config(
                "folds",
                format!(
                    "{}; cross-fitting needs at least 2 (each fold labelled by a model trained \
                     on the others)",
                    self.folds
                ),
            ));
        }
        if self.epochs == 0 {
            return Err(InferError::config("epochs", "0; train for at least 1"));
        }
        if self.batch_size == 0 {
            return Err(InferError::config("batch_size", "0; use at least 1 (256)"));
        }
        if self.clusters < 2 || self.clusters > 256 {
            return Err(InferError::config(
                "clusters",
                format!("{}; k-means needs 2 to 256 clusters", self.clusters),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_conflicting_share) {
            return Err(InferError::config(
                "min_conflicting_share",
                format!("{} is outside [0, 1]", self.min_conflicting_share),
            ));
        }
        self.sgd.validate()?;
        Ok(())
    }
}
