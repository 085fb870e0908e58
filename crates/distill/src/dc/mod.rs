//! DC, dataset condensation by gradient matching (Zhao, Mopuri & Bilen, ICLR 2021), as a
//! [`Matcher`]: per iteration a fresh ConvNet; per step the real gradients of every stratum
//! ([`MatchingTarget`]) against the synthetic gradients of every synthetic segment, summed over
//! the terms by a gradient [`Distance`]; between steps `inner_loop` epochs of plain SGD on the
//! synthetic set.
//!
//! The synthetic side needs the gradient of a gradient. On the CPU the loss is one custom op
//! whose backward runs the native second-order kernels ([`native_loss`]); elsewhere the
//! synthetic gradients are recorded op by op in differentiable candle ops
//! ([`MatchingTarget::loss_by_ops`]) and candle differentiates them.

pub mod distance;
mod native_loss;

use candle_core::{DType, Tensor};
use debiasdd_model::ConvNetConfig;
use debiasdd_model::backend::{Route, Segments, candle_ops};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{DistillConfig, Init, Preset, Settings, invalid};
use crate::engine::{Distiller, rng_for};
use crate::error::DistillError;
use crate::matcher::{Matcher, NonFiniteHints, Problem, Target, fresh_network};
use crate::method::MethodConfig;
use crate::strata::{MatchMode, RealBatch, label_tensor, select_rows};
pub use distance::Distance;
use distance::distance;
use native_loss::NativeMatchingLoss;

/// DC's (outer_loop, inner_loop) for a number of images per class, from the official code's
/// table; `None` for an ipc the table does not list.
pub fn loops_for_ipc(ipc: usize) -> Option<(usize, usize)> {
    match ipc {
        1 => Some((1, 1)),
        10 => Some((10, 50)),
        20 => Some((20, 25)),
        30 => Some((30, 20)),
        40 => Some((40, 15)),
        50 => Some((50, 10)),
        _ => None,
    }
}

/// DC's own settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DcConfig {
    /// Synthetic-image updates per iteration.
    pub outer_loop: usize,
    /// Epochs of network training on the synthetic set between two updates.
    pub inner_loop: usize,
    /// Batch size of the inner-loop network training.
    pub batch_train: usize,
    /// SGD learning rate of the inner-loop network training (no momentum, as DC).
    pub lr_net: f64,
    pub distance: Distance,
}

impl DcConfig {
    /// Checks DC's settings; the error names the field and the fix.
    pub fn validate(&self, settings: &Settings) -> Result<(), DistillError> {
        if self.outer_loop == 0 {
            return Err(invalid(
                "outer_loop",
                format!(
                    "must be at least 1 (DC's table covers ipc 1, 10, 20, 30, 40, 50; for ipc {} set the outer and inner loops)",
                    settings.ipc
                ),
            ));
        }
        if self.batch_train == 0 {
            return Err(invalid("batch_train", "must be at least 1".to_owned()));
        }
        if !self.lr_net.is_finite() || self.lr_net < 0.0 {
            return Err(invalid(
                "lr_net",
                format!("must be a finite number >= 0, got {}", self.lr_net),
            ));
        }
        Ok(())
    }

    /// The settings a report mentions.
    pub fn describe(&self) -> String {
        format!(
            "loops {}/{}, distance `{}`",
            self.outer_loop, self.inner_loop, self.distance
        )
    }
}

/// DC's presets.
///
/// - quick: small enough for a 2-core CPU in minutes, large enough to show the debiasing
///   effect: width 32, outer 5 / inner 10 loops, 20 iterations (the protocol's small-scale
///   comparison); real batch 64 per class, or 16 per group in the group-based modes (a class has
///   up to 10 groups, so that is up to 160 real images per class; 64 per group made a group-wise
///   iteration 2.6x a class-wise one at ratio 0.05 and more at 0.1).
/// - paper: the protocol: width 128, real batch 256, loops from [`loops_for_ipc`] (for an ipc
///   outside the table they are 0, and validation says to set them), 1000 iterations.
pub fn preset(preset: Preset, mode: MatchMode, ipc: usize) -> DistillConfig {
    let (outer_loop, inner_loop) = match preset {
        Preset::Quick => (5, 10),
        Preset::Paper => loops_for_ipc(ipc).unwrap_or((0, 0)),
    };
    let (width, batch_real, iterations) = match (preset, mode) {
        (Preset::Quick, MatchMode::Class) => (32, 64, 20),
        (Preset::Quick, _) => (32, 16, 20),
        (Preset::Paper, _) => (128, 256, 1000),
    };
    DistillConfig {
        settings: Settings {
            mode,
            ipc,
            iterations,
            batch_real,
            lr_img: 0.1,
            momentum_img: 0.5,
            init: Init::Noise,
            model: ConvNetConfig {
                width,
                ..ConvNetConfig::default()
            },
            seed: 0,
            dsa: None,
        },
        method: MethodConfig::Dc(DcConfig {
            outer_loop,
            inner_loop,
            batch_train: 256,
            lr_net: 0.01,
            distance: Distance::Ours,
        }),
    }
}

/// Real images times ConvNet width that one pass may hold: 1,024 images at width 128, 4,096 at
/// width 32 (so the quick preset's batches stay one pass). A pass keeps its activations for the
/// segment gradients, about 8 MB per image at width 128 (measured: 20 GB peak for the 2,560
/// images of a class-wise paper-size step), and a group-wise paper-size batch (about 7,000
/// images at ratio 0.1) in one pass was killed on a 24 GB machine.
pub const REAL_PASS_BUDGET: usize = 1024 * 128;

/// DC as a [`Matcher`]: its settings, and the network of the current iteration.
#[derive(Debug, Clone)]
pub struct Dc {
    config: DcConfig,
    /// The network's parameters (detached), in parameter order; trained between steps.
    params: Vec<Tensor>,
    /// Most real images per pass [`REAL_PASS_BUDGET`] / width unless set.
    real_pass_images: Option<usize>,
}

impl Dc {
    pub fn new(config: DcConfig) -> Self {
        Self {
            config,
            params: Vec::new(),
            real_pass_images: None,
        }
    }

    pub fn config(&self) -> &DcConfig {
        &self.config
    }

    /// Caps the real images of one pass (default: [`REAL_PASS_BUDGET`] / width); strata are
    /// never split, so a smaller cap only means more passes (for memory, and cross-checks).
    pub fn with_real_pass_images(mut self, images: usize) -> Self {
        self.real_pass_images = Some(images.max(1));
        self
    }

    /// A distiller running DC as `config` says (which must be a DC config).
    pub fn distiller(
        config: DistillConfig,
        train: &debiasdd_data::Split,
        device: &candle_core::Device,
        dtype: DType,
    ) -> Result<Distiller<Dc>, DistillError> {
        let dc = config.method.dc().cloned().ok_or_else(|| {
            invalid(
                "method",
                format!("expected dc, got {}", config.method.kind()),
            )
        })?;
        config.method.validate(&config.settings)?;
        Distiller::with_matcher(config.settings, Dc::new(dc), train, device, dtype)
    }

    /// The real gradients of every term on the network `params`, from the real batch `real`.
    pub fn target_on(
        &self,
        problem: &Problem<'_>,
        params: &[Tensor],
        real: &RealBatch,
    ) -> Result<MatchingTarget, DistillError> {
        let model = &problem.settings.model;
        // Every stratum's batch in as few untracked passes as memory allows.
        let mut parts: Vec<Vec<Tensor>> = Vec::new();
        let mut start = 0;
        let max_images = self
            .real_pass_images
            .unwrap_or((REAL_PASS_BUDGET / model.width.max(1)).max(1));
        for lens in real_chunks(real.segments.lens(), max_images) {
            let n: usize = lens.iter().sum();
            let x = real.images.narrow(0, start, n)?;
            let y = real.labels.narrow(0, start, n)?;
            let segments = Segments::new(lens)?;
            parts.push(
                problem
                    .route
                    .segment_gradients(model, params, &x, &y, &segments)?
                    .grads,
            );
            start += n;
        }
        let g_real = if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            (0..parts[0].len())
                .map(|k| Tensor::cat(&parts.iter().map(|p| &p[k]).collect::<Vec<_>>(), 0))
                .collect::<candle_core::Result<Vec<_>>>()?
        };
        Ok(MatchingTarget {
            model: model.clone(),
            route: problem.route,
            distance: self.config.distance,
            params: params.to_vec(),
            g_real: problem.plan.real_terms(g_real)?,
            syn_labels: problem.plan.syn_label_tensor().clone(),
            syn_segments: problem.plan.syn_segments().clone(),
            syn_index: problem.plan.syn_index().cloned(),
            real_images: real.segments.total(),
        })
    }

    /// `inner_loop` epochs of plain SGD on the detached synthetic set, in shuffled batches
    /// (augmented per image with DSA on).
    fn train_network(
        &mut self,
        problem: &Problem<'_>,
        images: &Tensor,
        rng: &mut ChaCha8Rng,
    ) -> Result<(), DistillError> {
        let c = &self.config;
        let model = &problem.settings.model;
        let syn_labels = problem.plan.syn_labels();
        let n = images.dim(0)?;
        for _ in 0..c.inner_loop {
            let mut order: Vec<u32> = (0..n as u32).collect();
            order.shuffle(rng);
            for batch in order.chunks(c.batch_train) {
                let idx = Tensor::new(batch, problem.device)?;
                let mut x = images.index_select(&idx, 0)?;
                if let Some(dsa) = &problem.settings.dsa {
                    // As the official DSA code: the inner loop trains on augmented batches,
                    // every image with its own parameters.
                    x = debiasdd_augment::augment(&x, &dsa.draw_batch(batch.len(), rng))?;
                }
                let labels: Vec<u8> = batch.iter().map(|&i| syn_labels[i as usize]).collect();
                let y = label_tensor(&labels, problem.device)?;
                let (g, _) = problem.route.batch_gradients(model, &self.params, &x, &y)?;
                for (p, g) in self.params.iter_mut().zip(g) {
                    *p = (&*p - (g * c.lr_net)?)?;
                }
            }
        }
        Ok(())
    }
}

impl Matcher for Dc {
    fn name(&self) -> &'static str {
        "dc"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("DC's settings serialise")
    }

    fn steps(&self) -> usize {
        self.config.outer_loop
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
        Ok(Box::new(self.target_on(problem, &self.params, real)?))
    }

    fn between_steps(
        &mut self,
        problem: &Problem<'_>,
        synthetic: &Tensor,
        rng: &mut ChaCha8Rng,
    ) -> Result<(), DistillError> {
        self.train_network(problem, synthetic, rng)
    }

    fn non_finite_hints(&self) -> NonFiniteHints {
        let mut hints = NonFiniteHints {
            lower: vec![format!("--lr-net (now {})", self.config.lr_net)],
            try_instead: Vec::new(),
        };
        if self.config.distance != Distance::Ours {
            // DC's layer-wise cosine is bounded; mse is not.
            hints
                .try_instead
                .push(format!("--distance ours (now {})", self.config.distance));
        }
        hints
    }
}

impl Distiller<Dc> {
    /// A matching target on a fresh network drawn from stream `stream` of the run's seed, as the
    /// first step of an iteration would see it (for inspection and gradient checks).
    pub fn probe(&self, stream: u64) -> Result<MatchingTarget, DistillError> {
        let problem = self.problem();
        let mut rng = rng_for(problem.settings.seed, stream);
        let params = fresh_network(&problem, &mut rng)?;
        let real = self.draw_real(&mut rng)?;
        self.matcher().target_on(&problem, &params, &real)
    }
}

/// The real side of one DC step: a network and the real gradients of every matching term.
#[derive(Debug, Clone)]
pub struct MatchingTarget {
    model: ConvNetConfig,
    route: Route,
    distance: Distance,
    params: Vec<Tensor>,
    /// One tensor per parameter, (terms, *shape).
    g_real: Vec<Tensor>,
    syn_labels: Tensor,
    syn_segments: Segments,
    /// Synthetic segment of every term, unless terms and segments coincide.
    syn_index: Option<Tensor>,
    /// Real images whose gradients were taken.
    pub real_images: usize,
}

impl MatchingTarget {
    /// A target with one term per synthetic segment: term s matches the gradients of synthetic
    /// segment s (`syn_labels` (N), `syn_segments`) against row s of `g_real` (one tensor per
    /// parameter, (terms, *shape)) on the network `params`. The engine builds its targets with
    /// [`Dc::target_on`]; this is for benchmarks and experiments on the same route.
    pub fn new(
        model: ConvNetConfig,
        distance: Distance,
        params: Vec<Tensor>,
        g_real: Vec<Tensor>,
        syn_labels: Tensor,
        syn_segments: Segments,
        route: Route,
    ) -> Self {
        Self {
            model,
            route,
            distance,
            params,
            g_real,
            syn_labels,
            syn_segments,
            syn_index: None,
            real_images: 0,
        }
    }

    /// The summed distance of all terms for the synthetic images `syn` (normalised space);
    /// differentiable with respect to `syn` when it is a variable. On the CPU one op whose
    /// gradient comes from the native kernels (`native_loss`); elsewhere [`Self::loss_by_ops`].
    pub fn loss(&self, syn: &Tensor) -> Result<Tensor, DistillError> {
        if self.route.native_second_order() {
            let op = NativeMatchingLoss {
                model: self.model.clone(),
                distance: self.distance,
                params: self.params.clone(),
                g_real: self.g_real.clone(),
                syn_labels: self.syn_labels.clone(),
                syn_segments: self.syn_segments.clone(),
                syn_index: self.syn_index.clone(),
                syn_grads: Default::default(),
            };
            return Ok(syn.contiguous()?.apply_op1(op)?);
        }
        self.loss_by_ops(syn)
    }

    /// The same loss recorded op by op (the synthetic gradients in differentiable candle ops,
    /// differentiated by candle's autograd): the route on every device but the CPU, and the
    /// reference the CPU route is tested against.
    pub fn loss_by_ops(&self, syn: &Tensor) -> Result<Tensor, DistillError> {
        let path = self.route.conv_path();
        let fwd = candle_ops::forward(&self.model, &self.params, syn, path)?;
        let g_syn = candle_ops::segment_gradients(
            &self.model,
            &self.params,
            &fwd,
            &self.syn_labels,
            &self.syn_segments,
            path,
        )?;
        let g_syn = select_rows(g_syn, self.syn_index.as_ref())?;
        Ok(distance(self.distance, &g_syn, &self.g_real)?)
    }

    /// Number of matching terms.
    pub fn n_terms(&self) -> Result<usize, DistillError> {
        Ok(self.g_real[0].dim(0)?)
    }
}

impl Target for MatchingTarget {
    fn loss(&self, synthetic: &Tensor) -> Result<Tensor, DistillError> {
        MatchingTarget::loss(self, synthetic)
    }
}

/// Splits consecutive segments (whole strata, never cut) into passes of at most `max_images`;
/// a larger stratum gets a pass of its own. Segments are independent under instance norm, so the
/// gradients do not depend on the split.
fn real_chunks(lens: &[usize], max_images: usize) -> Vec<Vec<usize>> {
    let mut chunks: Vec<Vec<usize>> = Vec::new();
    let mut images = 0;
    for &len in lens {
        match chunks.last_mut() {
            Some(chunk) if images + len <= max_images => {
                chunk.push(len);
                images += len;
            }
            _ => {
                chunks.push(vec![len]);
                images = len;
            }
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_passes_keep_strata_whole_and_within_budget() {
        assert_eq!(real_chunks(&[256; 10], 2560), vec![vec![256; 10]]);
        assert_eq!(real_chunks(&[256; 10], 1024).len(), 3);
        // Group-wise: strata are never cut; an oversized stratum gets its own pass.
        assert_eq!(
            real_chunks(&[256, 50, 50, 256, 40, 2000, 3000], 2560),
            vec![vec![256, 50, 50, 256, 40], vec![2000], vec![3000]]
        );
        // The quick preset's group-wise batch stays one pass.
        assert_eq!(real_chunks(&[16; 100], REAL_PASS_BUDGET / 32).len(), 1);
    }

    #[test]
    fn presets_validate_and_follow_the_protocol() {
        for mode in MatchMode::ALL {
            let paper = preset(Preset::Paper, mode, 10);
            paper.validate().unwrap();
            let dc = paper.method.dc().unwrap();
            assert_eq!((dc.outer_loop, dc.inner_loop), (10, 50));
            assert_eq!(
                (paper.settings.model.width, paper.settings.batch_real),
                (128, 256)
            );
            assert_eq!(
                (
                    paper.settings.lr_img,
                    paper.settings.momentum_img,
                    dc.lr_net
                ),
                (0.1, 0.5, 0.01)
            );
            let quick = preset(Preset::Quick, mode, 10);
            quick.validate().unwrap();
            let per_term = if mode == MatchMode::Class { 64 } else { 16 };
            assert_eq!(
                (quick.settings.model.width, quick.settings.batch_real),
                (32, per_term)
            );
        }
    }

    #[test]
    fn bad_settings_name_the_field() {
        let paper7 = preset(Preset::Paper, MatchMode::Class, 7);
        assert!(
            paper7
                .validate()
                .unwrap_err()
                .to_string()
                .contains("outer_loop")
        );
        let mut bad = preset(Preset::Quick, MatchMode::Group, 10);
        bad.method.dc_mut().unwrap().lr_net = -1.0;
        assert!(bad.validate().unwrap_err().to_string().contains("lr_net"));
    }

    #[test]
    fn hints_name_only_settings_that_would_change() {
        let ours = Dc::new(
            preset(Preset::Quick, MatchMode::Class, 10)
                .method
                .dc()
                .unwrap()
                .clone(),
        );
        let hints = ours.non_finite_hints();
        assert_eq!(hints.lower, ["--lr-net (now 0.01)"]);
        assert!(hints.try_instead.is_empty(), "{hints:?}");
        let mut mse = ours.config().clone();
        mse.distance = Distance::Mse;
        let hints = Dc::new(mse).non_finite_hints();
        assert_eq!(hints.try_instead, ["--distance ours (now mse)"]);
    }
}
