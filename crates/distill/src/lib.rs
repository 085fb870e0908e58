//! Debiased dataset distillation: DC's gradient matching, per class (vanilla), per
//! (class, colour) group (the debiased method) or class against groups (FairDD).
//!
//! Sits above the data layer (`debiasdd-cmnist`, `debiasdd-groups`), the networks
//! (`debiasdd-model`) and the synthetic-set format of `debiasdd-eval`; the binary and `xtask` drive
//! it. [`backend`] (re-exported from `debiasdd-model`) holds the hand-written ConvNet passes
//! (native CPU, differentiable candle ops that give exact second-order gradients, fused CUDA)
//! and the route that picks them, [`distance`] the matching distances,
//! [`engine`] the distillation loop with checkpoints, [`grid`] the picture of the synthetic set.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use candle_core::{DType, Device};
//! use debiasdd_distill::{DistillConfig, Distiller, MatchMode, Preset};
//!
//! let data = debiasdd_cmnist::io::load(std::path::Path::new("data/cmnist/seed-ratio0.01-seed0.safetensors"))?;
//! let config = DistillConfig::preset(Preset::Quick, MatchMode::Group, 10);
//! let mut distiller = Distiller::new(config, &data.train, &Device::Cpu, DType::F32)?;
//! while !distiller.is_done() {
//!     let stats = distiller.step()?;
//!     println!("iteration {} loss {:.4}", stats.iteration, stats.loss);
//! }
//! distiller.synthetic_set()?.save(std::path::Path::new("syn.safetensors"))?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod distance;
pub mod engine;
pub mod error;
pub use debiasdd_model::backend;
pub mod grid;
mod native_loss;

pub use config::{DistillConfig, Init, MatchMode, Preset, loops_for_ipc};
pub use distance::Distance;
pub use engine::{Distiller, IterationStats, MatchingTarget};
pub use error::DistillError;
