//! `debiasdd.infer_groups`: the train split's groups inferred from its class labels alone, as
//! `debiasdd infer-groups` does.

use std::path::PathBuf;
use std::sync::Arc;

use debiasdd_infer::{GroupingMethod, InferConfig, InferError, InferOverrides, InferProgress};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::dataset::Dataset;
use crate::distill::parse;
use crate::errors::{IntoPyResult, ToPyErr};
use crate::json::to_python;
use crate::progress::{Reporter, Value};

/// Infers the train split's groups from its class labels alone, as ``debiasdd
/// infer-groups``: cross-fitted bias models (GCE), then groups from their predictions or
/// k-means on their features. Returns the dataset with inferred train groups (valid and test
/// keep the annotations; ``distill`` and ``evaluate`` take it unchanged) and the report
/// (counts, the bias models' accuracy, and, when the data had annotations, the agreement with
/// them). ``progress(info)`` gets ``fold``, ``folds``, ``epoch``, ``epochs``, ``loss``,
/// ``accuracy`` after every epoch.
// Python's `help()` text; debiasdd.pyi has the same docstring for editors: keep them equal.
#[pyfunction]
#[pyo3(signature = (
    dataset, *, method = "auto", clusters = None, epochs = None, folds = None, q = None,
    lr = None, width = None, min_conflicting_share = None, seed = 0, device = "cpu",
    progress = None, heatmap = None
))]
#[allow(clippy::too_many_arguments)]
pub fn infer_groups<'py>(
    py: Python<'py>,
    dataset: &Dataset,
    method: &str,
    clusters: Option<usize>,
    epochs: Option<usize>,
    folds: Option<usize>,
    q: Option<f64>,
    lr: Option<f64>,
    width: Option<usize>,
    min_conflicting_share: Option<f64>,
    seed: u64,
    device: &str,
    progress: Option<&Bound<'py, PyAny>>,
    heatmap: Option<PathBuf>,
) -> PyResult<Bound<'py, PyTuple>> {
    let config = InferConfig {
        method: parse::<GroupingMethod>(method, "method")?,
        seed,
        ..InferConfig::default()
    }
    .with_overrides(&InferOverrides {
        width,
        clusters,
        epochs,
        folds,
        q,
        lr,
        min_conflicting_share,
    });
    config.validate().py()?;
    let device = debiasdd_model::device::parse_device(device).py()?;
    let data = Arc::clone(&dataset.inner);
    let mut reporter = Reporter::new(progress)?;
    let result = py.detach(|| {
        debiasdd_infer::infer_groups_until(&data, &config, &device, &mut |p| match p {
            InferProgress::Epoch {
                fold,
                folds,
                epoch,
                epochs,
                loss,
                accuracy,
            } => reporter.report(
                &[
                    ("fold", Value::Count(fold)),
                    ("folds", Value::Count(folds)),
                    ("epoch", Value::Count(epoch)),
                    ("epochs", Value::Count(epochs)),
                    ("loss", Value::Real(loss)),
                    ("accuracy", Value::Real(accuracy)),
                ],
                || {
                    format!(
                        "infer_groups: bias model {}/{folds}  epoch {}/{epochs}  GCE {loss:.4}",
                        fold + 1,
                        epoch + 1
                    )
                },
            ),
            InferProgress::Judged { .. } => reporter.check(),
        })
    });
    reporter.finish();
    let inference = match result {
        Ok(inference) => inference,
        Err(InferError::Stopped) => {
            return Err(reporter.stopped(
                py,
                "debiasdd: the group inference stopped; nothing was inferred",
            ));
        }
        Err(e) => return Err(e.to_py()),
    };
    if let Some(path) = &heatmap {
        inference
            .report
            .write_heatmap(path, data.info.attribute_colours.as_deref())
            .py()?;
    }
    let report = to_python(py, &inference.report)?;
    PyTuple::new(
        py,
        [
            Bound::new(py, Dataset::new(inference.data))?.into_any(),
            report,
        ],
    )
}
