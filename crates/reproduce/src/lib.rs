//! The source paper's experiment end to end: for every bias-conflicting ratio and seed, generate
//! Colored MNIST, distil it class-wise and group-wise (and class-vs-groups), draw random real
//! subsets of the same size (the floors), train the full-data baselines (ERM, group-balanced
//! ERM), score everything on the unbiased test split, and write tables and figures.
//!
//! The top of the workspace: it drives `debiasdd-cmnist` (data), `debiasdd-distill` (the engine)
//! and `debiasdd-eval` (scoring) and is driven by `cargo xtask reproduce`. It does no network I/O
//! and prints nothing: the grey MNIST files come in as a loader, progress goes out as [`Event`]s.
//!
//! The modules form a line, each using only those before it: [`config`] defines the grid and
//! its presets, [`cell`] its cells and each cell's recipe, [`store`] where results live (paths,
//! `result.json`, atomic writes), [`summary`] pools finished cells into table rows, [`figures`]
//! draws them, [`report`] writes `results.json` / `results.md`, and [`run`] executes the cells
//! (resumable: a cell's folder holds its checkpoint and, once done, its `result.json`).

pub mod cell;
pub mod config;
pub mod error;
pub mod figures;
pub mod report;
pub mod run;
pub mod store;
pub mod summary;

pub use cell::{Cell, Method, plan};
pub use config::{DistillSettings, Distilled, GroupSource, ReproduceConfig, ReproducePreset};
pub use error::ReproduceError;
pub use run::{Event, Outcome, Scope, run, run_scope};
pub use store::{CellResult, Paths};
