//! The library's errors as Python exceptions, with the library's messages: bad input and bad
//! settings are `ValueError`, a missing file `FileNotFoundError`, other I/O `OSError`, a
//! diverging run `FloatingPointError`, anything else `RuntimeError`. Never a panic.

use std::io::ErrorKind;

use debiasdd_cmnist::CmnistError;
use debiasdd_data::DataError;
use debiasdd_distill::DistillError;
use debiasdd_eval::EvalError;
use debiasdd_infer::InferError;
use debiasdd_model::ModelError;
use pyo3::PyErr;
use pyo3::exceptions::{
    PyFileNotFoundError, PyFloatingPointError, PyOSError, PyRuntimeError, PyValueError,
};

/// A library error as the Python exception its kind calls for.
pub(crate) trait ToPyErr {
    fn to_py(&self) -> PyErr;
}

fn value(e: &impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn runtime(e: &impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

fn os(e: &impl std::fmt::Display) -> PyErr {
    PyOSError::new_err(e.to_string())
}

impl ToPyErr for DataError {
    fn to_py(&self) -> PyErr {
        match self {
            DataError::Io { source, .. } if source.kind() == ErrorKind::NotFound => {
                PyFileNotFoundError::new_err(self.to_string())
            }
            DataError::Io { .. } | DataError::Write { .. } => os(self),
            DataError::Groups(_)
            | DataError::BadFile { .. }
            | DataError::ZeroShape { .. }
            | DataError::NotSquare { .. }
            | DataError::Import { .. }
            | DataError::Invalid { .. }
            | DataError::EmptyGroup { .. }
            | DataError::EmptyClass(_)
            | DataError::ZeroPerStratum => value(self),
            DataError::Candle(_) => runtime(self),
        }
    }
}

impl ToPyErr for ModelError {
    fn to_py(&self) -> PyErr {
        match self {
            ModelError::Candle(_) => runtime(self),
            _ => value(self),
        }
    }
}

impl ToPyErr for DistillError {
    fn to_py(&self) -> PyErr {
        match self {
            DistillError::InvalidConfig { .. }
            | DistillError::EmptyClass { .. }
            | DistillError::InconsistentSplit { .. }
            | DistillError::CheckpointMismatch { .. }
            | DistillError::BadCheckpoint { .. } => value(self),
            DistillError::NonFiniteLoss { .. } => PyFloatingPointError::new_err(self.to_string()),
            DistillError::Write { .. } => os(self),
            DistillError::Data(e) => e.to_py(),
            DistillError::Model(e) => e.to_py(),
            DistillError::Candle(_)
            | DistillError::RankFailed { .. }
            | DistillError::RankPanicked { .. }
            | DistillError::Nccl { .. } => runtime(self),
        }
    }
}

impl ToPyErr for EvalError {
    fn to_py(&self) -> PyErr {
        match self {
            EvalError::NonFiniteLoss { .. } => PyFloatingPointError::new_err(self.to_string()),
            EvalError::Image(_) => os(self),
            EvalError::Data(e) => e.to_py(),
            EvalError::Model(e) => e.to_py(),
            EvalError::Candle(_) | EvalError::Stopped => runtime(self),
            _ => value(self),
        }
    }
}

impl ToPyErr for InferError {
    fn to_py(&self) -> PyErr {
        match self {
            InferError::NonFiniteLoss { .. } => PyFloatingPointError::new_err(self.to_string()),
            InferError::Heatmap { .. } => os(self),
            InferError::Data(e) => e.to_py(),
            InferError::Model(e) => e.to_py(),
            InferError::Candle(_) | InferError::Stopped => runtime(self),
            InferError::TooFewClasses { .. }
            | InferError::ClassTooSmall { .. }
            | InferError::BiasModelAtChance { .. }
            | InferError::NoSplit { .. }
            | InferError::InvalidConfig { .. } => value(self),
        }
    }
}

impl ToPyErr for CmnistError {
    fn to_py(&self) -> PyErr {
        match self {
            CmnistError::Io { source, .. } if source.kind() == ErrorKind::NotFound => {
                PyFileNotFoundError::new_err(self.to_string())
            }
            CmnistError::MissingFile { .. } => PyFileNotFoundError::new_err(self.to_string()),
            CmnistError::Io { .. } | CmnistError::Write { .. } => os(self),
            CmnistError::Data(e) => e.to_py(),
            _ => value(self),
        }
    }
}

impl ToPyErr for candle_core::Error {
    fn to_py(&self) -> PyErr {
        runtime(self)
    }
}

/// `Result<T, E>` to `PyResult<T>` for the library's error types.
pub(crate) trait IntoPyResult<T> {
    fn py(self) -> pyo3::PyResult<T>;
}

impl<T, E: ToPyErr> IntoPyResult<T> for Result<T, E> {
    fn py(self) -> pyo3::PyResult<T> {
        self.map_err(|e| e.to_py())
    }
}
