//! Everything that can go wrong in a reproduction, each with what to do about it.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ReproduceError {
    #[error("invalid reproduction setting: {0}")]
    InvalidConfig(String),
    #[error("the grey MNIST files are not available: {0}")]
    SourceUnavailable(String),
    #[error(
        "dataset {path} exists but was generated with other settings ({problem}); delete it, or point the datasets folder elsewhere"
    )]
    StaleDataset { path: PathBuf, problem: String },
    #[error(
        "cell {id} in {dir} was computed with other settings; delete that folder to recompute it, or write the results elsewhere (--out)"
    )]
    StaleCell { id: String, dir: PathBuf },
    #[error(
        "there is no cell {index}: this grid has {total} (0 to {last}); `--list-cells` lists them, and a job array over it is --array=0-{last}",
        last = total.saturating_sub(1)
    )]
    NoSuchCell { index: usize, total: usize },
    #[error("cannot write {path}: {problem}")]
    Write { path: PathBuf, problem: String },
    #[error("cannot read {path}: {problem}")]
    Read { path: PathBuf, problem: String },
    #[error("cell {id}: {source}")]
    Cell {
        id: String,
        #[source]
        source: Box<ReproduceError>,
    },
    // The errors of the lower layers, boxed so that results stay small.
    #[error(transparent)]
    Cmnist(Box<debiasdd_cmnist::CmnistError>),
    #[error(transparent)]
    Distill(Box<debiasdd_distill::DistillError>),
    #[error(transparent)]
    Eval(Box<debiasdd_eval::EvalError>),
    #[error(transparent)]
    Data(Box<debiasdd_data::DataError>),
    #[error("inferring groups: {0}")]
    Infer(Box<debiasdd_infer::InferError>),
}

macro_rules! boxed_from {
    ($($variant:ident($ty:ty)),*) => {$(
        impl From<$ty> for ReproduceError {
            fn from(e: $ty) -> Self {
                ReproduceError::$variant(Box::new(e))
            }
        }
    )*};
}

boxed_from!(
    Cmnist(debiasdd_cmnist::CmnistError),
    Distill(debiasdd_distill::DistillError),
    Eval(debiasdd_eval::EvalError),
    Data(debiasdd_data::DataError),
    Infer(debiasdd_infer::InferError)
);

impl ReproduceError {
    pub(crate) fn write(path: &std::path::Path, problem: impl ToString) -> Self {
        ReproduceError::Write {
            path: path.to_owned(),
            problem: problem.to_string(),
        }
    }

    pub(crate) fn read(path: &std::path::Path, problem: impl ToString) -> Self {
        ReproduceError::Read {
            path: path.to_owned(),
            problem: problem.to_string(),
        }
    }
}
