//! `SyntheticSet`: a distilled (or any small) training set with its normalisation, as numpy
//! arrays; its file is the CLI's, which `safetensors.torch.load_file` reads.

use std::path::PathBuf;
use std::sync::Arc;

use debiasdd_data::Normalization;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::arrays::{Pixels, group_array, image_array, image_set, label_array};
use crate::errors::IntoPyResult;
use crate::json::from_json;

/// A small training set: `.images` (float32 N x C x H x W, pixel space: the [0, 1] scale of the
/// real images, not clipped), `.labels`, `.groups` (int64, -1 for none), and the per-channel
/// `.mean` / `.std` the evaluator normalises with. `debiasdd.distill` returns one;
/// `SyntheticSet(images, labels, groups)` makes one from arrays (a baseline subset, say).
#[pyclass(module = "debiasdd", frozen, skip_from_py_object)]
#[derive(Debug, Clone)]
pub struct SyntheticSet {
    pub(crate) inner: Arc<debiasdd_data::SyntheticSet>,
}

impl SyntheticSet {
    pub(crate) fn new(set: debiasdd_data::SyntheticSet) -> Self {
        Self {
            inner: Arc::new(set),
        }
    }
}

#[pymethods]
impl SyntheticSet {
    /// A set from arrays (see `debiasdd.distill` for their form). `mean` / `std` (one per
    /// channel) default to the images' own statistics; pass the real training set's to
    /// evaluate a subset as `debiasdd subset` does.
    #[new]
    #[pyo3(signature = (images, labels, groups = None, *, n_classes = None, n_attributes = None, mean = None, std = None))]
    fn py_new(
        images: &Bound<'_, PyAny>,
        labels: &Bound<'_, PyAny>,
        groups: Option<&Bound<'_, PyAny>>,
        n_classes: Option<usize>,
        n_attributes: Option<usize>,
        mean: Option<Vec<f32>>,
        std: Option<Vec<f32>>,
    ) -> PyResult<Self> {
        let set = image_set(
            Pixels::Synthetic,
            images,
            labels,
            groups,
            n_classes,
            n_attributes,
        )?;
        let own = Normalization::of_images(&set);
        let norm = Normalization {
            mean: mean.unwrap_or(own.mean),
            std: std.unwrap_or(own.std),
        };
        norm.validate(set.shape.channels)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(Self::new(debiasdd_data::SyntheticSet {
            set,
            norm,
            config: None,
        }))
    }

    #[getter]
    fn images<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        image_array(py, &self.inner.set)
    }

    #[getter]
    fn labels<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        label_array(py, &self.inner.set.labels)
    }

    #[getter]
    fn groups<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        group_array(py, self.inner.set.groups.iter().copied())
    }

    /// Per-channel mean of the normalisation `(x - mean) / std`.
    #[getter]
    fn mean(&self) -> Vec<f32> {
        self.inner.norm.mean.clone()
    }

    #[getter]
    fn std(&self) -> Vec<f32> {
        self.inner.norm.std.clone()
    }

    #[getter]
    fn n_classes(&self) -> usize {
        self.inner.set.spec.n_classes()
    }

    #[getter]
    fn n_attributes(&self) -> usize {
        self.inner.set.spec.n_attributes()
    }

    /// (channels, height, width).
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.inner.set.shape.dims())
    }

    /// What made the set (method, settings, iterations done) as a dict, or `None`.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.inner
            .config
            .as_deref()
            .map(|json| from_json(py, json))
            .transpose()
    }

    /// Writes the synthetic-set file: safetensors with `images` (F32), `labels` and `groups`
    /// (I64), which `safetensors.torch.load_file` / `safetensors.numpy.load_file` read, and the
    /// normalisation in its metadata; `debiasdd evaluate --synthetic` reads it too.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let set = Arc::clone(&self.inner);
        py.detach(move || set.save(&path)).py()
    }

    fn __len__(&self) -> usize {
        self.inner.set.len()
    }

    fn __repr__(&self) -> String {
        let s = &self.inner.set;
        format!(
            "<debiasdd.SyntheticSet: {} images of {}, {} classes x {} attributes>",
            s.len(),
            s.shape,
            s.spec.n_classes(),
            s.spec.n_attributes()
        )
    }
}

/// Reads a synthetic-set file (from `SyntheticSet.save` or `debiasdd distill`).
#[pyfunction]
pub fn load_synthetic(py: Python<'_>, path: PathBuf) -> PyResult<SyntheticSet> {
    py.detach(move || debiasdd_data::SyntheticSet::load(&path))
        .py()
        .map(SyntheticSet::new)
}
