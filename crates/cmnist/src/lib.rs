//! The benchmark generators of debiasdd: Colored MNIST and Colored Fashion-MNIST (foreground
//! and background colouring) and CIFAR10-S.
//!
//! Reads MNIST-style IDX files (raw or gzipped) and verifies them against the published
//! checksums ([`source`]), builds the biased Colored (Fashion-)MNIST of the project's protocol
//! and FairDD's from them ([`colored`]) and CIFAR10-S from the CIFAR-10 binary archive
//! ([`cifar`]). Every generator returns a [`debiasdd_data::Dataset`], which
//! [`debiasdd_data::file`] stores; only this crate knows the benchmarks' sizes. It does no
//! network I/O (downloads live in `xtask`).
//!
//! ```no_run
//! use debiasdd_cmnist::{ColoredMnistConfig, GreySource, Preset, SourceKind, Verification};
//! let source = GreySource::load("data/mnist".as_ref(), SourceKind::Mnist, Verification::Checksums)?;
//! let data = debiasdd_cmnist::build(&source, &ColoredMnistConfig::new(Preset::Seed, 0.01, 0))?;
//! debiasdd_data::file::save(&data, "data/cmnist/ratio-0.01.safetensors".as_ref())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod cifar;
pub mod colored;
pub mod error;
pub mod idx;
pub mod source;

pub use cifar::{Cifar10sConfig, CifarArchive, build_cifar10s};
pub use colored::{ColoredMnistConfig, Colouring, PROTOCOL_RATIOS, Preset, build, is_aligned};
pub use error::{CmnistError, Result};
pub use source::{GreySource, SourceKind, Verification};
