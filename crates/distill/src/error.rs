//! Everything that can go wrong in a distillation run, each with what to do about it.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum DistillError {
    #[error("invalid distillation setting `{field}`: {problem}")]
    InvalidConfig {
        field: &'static str,
        problem: String,
    },
    #[error("class {class} has no training images; distillation needs every class")]
    EmptyClass { class: usize },
    #[error(
        "the train split has {n} images but {n_labels} labels / {n_groups} group ids; the data file is inconsistent, regenerate it with `debiasdd generate`"
    )]
    InconsistentSplit {
        n: usize,
        n_labels: usize,
        n_groups: usize,
    },
    #[error("the matching loss became {value} at iteration {iteration}, step {step}; {hint}")]
    NonFiniteLoss {
        iteration: usize,
        step: usize,
        value: f64,
        /// What to change, each option with its current value.
        hint: String,
    },
    #[error(
        "checkpoint {path} was written by a run with different settings ({problem}); resume with the same settings or start a new run"
    )]
    CheckpointMismatch { path: PathBuf, problem: String },
    #[error("checkpoint {path} is unreadable: {problem}")]
    BadCheckpoint { path: PathBuf, problem: String },
    #[error("cannot write {path}: {problem}")]
    Write { path: PathBuf, problem: String },
    #[error("rank {rank} of the distillation failed ({problem}); every rank stopped with it")]
    RankFailed { rank: usize, problem: String },
    #[error(
        "NCCL on rank {rank}: {problem}; check that every rank has its own GPU and that libnccl.so.2 is on LD_LIBRARY_PATH, or pass --collective host"
    )]
    Nccl { rank: usize, problem: String },
    #[error("rank {rank} of the distillation panicked: {message}; this is a bug, please report it")]
    RankPanicked { rank: usize, message: String },
    #[error(transparent)]
    Data(#[from] debiasdd_data::DataError),
    #[error(transparent)]
    Model(#[from] debiasdd_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
