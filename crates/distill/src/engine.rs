//! The distillation loop, shared by every method: the synthetic images and their optimiser, the
//! strata's real batches, one random stream per iteration, timing, and the synthetic set out.
//!
//! One iteration: [`Matcher::begin_iteration`]; then `steps` times { draw a real batch from
//! every stratum; [`Matcher::target`]; differentiate the target's loss with respect to the
//! synthetic images; one SGD step with momentum on them; unless it was the last step,
//! [`Matcher::between_steps`] }.
//!
//! Randomness: the synthetic initialisation uses stream 0 of a ChaCha8 generator seeded with the
//! seed; iteration `i` uses stream `i + 1` for everything it draws (the method's state, real
//! batches, training order) and, with DSA, stream `DSA_STREAM + i + 1` for the Siamese
//! augmentation of its steps (so turning DSA on changes no other draw). The state between iterations is therefore the synthetic images,
//! their momentum and the iteration number, which is what a checkpoint holds
//! ([`crate::checkpoint`]).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use debiasdd_augment::{Transform, augment};
use debiasdd_data::{ImageSet, ImageShape, Normalization, Split, SyntheticSet};
use debiasdd_groups::{GroupIndex, GroupSpec};
use debiasdd_model::backend::{ConvPath, Route};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{DistillConfig, Init, Settings};
use crate::error::DistillError;
use crate::matcher::{Matcher, Problem};
use crate::ranks::Collective;
use crate::ranks::shard::Shard;
use crate::strata::{MatchingPlan, RealBatch};

/// First stream of the Siamese augmentation draws (iteration `i` uses `DSA_STREAM + i + 1`).
const DSA_STREAM: u64 = 1 << 63;

/// The generator of stream `stream` under `seed`.
pub(crate) fn rng_for(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// What one iteration did; serialised, one line of a run's history file.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct IterationStats {
    /// 1-based number of the iteration just finished.
    pub iteration: usize,
    /// Mean matching distance per term over the iteration's steps.
    pub loss: f64,
    /// Real images the iteration's targets were built from.
    pub real_images: usize,
    /// Wall time of the whole iteration.
    pub seconds: f64,
    /// Of which: drawing real batches and building the targets from them.
    pub real_seconds: f64,
    /// Of which: the matching loss, its gradient and the synthetic update.
    pub synthetic_seconds: f64,
    /// Of which: the method's work between steps (DC: training the network on the synthetic
    /// set).
    pub inner_seconds: f64,
}

/// Times the phases of an iteration; each split first waits for the device's queued work, so
/// that on a GPU the time lands in the phase that launched it.
struct Stopwatch<'a> {
    device: &'a Device,
    lap: Instant,
}

impl<'a> Stopwatch<'a> {
    fn start(device: &'a Device) -> Self {
        Self {
            device,
            lap: Instant::now(),
        }
    }

    /// Seconds since the previous split (or the start).
    fn split(&mut self) -> candle_core::Result<f64> {
        self.device.synchronize()?;
        let now = Instant::now();
        let seconds = (now - self.lap).as_secs_f64();
        self.lap = now;
        Ok(seconds)
    }
}

/// A distillation run in progress: the method, the synthetic images, their optimiser state,
/// the iteration. `M` is the method; [`Distiller::new`] picks it from the config at run time.
#[derive(Debug)]
pub struct Distiller<M: Matcher = Box<dyn Matcher>> {
    pub(crate) settings: Settings,
    pub(crate) matcher: M,
    pub(crate) plan: MatchingPlan,
    /// The train split, normalised, on the run's device.
    real_images: Tensor,
    norm: Normalization,
    /// The train split's image shape and group layout, which the synthetic set shares.
    shape: ImageShape,
    spec: debiasdd_groups::GroupSpec,
    pub(crate) synthetic: Var,
    pub(crate) momentum: Tensor,
    pub(crate) iteration: usize,
    pub(crate) device: Device,
    pub(crate) dtype: DType,
    route: Route,
    /// This rank's share of the terms, in a run over several ranks ([`crate::ranks`]).
    shard: Option<Shard>,
}

impl Distiller {
    /// Validates `config`, indexes the train split and initialises the synthetic set; the method
    /// is the one `config.method` names.
    pub fn new(
        config: DistillConfig,
        train: &Split,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, DistillError> {
        config.method.validate(&config.settings)?;
        let matcher = config.method.matcher();
        Self::with_matcher(config.settings, matcher, train, device, dtype)
    }

    /// [`Distiller::new`] over real images given as floats; see
    /// [`Distiller::with_matcher_on_images`].
    pub fn on_images(
        config: DistillConfig,
        train: &ImageSet,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, DistillError> {
        config.method.validate(&config.settings)?;
        let matcher = config.method.matcher();
        Self::with_matcher_on_images(config.settings, matcher, train, device, dtype)
    }
}

impl<M: Matcher> Distiller<M> {
    /// Validates `settings`, indexes the train split and initialises the synthetic set for the
    /// method `matcher`.
    pub fn with_matcher(
        settings: Settings,
        matcher: M,
        train: &Split,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, DistillError> {
        if train.labels.len() != train.len() || train.attributes.len() != train.len() {
            return Err(DistillError::InconsistentSplit {
                n: train.len(),
                n_labels: train.labels.len(),
                n_groups: train.attributes.len(),
            });
        }
        let norm = Normalization::of_split(train);
        Self::build(
            settings,
            matcher,
            &ImageSet::from_split(train),
            norm,
            device,
            dtype,
        )
    }

    /// [`Distiller::with_matcher`] over real images given as floats in pixel space ([0, 1]),
    /// not bytes (for example from Python): normalised by their own per-channel statistics
    /// ([`Normalization::of_images`]). The set is checked first (lengths, labels and groups
    /// inside its layout, finite values).
    pub fn with_matcher_on_images(
        settings: Settings,
        matcher: M,
        train: &ImageSet,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, DistillError> {
        train.validate()?;
        train.check_finite()?;
        let norm = Normalization::of_images(train);
        Self::build(settings, matcher, train, norm, device, dtype)
    }

    fn build(
        settings: Settings,
        matcher: M,
        train: &ImageSet,
        norm: Normalization,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, DistillError> {
        let settings = settings.for_data(train.shape, train.spec)?;
        let unknown = train.groups.iter().filter(|g| g.is_none()).count();
        if settings.mode != crate::MatchMode::Class && unknown > 0 {
            return Err(DistillError::InvalidConfig {
                field: "mode",
                problem: format!(
                    "{} needs every training image's group, but {unknown} of {} have no attribute; use --mode class, or give the data an attribute column",
                    settings.mode,
                    train.len()
                ),
            });
        }
        // Class-wise strata need only the labels: where some attributes are unknown, the
        // index is by class alone, so those images still count (and no group is reported
        // empty).
        let index = if settings.mode == crate::MatchMode::Class && unknown > 0 {
            GroupSpec::new(train.spec.n_classes(), 1)
                .and_then(|spec| GroupIndex::from_group_ids(spec, &train.labels))
        } else {
            GroupIndex::from_optional_group_ids(train.spec, &train.groups)
        }
        .map_err(debiasdd_data::DataError::from)?;
        let plan = MatchingPlan::new(settings.mode, settings.ipc, &index, device)?;
        if settings.mode != crate::MatchMode::Class && !plan.empty_groups().is_empty() {
            tracing::warn!(
                groups = ?plan.empty_groups(),
                "groups without real training images contribute no matching term"
            );
        }
        let (real_images, _) = train.to_tensors(&norm, device, dtype)?;
        let synthetic = initial_synthetic(&settings, &plan, &real_images, device, dtype)?;
        let momentum = synthetic.zeros_like()?;
        Ok(Self {
            // Settings::validate refused every network the hand-written passes do not cover;
            // other dtypes than f32 / f64 take candle's ops.
            route: Route::select(device, dtype, &settings.model)
                .unwrap_or(Route::candle_ops(ConvPath::Candle)),
            settings,
            matcher,
            plan,
            real_images,
            norm,
            shape: train.shape,
            spec: train.spec,
            synthetic: Var::from_tensor(&synthetic)?,
            momentum,
            iteration: 0,
            device: device.clone(),
            dtype,
            shard: None,
        })
    }

    /// Makes this distiller one rank of a run over `collective.size()` ranks
    /// ([`crate::ranks`]): it computes only its share of every step's terms and sums the
    /// gradient with the other ranks'. Every rank must be built alike (settings, data, seed,
    /// checkpoint). One rank changes nothing.
    pub fn with_collective(
        mut self,
        collective: std::sync::Arc<dyn Collective>,
    ) -> Result<Self, DistillError> {
        if collective.rank() >= collective.size() {
            return Err(DistillError::InvalidConfig {
                field: "ranks",
                problem: format!(
                    "rank {} of a group of {}: ranks are 0 to size - 1",
                    collective.rank(),
                    collective.size()
                ),
            });
        }
        self.shard = if collective.size() == 1 {
            None
        } else {
            Some(Shard::new(
                collective,
                &self.plan,
                self.settings.batch_real,
                &self.device,
            )?)
        };
        Ok(self)
    }

    /// Whether the run should stop before the next iteration: `stop`, agreed by every rank
    /// when there are several (any rank's flag stops them all, at the same iteration).
    pub fn should_stop(&self, stop: &std::sync::atomic::AtomicBool) -> Result<bool, DistillError> {
        let mine = stop.load(std::sync::atomic::Ordering::SeqCst);
        match &self.shard {
            None => Ok(mine),
            Some(shard) => {
                let flag = Tensor::new(&[f64::from(u8::from(mine))], &Device::Cpu)?;
                let any = shard.collective.all_reduce_sum(&flag)?.to_vec1::<f64>()?[0];
                Ok(any > 0.0)
            }
        }
    }

    /// This rank's index and the rank count: (0, 1) unless part of a run over several ranks.
    pub fn rank(&self) -> (usize, usize) {
        self.shard
            .as_ref()
            .map_or((0, 1), |s| (s.collective.rank(), s.collective.size()))
    }

    /// Forces a route, e.g. `Route::candle_ops(ConvPath::Candle)`: candle's `conv2d` instead of
    /// the native kernels on the CPU (slower; for cross-checks).
    pub fn with_route(mut self, route: Route) -> Self {
        self.route = route;
        self
    }

    /// The shared settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The method.
    pub fn matcher(&self) -> &M {
        &self.matcher
    }

    /// What the method sees of the run.
    pub fn problem(&self) -> Problem<'_> {
        Problem {
            settings: &self.settings,
            plan: &self.plan,
            device: &self.device,
            dtype: self.dtype,
            route: self.route,
        }
    }

    /// The matching terms.
    pub fn plan(&self) -> &MatchingPlan {
        &self.plan
    }

    /// Iterations finished so far.
    pub fn iteration(&self) -> usize {
        self.iteration
    }

    /// Whether `settings.iterations` iterations are done.
    pub fn is_done(&self) -> bool {
        self.iteration >= self.settings.iterations
    }

    /// Changes the number of iterations to run in all (for example to extend a resumed run).
    pub fn set_iterations(&mut self, iterations: usize) {
        self.settings.iterations = iterations;
    }

    /// Groups with no real training images; in group modes they get no matching term.
    pub fn empty_groups(&self) -> &[u16] {
        self.plan.empty_groups()
    }

    /// Number of matching terms per step.
    pub fn n_terms(&self) -> usize {
        self.plan.n_terms()
    }

    /// The synthetic images in normalised space (N, C, H, W).
    pub fn images(&self) -> &Tensor {
        self.synthetic.as_tensor()
    }

    /// One step's real batch from every stratum, drawn from `rng`.
    pub fn draw_real(&self, rng: &mut ChaCha8Rng) -> Result<RealBatch, DistillError> {
        self.plan
            .draw_real(&self.real_images, self.settings.batch_real, rng)
    }

    /// The run's settings as JSON: the shared settings and the method's, tagged with its name
    /// (for a method built from a [`DistillConfig`], that config's JSON).
    pub fn config_json(&self) -> serde_json::Value {
        let mut method = self.matcher.settings();
        match method.as_object_mut() {
            Some(fields) => {
                fields.insert("name".into(), self.matcher.name().into());
            }
            None => method = serde_json::json!({ "name": self.matcher.name(), "settings": method }),
        }
        serde_json::json!({ "settings": self.settings, "method": method })
    }

    /// The current synthetic set in pixel space, with labels, groups, normalisation and the
    /// run's config, ready to save.
    pub fn synthetic_set(&self) -> Result<SyntheticSet, DistillError> {
        let c = self.shape.channels;
        let mean = Tensor::new(self.norm.mean.as_slice(), &Device::Cpu)?.reshape((1, c, 1, 1))?;
        let std = Tensor::new(self.norm.std.as_slice(), &Device::Cpu)?.reshape((1, c, 1, 1))?;
        let pixels = self
            .synthetic
            .as_tensor()
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .broadcast_mul(&std)?
            .broadcast_add(&mean)?;
        let config = serde_json::json!({
            "method": self.matcher.name(),
            "iterations_done": self.iteration,
            "distill": self.config_json(),
        });
        Ok(SyntheticSet {
            set: ImageSet {
                shape: self.shape,
                spec: self.spec,
                images: pixels.flatten_all()?.to_vec1()?,
                labels: self.plan.syn_labels().to_vec(),
                groups: self.plan.syn_groups().to_vec(),
            },
            norm: self.norm.clone(),
            config: Some(config.to_string()),
        })
    }

    /// One iteration of the method.
    pub fn step(&mut self) -> Result<IterationStats, DistillError> {
        let start = Instant::now();
        let mut rng = rng_for(self.settings.seed, self.iteration as u64 + 1);
        let problem = Problem {
            settings: &self.settings,
            plan: &self.plan,
            device: &self.device,
            dtype: self.dtype,
            route: self.route,
        };
        self.matcher.begin_iteration(&problem, &mut rng)?;
        let steps = self.matcher.steps();
        let (lr, momentum) = (self.settings.lr_img, self.settings.momentum_img);
        let mut loss_sum = 0.0;
        let mut real_images = 0;
        let mut watch = Stopwatch::start(&self.device);
        let (mut real_seconds, mut synthetic_seconds, mut inner_seconds) = (0.0, 0.0, 0.0);
        let mut dsa_rng = rng_for(self.settings.seed, DSA_STREAM + self.iteration as u64 + 1);
        // With several ranks, this rank's terms: its part of the plan, the rows of the
        // synthetic set they hold, and the strata they draw.
        let part = self.shard.as_ref().and_then(|s| s.part.as_ref());
        let mine = Problem {
            plan: part.map_or(&self.plan, |p| &p.plan),
            ..problem
        };
        for step in 0..steps {
            let keep = match (&self.shard, part) {
                (None, _) => None,
                (Some(_), Some(part)) => Some(part.strata.as_slice()),
                (Some(_), None) => Some(&[][..]),
            };
            // `None` only for a rank without terms.
            let mut real = self.plan.draw_real_of(
                &self.real_images,
                self.settings.batch_real,
                &mut rng,
                keep,
            )?;
            // Siamese augmentation: one transform per synthetic segment (all drawn, on every
            // rank), for its synthetic images and the real images of its strata.
            let syn_transforms = match &self.settings.dsa {
                Some(dsa) => {
                    let per_segment: Vec<Transform> = (0..self.plan.syn_segments().count())
                        .map(|_| dsa.draw_siamese(&mut dsa_rng))
                        .collect();
                    // The (whole-plan) segment of every stratum in the batch, and the
                    // segments whose synthetic images this rank differentiates.
                    let (strata_segments, segments): (Vec<usize>, Vec<usize>) = match part {
                        Some(p) => (
                            p.strata
                                .iter()
                                .map(|&s| self.plan.stratum_segments()[s])
                                .collect(),
                            p.segments.clone(),
                        ),
                        None => (
                            self.plan.stratum_segments().to_vec(),
                            (0..self.plan.syn_segments().count()).collect(),
                        ),
                    };
                    if let Some(real) = real.as_mut() {
                        let per_real: Vec<Transform> = real
                            .segments
                            .lens()
                            .iter()
                            .zip(&strata_segments)
                            .flat_map(|(&len, &s)| std::iter::repeat_n(&per_segment[s], len))
                            .cloned()
                            .collect();
                        real.images = augment(&real.images, &per_real)?;
                    }
                    let lens = self.plan.syn_segments().lens();
                    let per_syn: Vec<Transform> = segments
                        .iter()
                        .flat_map(|&s| std::iter::repeat_n(&per_segment[s], lens[s]))
                        .cloned()
                        .collect();
                    Some(per_syn)
                }
                None => None,
            };
            // This rank's loss and its gradient with respect to the whole synthetic set (a
            // rank without terms adds zeros).
            let (value, grad, real_count) = if let Some(real) = &real {
                let target = self.matcher.target(&mine, real)?;
                let real_count = real.segments.total();
                real_seconds += watch.split()?;
                let syn = match part {
                    Some(p) => self.synthetic.as_tensor().index_select(&p.syn_rows, 0)?,
                    None => self.synthetic.as_tensor().clone(),
                };
                let loss = match &syn_transforms {
                    Some(transforms) => target.loss(&augment(&syn, transforms)?)?,
                    None => target.loss(&syn)?,
                };
                let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                let grad = if value.is_finite() {
                    loss.backward()?
                        .remove(self.synthetic.as_tensor())
                        .ok_or_else(|| {
                            candle_core::Error::Msg("no gradient for the synthetic images".into())
                        })?
                } else {
                    self.synthetic.as_tensor().zeros_like()?
                };
                (value, grad, real_count)
            } else {
                (0.0, self.synthetic.as_tensor().zeros_like()?, 0)
            };
            let (value, grad, real_count) = match &self.shard {
                None => (value, grad, real_count),
                Some(shard) => {
                    let c = &shard.collective;
                    let totals = Tensor::new(&[value, real_count as f64], &Device::Cpu)?;
                    let totals = c.all_reduce_sum(&totals)?.to_vec1::<f64>()?;
                    (totals[0], c.all_reduce_sum(&grad)?, totals[1] as usize)
                }
            };
            real_images += real_count;
            if !value.is_finite() {
                let advice = self.matcher.non_finite_hints();
                let mut lower = vec![format!("--lr-img (now {lr})")];
                lower.extend(advice.lower);
                let mut hint = format!("lower {}", lower.join(" or "));
                if !advice.try_instead.is_empty() {
                    hint.push_str(&format!(", or try {}", advice.try_instead.join(" or ")));
                }
                return Err(DistillError::NonFiniteLoss {
                    iteration: self.iteration + 1,
                    step: step + 1,
                    value,
                    hint,
                });
            }
            loss_sum += value;
            // SGD with momentum, PyTorch's form: buf = m * buf + g; x -= lr * buf.
            self.momentum = ((&self.momentum * momentum)? + grad)?;
            let updated = (self.synthetic.as_tensor() - (&self.momentum * lr)?)?;
            self.synthetic.set(&updated)?;
            synthetic_seconds += watch.split()?;
            if step + 1 < steps {
                let images = self.synthetic.as_detached_tensor();
                self.matcher.between_steps(&problem, &images, &mut rng)?;
                inner_seconds += watch.split()?;
            }
        }
        self.iteration += 1;
        Ok(IterationStats {
            iteration: self.iteration,
            loss: loss_sum / (steps * self.plan.n_terms()) as f64,
            real_images,
            seconds: start.elapsed().as_secs_f64(),
            real_seconds,
            synthetic_seconds,
            inner_seconds,
        })
    }
}

/// The synthetic set at iteration 0 (normalised space).
fn initial_synthetic(
    settings: &Settings,
    plan: &MatchingPlan,
    real_images: &Tensor,
    device: &Device,
    dtype: DType,
) -> Result<Tensor, DistillError> {
    let n = settings.n_synthetic();
    let mut rng = rng_for(settings.seed, 0);
    match settings.init {
        Init::Noise => {
            let (_, c, h, w) = real_images.dims4()?;
            let values: Vec<f64> = (0..n * c * h * w)
                .map(|_| rng.sample(rand_distr::StandardNormal))
                .collect();
            Ok(Tensor::from_vec(values, (n, c, h, w), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?)
        }
        Init::Real => {
            // Each image's pool: its group's real images in group mode (its class's when the
            // group is empty), its class's otherwise. Draws are without replacement within a pool
            // while it lasts.
            let mut by_pool: Vec<(&[usize], Vec<usize>)> = Vec::new();
            for i in 0..plan.syn_labels().len() {
                let pool = plan.init_pool(i);
                match by_pool.iter_mut().find(|(p, _)| std::ptr::eq(*p, pool)) {
                    Some((_, slots)) => slots.push(i),
                    None => by_pool.push((pool, vec![i])),
                }
            }
            let mut picks = vec![0u32; n];
            for (pool, slots) in &by_pool {
                if pool.len() < slots.len() {
                    let first = slots[0];
                    tracing::warn!(
                        class = plan.syn_labels()[first],
                        group = ?plan.syn_groups()[first],
                        real = pool.len(),
                        synthetic = slots.len(),
                        "real init: fewer real images than synthetic images start from them; drawing with replacement, so some start as copies (use --init noise or a smaller --ipc to avoid it)"
                    );
                }
                let k = slots.len().min(pool.len());
                let mut drawn: Vec<usize> = rand::seq::index::sample(&mut rng, pool.len(), k)
                    .into_iter()
                    .map(|i| pool[i])
                    .collect();
                while drawn.len() < slots.len() {
                    drawn.push(pool[rng.random_range(0..pool.len())]);
                }
                for (&slot, &image) in slots.iter().zip(&drawn) {
                    picks[slot] = image as u32;
                }
            }
            let idx = Tensor::new(picks.as_slice(), device)?;
            Ok(real_images.index_select(&idx, 0)?)
        }
    }
}
