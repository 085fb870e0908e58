//! Debiased dataset distillation: strata x method. The strata ([`strata`]) say which real images
//! form each matching term (per class, per (class, colour) group, FairDD's class against groups,
//! or COBRA's class against the mean of its groups); the method ([`Matcher`]) says what is
//! matched over those terms (DC: gradients, [`dc`]; DM: embeddings, [`dm`]). One loop ([`Distiller`]), one checkpoint format ([`checkpoint`]) and one resumable
//! driver ([`driver::drive`]) serve every method; [`method`] is the registry that names them.
//!
//! Sits above the data layer (`debiasdd-data`: image sets of any shape and group layout, the
//! synthetic-set file; `debiasdd-groups`) and the networks and their backends
//! (`debiasdd-model`), beside the evaluator (neither imports the other); the binary and `xtask`
//! drive it. The network's input and output sizes come from the train split. [`grid`] draws the
//! synthetic set. [`ranks`] splits one distillation's terms over several ranks (GPUs, or
//! threads), their gradients summed by a [`Collective`].
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::atomic::AtomicBool;
//! use candle_core::{DType, Device};
//! use debiasdd_distill::{DistillConfig, Distiller, MatchMode, MethodKind, Preset};
//! use debiasdd_distill::driver::{RunFiles, drive};
//!
//! let data = debiasdd_data::file::load(std::path::Path::new("data/cmnist/seed-ratio0.01-seed0.safetensors"))?;
//! let config = DistillConfig::preset(MethodKind::Dc, Preset::Quick, MatchMode::Group, 10);
//! let mut distiller = Distiller::new(config, &data.train, &Device::Cpu, DType::F32)?;
//! let files = RunFiles {
//!     checkpoint: Some(std::path::Path::new("syn.ckpt.safetensors")),
//!     checkpoint_every: 5,
//!     history: Some(std::path::Path::new("history.jsonl")),
//! };
//! drive(&mut distiller, files, &AtomicBool::new(false), &mut |_, stats| {
//!     println!("iteration {} loss {:.4}", stats.iteration, stats.loss);
//!     Ok(())
//! })?;
//! distiller.synthetic_set()?.save(std::path::Path::new("syn.safetensors"))?;
//! # Ok(()) }
//! ```
//!
//! A new method implements [`Matcher`] (and [`matcher::Target`] for its per-step loss) and runs
//! through [`Distiller::with_matcher`] with nothing else changed: `tests/custom_method.rs`
//! distils, checkpoints and resumes a method written outside this crate. To make it selectable
//! by name from the command line and the experiment grid, add it to [`method`].

pub mod checkpoint;
pub mod config;
mod cpu_loss;
pub mod dc;
pub mod dm;
pub mod driver;
pub mod engine;
pub mod error;
pub mod grid;
pub mod matcher;
pub mod method;
pub mod ranks;
pub mod strata;

pub use config::{DistillConfig, Init, Overrides, Preset, Settings};
pub use dc::{Dc, DcConfig, Distance, MatchingTarget, loops_for_ipc};
pub use dm::{Dm, DmConfig};
pub use driver::{RunFiles, RunOutcome, drive};
pub use engine::{Distiller, IterationStats};
pub use error::DistillError;
pub use matcher::{Matcher, NonFiniteHints, Problem, Target};
pub use method::{MethodConfig, MethodKind};
pub use ranks::{Collective, CollectiveKind, ThreadGroup, drive_ranks};
pub use strata::{MatchMode, MatchingPlan, RealBatch, Term};
