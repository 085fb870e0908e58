//! The crate's error type: invalid configurations, weight files that do not fit a network, and
//! candle errors passed through.

use std::path::PathBuf;

use candle_core::DType;

/// Everything that can go wrong building, saving or loading a network or an optimiser. Each
/// variant names the value at fault and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A size in a config is zero.
    #[error("{model}: `{field}` must be at least 1, got 0")]
    Zero {
        model: &'static str,
        field: &'static str,
    },
    /// The pooling layers shrink the feature map to nothing before the last block.
    #[error(
        "convnet: depth {depth} is too deep for {image_size}x{image_size} input: block {block} \
         (`features.{block}`) would pool a {size}x{size} feature map to nothing; use a \
         smaller depth (at most {max_depth} here) or pooling = none"
    )]
    TooDeep {
        depth: usize,
        image_size: usize,
        block: usize,
        size: usize,
        max_depth: usize,
    },
    /// A fixed-architecture network (LeNet) cannot take images this small.
    #[error(
        "{model}: {image_size}x{image_size} input is too small; its layers need at least \
         {min}x{min}"
    )]
    ImageTooSmall {
        model: &'static str,
        image_size: usize,
        min: usize,
    },
    /// Group norm splits the channels into 4 groups, so the width must be a multiple of 4.
    #[error(
        "convnet: group norm uses {groups} groups, so width must be a multiple of {groups}, got {width}"
    )]
    GroupsDoNotDivide { width: usize, groups: usize },
    /// Parameters must be floating point.
    #[error("networks need a floating-point dtype, got {0:?}")]
    UnsupportedDType(DType),
    /// An optimiser hyper-parameter is out of range.
    #[error("sgd: {0}")]
    InvalidOptimizer(String),
    /// A string does not name a variant of one of the config enums.
    #[error("unknown {what} `{value}`; expected one of: {expected}")]
    Parse {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
    /// A `--device` string names no usable device.
    #[error("device `{spec}`: {reason}")]
    Device { spec: String, reason: String },
    /// A weight file lacks a tensor the network has.
    #[error("{path}: no tensor `{name}`; the file was saved from a different architecture")]
    MissingTensor { path: PathBuf, name: String },
    /// A weight file holds a tensor the network does not have.
    #[error("{path}: unexpected tensor `{name}`; the file was saved from a different architecture")]
    UnexpectedTensor { path: PathBuf, name: String },
    /// A weight file's tensor has the wrong shape.
    #[error("{path}: tensor `{name}` has shape {found:?}, the network expects {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A ConvNet pass got the wrong number of parameter tensors.
    #[error(
        "convnet: expected {expected} parameter tensors, got {found}; pass them in \
         `Network::parameters` order"
    )]
    ParamCount { expected: usize, found: usize },
    /// A ConvNet pass got a parameter tensor of the wrong shape.
    #[error(
        "convnet: `{name}` has shape {found:?}, expected {expected:?}; pass the parameters in \
         `Network::parameters` order, of a network built from the same config"
    )]
    ParamShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// Reading or writing a weight file failed.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
