//! Rust values as Python objects (dicts, lists, numbers) through their JSON form: reports,
//! dataset descriptions and settings reach Python as the CLI's JSON files show them.

use pyo3::prelude::*;
use serde::Serialize;

/// `value` as the Python object its JSON form reads as (`json.loads`).
pub(crate) fn to_python<'py>(
    py: Python<'py>,
    value: &impl Serialize,
) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(value).expect("library values serialise");
    from_json(py, &text)
}

/// A JSON text as a Python object.
pub(crate) fn from_json<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (text,))
}
