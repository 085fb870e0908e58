//! The resumable driver of a run, shared by `debiasdd distill` and `cargo xtask reproduce`:
//! iterations until done or stopped, one history line per iteration, checkpoints every few
//! iterations, at the end and when stopped.
//!
//! The caller decides whether to resume (it loads a checkpoint into the [`Distiller`] first);
//! the driver keeps the history file consistent with that: it holds exactly the lines of the
//! iterations behind the distiller (a resumed run drops lines of iterations after its
//! checkpoint, which it recomputes; a fresh run starts an empty history).

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use crate::engine::{Distiller, IterationStats};
use crate::error::DistillError;
use crate::matcher::Matcher;

/// Where a run keeps its state.
#[derive(Debug, Clone, Copy)]
pub struct RunFiles<'a> {
    /// Written every `checkpoint_every` iterations, at the end, and when stopped; `None`: no
    /// checkpoints (a stopped run is then lost).
    pub checkpoint: Option<&'a Path>,
    pub checkpoint_every: usize,
    /// One JSON line of [`IterationStats`] per iteration, if wanted.
    pub history: Option<&'a Path>,
}

/// How a driven run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// Every iteration is done; the final checkpoint is written.
    Finished,
    /// The stop flag was seen between two iterations; the checkpoint holds the last one.
    Interrupted,
}

/// What the driver calls after every iteration (progress bars, grids); an error stops the run.
pub type OnIteration<'a, M> =
    dyn FnMut(&Distiller<M>, &IterationStats) -> Result<(), DistillError> + 'a;

/// Runs `distiller` until it is done or `stop` is set (checked before every iteration, so the
/// iteration in progress always finishes; with several ranks, any rank's flag stops all of
/// them at the same iteration). After every iteration: its history line, then
/// `on_iteration` (progress bars, grids), then the checkpoint when one is due.
pub fn drive<M: Matcher>(
    distiller: &mut Distiller<M>,
    files: RunFiles<'_>,
    stop: &AtomicBool,
    on_iteration: &mut OnIteration<'_, M>,
) -> Result<RunOutcome, DistillError> {
    if files.checkpoint_every == 0 {
        return Err(DistillError::InvalidConfig {
            field: "checkpoint_every",
            problem: "must be at least 1".into(),
        });
    }
    let mut history = match files.history {
        Some(path) => Some(open_history(path, distiller.iteration())?),
        None => None,
    };
    while !distiller.is_done() {
        if distiller.should_stop(stop)? {
            save(distiller, files)?;
            return Ok(RunOutcome::Interrupted);
        }
        let stats = distiller.step()?;
        if let (Some(file), Some(path)) = (history.as_mut(), files.history) {
            let line = serde_json::to_string(&stats).expect("stats serialise");
            writeln!(file, "{line}")
                .and_then(|()| file.flush())
                .map_err(|e| write_error(path, e))?;
        }
        on_iteration(distiller, &stats)?;
        if stats.iteration % files.checkpoint_every == 0 {
            save(distiller, files)?;
        }
    }
    save(distiller, files)?;
    Ok(RunOutcome::Finished)
}

fn save<M: Matcher>(distiller: &Distiller<M>, files: RunFiles<'_>) -> Result<(), DistillError> {
    match files.checkpoint {
        Some(path) => distiller.save_checkpoint(path),
        None => Ok(()),
    }
}

fn write_error(path: &Path, e: std::io::Error) -> DistillError {
    DistillError::Write {
        path: path.to_owned(),
        problem: e.to_string(),
    }
}

/// The history file, holding the first `iterations` lines of what it held, open for appending.
fn open_history(path: &Path, iterations: usize) -> Result<std::fs::File, DistillError> {
    let kept: String = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .take(iterations)
        .map(|l| format!("{l}\n"))
        .collect();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| write_error(path, e))?;
    }
    std::fs::write(path, kept).map_err(|e| write_error(path, e))?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| write_error(path, e))
}
