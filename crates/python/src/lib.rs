//! The `debiasdd` Python module (PyO3, abi3): Colored MNIST and friends as numpy arrays,
//! distillation (DC, DM over any strata), evaluation and group inference from Python, on the
//! same engine as the CLI. Built with maturin (`pip install ./crates/python`); the API is
//! documented in `debiasdd.pyi` and tested by `tests/` (pytest).
//!
//! Long calls release the GIL, report progress after every iteration or epoch, and stop on
//! Ctrl-C ([`progress`]); the library's errors become Python exceptions ([`errors`]).

// The allocator of the CLI: candle allocates a buffer per op, and mimalloc keeps reusing them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod arrays;
mod dataset;
mod distill;
mod errors;
mod evaluate;
mod infer;
mod json;
mod progress;
mod synthetic;

use pyo3::prelude::*;

/// debiasdd: debiased dataset distillation on a Rust engine.
///
/// load / generate a Dataset (numpy splits), distill a SyntheticSet from it (DC or DM; per
/// class, per group, FairDD, COBRA), evaluate it on the unbiased test split, infer_groups when
/// the data has no bias labels. See help(debiasdd.distill) and the others; the options of the
/// `debiasdd` command line are keywords of the same names.
#[pymodule]
#[pyo3(name = "debiasdd")]
fn debiasdd_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<dataset::Dataset>()?;
    m.add_class::<dataset::Split>()?;
    m.add_class::<synthetic::SyntheticSet>()?;
    m.add_function(wrap_pyfunction!(dataset::load, m)?)?;
    m.add_function(wrap_pyfunction!(dataset::generate, m)?)?;
    m.add_function(wrap_pyfunction!(synthetic::load_synthetic, m)?)?;
    m.add_function(wrap_pyfunction!(distill::distill, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate::evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(infer::infer_groups, m)?)?;
    Ok(())
}
