//! `debiasdd.evaluate`: trains fresh networks on a synthetic set (or a real split) and scores
//! them on a dataset's unbiased test split, as `debiasdd evaluate` does.

use std::borrow::Cow;
use std::path::PathBuf;

use debiasdd_data::{ImageSet, Normalization};
use debiasdd_eval::EvalError;
use debiasdd_eval::evaluate::{EvalConfig, EvalProgress, evaluate_until};
use debiasdd_eval::train::TrainConfig;
use debiasdd_model::{ConvNetConfig, ModelConfig, Norm};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::dataset::{Dataset, Split};
use crate::distill::parse;
use crate::errors::{IntoPyResult, ToPyErr};
use crate::json::to_python;
use crate::progress::{Reporter, Value};
use crate::synthetic::SyntheticSet;

/// Trains ``models`` fresh ConvNets on ``synthetic`` and scores them on ``dataset``'s
/// unbiased test split, as ``debiasdd evaluate``.
///
/// Protocol: DC's (1000 epochs with its augmentation, 300 with ``augment=False``), or DSA's
/// with ``dsa=True``; ``epochs`` overrides. Returns the CLI report's summary at the top:
/// ``accuracy``, ``aligned_accuracy``, ``conflicting_accuracy``, ``worst_group_accuracy``,
/// ``deo_max``, ``deo_mean`` (each ``{"mean", "std"}`` over the models, in %; the aligned and
/// conflicting ones None when there are no such test images), ``group_accuracy_mean`` (the
/// classes x attributes matrix), ``n_runs``; then ``runs`` (per model), ``config``, ``n_train``,
/// ``n_test``. ``progress(info)`` gets ``model``, ``models``, ``epoch``, ``epochs``, ``loss``,
/// ``accuracy`` after every epoch. ``heatmap``: a PNG of the per-group accuracy.
// Python's `help()` text; debiasdd.pyi has the same docstring for editors: keep them equal.
#[pyfunction]
#[pyo3(signature = (
    dataset, synthetic, *, models = 2, epochs = None, augment = true, dsa = false,
    width = 128, depth = 3, norm = "instance", seed = 0, device = "cpu", progress = None,
    heatmap = None
))]
#[allow(clippy::too_many_arguments)]
pub fn evaluate<'py>(
    py: Python<'py>,
    dataset: &Dataset,
    synthetic: &Bound<'py, PyAny>,
    models: usize,
    epochs: Option<usize>,
    augment: bool,
    dsa: bool,
    width: usize,
    depth: usize,
    norm: &str,
    seed: u64,
    device: &str,
    progress: Option<&Bound<'py, PyAny>>,
    heatmap: Option<PathBuf>,
) -> PyResult<Bound<'py, PyDict>> {
    // A synthetic set is borrowed as it is; a real split is converted (and normalised) once.
    let (set, normalization): (Cow<'_, ImageSet>, Cow<'_, Normalization>) = if let Ok(s) =
        synthetic.cast::<SyntheticSet>()
    {
        let s = &s.get().inner;
        (Cow::Borrowed(&s.set), Cow::Borrowed(&s.norm))
    } else if let Ok(split) = synthetic.cast::<Split>() {
        let (_, split) = split.get().inner();
        (
            Cow::Owned(ImageSet::from_split(split)),
            Cow::Owned(Normalization::of_split(split)),
        )
    } else {
        return Err(PyTypeError::new_err(format!(
            "synthetic: expected a SyntheticSet (from debiasdd.distill, debiasdd.load_synthetic \
                 or SyntheticSet(images, labels)) or a Split, got {}",
            synthetic.get_type().name()?
        )));
    };
    if dsa && !augment {
        return Err(PyValueError::new_err(
            "dsa=True trains with DSA augmentation; augment=False asks for none: pick one",
        ));
    }
    let protocol = if dsa {
        TrainConfig::dsa()
    } else {
        TrainConfig::dc(augment)
    };
    let config = EvalConfig {
        model: ModelConfig::ConvNet(ConvNetConfig {
            width,
            depth,
            norm: parse::<Norm>(norm, "norm")?,
            ..ConvNetConfig::default()
        }),
        train: TrainConfig {
            epochs: epochs.unwrap_or(protocol.epochs),
            ..protocol
        },
        n_models: models,
        seed,
    };
    let device = debiasdd_model::device::parse_device(device).py()?;
    let data = &dataset.inner;
    let mut reporter = Reporter::new(progress)?;
    let epochs = config.train.epochs;
    let result = py.detach(|| {
        evaluate_until(
            &set,
            &normalization,
            data,
            &config,
            &device,
            &mut |p| match p {
                EvalProgress::Epoch {
                    model,
                    n_models,
                    report,
                } => reporter.report(
                    &[
                        ("model", Value::Count(model)),
                        ("models", Value::Count(n_models)),
                        ("epoch", Value::Count(report.epoch)),
                        ("epochs", Value::Count(epochs)),
                        ("loss", Value::Real(report.loss)),
                        ("accuracy", Value::Real(report.accuracy)),
                    ],
                    || {
                        format!(
                            "evaluate: model {}/{n_models}  epoch {}/{epochs}  loss {:.4}",
                            model + 1,
                            report.epoch,
                            report.loss
                        )
                    },
                ),
                EvalProgress::Scored { .. } => reporter.check(),
            },
        )
    });
    reporter.finish();
    let report = match result {
        Ok(report) => report,
        Err(EvalError::Stopped) => {
            return Err(
                reporter.stopped(py, "debiasdd: the evaluation stopped; nothing was scored")
            );
        }
        Err(e) => return Err(e.to_py()),
    };
    if let Some(path) = &heatmap {
        debiasdd_eval::heatmap::write_group_heatmap(
            &report.summary.group_accuracy_mean,
            path,
            data.info.attribute_colours.as_deref(),
        )
        .py()?;
    }
    // The summary's metrics at the top (accuracy, worst_group_accuracy, ... as {mean, std}),
    // then the rest of the CLI's JSON report.
    let out: Bound<'py, PyDict> = to_python(py, &report.summary)?.cast_into()?;
    out.set_item("runs", to_python(py, &report.runs)?)?;
    out.set_item("config", to_python(py, &report.config)?)?;
    out.set_item("n_train", report.n_train)?;
    out.set_item("n_test", report.n_test)?;
    Ok(out)
}
