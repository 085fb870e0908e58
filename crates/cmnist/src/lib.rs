//! Colored MNIST for debiasdd: the data layer.
//!
//! Reads MNIST-style IDX files (raw or gzipped) and verifies them against the published
//! checksums ([`source`]), builds the biased Colored MNIST of the project's protocol from them
//! ([`colored`]), stores it as one safetensors file ([`io`]) and draws the class x colour preview
//! grid ([`preview`]). It sits at the bottom of the workspace next to `debiasdd-groups` and knows
//! nothing of models or tensors beyond the file format; it does no network I/O (downloads live in
//! `xtask`).

pub mod error;
pub mod idx;
pub mod source;

pub use error::{CmnistError, Result};
pub use source::{GreySource, SourceKind, Verification};
