//! Long calls: the work runs with the GIL released; after every iteration (distillation) or
//! epoch (training) a [`Reporter`] takes the GIL back for a moment, hands the progress to the
//! caller's callback and lets Python run its signal handlers. A `KeyboardInterrupt` (Ctrl-C)
//! or an exception raised by the callback asks the work to stop there; it is raised in Python
//! once the work has stopped (for a distillation: after its checkpoint is written).

use std::ops::ControlFlow;

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// One entry of a progress `dict`: an int or a float.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Value {
    Count(usize),
    Real(f64),
}

/// What the caller asked for as `progress=`.
#[derive(Debug)]
enum Sink {
    /// `None`: nothing is reported (interrupts are still honoured).
    Silent,
    /// `True`: one line on `sys.stderr`, rewritten in place.
    Line,
    /// A callable, called with one `dict` per iteration or epoch.
    Callback(Py<PyAny>),
}

/// Reports progress to Python and collects the reason to stop, if any.
#[derive(Debug)]
pub(crate) struct Reporter {
    sink: Sink,
    /// The exception that stopped the work (KeyboardInterrupt, or the callback's own).
    pending: Option<PyErr>,
}

impl Reporter {
    /// From the `progress=` argument: `None`, `True`/`False`, or a callable.
    pub(crate) fn new(progress: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let sink = match progress {
            None => Sink::Silent,
            Some(p) if p.is_none() => Sink::Silent,
            Some(p) if p.is_instance_of::<pyo3::types::PyBool>() => {
                if p.is_truthy()? {
                    Sink::Line
                } else {
                    Sink::Silent
                }
            }
            Some(p) if p.is_callable() => Sink::Callback(p.clone().unbind()),
            Some(p) => {
                return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                    "progress: expected None, True or a callable taking a dict, got {}",
                    p.get_type().name()?
                )));
            }
        };
        Ok(Self {
            sink,
            pending: None,
        })
    }

    /// With the GIL: reports `fields` (built from `(key, value)` pairs) as `text` or to the
    /// callback, then runs pending signal handlers. `Break` when the work should stop.
    pub(crate) fn report(
        &mut self,
        fields: &[(&str, Value)],
        text: impl FnOnce() -> String,
    ) -> ControlFlow<()> {
        if self.pending.is_some() {
            return ControlFlow::Break(());
        }
        let outcome = Python::attach(|py| -> PyResult<()> {
            match &self.sink {
                Sink::Silent => {}
                Sink::Line => {
                    let stderr = py.import("sys")?.getattr("stderr")?;
                    stderr.call_method1("write", (format!("\r{}\x1b[K", text()),))?;
                    stderr.call_method0("flush")?;
                }
                Sink::Callback(callback) => {
                    let info = PyDict::new(py);
                    for &(key, value) in fields {
                        match value {
                            Value::Count(n) => info.set_item(key, n)?,
                            Value::Real(x) => info.set_item(key, x)?,
                        }
                    }
                    callback.call1(py, (info,))?;
                }
            }
            py.check_signals()
        });
        match outcome {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                self.pending = Some(e);
                ControlFlow::Break(())
            }
        }
    }

    /// With the GIL: runs pending signal handlers only (between steps that report nothing).
    pub(crate) fn check(&mut self) -> ControlFlow<()> {
        if self.pending.is_some() {
            return ControlFlow::Break(());
        }
        match Python::attach(|py| py.check_signals()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                self.pending = Some(e);
                ControlFlow::Break(())
            }
        }
    }

    /// Ends the line of `progress=True`.
    pub(crate) fn finish(&self) {
        if matches!(self.sink, Sink::Line) {
            Python::attach(|py| {
                if let Ok(stderr) = py.import("sys").and_then(|s| s.getattr("stderr")) {
                    let _ = stderr.call_method1("write", ("\n",));
                }
            });
        }
    }

    /// The exception that stopped the work, with `note` attached (PEP 678, Python 3.11+;
    /// older Pythons raise it without).
    pub(crate) fn stopped(&mut self, py: Python<'_>, note: &str) -> PyErr {
        let err = self.pending.take().unwrap_or_else(|| {
            pyo3::exceptions::PyRuntimeError::new_err("the work stopped without a reason")
        });
        let value = err.value(py);
        if value.hasattr("add_note").unwrap_or(false) {
            let _ = value.call_method1("add_note", (note,));
        }
        err
    }
}
