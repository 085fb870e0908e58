//! Where a grid keeps its results: the paths of a results folder, a finished cell's
//! `result.json`, and atomic JSON and file writes. The layer under the runner, the summary, the
//! figures and the report, which all read finished cells through it.
//!
//! Layout under `out`: `cells/<id>/` per cell (synthetic set or subset, distillation checkpoint
//! and history, grid, heat map, `result.json`), and the report files of [`crate::report`].

use std::path::{Path, PathBuf};

use debiasdd_eval::evaluate::EvalReport;
use serde::{Deserialize, Serialize};

use crate::cell::{Cell, plan, settings};
use crate::config::ReproduceConfig;
use crate::error::ReproduceError;

/// Where a reproduction reads and writes.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The results folder (`results/<preset>` for `cargo xtask reproduce`).
    pub out: PathBuf,
    /// Where generated Colored MNIST files are cached (`data/cmnist`).
    pub datasets: PathBuf,
}

impl Paths {
    pub fn cell_dir(&self, cell: &Cell) -> PathBuf {
        self.out.join("cells").join(cell.id())
    }

    /// The dataset with inferred train groups of one (ratio, seed); its report beside it as
    /// `.json`, its heat map as `.png`.
    pub fn inferred_file(&self, ratio: f64, seed: u64) -> PathBuf {
        self.out
            .join("inferred")
            .join(format!("r{ratio}-s{seed}.safetensors"))
    }

    /// The file whose presence means `cell` is done.
    pub fn result_file(&self, cell: &Cell) -> PathBuf {
        self.cell_dir(cell).join("result.json")
    }
}

/// What one finished cell measured; stored as its `result.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellResult {
    pub id: String,
    pub cell: Cell,
    pub label: String,
    /// What produced the training set (distillation config, subset recipe, baseline sampling),
    /// and how it was scored.
    pub settings: serde_json::Value,
    /// Seconds spent producing the training set (distillation over all sessions, subset draw).
    pub produce_seconds: f64,
    /// Seconds spent training and scoring the networks.
    pub eval_seconds: f64,
    pub report: EvalReport,
}

/// The stored result of `cell`, if it is done with the current settings.
pub fn finished(
    config: &ReproduceConfig,
    cell: &Cell,
    paths: &Paths,
) -> Result<Option<CellResult>, ReproduceError> {
    let path = paths.result_file(cell);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ReproduceError::read(&path, e))?;
    let stale = || ReproduceError::StaleCell {
        id: cell.id(),
        dir: paths.cell_dir(cell),
    };
    // A result of an older layout does not parse; like one of other settings, it is refused
    // with the folder to delete rather than mixed into the tables.
    let result: CellResult = serde_json::from_str(&text).map_err(|_| stale())?;
    if result.settings != settings(config, cell) {
        return Err(stale());
    }
    Ok(Some(result))
}

/// Every finished result of the grid, in plan order.
pub fn collect(config: &ReproduceConfig, paths: &Paths) -> Result<Vec<CellResult>, ReproduceError> {
    let mut results = Vec::new();
    for cell in plan(config) {
        if let Some(result) = finished(config, &cell, paths)? {
            results.push(result);
        }
    }
    Ok(results)
}

/// Pretty JSON, written to a temporary file and renamed so that a crash never leaves half a file.
/// The inference report of one (ratio, seed) ([`Paths::inferred_file`] with `.json`): `None`
/// when there is none yet, an error naming the file when it does not parse.
pub fn read_inferred_report(
    paths: &Paths,
    ratio: f64,
    seed: u64,
) -> Result<Option<debiasdd_infer::InferReport>, ReproduceError> {
    let path = paths.inferred_file(ratio, seed).with_extension("json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ReproduceError::read(&path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ReproduceError::read(&path, format!("not an inference report ({e})")))
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ReproduceError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| ReproduceError::write(path, e))?;
    write_atomic(path, text.as_bytes())
}

/// `bytes` into `path` through a sibling temporary file, creating the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ReproduceError> {
    debiasdd_data::write_atomically(path, bytes).map_err(|e| ReproduceError::write(path, e))
}
