//! DM, dataset condensation with distribution matching (Zhao & Bilen, WACV 2023), as a
//! [`Matcher`]: per iteration a fresh, randomly initialised ConvNet, never trained; one step per
//! iteration whose loss sums, over the matching terms, the squared distance between the mean
//! embedding (the features entering the classifier) of the term's real images and that of its
//! synthetic images, summed over feature dimensions (the official `main_DM.py`:
//! `sum((mean(embed(real)) - mean(embed(syn)))**2)` per class).
//!
//! The real side is a forward pass only ([`Route::embeddings`]). The synthetic side needs the
//! gradient of the loss with respect to the images: on the CPU one custom op whose backward runs
//! the native embedding backward ([`native_loss`], [`Route::embedding_input_gradient`]);
//! elsewhere the synthetic embeddings are recorded in differentiable candle ops
//! ([`EmbeddingTarget::loss_by_ops`]) and candle differentiates them. First-order only: a DM
//! step costs about one forward pass of the real batch and one forward and backward pass of
//! the synthetic set.

mod native_loss;

use candle_core::Tensor;
use debiasdd_model::ConvNetConfig;
use debiasdd_model::backend::{Route, Segments, Untracked, candle_ops};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{DistillConfig, Init, Preset, Settings};
use crate::engine::{Distiller, rng_for};
use crate::error::DistillError;
use crate::matcher::{Matcher, Problem, Target, fresh_network};
use crate::method::MethodConfig;
use crate::strata::{MatchMode, RealBatch};
use native_loss::NativeEmbeddingLoss;

/// DM's own settings: none beyond the shared ones (the official code has no others); the
/// section exists so that checkpoints and reports name the method.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmConfig {}

impl DmConfig {
    /// Checks DM's settings against the shared ones.
    pub fn validate(&self, _settings: &Settings) -> Result<(), DistillError> {
        Ok(())
    }

    /// The settings a report mentions.
    pub fn describe(&self) -> String {
        "mean embeddings, fresh network per iteration".to_owned()
    }
}

/// DM's presets.
///
/// - quick: this CPU in minutes: width 32, real init, 1,000 iterations; real batch 256 per
///   class class-wise, 64 per group in the group-based modes (the scale at which the official
///   code at width 32 lifts the worst group over the group-stratified floor).
/// - paper: the official `main_DM.py`: width 128, real batch 256, 20,000 iterations.
///
/// Both: lr 1.0 and momentum 0.5 for the images (the official values), real initialisation.
/// Augmentation (DSA, on by default for DM as in the official code) is set by the caller
/// ([`Settings::dsa`]).
pub fn preset(preset: Preset, mode: MatchMode, ipc: usize) -> DistillConfig {
    let (width, batch_real, iterations) = match (preset, mode) {
        (Preset::Quick, MatchMode::Class) => (32, 256, 1000),
        (Preset::Quick, _) => (32, 64, 1000),
        (Preset::Paper, _) => (128, 256, 20_000),
    };
    DistillConfig {
        settings: Settings {
            mode,
            ipc,
            iterations,
            batch_real,
            lr_img: 1.0,
            momentum_img: 0.5,
            init: Init::Real,
            model: ConvNetConfig {
                width,
                ..ConvNetConfig::default()
            },
            seed: 0,
            dsa: Some(debiasdd_augment::DsaConfig::default()),
        },
        method: MethodConfig::Dm(DmConfig {}),
    }
}

/// Real images times ConvNet width of one embedding pass: 512 images at width 32, 128 at width
/// 128. The real side is forward-only, so passes of a few hundred images lose nothing to larger
/// ones and keep their buffers small enough to be reused instead of freshly mapped.
pub const EMBED_PASS_BUDGET: usize = 512 * 32;

/// DM as a [`Matcher`]: the network of the current iteration.
#[derive(Debug, Clone)]
pub struct Dm {
    config: DmConfig,
    params: Vec<Tensor>,
}

impl Dm {
    pub fn new(config: DmConfig) -> Self {
        Self {
            config,
            params: Vec::new(),
        }
    }

    /// The target of the real batch `real` on the network `params`: the mean real embedding
    /// of every term.
    pub fn target_on(
        problem: &Problem<'_>,
        params: &[Tensor],
        real: &RealBatch,
    ) -> Result<EmbeddingTarget, DistillError> {
        let model = &problem.settings.model;
        let per_pass = (EMBED_PASS_BUDGET / model.width.max(1)).max(1);
        let n = real.images.dim(0)?;
        let mut parts = Vec::with_capacity(n.div_ceil(per_pass));
        let mut start = 0;
        while start < n {
            let len = per_pass.min(n - start);
            let x = real.images.narrow(0, start, len)?;
            parts.push(problem.route.embeddings(model, params, &x)?);
            start += len;
        }
        let embeddings = if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Tensor::cat(&parts, 0)?
        };
        let strata_means = segment_means(&embeddings, &real.segments)?;
        let real_means = problem
            .plan
            .real_terms(vec![strata_means])?
            .pop()
            .expect("one statistic");
        Ok(EmbeddingTarget {
            model: model.clone(),
            route: problem.route,
            params: params.to_vec(),
            real_means,
            syn_segments: problem.plan.syn_segments().clone(),
            syn_index: problem.plan.syn_index().cloned(),
            real_images: n,
        })
    }
}

impl Matcher for Dm {
    fn name(&self) -> &'static str {
        "dm"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("DM's settings serialise")
    }

    fn steps(&self) -> usize {
        1
    }

    fn begin_iteration(
        &mut self,
        problem: &Problem<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Result<(), DistillError> {
        self.params = fresh_network(problem, rng)?;
        Ok(())
    }

    fn target(
        &mut self,
        problem: &Problem<'_>,
        real: &RealBatch,
    ) -> Result<Box<dyn Target>, DistillError> {
        Ok(Box::new(Self::target_on(problem, &self.params, real)?))
    }

    fn between_steps(
        &mut self,
        _problem: &Problem<'_>,
        _synthetic: &Tensor,
        _rng: &mut ChaCha8Rng,
    ) -> Result<(), DistillError> {
        Ok(())
    }
}

impl Distiller<Dm> {
    /// A target on a fresh network drawn from stream `stream` of the run's seed, as the step of
    /// an iteration would see it (for inspection and gradient checks).
    pub fn probe(&self, stream: u64) -> Result<EmbeddingTarget, DistillError> {
        let problem = self.problem();
        let mut rng = rng_for(problem.settings.seed, stream);
        let params = fresh_network(&problem, &mut rng)?;
        let real = self.draw_real(&mut rng)?;
        Dm::target_on(&problem, &params, &real)
    }
}

/// The real side of one DM step: a network and the mean real embedding of every term.
#[derive(Debug, Clone)]
pub struct EmbeddingTarget {
    model: ConvNetConfig,
    route: Route,
    params: Vec<Tensor>,
    /// (terms, feature_dim).
    real_means: Tensor,
    syn_segments: Segments,
    /// Synthetic segment of every term, unless terms and segments coincide.
    syn_index: Option<Tensor>,
    /// Real images embedded.
    pub real_images: usize,
}

impl EmbeddingTarget {
    /// A target with one term per synthetic segment of `syn_segments`, term s against row s of
    /// `real_means` (terms, feature_dim), on the network `params` (for benchmarks and checks;
    /// the engine builds its targets with [`Dm::target_on`]).
    pub fn new(
        model: ConvNetConfig,
        params: Vec<Tensor>,
        real_means: Tensor,
        syn_segments: Segments,
        route: Route,
    ) -> Self {
        Self {
            model,
            route,
            params,
            real_means,
            syn_segments,
            syn_index: None,
            real_images: 0,
        }
    }

    /// The summed squared distance of all terms for the synthetic images `syn` (normalised
    /// space); differentiable with respect to `syn` when it is a variable. On the CPU one op
    /// whose gradient comes from the native embedding backward; elsewhere
    /// [`Self::loss_by_ops`].
    pub fn loss(&self, syn: &Tensor) -> Result<Tensor, DistillError> {
        if self.route.untracked() == Untracked::Native && syn.device().is_cpu() {
            let op = NativeEmbeddingLoss {
                model: self.model.clone(),
                params: self.params.clone(),
                real_means: self.real_means.clone(),
                syn_segments: self.syn_segments.clone(),
                syn_index: self.syn_index.clone(),
                embeddings: Default::default(),
            };
            return Ok(syn.contiguous()?.apply_op1(op)?);
        }
        self.loss_by_ops(syn)
    }

    /// The same loss recorded op by op (the synthetic embeddings by differentiable candle ops,
    /// differentiated by candle's autograd): the route off the CPU, and the reference the CPU
    /// route is tested against.
    pub fn loss_by_ops(&self, syn: &Tensor) -> Result<Tensor, DistillError> {
        let fwd = candle_ops::forward(&self.model, &self.params, syn, self.route.conv_path())?;
        Ok(embedding_distance(
            fwd.features(),
            &self.syn_segments,
            self.syn_index.as_ref(),
            &self.real_means,
        )?)
    }

    /// Number of matching terms.
    pub fn n_terms(&self) -> Result<usize, DistillError> {
        Ok(self.real_means.dim(0)?)
    }
}

impl Target for EmbeddingTarget {
    fn loss(&self, synthetic: &Tensor) -> Result<Tensor, DistillError> {
        EmbeddingTarget::loss(self, synthetic)
    }
}

/// The mean row of every segment of `x` (N, D), as (S, D); candle ops, differentiable.
fn segment_means(x: &Tensor, segments: &Segments) -> candle_core::Result<Tensor> {
    let rows = segments
        .ranges()
        .map(|(start, len)| x.narrow(0, start, len)?.mean_keepdim(0))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&rows, 0)
}

/// `sum_t || mean of syn segment(t) - real_means[t] ||^2` over the embeddings `syn` (N, D) of
/// the synthetic images; candle ops, differentiable with respect to `syn`.
fn embedding_distance(
    syn: &Tensor,
    syn_segments: &Segments,
    syn_index: Option<&Tensor>,
    real_means: &Tensor,
) -> candle_core::Result<Tensor> {
    let means = segment_means(syn, syn_segments)?;
    let per_term = match syn_index {
        Some(index) => means.index_select(index, 0)?,
        None => means,
    };
    let real = real_means.to_dtype(per_term.dtype())?;
    (per_term - real)?.sqr()?.sum_all()
}
