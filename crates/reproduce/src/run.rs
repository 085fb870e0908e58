//! The runner: datasets, then every cell not yet done, each leaving its files and a
//! `result.json` in its own folder; the report is rewritten after every cell.
//!
//! Files go where [`crate::store`] says. A cell with a `result.json` is done and never
//! recomputed (unless its settings changed, which is an error); an interrupted distillation
//! resumes from its checkpoint through the same driver as `debiasdd distill`
//! ([`debiasdd_distill::drive`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device};
use debiasdd_cmnist::{ColoredMnistConfig, GreySource};
use debiasdd_data::{Dataset, ImageSet, Normalization, SyntheticSet, random_real_subset};
use debiasdd_distill::{Distiller, RunFiles, RunOutcome, drive};
use debiasdd_eval::evaluate::{EvalProgress, evaluate};
use debiasdd_infer::{InferProgress, InferReport};
use rand::SeedableRng;

use crate::cell::{Cell, Method, eval_config, floor_size, plan, settings};
use crate::config::{Distilled, GroupSource, ReproduceConfig};
use crate::error::ReproduceError;
use crate::report;
use crate::store::{CellResult, Paths, finished, read_inferred_report, write_json};

/// What the runner tells its caller (progress bars, logs).
#[derive(Debug)]
pub enum Event<'a> {
    /// The grid is planned: `done` of `total` cells are already finished; the costs are the
    /// relative weights of [`Cell::cost`].
    Planned {
        total: usize,
        done: usize,
        total_cost: f64,
        done_cost: f64,
    },
    /// A Colored MNIST file was generated or found in the cache.
    Dataset {
        path: &'a Path,
        generated: bool,
        empty_groups: usize,
    },
    /// The train groups of a (ratio, seed) were inferred, or read from the results folder.
    Inferred {
        path: &'a Path,
        computed: bool,
        report: &'a InferReport,
    },
    /// A cell starts (or resumes).
    CellStarted {
        cell: &'a Cell,
        index: usize,
        total: usize,
    },
    /// Progress within the current cell, `fraction` in [0, 1].
    Progress {
        cell: &'a Cell,
        fraction: f64,
        message: String,
    },
    CellFinished {
        cell: &'a Cell,
        result: &'a CellResult,
    },
    /// The stop flag was seen; the run ends after saving what it can.
    Interrupted {
        cell: &'a Cell,
        checkpoint: Option<&'a Path>,
    },
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Complete,
    Interrupted,
}

/// The dataset of one (ratio, seed), generated into the cache when missing.
fn dataset(
    config: &ReproduceConfig,
    ratio: f64,
    seed: u64,
    source: &dyn Fn() -> Result<GreySource, ReproduceError>,
    paths: &Paths,
    observer: &mut dyn FnMut(Event<'_>),
) -> Result<Dataset, ReproduceError> {
    if let Some(file) = &config.data {
        let data = debiasdd_data::file::load(&file.path)?;
        observer(Event::Dataset {
            path: &file.path,
            generated: false,
            empty_groups: data.train.group_index().empty_groups().len(),
        });
        return Ok(data);
    }
    let wanted = config.cmnist_config(ratio, seed);
    let path = paths.datasets.join(wanted.file_name());
    if path.exists() {
        let data = debiasdd_data::file::load(&path)?;
        let found = ColoredMnistConfig::of_dataset(&data);
        if found.as_ref() != Some(&wanted) {
            return Err(ReproduceError::StaleDataset {
                path,
                problem: format!(
                    "its config is {}",
                    found
                        .map(|c| serde_json::to_string(&c).unwrap_or_default())
                        .unwrap_or_else(|| "not a Colored MNIST config".into())
                ),
            });
        }
        observer(Event::Dataset {
            path: &path,
            generated: false,
            empty_groups: data.train.group_index().empty_groups().len(),
        });
        return Ok(data);
    }
    let data = debiasdd_cmnist::build(&source()?, &wanted)?;
    debiasdd_data::file::save(&data, &path)?;
    debiasdd_data::preview::write_preview(
        &data.train,
        data.info.attribute_colours.as_deref(),
        &path.with_extension("png"),
    )?;
    observer(Event::Dataset {
        path: &path,
        generated: true,
        empty_groups: data.train.group_index().empty_groups().len(),
    });
    Ok(data)
}

/// The dataset of a cell's (ratio, seed) with inferred train groups: read from the results
/// folder (`inferred/r<ratio>-s<seed>.safetensors`, with its report as `.json`) when it was
/// inferred with the grid's settings, inferred and written there otherwise.
fn inferred_dataset(
    config: &ReproduceConfig,
    cell: &Cell,
    data: &Dataset,
    paths: &Paths,
    device: &Device,
    observer: &mut dyn FnMut(Event<'_>),
) -> Result<Dataset, ReproduceError> {
    let path = paths.inferred_file(cell.ratio, cell.seed);
    let report_path = path.with_extension("json");
    let config_seeded = debiasdd_infer::InferConfig {
        seed: cell.seed,
        ..config.infer.clone()
    };
    let cached = match path.exists() {
        true => read_inferred_report(paths, cell.ratio, cell.seed)?,
        false => None,
    };
    if let Some(report) = cached {
        if report.config == config_seeded {
            let inferred = debiasdd_data::file::load(&path)?;
            observer(Event::Inferred {
                path: &path,
                computed: false,
                report: &report,
            });
            return Ok(inferred);
        }
        return Err(ReproduceError::StaleDataset {
            path,
            problem: "it was inferred with other settings".into(),
        });
    }
    let inference = debiasdd_infer::infer_groups(data, &config_seeded, device, &mut |p| {
        if let InferProgress::Epoch {
            fold,
            folds,
            epoch,
            epochs,
            loss,
            ..
        } = p
        {
            tracing::info!(fold, folds, epoch, epochs, loss, "bias model");
        }
    })?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| ReproduceError::write(dir, e))?;
    }
    debiasdd_data::file::save(&inference.data, &path)?;
    write_json(&report_path, &inference.report)?;
    inference.report.write_heatmap(
        &path.with_extension("png"),
        data.info.attribute_colours.as_deref(),
    )?;
    observer(Event::Inferred {
        path: &path,
        computed: true,
        report: &inference.report,
    });
    Ok(inference.data)
}

/// Which part of the grid a call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every unfinished cell, the report rewritten after each.
    All,
    /// Cell `index` of [`plan`] alone (one task of a job array), skipped when it is done. The
    /// report is left alone, so tasks sharing a results folder never race on it: a
    /// [`Scope::ReportOnly`] call writes it once they are done.
    Cell(usize),
    /// Only the report, from the cells' `result.json` files; no cell runs.
    ReportOnly,
}

/// Runs every unfinished cell of the grid, writing the report after each: [`run_scope`] with
/// [`Scope::All`].
pub fn run(
    config: &ReproduceConfig,
    source: &dyn Fn() -> Result<GreySource, ReproduceError>,
    paths: &Paths,
    device: &Device,
    stop: &AtomicBool,
    observer: &mut dyn FnMut(Event<'_>),
) -> Result<Outcome, ReproduceError> {
    run_scope(config, Scope::All, source, paths, device, stop, observer)
}

/// Runs the unfinished cells of `scope`. `source` loads the grey MNIST files and is only
/// called when a dataset must be generated. Setting `stop` makes the run end at the next safe
/// point (after a distillation iteration, with a checkpoint; or after the current evaluation).
/// Every file is written atomically under a name of its own (cell folders, `result.json`) or
/// with the same content by every writer (cached datasets and inferred groups), so cells of one
/// grid may run at once in separate processes sharing the folders.
pub fn run_scope(
    config: &ReproduceConfig,
    scope: Scope,
    source: &dyn Fn() -> Result<GreySource, ReproduceError>,
    paths: &Paths,
    device: &Device,
    stop: &AtomicBool,
    observer: &mut dyn FnMut(Event<'_>),
) -> Result<Outcome, ReproduceError> {
    config.validate()?;
    let cells = plan(config);
    if let Scope::Cell(index) = scope
        && index >= cells.len()
    {
        return Err(ReproduceError::NoSuchCell {
            index,
            total: cells.len(),
        });
    }
    let writes_report = scope == Scope::All;
    let mut done = Vec::with_capacity(cells.len());
    for cell in &cells {
        done.push(finished(config, cell, paths)?.is_some());
    }
    let cost = |c: &Cell| c.cost(config);
    observer(Event::Planned {
        total: cells.len(),
        done: done.iter().filter(|&&d| d).count(),
        total_cost: cells.iter().map(cost).sum(),
        done_cost: cells
            .iter()
            .zip(&done)
            .filter(|(_, d)| **d)
            .map(|(c, _)| cost(c))
            .sum(),
    });
    match scope {
        Scope::ReportOnly => {
            report::write(config, paths)?;
            return Ok(Outcome::Complete);
        }
        Scope::All => report::write(config, paths)?,
        Scope::Cell(_) => {}
    }
    let mut data: Option<(f64, u64, Dataset)> = None;
    let mut inferred: Option<(f64, u64, Dataset)> = None;
    for (index, cell) in cells.iter().enumerate() {
        if done[index] || matches!(scope, Scope::Cell(only) if only != index) {
            continue;
        }
        if stop.load(Ordering::SeqCst) {
            observer(Event::Interrupted {
                cell,
                checkpoint: None,
            });
            return Ok(Outcome::Interrupted);
        }
        if data
            .as_ref()
            .is_none_or(|(r, s, _)| (*r, *s) != (cell.ratio, cell.seed))
        {
            let d = dataset(config, cell.ratio, cell.seed, source, paths, observer)?;
            data = Some((cell.ratio, cell.seed, d));
        }
        let (_, _, dataset) = data.as_ref().expect("loaded above");
        let wants_inferred = matches!(
            cell.method,
            Method::Distill(Distilled {
                groups: GroupSource::Inferred,
                ..
            })
        );
        if wants_inferred
            && inferred
                .as_ref()
                .is_none_or(|(r, s, _)| (*r, *s) != (cell.ratio, cell.seed))
        {
            let d = inferred_dataset(config, cell, dataset, paths, device, observer)?;
            inferred = Some((cell.ratio, cell.seed, d));
        }
        let dataset = match &inferred {
            Some((_, _, d)) if wants_inferred => d,
            _ => dataset,
        };
        observer(Event::CellStarted {
            cell,
            index,
            total: cells.len(),
        });
        let outcome =
            run_cell(config, cell, dataset, paths, device, stop, observer).map_err(|source| {
                ReproduceError::Cell {
                    id: cell.id(),
                    source: Box::new(source),
                }
            })?;
        match outcome {
            Some(result) => {
                write_json(&paths.result_file(cell), &result)?;
                observer(Event::CellFinished {
                    cell,
                    result: &result,
                });
                if writes_report {
                    report::write(config, paths)?;
                }
            }
            None => return Ok(Outcome::Interrupted),
        }
    }
    Ok(Outcome::Complete)
}

/// What every step of one cell needs.
struct CellRun<'a> {
    config: &'a ReproduceConfig,
    cell: &'a Cell,
    data: &'a Dataset,
    dir: PathBuf,
    device: &'a Device,
    stop: &'a AtomicBool,
}

/// Runs one cell; `None` when it was interrupted (its checkpoint saved).
fn run_cell(
    config: &ReproduceConfig,
    cell: &Cell,
    data: &Dataset,
    paths: &Paths,
    device: &Device,
    stop: &AtomicBool,
    observer: &mut dyn FnMut(Event<'_>),
) -> Result<Option<CellResult>, ReproduceError> {
    let dir = paths.cell_dir(cell);
    std::fs::create_dir_all(&dir).map_err(|e| ReproduceError::write(&dir, e))?;
    let run = CellRun {
        config,
        cell,
        data,
        dir,
        device,
        stop,
    };
    let norm = Normalization::of_split(&data.train);
    let produce_started = Instant::now();
    // The set the networks are trained on, and the share of the cell's cost already behind.
    let (train, produce_seconds, produced_fraction) = match cell.method {
        Method::Distill(distilled) => {
            let fraction = cell.produce_cost(config) / cell.cost(config);
            let synthetic = run.dir.join("synthetic.safetensors");
            if !synthetic.exists() && !run.distill(distilled, fraction, observer)? {
                return Ok(None);
            }
            let set = SyntheticSet::load(&synthetic)?;
            (
                set.set,
                history_seconds(&run.dir.join("history.jsonl")),
                fraction,
            )
        }
        Method::Floor(stratify) => {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cell.seed);
            let set = random_real_subset(
                &data.train,
                stratify,
                floor_size(config, stratify),
                &mut rng,
            )?;
            let synthetic = SyntheticSet {
                set,
                norm: norm.clone(),
                config: Some(settings(config, cell)["train_set"].to_string()),
            };
            synthetic.save(&run.dir.join("subset.safetensors"))?;
            let secs = produce_started.elapsed().as_secs_f64();
            (synthetic.set, secs, 0.0)
        }
        Method::Baseline(_) => (ImageSet::from_split(&data.train), 0.0, 0.0),
    };
    let eval = eval_config(config, cell);
    let eval_started = Instant::now();
    let epochs = eval.train.epochs + 1;
    let report = evaluate(&train, &norm, data, &eval, device, &mut |p| {
        if let EvalProgress::Epoch {
            model,
            n_models,
            report,
        } = p
        {
            let done = (model * epochs + report.epoch + 1) as f64 / (n_models * epochs) as f64;
            observer(Event::Progress {
                cell,
                fraction: produced_fraction + (1.0 - produced_fraction) * done,
                message: format!(
                    "model {}/{n_models} epoch {}/{}  loss {:.3}",
                    model + 1,
                    report.epoch,
                    report.epochs,
                    report.loss
                ),
            });
        }
    })?;
    debiasdd_eval::heatmap::write_group_heatmap(
        &report.summary.group_accuracy_mean,
        &run.dir.join("heat.png"),
        data.info.attribute_colours.as_deref(),
    )?;
    Ok(Some(CellResult {
        id: cell.id(),
        cell: *cell,
        label: cell.method.label(),
        settings: settings(config, cell),
        produce_seconds,
        eval_seconds: eval_started.elapsed().as_secs_f64(),
        report,
    }))
}

impl CellRun<'_> {
    /// Distils the cell's set into its folder, resuming from its checkpoint; `false` when
    /// interrupted. `share` is the part of the cell's cost the distillation makes up.
    fn distill(
        &self,
        distilled: Distilled,
        share: f64,
        observer: &mut dyn FnMut(Event<'_>),
    ) -> Result<bool, ReproduceError> {
        let (cell, dir) = (self.cell, &self.dir);
        let config = self.config.distill_config(distilled, cell.seed);
        let iterations = config.settings.iterations;
        let checkpoint = dir.join("checkpoint.safetensors");
        let history = dir.join("history.jsonl");
        let mut distiller = Distiller::new(config, &self.data.train, self.device, DType::F32)?;
        if checkpoint.exists() {
            distiller.load_checkpoint(&checkpoint)?;
        }
        let files = RunFiles {
            checkpoint: Some(&checkpoint),
            checkpoint_every: self.config.checkpoint_every,
            history: Some(&history),
        };
        let outcome = drive(&mut distiller, files, self.stop, &mut |_, stats| {
            observer(Event::Progress {
                cell,
                fraction: share * stats.iteration as f64 / iterations as f64,
                message: format!(
                    "iteration {}/{iterations}  loss {:.3}  {:.1} s/it",
                    stats.iteration, stats.loss, stats.seconds
                ),
            });
            Ok(())
        })?;
        if outcome == RunOutcome::Interrupted {
            observer(Event::Interrupted {
                cell,
                checkpoint: Some(&checkpoint),
            });
            return Ok(false);
        }
        let set = distiller.synthetic_set()?;
        debiasdd_distill::grid::save(&set, &dir.join("grid.png"))?;
        set.save(&dir.join("synthetic.safetensors"))?;
        Ok(true)
    }
}

/// Total seconds of the iterations recorded in a history file.
fn history_seconds(path: &Path) -> f64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["seconds"].as_f64())
        .sum()
}
