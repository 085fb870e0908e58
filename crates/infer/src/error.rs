//! The one error type of group inference: every message says what to change.

/// What can go wrong when inferring groups.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(
        "the train split has {classes} class(es); groups are inferred from what a bias model \
         confuses between classes, so it needs at least 2"
    )]
    TooFewClasses { classes: usize },
    #[error(
        "class {class} has {count} train image(s); cross-fitting over {folds} folds needs at \
         least {folds} per class (use --folds 2 or drop the class)"
    )]
    ClassTooSmall {
        class: usize,
        count: usize,
        folds: usize,
    },
    #[error(
        "the bias model's held-out accuracy on the class labels is {accuracy:.1} %, no better \
         than chance ({chance:.1} %, the largest class's share): it found no signal, biased or \
         not, to infer groups from. Train it longer (--epochs), with a higher learning rate \
         (--lr), or check that the labels belong to the images"
    )]
    BiasModelAtChance { accuracy: f64, chance: f64 },
    #[error(
        "the inferred groups leave every class with one group: {reason}. Choose a method that \
         splits classes (--method kmeans or --method jtt)"
    )]
    NoSplit { reason: String },
    #[error("invalid inference setting `{field}`: {problem}")]
    InvalidConfig {
        field: &'static str,
        problem: String,
    },
    #[error(
        "training the bias model diverged (non-finite loss in epoch {epoch} of fold {fold}); lower --lr"
    )]
    NonFiniteLoss { fold: usize, epoch: usize },
    #[error("cannot write the heat map {path}: {problem}")]
    Heatmap {
        path: std::path::PathBuf,
        problem: String,
    },
    #[error("stopped by the caller (an interrupt) before the groups were inferred")]
    Stopped,
    #[error(transparent)]
    Data(#[from] debiasdd_data::DataError),
    #[error(transparent)]
    Model(#[from] debiasdd_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl InferError {
    pub(crate) fn config(field: &'static str, problem: impl Into<String>) -> Self {
        Self::InvalidConfig {
            field,
            problem: problem.into(),
        }
    }
}
