//! What can go wrong building, reading or writing image sets; every message names the field or
//! file at fault and the fix.

use std::path::PathBuf;

use crate::ImageShape;

/// What can go wrong building, reading or writing image sets.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    BadFile { path: PathBuf, problem: String },
    #[error("cannot write {path}: {problem}")]
    Write { path: PathBuf, problem: String },
    #[error("image shape: `{field}` is 0; every side of an image must be at least 1")]
    ZeroShape { field: &'static str },
    #[error(
        "images are {shape} (C x H x W), but the ConvNet takes square images; resize them to \
         S x S (for example `debiasdd import --size S`)"
    )]
    NotSquare { shape: ImageShape },
    #[error("{at}: {problem}")]
    Import { at: String, problem: String },
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
    #[error(
        "group {group} (class {class}, attribute {attribute}) has no real samples to draw from; \
         a group-stratified subset needs every group, or skip empty groups"
    )]
    EmptyGroup {
        group: usize,
        class: usize,
        attribute: usize,
    },
    #[error("class {0} has no real samples to draw from")]
    EmptyClass(usize),
    #[error("asked for 0 images per class/group; ask for at least 1")]
    ZeroPerStratum,
    #[error(transparent)]
    Groups(#[from] debiasdd_groups::GroupError),
    #[cfg(feature = "tensors")]
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl DataError {
    /// A validation error of `field`.
    pub fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            problem: problem.into(),
        }
    }
}
