//! The distillation loop: DC's gradient matching with per-class, per-group or class-vs-group
//! terms, one fresh network per iteration, checkpoints that resume bit-identically.
//!
//! One iteration (protocol §3): draw a fresh ConvNet; `outer_loop` times { draw a real batch for
//! every stratum (class or group); compute the real gradients of all strata in one pass and the
//! synthetic gradients of all synthetic segments in one differentiable pass; sum the distances of
//! the matching terms; one SGD step on the synthetic images; unless it was the last outer step,
//! train the network `inner_loop` epochs on the (detached) synthetic set }.
//!
//! Randomness: the synthetic initialisation uses stream 0 of a ChaCha8 generator seeded with the
//! config's seed; iteration `i` uses stream `i + 1` for everything it draws (network, real
//! batches, inner-loop order). The state between iterations is therefore just the synthetic
//! images, their momentum and the iteration number, which is what a checkpoint holds.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use debiasdd_cmnist::colored::Split;
use debiasdd_eval::data::{ImageSet, Normalization, SyntheticSet};
use debiasdd_groups::{GroupIndex, GroupSpec};
use debiasdd_model::{ModelConfig, Network};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};

use crate::backend::{ConvPath, Route, Segments, candle_ops};
use crate::config::{DistillConfig, Init, MatchMode};
use crate::distance::distance;
use crate::error::DistillError;
use crate::native_loss::NativeMatchingLoss;

const SIDE: usize = 28;
const CHANNELS: usize = 3;
const CHECKPOINT_FORMAT: &str = "debiasdd-distill-checkpoint/1";

/// The generator of stream `stream` under `seed`.
fn rng_for(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// A set of real training images the real batches of one matching term are drawn from.
#[derive(Debug, Clone)]
struct Stratum {
    class: u8,
    /// Indices into the train split.
    members: Vec<usize>,
}

/// Which synthetic images and which real strata the terms of an outer step pair up.
#[derive(Debug, Clone)]
struct Plan {
    /// Synthetic images are ordered class by class; within a class, by colour in group mode.
    syn_segments: Segments,
    syn_labels: Vec<u8>,
    syn_groups: Vec<Option<u16>>,
    strata: Vec<Stratum>,
    /// (synthetic segment, stratum) of every term.
    pairs: Vec<(usize, usize)>,
    /// Groups without real samples (they contribute no term).
    empty_groups: Vec<u16>,
    /// Train-split indices of every group and of every class (for `--init real`).
    group_members: Vec<Vec<usize>>,
    class_members: Vec<Vec<usize>>,
}

impl Plan {
    fn new(config: &DistillConfig, index: &GroupIndex) -> Result<Self, DistillError> {
        let spec = GroupSpec::COLORED_MNIST;
        let (n_classes, n_attr) = (spec.n_classes(), spec.n_attributes());
        let ipc = config.ipc;
        for class in 0..n_classes {
            if index.class_members(class).map_or(true, |m| m.is_empty()) {
                return Err(DistillError::EmptyClass { class });
            }
        }
        let empty_groups: Vec<u16> = index.empty_groups().iter().map(|&g| g as u16).collect();
        let group_members: Vec<Vec<usize>> = (0..spec.n_groups())
            .map(|g| index.members(g).to_vec())
            .collect();
        let class_members: Vec<Vec<usize>> = (0..n_classes)
            .map(|c| index.class_members(c).expect("class in range"))
            .collect();
        let syn_labels: Vec<u8> = (0..n_classes)
            .flat_map(|c| std::iter::repeat_n(c as u8, ipc))
            .collect();
        let group_strata = || {
            let mut strata = Vec::new();
            let mut stratum_of_group = vec![None; spec.n_groups()];
            for (group, slot) in stratum_of_group.iter_mut().enumerate() {
                let members = index.members(group);
                if !members.is_empty() {
                    *slot = Some(strata.len());
                    strata.push(Stratum {
                        class: (group / n_attr) as u8,
                        members: members.to_vec(),
                    });
                }
            }
            (strata, stratum_of_group)
        };
        let plan = match config.mode {
            MatchMode::Class => Plan {
                syn_segments: Segments::uniform(n_classes, ipc)?,
                syn_labels,
                syn_groups: vec![None; n_classes * ipc],
                strata: class_members
                    .iter()
                    .enumerate()
                    .map(|(c, members)| Stratum {
                        class: c as u8,
                        members: members.clone(),
                    })
                    .collect(),
                pairs: (0..n_classes).map(|c| (c, c)).collect(),
                empty_groups,
                group_members,
                class_members,
            },
            MatchMode::Group => {
                let per_group = ipc / n_attr;
                let (strata, stratum_of_group) = group_strata();
                let pairs = stratum_of_group
                    .iter()
                    .enumerate()
                    .filter_map(|(g, s)| s.map(|s| (g, s)))
                    .collect();
                let syn_groups = (0..n_classes * ipc)
                    .map(|i| {
                        let (class, j) = (i / ipc, i % ipc);
                        Some((class * n_attr + j / per_group) as u16)
                    })
                    .collect();
                Plan {
                    syn_segments: Segments::uniform(spec.n_groups(), per_group)?,
                    syn_labels,
                    syn_groups,
                    strata,
                    pairs,
                    empty_groups,
                    group_members: group_members.clone(),
                    class_members: class_members.clone(),
                }
            }
            MatchMode::ClassVsGroups => {
                let (strata, stratum_of_group) = group_strata();
                let pairs = stratum_of_group
                    .iter()
                    .enumerate()
                    .filter_map(|(g, s)| s.map(|s| (g / n_attr, s)))
                    .collect();
                Plan {
                    syn_segments: Segments::uniform(n_classes, ipc)?,
                    syn_labels,
                    syn_groups: vec![None; n_classes * ipc],
                    strata,
                    pairs,
                    empty_groups,
                    group_members: group_members.clone(),
                    class_members: class_members.clone(),
                }
            }
        };
        Ok(plan)
    }
}

/// The train split, normalised, on the run's device.
#[derive(Debug)]
struct RealData {
    images: Tensor,
    norm: Normalization,
}

/// What one iteration did; serialised, one line of a run's history file.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct IterationStats {
    /// 1-based number of the iteration just finished.
    pub iteration: usize,
    /// Mean matching distance per term over the iteration's outer steps.
    pub loss: f64,
    /// Real images whose gradients were taken.
    pub real_images: usize,
    /// Wall time of the whole iteration.
    pub seconds: f64,
    /// Of which: drawing real batches and taking their gradients.
    pub real_seconds: f64,
    /// Of which: the matching loss, its gradient and the synthetic update.
    pub synthetic_seconds: f64,
    /// Of which: training the network on the synthetic set between updates.
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

/// The real side of one outer step: a network and the real gradients of every matching term.
#[derive(Debug, Clone)]
pub struct MatchingTarget {
    model: debiasdd_model::ConvNetConfig,
    route: Route,
    distance: crate::Distance,
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
    /// [`Distiller::matching_target`]; this is for benchmarks and experiments on the same route.
    pub fn new(
        model: debiasdd_model::ConvNetConfig,
        distance: crate::Distance,
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

/// A distillation run in progress: the synthetic images, their optimiser state, the iteration.
#[derive(Debug)]
pub struct Distiller {
    config: DistillConfig,
    plan: Plan,
    /// Derived from the plan once: term -> synthetic segment and term -> stratum (see
    /// [`pair_indices`]), and the synthetic labels.
    syn_index: Option<Tensor>,
    real_index: Option<Tensor>,
    syn_labels: Tensor,
    real: RealData,
    synthetic: Var,
    momentum: Tensor,
    iteration: usize,
    device: Device,
    dtype: DType,
    /// Most real images per pass [`REAL_PASS_BUDGET`] / width unless set.
    real_pass_images: Option<usize>,
    route: Route,
}

impl Distiller {
    /// Validates `config`, indexes the train split and initialises the synthetic set.
    pub fn new(
        config: DistillConfig,
        train: &Split,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, DistillError> {
        config.validate()?;
        if train.labels.len() != train.len() || train.groups.len() != train.len() {
            return Err(DistillError::InconsistentSplit {
                n: train.len(),
                n_labels: train.labels.len(),
                n_groups: train.groups.len(),
            });
        }
        let index = train.group_index();
        let plan = Plan::new(&config, &index)?;
        if !plan.empty_groups.is_empty() {
            tracing::warn!(
                groups = ?plan.empty_groups,
                "groups without real training images contribute no matching term"
            );
        }
        let norm = Normalization::of_split(train);
        let (images, _) = ImageSet::from_split(train).to_tensors(&norm, device, dtype)?;
        let real = RealData { images, norm };
        let synthetic = initial_synthetic(&config, &plan, &real, device, dtype)?;
        let momentum = synthetic.zeros_like()?;
        let (syn_index, real_index) = pair_indices(&plan, device)?;
        let syn_labels = label_tensor(&plan.syn_labels, device)?;
        Ok(Self {
            syn_index,
            real_index,
            syn_labels,
            route: Route::select(device, dtype, &config.model)
                .unwrap_or(Route::candle_ops(ConvPath::Candle)),
            config,
            plan,
            real,
            synthetic: Var::from_tensor(&synthetic)?,
            momentum,
            iteration: 0,
            device: device.clone(),
            dtype,
            real_pass_images: None,
        })
    }

    /// Forces a route, e.g. `Route::candle_ops(ConvPath::Candle)`: candle's `conv2d` instead of
    /// the native kernels on the CPU (slower; for cross-checks).
    pub fn with_route(mut self, route: Route) -> Self {
        self.route = route;
        self
    }

    /// Caps the real images of one pass (default: [`REAL_PASS_BUDGET`] / width); strata are
    /// never split, so a smaller cap only means more passes (for memory, and cross-checks).
    pub fn with_real_pass_images(mut self, images: usize) -> Self {
        self.real_pass_images = Some(images.max(1));
        self
    }

    pub fn config(&self) -> &DistillConfig {
        &self.config
    }

    /// Iterations finished so far.
    pub fn iteration(&self) -> usize {
        self.iteration
    }

    /// Whether `config.iterations` iterations are done.
    pub fn is_done(&self) -> bool {
        self.iteration >= self.config.iterations
    }

    /// Changes the number of iterations to run in all (for example to extend a resumed run).
    pub fn set_iterations(&mut self, iterations: usize) {
        self.config.iterations = iterations;
    }

    /// Groups with no real training images; in group modes they get no matching term.
    pub fn empty_groups(&self) -> &[u16] {
        &self.plan.empty_groups
    }

    /// Number of matching terms per outer step.
    pub fn n_terms(&self) -> usize {
        self.plan.pairs.len()
    }

    /// The synthetic images in normalised space (N, 3, 28, 28).
    pub fn images(&self) -> &Tensor {
        self.synthetic.as_tensor()
    }

    /// The current synthetic set in pixel space, with labels, groups, normalisation and the
    /// run's config, ready to save.
    pub fn synthetic_set(&self) -> Result<SyntheticSet, DistillError> {
        let mean = Tensor::new(&self.real.norm.mean, &Device::Cpu)?.reshape((1, 3, 1, 1))?;
        let std = Tensor::new(&self.real.norm.std, &Device::Cpu)?.reshape((1, 3, 1, 1))?;
        let pixels = self
            .synthetic
            .as_tensor()
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .broadcast_mul(&std)?
            .broadcast_add(&mean)?;
        let config = serde_json::json!({
            "method": "dc-gradient-matching",
            "iterations_done": self.iteration,
            "distill": self.config,
        });
        Ok(SyntheticSet {
            set: ImageSet {
                images: pixels.flatten_all()?.to_vec1()?,
                labels: self.plan.syn_labels.clone(),
                groups: self.plan.syn_groups.clone(),
            },
            norm: self.real.norm,
            config: Some(config.to_string()),
        })
    }

    /// One iteration: a fresh network, `outer_loop` synthetic updates with network training in
    /// between.
    pub fn step(&mut self) -> Result<IterationStats, DistillError> {
        let start = Instant::now();
        let c = &self.config;
        let mut rng = rng_for(c.seed, self.iteration as u64 + 1);
        let network = Network::new(
            &ModelConfig::ConvNet(c.model.clone()),
            &mut rng,
            &self.device,
            self.dtype,
        )?;
        let mut params: Vec<Tensor> = network
            .vars()
            .iter()
            .map(|v| v.as_detached_tensor())
            .collect();
        let mut loss_sum = 0.0;
        let mut real_images = 0;
        let mut watch = Stopwatch::start(&self.device);
        let (mut real_seconds, mut synthetic_seconds, mut inner_seconds) = (0.0, 0.0, 0.0);
        for outer in 0..c.outer_loop {
            let target = self.matching_target(&params, &mut rng)?;
            real_images += target.real_images;
            real_seconds += watch.split()?;
            let loss = target.loss(self.synthetic.as_tensor())?;
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(DistillError::NonFiniteLoss {
                    iteration: self.iteration + 1,
                    outer_step: outer + 1,
                    value,
                });
            }
            loss_sum += value;
            let grad = loss
                .backward()?
                .remove(self.synthetic.as_tensor())
                .ok_or_else(|| {
                    candle_core::Error::Msg("no gradient for the synthetic images".into())
                })?;
            // SGD with momentum, PyTorch's form: buf = m * buf + g; x -= lr * buf.
            self.momentum = ((&self.momentum * c.momentum_img)? + grad)?;
            let updated = (self.synthetic.as_tensor() - (&self.momentum * c.lr_img)?)?;
            self.synthetic.set(&updated)?;
            synthetic_seconds += watch.split()?;
            if outer + 1 < c.outer_loop {
                self.train_network(&mut params, &mut rng)?;
                inner_seconds += watch.split()?;
            }
        }
        self.iteration += 1;
        Ok(IterationStats {
            iteration: self.iteration,
            loss: loss_sum / (c.outer_loop * self.plan.pairs.len()) as f64,
            real_images,
            seconds: start.elapsed().as_secs_f64(),
            real_seconds,
            synthetic_seconds,
            inner_seconds,
        })
    }

    /// Draws one outer step's real batches and takes their gradients on the network `params`:
    /// the matching loss as a function of the synthetic images.
    pub fn matching_target(
        &self,
        params: &[Tensor],
        rng: &mut ChaCha8Rng,
    ) -> Result<MatchingTarget, DistillError> {
        let c = &self.config;
        // Every stratum's batch in as few untracked passes as memory allows.
        let (real_x, real_y, real_segments) = self.real_batch(rng)?;
        let mut parts: Vec<Vec<Tensor>> = Vec::new();
        let mut start = 0;
        let max_images = self
            .real_pass_images
            .unwrap_or((REAL_PASS_BUDGET / c.model.width.max(1)).max(1));
        for lens in real_chunks(real_segments.lens(), max_images) {
            let n: usize = lens.iter().sum();
            let x = real_x.narrow(0, start, n)?;
            let y = real_y.narrow(0, start, n)?;
            let segments = Segments::new(lens)?;
            parts.push(
                self.route
                    .segment_gradients(&c.model, params, &x, &y, &segments)?
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
            model: c.model.clone(),
            route: self.route,
            distance: c.distance,
            params: params.to_vec(),
            g_real: select_rows(g_real, self.real_index.as_ref())?,
            syn_labels: self.syn_labels.clone(),
            syn_segments: self.plan.syn_segments.clone(),
            syn_index: self.syn_index.clone(),
            real_images: real_segments.total(),
        })
    }

    /// A matching target on a fresh network drawn from stream `stream` of the run's seed, as the
    /// first outer step of an iteration would see it (for inspection and gradient checks).
    pub fn probe(&self, stream: u64) -> Result<MatchingTarget, DistillError> {
        let mut rng = rng_for(self.config.seed, stream);
        let network = Network::new(
            &ModelConfig::ConvNet(self.config.model.clone()),
            &mut rng,
            &self.device,
            self.dtype,
        )?;
        let params: Vec<Tensor> = network
            .vars()
            .iter()
            .map(|v| v.as_detached_tensor())
            .collect();
        self.matching_target(&params, &mut rng)
    }

    /// `inner_loop` epochs of plain SGD on the detached synthetic set, in shuffled batches.
    fn train_network(
        &self,
        params: &mut [Tensor],
        rng: &mut ChaCha8Rng,
    ) -> Result<(), DistillError> {
        let c = &self.config;
        let images = self.synthetic.as_detached_tensor();
        let n = images.dim(0)?;
        for _ in 0..c.inner_loop {
            let mut order: Vec<u32> = (0..n as u32).collect();
            order.shuffle(rng);
            for batch in order.chunks(c.batch_train) {
                let idx = Tensor::new(batch, &self.device)?;
                let x = images.index_select(&idx, 0)?;
                let labels: Vec<u8> = batch
                    .iter()
                    .map(|&i| self.plan.syn_labels[i as usize])
                    .collect();
                let y = label_tensor(&labels, &self.device)?;
                let (g, _) = self.route.batch_gradients(&c.model, params, &x, &y)?;
                for (p, g) in params.iter_mut().zip(g) {
                    *p = (&*p - (g * c.lr_net)?)?;
                }
            }
        }
        Ok(())
    }

    /// Draws `min(batch_real, size)` images without replacement from every stratum.
    fn real_batch(&self, rng: &mut ChaCha8Rng) -> Result<(Tensor, Tensor, Segments), DistillError> {
        let mut chosen: Vec<u32> = Vec::new();
        let mut labels = Vec::new();
        let mut lens = Vec::with_capacity(self.plan.strata.len());
        for stratum in &self.plan.strata {
            let k = self.config.batch_real.min(stratum.members.len());
            let picks = rand::seq::index::sample(rng, stratum.members.len(), k);
            chosen.extend(picks.iter().map(|i| stratum.members[i] as u32));
            labels.extend(std::iter::repeat_n(stratum.class, k));
            lens.push(k);
        }
        let idx = Tensor::new(chosen.as_slice(), &self.device)?;
        let images = self.real.images.index_select(&idx, 0)?;
        Ok((
            images,
            label_tensor(&labels, &self.device)?,
            Segments::new(lens)?,
        ))
    }

    /// Writes images, momentum, iteration and settings to `path` (through a temporary file, so
    /// an interrupted write leaves the previous checkpoint intact).
    pub fn save_checkpoint(&self, path: &Path) -> Result<(), DistillError> {
        let write_err = |problem: String| DistillError::Write {
            path: path.to_owned(),
            problem,
        };
        let (dtype, images, momentum) = match self.dtype {
            DType::F64 => (
                Dtype::F64,
                f64_bytes(self.synthetic.as_tensor())?,
                f64_bytes(&self.momentum)?,
            ),
            _ => (
                Dtype::F32,
                f32_bytes(self.synthetic.as_tensor())?,
                f32_bytes(&self.momentum)?,
            ),
        };
        let shape = self.synthetic.dims().to_vec();
        let views = [("images", &images), ("momentum", &momentum)]
            .into_iter()
            .map(|(name, bytes)| {
                TensorView::new(dtype, shape.clone(), bytes)
                    .map(|v| (name, v))
                    .map_err(|e| write_err(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let metadata = HashMap::from([
            ("format".to_owned(), CHECKPOINT_FORMAT.to_owned()),
            ("iteration".to_owned(), self.iteration.to_string()),
            ("config".to_owned(), self.config.identity()),
        ]);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| write_err(e.to_string()))?;
        }
        let tmp = path.with_extension("tmp");
        safetensors::serialize_to_file(views, Some(metadata), &tmp)
            .map_err(|e| write_err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| write_err(e.to_string()))
    }

    /// Restores images, momentum and iteration from a checkpoint written by a run with the same
    /// settings (the number of iterations may differ).
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<(), DistillError> {
        let bad = |problem: String| DistillError::BadCheckpoint {
            path: path.to_owned(),
            problem,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(CHECKPOINT_FORMAT) {
            return Err(bad(format!("not a {CHECKPOINT_FORMAT} file")));
        }
        let saved = meta
            .get("config")
            .ok_or_else(|| bad("no config in metadata".into()))?;
        if *saved != self.config.identity() {
            return Err(DistillError::CheckpointMismatch {
                path: path.to_owned(),
                problem: config_difference(saved, &self.config.identity()),
            });
        }
        let iteration: usize = meta
            .get("iteration")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no iteration in metadata".into()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let load = |name: &str| -> Result<Tensor, DistillError> {
            let view = st
                .tensor(name)
                .map_err(|_| bad(format!("no tensor `{name}`")))?;
            if view.shape() != self.synthetic.dims() {
                return Err(bad(format!(
                    "`{name}` has shape {:?}, expected {:?}",
                    view.shape(),
                    self.synthetic.dims()
                )));
            }
            let t = match view.dtype() {
                Dtype::F64 => Tensor::from_vec(
                    view.data()
                        .chunks_exact(8)
                        .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                        .collect::<Vec<_>>(),
                    view.shape(),
                    &Device::Cpu,
                )?,
                Dtype::F32 => Tensor::from_vec(
                    view.data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                        .collect::<Vec<_>>(),
                    view.shape(),
                    &Device::Cpu,
                )?,
                other => return Err(bad(format!("`{name}` has dtype {other:?}"))),
            };
            Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
        };
        self.synthetic.set(&load("images")?)?;
        self.momentum = load("momentum")?;
        self.iteration = iteration;
        Ok(())
    }
}

/// The first settings that differ between two identity JSONs, for an error message.
fn config_difference(saved: &str, current: &str) -> String {
    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or_default();
    let (a, b) = (parse(saved), parse(current));
    let mut diffs = Vec::new();
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for (key, va) in a {
            if b.get(key) != Some(va) {
                let vb = b.get(key).map_or("missing".into(), |v| v.to_string());
                diffs.push(format!("{key}: checkpoint {va}, now {vb}"));
            }
        }
    }
    if diffs.is_empty() {
        "settings differ".into()
    } else {
        diffs.join("; ")
    }
}

fn f32_bytes(t: &Tensor) -> Result<Vec<u8>, DistillError> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

fn f64_bytes(t: &Tensor) -> Result<Vec<u8>, DistillError> {
    let v: Vec<f64> = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

/// Index tensors that expand per-segment (per-stratum) gradients into per-term rows; `None`
/// when the terms are the segments themselves, in order.
fn pair_indices(
    plan: &Plan,
    device: &Device,
) -> Result<(Option<Tensor>, Option<Tensor>), DistillError> {
    let expand = |column: Vec<u32>, count: usize| -> Result<Option<Tensor>, DistillError> {
        if column.len() == count && column.iter().enumerate().all(|(i, &v)| i as u32 == v) {
            Ok(None)
        } else {
            Ok(Some(Tensor::new(column.as_slice(), device)?))
        }
    };
    let syn: Vec<u32> = plan.pairs.iter().map(|&(s, _)| s as u32).collect();
    let real: Vec<u32> = plan.pairs.iter().map(|&(_, r)| r as u32).collect();
    Ok((
        expand(syn, plan.syn_segments.count())?,
        expand(real, plan.strata.len())?,
    ))
}

/// Class labels as a U32 tensor on `device`.
fn label_tensor(labels: &[u8], device: &Device) -> Result<Tensor, DistillError> {
    let v: Vec<u32> = labels.iter().map(|&l| u32::from(l)).collect();
    Ok(Tensor::from_vec(v, labels.len(), device)?)
}

/// `grads[p].index_select(index, 0)` for every parameter, or the gradients themselves.
/// Real images times ConvNet width that one pass may hold: 1,024 images at width 128, 4,096 at
/// width 32 (so the quick preset's batches stay one pass). A pass keeps its activations for the
/// segment gradients, about 8 MB per image at width 128 (measured: 20 GB peak for the 2,560
/// images of a class-wise paper-size step), and a group-wise paper-size batch (about 7,000
/// images at ratio 0.1) in one pass was killed on a 24 GB machine.
pub const REAL_PASS_BUDGET: usize = 1024 * 128;

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

fn select_rows(grads: Vec<Tensor>, index: Option<&Tensor>) -> Result<Vec<Tensor>, DistillError> {
    match index {
        None => Ok(grads),
        Some(index) => Ok(grads
            .iter()
            .map(|g| g.index_select(index, 0))
            .collect::<candle_core::Result<Vec<_>>>()?),
    }
}

/// The synthetic set at iteration 0 (normalised space).
fn initial_synthetic(
    config: &DistillConfig,
    plan: &Plan,
    real: &RealData,
    device: &Device,
    dtype: DType,
) -> Result<Tensor, DistillError> {
    let n = config.n_synthetic();
    let mut rng = rng_for(config.seed, 0);
    match config.init {
        Init::Noise => {
            let values: Vec<f64> = (0..n * CHANNELS * SIDE * SIDE)
                .map(|_| rng.sample(rand_distr::StandardNormal))
                .collect();
            Ok(
                Tensor::from_vec(values, (n, CHANNELS, SIDE, SIDE), &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(device)?,
            )
        }
        Init::Real => {
            // Each image's pool: its group's real images in group mode (its class's when the
            // group is empty), its class's otherwise. Draws are without replacement within a pool
            // while it lasts.
            let mut by_pool: Vec<(&[usize], Vec<usize>)> = Vec::new();
            for (i, (&label, group)) in plan.syn_labels.iter().zip(&plan.syn_groups).enumerate() {
                let pool: &[usize] = match group {
                    Some(g) if !plan.group_members[*g as usize].is_empty() => {
                        &plan.group_members[*g as usize]
                    }
                    _ => &plan.class_members[label as usize],
                };
                match by_pool.iter_mut().find(|(p, _)| std::ptr::eq(*p, pool)) {
                    Some((_, slots)) => slots.push(i),
                    None => by_pool.push((pool, vec![i])),
                }
            }
            let mut picks = vec![0u32; n];
            for (pool, slots) in &by_pool {
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
            Ok(real.images.index_select(&idx, 0)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::real_chunks;

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
        assert_eq!(
            real_chunks(&[16; 100], super::REAL_PASS_BUDGET / 32).len(),
            1
        );
    }
}
