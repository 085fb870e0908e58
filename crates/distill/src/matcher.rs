//! The interface between the distillation loop and a method: what is matched, and the work
//! between two synthetic updates.
//!
//! The loop ([`crate::Distiller::step`]) owns everything a method shares with every other: the
//! synthetic images and their SGD with momentum, the strata and the real batches drawn from
//! them, the random streams, the timing, checkpoints and histories. A method implements
//! [`Matcher`]: per iteration it may draw state (DC: a fresh network), per step it turns the
//! step's real batch into a [`Target`] (DC: the real gradients of every term), whose
//! [`Target::loss`] the loop differentiates with respect to the synthetic images, and between
//! two steps it may do more work (DC: train the network on the synthetic set).
//!
//! Randomness: iteration `i` hands the same generator (stream `i + 1` of the seed) to
//! [`Matcher::begin_iteration`], to the real batch of every step (drawn by the loop just before
//! [`Matcher::target`]) and to [`Matcher::between_steps`], in that order.
//!
//! A new method is a module with a config section and a `Matcher`; see the crate docs for one
//! written outside the crate, run by the unchanged loop, checkpoints and driver.

use candle_core::{DType, Device, Tensor};
use debiasdd_model::backend::Route;
use debiasdd_model::{ModelConfig, Network};
use rand_chacha::ChaCha8Rng;

use crate::config::Settings;
use crate::error::DistillError;
use crate::strata::{MatchingPlan, RealBatch};

/// What a method sees of the run.
#[derive(Debug, Clone, Copy)]
pub struct Problem<'a> {
    /// The settings every method shares (strata, sizes, network, seed).
    pub settings: &'a Settings,
    /// The matching terms and the synthetic set's order. In [`Matcher::target`] of a run over
    /// several ranks ([`crate::ranks`]): this rank's part of them ([`MatchingPlan::part`]), whose
    /// synthetic images are the ones the target's loss receives.
    pub plan: &'a MatchingPlan,
    pub device: &'a Device,
    pub dtype: DType,
    /// Which backend runs the network's passes on this device, dtype and network.
    pub route: Route,
}

/// One step's matching loss as a function of the synthetic images.
pub trait Target {
    /// The summed distance of all terms for the synthetic images `synthetic` (normalised
    /// space, (N, C, H, W)); differentiable with respect to `synthetic` when it is a variable.
    fn loss(&self, synthetic: &Tensor) -> Result<Tensor, DistillError>;
}

/// A method's advice for a loss that became NaN or infinite.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NonFiniteHints {
    /// Learning rates to lower, each with its current value (`--lr-net (now 0.01)`).
    pub lower: Vec<String>,
    /// Other options to try, each with its current value (`--distance ours (now mse)`).
    pub try_instead: Vec<String>,
}

/// A distillation method.
pub trait Matcher: std::fmt::Debug {
    /// The method's name, as checkpoints, synthetic-set files and reports record it (`dc`).
    fn name(&self) -> &'static str;

    /// The method's own settings, as JSON. Part of a run's identity: a checkpoint resumes only
    /// under the same settings.
    fn settings(&self) -> serde_json::Value;

    /// Synthetic updates per iteration (DC: its outer loop).
    fn steps(&self) -> usize;

    /// Called at the start of every iteration, before any real batch is drawn.
    fn begin_iteration(
        &mut self,
        problem: &Problem<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Result<(), DistillError>;

    /// The loss of one step, from that step's real batch.
    fn target(
        &mut self,
        problem: &Problem<'_>,
        real: &RealBatch,
    ) -> Result<Box<dyn Target>, DistillError>;

    /// Work between two steps of an iteration (not after the last), on the updated synthetic
    /// images (detached).
    fn between_steps(
        &mut self,
        problem: &Problem<'_>,
        synthetic: &Tensor,
        rng: &mut ChaCha8Rng,
    ) -> Result<(), DistillError>;

    /// What to change when the loss becomes NaN or infinite, besides the images' learning
    /// rate: learning rates to lower (`--lr-net (now 0.01)`) and other options to try
    /// (`--distance ours (now mse)`), naming only options that would change the run.
    fn non_finite_hints(&self) -> NonFiniteHints {
        NonFiniteHints::default()
    }
}

impl<M: Matcher + ?Sized> Matcher for Box<M> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn settings(&self) -> serde_json::Value {
        (**self).settings()
    }

    fn steps(&self) -> usize {
        (**self).steps()
    }

    fn begin_iteration(
        &mut self,
        problem: &Problem<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Result<(), DistillError> {
        (**self).begin_iteration(problem, rng)
    }

    fn target(
        &mut self,
        problem: &Problem<'_>,
        real: &RealBatch,
    ) -> Result<Box<dyn Target>, DistillError> {
        (**self).target(problem, real)
    }

    fn between_steps(
        &mut self,
        problem: &Problem<'_>,
        synthetic: &Tensor,
        rng: &mut ChaCha8Rng,
    ) -> Result<(), DistillError> {
        (**self).between_steps(problem, synthetic, rng)
    }

    fn non_finite_hints(&self) -> NonFiniteHints {
        (**self).non_finite_hints()
    }
}

/// A fresh, randomly initialised ConvNet of the run's settings, its parameters (detached) in
/// parameter order, drawn from `rng` (DC and DM draw one per iteration).
pub fn fresh_network(
    problem: &Problem<'_>,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Tensor>, DistillError> {
    let network = Network::new(
        &ModelConfig::ConvNet(problem.settings.model.clone()),
        rng,
        problem.device,
        problem.dtype,
    )?;
    Ok(network
        .vars()
        .iter()
        .map(|v| v.as_detached_tensor())
        .collect())
}
