//! Evaluation of training sets: how good and how fair is a (small or large) training set?
//!
//! Sits above `debiasdd-model` (the networks) and the data layer (`debiasdd-data`,
//! `debiasdd-groups`), beside the distillation engine (neither imports the other) and below the
//! binary. It trains fresh networks
//! with the DC protocol ([`train`], [`augment`]), scores them on the unbiased test split with
//! group metrics ([`metrics`]: accuracy, aligned / conflicting / worst-group accuracy, FairDD's
//! DEO_M and DEO_A), summarises K models ([`evaluate`]) and draws per-group heat maps
//! It does not print: progress flows through callbacks.

pub mod augment;
pub mod error;
pub mod evaluate;
pub mod heatmap;
pub mod metrics;
pub mod train;

pub use error::EvalError;
