//! Colored MNIST for debiasdd: the data layer.
//!
//! Reads MNIST-style IDX files (raw or gzipped) and verifies them against the published
//! checksums ([`source`]), builds the biased Colored MNIST of the project's protocol from them
//! ([`colored`]), stores it as one safetensors file ([`io`]) and draws the class x colour preview
//! grid ([`preview`]). It sits at the bottom of the workspace next to `debiasdd-groups` and knows
//! nothing of models or tensors beyond the file format; it does no network I/O (downloads live in
//! `xtask`).
//!
//! ```no_run
//! use debiasdd_cmnist::{ColoredMnistConfig, GreySource, Preset, SourceKind, Verification};
//! let source = GreySource::load("data/mnist".as_ref(), SourceKind::Mnist, Verification::Checksums)?;
//! let data = debiasdd_cmnist::build(&source, &ColoredMnistConfig::new(Preset::Seed, 0.01, 0))?;
//! debiasdd_cmnist::io::save(&data, "data/cmnist/ratio-0.01.safetensors".as_ref())?;
//! # Ok::<(), debiasdd_cmnist::CmnistError>(())
//! ```

pub mod colored;
pub mod error;
pub mod idx;
pub mod io;
pub mod preview;
pub mod source;

pub use colored::{ColoredMnist, ColoredMnistConfig, PROTOCOL_RATIOS, Preset, Split, build};
pub use error::{CmnistError, Result};
pub use source::{GreySource, SourceKind, Verification};
