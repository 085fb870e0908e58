//! `Dataset` and `Split`: a dataset file's three splits as numpy arrays; `load` and `generate`.

use std::path::PathBuf;
use std::sync::Arc;

use debiasdd_cmnist::{
    Cifar10sConfig, CifarArchive, ColoredMnistConfig, GreySource, Preset, SourceKind, Verification,
};
use debiasdd_data::SPLIT_NAMES;
use pyo3::exceptions::{PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::arrays::{array, group_array, label_array, split_images};
use crate::errors::IntoPyResult;
use crate::json::to_python;

/// A labelled image dataset with bias attributes: three splits (`train`, `valid`, `test`) of
/// images, class labels and attributes, and its group layout (group = class x attribute).
/// From `debiasdd.load` (a file of `debiasdd generate` / `import`) or `debiasdd.generate`.
#[pyclass(module = "debiasdd", frozen, skip_from_py_object)]
#[derive(Debug, Clone)]
pub struct Dataset {
    pub(crate) inner: Arc<debiasdd_data::Dataset>,
}

/// One split of a `Dataset`: `.images` (float32 N x C x H x W in [0, 1]), `.labels` (int64),
/// `.attributes` and `.groups` (int64, -1 where unknown; group = label * n_attributes +
/// attribute). Each property returns a new array.
#[pyclass(module = "debiasdd", frozen)]
#[derive(Debug)]
pub struct Split {
    data: Arc<debiasdd_data::Dataset>,
    name: &'static str,
}

impl Split {
    fn split(&self) -> &debiasdd_data::Split {
        self.data.split(self.name).expect("a known split name")
    }

    /// Another handle on the same split.
    pub(crate) fn clone_ref(&self) -> Split {
        Split {
            data: Arc::clone(&self.data),
            name: self.name,
        }
    }

    /// The split, for functions that take a `Split` where they take arrays.
    pub(crate) fn inner(&self) -> (&debiasdd_data::Dataset, &debiasdd_data::Split) {
        (&self.data, self.split())
    }
}

#[pymethods]
impl Split {
    /// `train`, `valid` or `test`.
    #[getter]
    fn name(&self) -> &'static str {
        self.name
    }

    /// Pixel values in [0, 1], float32, N x C x H x W.
    #[getter]
    fn images<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        split_images(py, self.split())
    }

    /// Class labels, int64, N.
    #[getter]
    fn labels<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        label_array(py, &self.split().labels)
    }

    /// Bias attributes, int64, N; -1 where unknown.
    #[getter]
    fn attributes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let values: Vec<i64> = self
            .split()
            .attributes
            .iter()
            .map(|a| a.map_or(-1, i64::from))
            .collect();
        let n = values.len();
        array(py, values, &[n])
    }

    /// Groups (label * n_attributes + attribute), int64, N; -1 where the attribute is unknown.
    #[getter]
    fn groups<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        group_array(py, self.split().group_ids().into_iter())
    }

    /// Attributes per class of this split's group layout.
    #[getter]
    fn n_attributes(&self) -> usize {
        self.split().spec.n_attributes()
    }

    #[getter]
    fn n_classes(&self) -> usize {
        self.split().spec.n_classes()
    }

    fn __len__(&self) -> usize {
        self.split().len()
    }

    fn __repr__(&self) -> String {
        let s = self.split();
        format!(
            "<debiasdd.Split {} of {:?}: {} images of {}, {} x {} groups>",
            self.name,
            self.data.info.name,
            s.len(),
            s.shape,
            s.spec.n_classes(),
            s.spec.n_attributes()
        )
    }
}

#[pymethods]
impl Dataset {
    #[getter]
    fn train(&self) -> Split {
        self.split_named(SPLIT_NAMES[0])
    }

    /// May be empty.
    #[getter]
    fn valid(&self) -> Split {
        self.split_named(SPLIT_NAMES[1])
    }

    #[getter]
    fn test(&self) -> Split {
        self.split_named(SPLIT_NAMES[2])
    }

    #[getter]
    fn name(&self) -> String {
        self.inner.info.name.clone()
    }

    /// Class names.
    #[getter]
    fn classes(&self) -> Vec<String> {
        self.inner.info.classes.clone()
    }

    /// Attribute names (the annotated ones; see `inferred` for a train split's inferred ones).
    #[getter]
    fn attribute_names(&self) -> Vec<String> {
        self.inner.info.attributes.clone()
    }

    #[getter]
    fn n_classes(&self) -> usize {
        self.inner.spec().n_classes()
    }

    /// Annotated attributes per class (the test split's layout).
    #[getter]
    fn n_attributes(&self) -> usize {
        self.inner.spec().n_attributes()
    }

    /// (channels, height, width).
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.inner.shape().dims())
    }

    /// The dataset's description (name, classes, attributes, shape, how it was made) as a dict.
    #[getter]
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_python(py, &self.inner.info)
    }

    /// `None`, or, when the train split's groups were inferred (`debiasdd.infer_groups`), how.
    #[getter]
    fn inferred<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.inner
            .info
            .inferred
            .as_ref()
            .map(|inferred| to_python(py, inferred))
            .transpose()
    }

    /// Writes the dataset file (safetensors) that `debiasdd.load` and the CLI read.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let data = Arc::clone(&self.inner);
        py.detach(move || debiasdd_data::file::save(&data, &path))
            .py()
    }

    fn __repr__(&self) -> String {
        let d = &self.inner;
        format!(
            "<debiasdd.Dataset {:?}: {} train / {} valid / {} test images of {}, {} classes x {} attributes{}>",
            d.info.name,
            d.train.len(),
            d.valid.len(),
            d.test.len(),
            d.shape(),
            d.spec().n_classes(),
            d.spec().n_attributes(),
            if d.info.inferred.is_some() {
                ", inferred train groups"
            } else {
                ""
            }
        )
    }
}

impl Dataset {
    pub(crate) fn new(data: debiasdd_data::Dataset) -> Self {
        Self {
            inner: Arc::new(data),
        }
    }

    /// The train split.
    pub(crate) fn train_split(&self) -> Split {
        self.split_named(SPLIT_NAMES[0])
    }

    fn split_named(&self, name: &'static str) -> Split {
        Split {
            data: Arc::clone(&self.inner),
            name,
        }
    }
}

/// Reads a dataset file (from `debiasdd generate`, `debiasdd import` or `Dataset.save`).
#[pyfunction]
pub fn load(py: Python<'_>, path: PathBuf) -> PyResult<Dataset> {
    py.detach(move || debiasdd_data::file::load(&path))
        .py()
        .map(Dataset::new)
}

/// Builds a benchmark dataset as ``debiasdd generate`` does.
///
/// ``mnist_dir``: the folder of the four IDX files (MNIST, or Fashion-MNIST for the cfmnist
/// presets); with ``preset="cifar10s"`` the CIFAR-10 binary archive or its folder. ``ratio``:
/// the share of bias-conflicting training images, in [0, 1]. ``verify`` checks the files'
/// checksums.
// Python's `help()` text; debiasdd.pyi has the same docstring for editors: keep them equal.
#[pyfunction]
#[pyo3(signature = (mnist_dir, ratio, seed = 0, preset = "seed", *, dataset = None, train_size = None, valid_size = None, jitter = None, verify = true))]
#[allow(clippy::too_many_arguments)]
pub fn generate(
    py: Python<'_>,
    mnist_dir: PathBuf,
    ratio: f64,
    seed: u64,
    preset: &str,
    dataset: Option<&str>,
    train_size: Option<usize>,
    valid_size: Option<usize>,
    jitter: Option<f64>,
    verify: bool,
) -> PyResult<Dataset> {
    if !mnist_dir.exists() {
        return Err(PyFileNotFoundError::new_err(format!(
            "{} does not exist: pass the folder with the four IDX files of MNIST or \
             Fashion-MNIST (or, with preset=\"cifar10s\", the CIFAR-10 binary archive); \
             `cargo xtask download` fetches them",
            mnist_dir.display()
        )));
    }
    if preset == "cifar10s" {
        if dataset.is_some() || train_size.is_some() || valid_size.is_some() || jitter.is_some() {
            return Err(PyValueError::new_err(
                "preset \"cifar10s\" takes only the archive, ratio and seed; dataset, \
                 train_size, valid_size and jitter are Colored MNIST options",
            ));
        }
        let config = Cifar10sConfig { ratio, seed };
        return py
            .detach(move || {
                CifarArchive::load(&mnist_dir)
                    .and_then(|archive| debiasdd_cmnist::build_cifar10s(&archive, &config))
            })
            .py()
            .map(Dataset::new);
    }
    let preset: Preset = preset
        .parse()
        .map_err(|e: String| PyValueError::new_err(format!("preset: {e}, or cifar10s")))?;
    let base = ColoredMnistConfig::new(preset, ratio, seed);
    let source = match dataset {
        None => base.source,
        Some(s) => s
            .parse::<SourceKind>()
            .map_err(|e| PyValueError::new_err(format!("dataset: {e}")))?,
    };
    let config = ColoredMnistConfig {
        source,
        train_size: train_size.unwrap_or(base.train_size),
        valid_size: valid_size.unwrap_or(base.valid_size),
        jitter_std: jitter.unwrap_or(base.jitter_std),
        ..base
    };
    // The cheap checks before reading 50 MB.
    config.check(usize::MAX).py()?;
    let verification = if verify {
        Verification::Checksums
    } else {
        Verification::Skip
    };
    py.detach(move || {
        GreySource::load(&mnist_dir, config.source, verification)
            .and_then(|source| debiasdd_cmnist::build(&source, &config))
    })
    .py()
    .map(Dataset::new)
}
