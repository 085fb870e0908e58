//! The source paper's experiment end to end: for every bias-conflicting ratio and seed, generate
//! Colored MNIST, distil it class-wise and group-wise (and class-vs-groups), draw random real
//! subsets of the same size (the floors), train the full-data baselines (ERM, group-balanced
//! ERM), score everything on the unbiased test split, and write tables and figures.
//!
//! The top of the workspace: it drives `debiasdd-cmnist` (data), `debiasdd-distill` (the engine)
//! and `debiasdd-eval` (scoring) and is driven by `cargo xtask reproduce`. It does no network I/O
//! and prints nothing: the grey MNIST files come in as a loader, progress goes out as [`Event`]s.
//!
//! [`config`] defines the grid and its presets, [`cell`] its cells, [`run`] executes them
//! (resumable: a cell's folder holds its checkpoint and, once done, its `result.json`),
//! [`report`] writes `results.json` / `results.md`, [`figures`] the pictures.

pub mod cell;
pub mod config;
pub mod error;
pub mod figures;
pub mod report;
pub mod run;

pub use cell::{Cell, Method, plan};
pub use config::{DistillSettings, ReproduceConfig, ReproducePreset};
pub use error::ReproduceError;
pub use run::{CellResult, Event, Outcome, Paths, run};
