//! `debiasdd.distill`: the CLI's `distill` as a function of arrays (or a `Split`), on the same
//! engine and driver: checkpoints, resume, history, progress, Ctrl-C.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::DType;
use debiasdd_data::ImageSet;
use debiasdd_distill::{
    DistillConfig, DistillError, Distiller, MatchMode, MethodKind, Overrides, Preset, RunFiles,
    RunOutcome, drive,
};
use pyo3::exceptions::{PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;

use crate::arrays::{Pixels, image_set};
use crate::dataset::{Dataset, Split};
use crate::errors::{IntoPyResult, ToPyErr};
use crate::progress::{Reporter, Value};
use crate::synthetic::SyntheticSet;

/// Parses a name with the library's `FromStr`, naming the argument on failure.
pub(crate) fn parse<T: std::str::FromStr>(value: &str, name: &str) -> PyResult<T>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

/// The real training images: a dataset's train split as it is stored (bytes), or arrays.
enum Train {
    Split(Split),
    Images(ImageSet),
}

/// Distils ``ipc`` synthetic images per class from real images, as ``debiasdd distill``.
///
/// ``images``: float32 N x C x H x W in [0, 1] with ``labels`` (and ``groups`` for the group
/// modes: label * n_attributes + attribute), or a Dataset (its train split) or Split.
/// ``n_classes`` defaults to the largest label + 1, ``n_attributes`` to the one layout the
/// groups fit (an error says when it is ambiguous). ``mode``: "class" (vanilla), "group"
/// (debiased: one term per group), "class-vs-groups" (FairDD), "class-vs-group-mean" (COBRA).
/// ``preset`` sets everything not given (quick: minutes on a laptop CPU; paper: the method's
/// protocol); the other keywords are the CLI's options of the same name. ``device``: "cpu",
/// "cuda[:N]" (a build with the cuda feature). Same seed and device, same result. ``ranks``:
/// split every step's matching terms over that many ranks (threads; one GPU each from
/// ``cuda:N`` on, or sharing the CPU), the same set within rounding; ``collective``: how they
/// sum, "auto", "host" or "nccl" (a build with the nccl feature).
///
/// ``progress(info)`` is called after every iteration with ``iteration``, ``iterations``,
/// ``loss`` and ``seconds``; raising in it stops the run (the exception propagates).
/// ``checkpoint``: written every ``checkpoint_every`` iterations, at the end and on Ctrl-C;
/// ``resume=True`` continues from it (same settings; ``iterations`` may grow). ``history``:
/// one JSON line per iteration.
// Python's `help()` text; debiasdd.pyi has the same docstring for editors: keep them equal.
#[pyfunction]
#[pyo3(signature = (
    images, labels = None, groups = None, *, n_classes = None, n_attributes = None,
    method = "dc", mode = "group", ipc = 10, preset = "quick", iterations = None, init = None,
    width = None, depth = None, batch_real = None, outer_loop = None, inner_loop = None,
    lr_img = None, lr_net = None, distance = None, dsa = None, seed = 0, device = "cpu",
    ranks = 1, collective = "auto", progress = None, checkpoint = None, checkpoint_every = 10, resume = false, history = None
))]
#[allow(clippy::too_many_arguments)]
pub fn distill(
    py: Python<'_>,
    images: &Bound<'_, PyAny>,
    labels: Option<&Bound<'_, PyAny>>,
    groups: Option<&Bound<'_, PyAny>>,
    n_classes: Option<usize>,
    n_attributes: Option<usize>,
    method: &str,
    mode: &str,
    ipc: usize,
    preset: &str,
    iterations: Option<usize>,
    init: Option<&str>,
    width: Option<usize>,
    depth: Option<usize>,
    batch_real: Option<usize>,
    outer_loop: Option<usize>,
    inner_loop: Option<usize>,
    lr_img: Option<f64>,
    lr_net: Option<f64>,
    distance: Option<&str>,
    dsa: Option<bool>,
    seed: u64,
    device: &str,
    ranks: usize,
    collective: &str,
    progress: Option<&Bound<'_, PyAny>>,
    checkpoint: Option<PathBuf>,
    checkpoint_every: usize,
    resume: bool,
    history: Option<PathBuf>,
) -> PyResult<SyntheticSet> {
    let method: MethodKind = parse(method, "method")?;
    let mode: MatchMode = parse(mode, "mode")?;
    let preset: Preset = parse(preset, "preset")?;
    let overrides = Overrides {
        iterations,
        batch_real,
        lr_img,
        init: init.map(|s| parse(s, "init")).transpose()?,
        width,
        depth,
        seed: Some(seed),
        dsa,
        outer_loop,
        inner_loop,
        lr_net,
        distance: distance.map(|s| parse(s, "distance")).transpose()?,
    };
    let config = DistillConfig::preset(method, preset, mode, ipc)
        .with_overrides(&overrides)
        .py()?;
    config.validate().py()?;
    let resume_from = match (&checkpoint, resume) {
        (Some(path), true) if path.exists() => Some(path.clone()),
        (Some(path), true) => {
            return Err(PyFileNotFoundError::new_err(format!(
                "resume=True, but the checkpoint {} does not exist; run without resume=True to \
                 start afresh",
                path.display()
            )));
        }
        (None, true) => {
            return Err(PyValueError::new_err(
                "resume=True needs checkpoint=PATH: the file to continue from",
            ));
        }
        (_, false) => None,
    };
    let train = training_images(images, labels, groups, n_classes, n_attributes)?;
    let groups_known = match &train {
        Train::Split(split) => split.inner().1.attributes_known(),
        Train::Images(set) => set.groups.iter().all(Option::is_some),
    };
    if mode != MatchMode::Class && !groups_known {
        return Err(PyValueError::new_err(format!(
            "mode {mode:?} needs every image's group, and some (or all) have none; pass groups=, \
             infer them with debiasdd.infer_groups, or use mode=\"class\"",
            mode = mode.name()
        )));
    }
    let devices = debiasdd_model::device::parse_rank_devices(device, ranks).py()?;
    let collective = parse::<debiasdd_distill::CollectiveKind>(collective, "collective")?
        .resolve(&devices)
        .py()?;
    let mut reporter = Reporter::new(progress)?;
    let iterations = config.settings.iterations;
    let stop = AtomicBool::new(false);
    let outcome = py.detach(|| -> Result<Option<_>, DistillError> {
        // Every rank's distiller, built (and resumed) alike.
        let build = |rank: usize| -> Result<Distiller, DistillError> {
            let config = config.clone();
            let mut distiller = match &train {
                Train::Split(split) => {
                    Distiller::new(config, split.inner().1, &devices[rank], DType::F32)?
                }
                Train::Images(set) => {
                    Distiller::on_images(config, set, &devices[rank], DType::F32)?
                }
            };
            if let Some(path) = &resume_from {
                distiller.load_checkpoint(path)?;
            }
            Ok(distiller)
        };
        let files = RunFiles {
            checkpoint: checkpoint.as_deref(),
            checkpoint_every,
            history: history.as_deref(),
        };
        let mut on_iteration = |_: &Distiller, stats: &debiasdd_distill::IterationStats| {
            let fields = [
                ("iteration", Value::Count(stats.iteration)),
                ("iterations", Value::Count(iterations)),
                ("loss", Value::Real(stats.loss)),
                ("seconds", Value::Real(stats.seconds)),
            ];
            let flow = reporter.report(&fields, || {
                format!(
                    "distill: iteration {}/{iterations}  loss {:.4}  {:.2} s/it",
                    stats.iteration, stats.loss, stats.seconds
                )
            });
            if flow.is_break() {
                stop.store(true, Ordering::SeqCst);
            }
            Ok(())
        };
        let (outcome, distiller) = if ranks == 1 {
            let mut distiller = build(0)?;
            (
                drive(&mut distiller, files, &stop, &mut on_iteration)?,
                distiller,
            )
        } else {
            debiasdd_distill::drive_ranks(
                &devices,
                collective,
                build,
                files,
                &stop,
                &mut on_iteration,
            )?
        };
        match outcome {
            RunOutcome::Finished => distiller.synthetic_set().map(Some),
            RunOutcome::Interrupted => Ok(None),
        }
    });
    reporter.finish();
    match outcome {
        Ok(Some(set)) => Ok(SyntheticSet::new(set)),
        Ok(None) => {
            let note = match &checkpoint {
                Some(path) => format!(
                    "debiasdd: the distillation stopped; checkpoint {} holds its last iteration: \
                     call distill again with the same arguments and resume=True to continue",
                    path.display()
                ),
                None => "debiasdd: the distillation stopped; it had no checkpoint= file, so \
                         its progress is lost"
                    .to_owned(),
            };
            Err(reporter.stopped(py, &note))
        }
        Err(e) => Err(e.to_py()),
    }
}

/// `images` as the training set: a `Split` or `Dataset` (its train split), or arrays.
fn training_images(
    images: &Bound<'_, PyAny>,
    labels: Option<&Bound<'_, PyAny>>,
    groups: Option<&Bound<'_, PyAny>>,
    n_classes: Option<usize>,
    n_attributes: Option<usize>,
) -> PyResult<Train> {
    let given_split = if let Ok(dataset) = images.cast::<Dataset>() {
        Some(dataset.get().train_split())
    } else if let Ok(split) = images.cast::<Split>() {
        Some(split.get().clone_ref())
    } else {
        None
    };
    match given_split {
        Some(split) => {
            if labels.is_some() || groups.is_some() || n_classes.is_some() || n_attributes.is_some()
            {
                return Err(PyValueError::new_err(
                    "images is a Dataset or Split, which carries its labels and groups: pass \
                     labels, groups, n_classes and n_attributes only with image arrays",
                ));
            }
            Ok(Train::Split(split))
        }
        None => {
            let labels = labels.ok_or_else(|| {
                PyValueError::new_err(
                    "labels are missing: pass labels= with image arrays (or a Dataset or Split \
                     as images)",
                )
            })?;
            image_set(
                Pixels::Real,
                images,
                labels,
                groups,
                n_classes,
                n_attributes,
            )
            .map(Train::Images)
        }
    }
}
