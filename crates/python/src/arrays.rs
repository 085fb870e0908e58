//! numpy arrays in and out. Input is anything `numpy.asarray` takes (numpy arrays, CPU torch
//! tensors, lists), checked here with errors that name the argument: images `float32` (or
//! `float64`) `N x C x H x W` in [0, 1] without NaN; labels and groups 1-D integers.

use debiasdd_data::{ImageSet, ImageShape, Split};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// `numpy.ascontiguousarray(obj, dtype)` after checking that `obj`'s dtype is of `kinds`
/// (numpy's one-letter kinds: `f` float, `i` signed, `u` unsigned).
fn contiguous<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    kinds: &str,
    dtype: &str,
    expected: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let np = obj.py().import("numpy")?;
    let array = np.call_method1("asarray", (obj,)).map_err(|e| {
        PyTypeError::new_err(format!(
            "{name}: cannot be read as an array ({e}); pass a numpy array or a CPU tensor"
        ))
    })?;
    let found = array.getattr("dtype")?;
    let kind: String = found.getattr("kind")?.extract()?;
    if !kinds.contains(kind.as_str()) {
        return Err(PyTypeError::new_err(format!(
            "{name}: dtype {}, expected {expected}",
            found.str()?
        )));
    }
    np.call_method1("ascontiguousarray", (array, np.getattr(dtype)?))
}

/// Which values images may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pixels {
    /// Real images: [0, 1].
    Real,
    /// Synthetic images: pixel space, not clipped (any finite value).
    Synthetic,
}

/// Images as `float32` `N x C x H x W` with every value finite (and in [0, 1] for
/// [`Pixels::Real`]).
pub(crate) fn images(
    obj: &Bound<'_, PyAny>,
    name: &str,
    pixels: Pixels,
) -> PyResult<(ImageShape, Vec<f32>)> {
    let array = contiguous(
        obj,
        name,
        "f",
        "float32",
        "float32 (or float64) pixel values in [0, 1]; for 0-255 images use images / 255.0",
    )?;
    let array: PyReadonlyArrayDyn<'_, f32> = array.extract()?;
    let dims = array.shape().to_vec();
    let &[n, c, h, w] = dims.as_slice() else {
        return Err(PyValueError::new_err(format!(
            "{name}: shape {dims:?}, expected 4 dimensions N x C x H x W (one grey image is 1 x H x W: \
             add the channel axis with images[:, None])"
        )));
    };
    let shape =
        ImageShape::new(c, h, w).map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
    if n == 0 {
        return Err(PyValueError::new_err(format!("{name}: no images (N = 0)")));
    }
    let values = array.as_slice()?.to_vec();
    let numel = shape.numel();
    if let Some(at) = values.iter().position(|v| !v.is_finite()) {
        return Err(PyValueError::new_err(format!(
            "{name}[{}]: value {} is {}; every pixel must be a finite number",
            at / numel,
            at % numel,
            values[at]
        )));
    }
    let outside = values.iter().position(|v| !(0.0..=1.0).contains(v));
    if let (Pixels::Real, Some(at)) = (pixels, outside) {
        return Err(PyValueError::new_err(format!(
            "{name}[{}]: value {} is {}, outside [0, 1]; pass pixel values in [0, 1] (divide \
             0-255 images by 255, undo a normalisation), or clip them with numpy.clip",
            at / numel,
            at % numel,
            values[at]
        )));
    }
    Ok((shape, values))
}

/// A 1-D integer array of `n` entries as `i64`.
pub(crate) fn integers(obj: &Bound<'_, PyAny>, name: &str, n: usize) -> PyResult<Vec<i64>> {
    let array = contiguous(obj, name, "iu", "int64", "integers (for example int64)")?;
    let array: PyReadonlyArrayDyn<'_, i64> = array.extract()?;
    if array.ndim() != 1 || array.len() != n {
        return Err(PyValueError::new_err(format!(
            "{name}: shape {:?}, expected ({n},): one entry per image",
            array.shape()
        )));
    }
    Ok(array.as_slice()?.to_vec())
}

/// `values` as a numpy array of `shape`.
pub(crate) fn array<'py, T: numpy::Element>(
    py: Python<'py>,
    values: Vec<T>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray1::from_vec(py, values).reshape(shape)?.into_any())
}

/// The pixel values of an image set, `float32` `N x C x H x W`.
pub(crate) fn image_array<'py>(py: Python<'py>, set: &ImageSet) -> PyResult<Bound<'py, PyAny>> {
    let [c, h, w] = set.shape.dims();
    array(py, set.images.clone(), &[set.len(), c, h, w])
}

/// The pixel values of a real split in [0, 1], `float32` `N x C x H x W`.
pub(crate) fn split_images<'py>(py: Python<'py>, split: &Split) -> PyResult<Bound<'py, PyAny>> {
    let [c, h, w] = split.shape.dims();
    let values = split.images.iter().map(|&v| f32::from(v) / 255.0).collect();
    array(py, values, &[split.len(), c, h, w])
}

/// Group ids as numpy `int64`, -1 for an image without a group.
pub(crate) fn group_array<'py>(
    py: Python<'py>,
    groups: impl Iterator<Item = Option<u16>>,
) -> PyResult<Bound<'py, PyAny>> {
    let values: Vec<i64> = groups.map(|g| g.map_or(-1, i64::from)).collect();
    let n = values.len();
    array(py, values, &[n])
}

/// Labels as numpy `int64`.
pub(crate) fn label_array<'py>(py: Python<'py>, labels: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    array(
        py,
        labels.iter().map(|&l| i64::from(l)).collect(),
        &[labels.len()],
    )
}

/// A training set from arrays: `images` (see [`images`] and `pixels`), `labels` (ints in 0..n_classes) and
/// optional `groups` (ints, `label * n_attributes + attribute`, -1 for none). `n_classes`
/// defaults to the largest label + 1; `n_attributes` to the one layout the groups fit, or 1
/// without groups.
pub(crate) fn image_set(
    pixels: Pixels,
    images_obj: &Bound<'_, PyAny>,
    labels_obj: &Bound<'_, PyAny>,
    groups_obj: Option<&Bound<'_, PyAny>>,
    n_classes: Option<usize>,
    n_attributes: Option<usize>,
) -> PyResult<ImageSet> {
    let (shape, values) = images(images_obj, "images", pixels)?;
    let n = values.len() / shape.numel();
    let raw_labels = integers(labels_obj, "labels", n)?;
    let max_label = raw_labels.iter().copied().max().unwrap_or(0);
    if let Some(i) = raw_labels.iter().position(|&l| l < 0) {
        return Err(PyValueError::new_err(format!(
            "labels[{i}] is {}; class labels are 0, 1, ..., n_classes - 1",
            raw_labels[i]
        )));
    }
    let n_classes = n_classes.unwrap_or(max_label as usize + 1);
    if let Some(i) = raw_labels.iter().position(|&l| l as usize >= n_classes) {
        return Err(PyValueError::new_err(format!(
            "labels[{i}] is {}, outside the {n_classes} classes 0..{n_classes}; raise n_classes \
             or fix the label",
            raw_labels[i]
        )));
    }
    if n_classes > 256 {
        return Err(PyValueError::new_err(format!(
            "{n_classes} classes; at most 256 are supported"
        )));
    }
    let labels: Vec<u8> = raw_labels.iter().map(|&l| l as u8).collect();
    let (n_attributes, groups) = match groups_obj.filter(|g| !g.is_none()) {
        None => (n_attributes.unwrap_or(1), vec![None; n]),
        Some(obj) => {
            let raw = integers(obj, "groups", n)?;
            let n_attributes = match n_attributes {
                Some(a) => a,
                None => attributes_per_class(&raw, &labels)?,
            };
            let mut groups = Vec::with_capacity(n);
            for (i, (&g, &label)) in raw.iter().zip(&labels).enumerate() {
                let first = usize::from(label) * n_attributes;
                match g {
                    -1 => groups.push(None),
                    g if g >= first as i64 && g < (first + n_attributes) as i64 => {
                        groups.push(Some(g as u16));
                    }
                    g => {
                        return Err(PyValueError::new_err(format!(
                            "groups[{i}] is {g}, not a group of its label {label}: with \
                             {n_attributes} attributes class {label}'s groups are {first}..{} \
                             (group = label * n_attributes + attribute, -1 for none)",
                            first + n_attributes
                        )));
                    }
                }
            }
            (n_attributes, groups)
        }
    };
    let spec = debiasdd_groups::GroupSpec::new(n_classes, n_attributes)
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    if n_classes * n_attributes > usize::from(u16::MAX) {
        return Err(PyValueError::new_err(format!(
            "{n_classes} x {n_attributes} groups; at most {} are supported",
            u16::MAX
        )));
    }
    let set = ImageSet {
        shape,
        spec,
        images: values,
        labels,
        groups,
    };
    set.validate()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(set)
}

/// The number of attributes per class that group ids imply (`group // n_attributes == label`
/// for every image), when exactly one does; else an error saying to pass `n_attributes`.
fn attributes_per_class(groups: &[i64], labels: &[u8]) -> PyResult<usize> {
    // Each image bounds A: label * A <= g < (label + 1) * A.
    let (mut low, mut high) = (1usize, usize::MAX);
    for (i, (&g, &label)) in groups.iter().zip(labels).enumerate() {
        if g == -1 {
            continue;
        }
        if g < 0 {
            return Err(PyValueError::new_err(format!(
                "groups[{i}] is {g}; groups are label * n_attributes + attribute, or -1 for none"
            )));
        }
        let (g, c) = (g as usize, usize::from(label));
        low = low.max(g / (c + 1) + 1);
        if let Some(bound) = g.checked_div(c) {
            high = high.min(bound);
        }
    }
    if low == high || (low < high && high == usize::MAX && groups.iter().all(|&g| g == -1)) {
        return Ok(low);
    }
    if low > high {
        return Err(PyValueError::new_err(
            "groups do not match labels: no number of attributes makes every group \
             label * n_attributes + attribute; check that groups and labels are of the same images",
        ));
    }
    Err(PyValueError::new_err(format!(
        "the groups fit {} attributes per class; pass n_attributes= to say which",
        if high == usize::MAX {
            format!("{low} or more")
        } else {
            format!("from {low} to {high}")
        }
    )))
}
