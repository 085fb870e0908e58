//! The one error type of the evaluator.

/// What can go wrong when evaluating predictions, summarising runs or drawing heat maps.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(
        "{predictions} predictions, {labels} labels and {attributes} attributes: \
         every sample needs all three"
    )]
    LengthMismatch {
        predictions: usize,
        labels: usize,
        attributes: usize,
    },
    #[error("no samples to evaluate")]
    NoSamples,
    #[error("sample {index} has {what} {value}, outside the layout's range 0..{limit}")]
    OutOfRange {
        index: usize,
        what: &'static str,
        value: usize,
        limit: usize,
    },
    #[error("no runs to summarise")]
    NoRuns,
    #[error(
        "run {run} has a {found_classes} x {found_attributes} group table but run 0 has \
         {classes} x {attributes}: summarise only runs on the same split"
    )]
    RunShapeMismatch {
        run: usize,
        classes: usize,
        attributes: usize,
        found_classes: usize,
        found_attributes: usize,
    },
    #[error("invalid group-accuracy matrix: {0}")]
    BadMatrix(String),
    #[error("{colours} palette colours for {columns} attribute columns")]
    PaletteMismatch { colours: usize, columns: usize },
    #[error("invalid augmentation setting: {0}")]
    BadAugment(String),
    #[error("could not write the image")]
    Image(#[from] image::ImageError),
    #[error("invalid evaluation setting: {0}")]
    InvalidConfig(String),
    #[error("the training set is empty: nothing to train on")]
    EmptyTrainingSet,
    #[error(
        "group-balanced training needs a group for every image, but the training set has \
         images without one (a class-wise synthetic set?); train without --balanced"
    )]
    MissingGroups,
    #[error(
        "training diverged: the loss became NaN or infinite in epoch {epoch} at lr {lr}; \
         lower the learning rate or check the training images for extreme values"
    )]
    NonFiniteLoss { epoch: usize, lr: f64 },
    #[error("stopped by the caller (an interrupt) before training finished")]
    Stopped,
    #[error(transparent)]
    Model(#[from] debiasdd_model::ModelError),
    #[error(transparent)]
    Data(#[from] debiasdd_data::DataError),
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}
