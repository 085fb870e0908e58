//! `cargo xtask reproduce`'s code path on a miniature grid: tiny generated MNIST, one ratio,
//! class- and group-wise distillation (DC, and DM with DSA) of two iterations, floors and baselines. Checks that every
//! output file exists and parses, that a second run recomputes nothing, that an interrupted run
//! resumes to the same synthetic sets, and that changed settings are refused.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;
use debiasdd_cmnist::{GreySource, SourceKind, Verification};
use debiasdd_data::SyntheticSet;
use debiasdd_reproduce::report::Results;
use debiasdd_reproduce::{
    Event, Method, Outcome, Paths, ReproduceConfig, ReproduceError, ReproducePreset,
};

/// The smoke grid: one ratio, DC and DM class- and group-wise (annotated and inferred groups)
/// of two iterations at width 8, floors and baselines, on 400 training images.
fn miniature() -> ReproduceConfig {
    ReproduceConfig::preset(ReproducePreset::Smoke)
}

/// A folder of tiny generated grey MNIST files under `tmp`.
fn tiny_mnist(tmp: &Path) -> anyhow::Result<std::path::PathBuf> {
    let mnist = tmp.join("mnist");
    std::fs::create_dir_all(&mnist)?;
    debiasdd_cmnist::source::write_synthetic_source(&mnist, 500, 200)?;
    Ok(mnist)
}

/// The grid's loader of the grey files in `mnist`.
fn grey(mnist: &Path) -> impl Fn() -> Result<GreySource, ReproduceError> + Sync + '_ {
    move || {
        Ok(GreySource::load(
            mnist,
            SourceKind::Mnist,
            Verification::Skip,
        )?)
    }
}

/// Runs the grid; returns the outcome and how many cells were started.
fn run(
    config: &ReproduceConfig,
    mnist: &Path,
    paths: &Paths,
    stop_after_first_iteration: bool,
) -> Result<(Outcome, usize), ReproduceError> {
    let source = grey(mnist);
    let stop = AtomicBool::new(false);
    let mut started = 0;
    let outcome =
        debiasdd_reproduce::run(
            config,
            &source,
            paths,
            &Device::Cpu,
            &stop,
            &mut |e| match e {
                Event::CellStarted { .. } => started += 1,
                Event::Progress { cell, message, .. }
                    if stop_after_first_iteration
                        && matches!(cell.method, Method::Distill(_))
                        && message.starts_with("iteration 1/") =>
                {
                    stop.store(true, Ordering::SeqCst)
                }
                _ => {}
            },
        )?;
    Ok((outcome, started))
}

#[test]
fn miniature_grid_writes_every_output_resumes_and_refuses_changed_settings() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mnist = tiny_mnist(tmp.path())?;
    let config = miniature();
    let paths = Paths {
        out: tmp.path().join("results/quick"),
        datasets: tmp.path().join("cmnist"),
    };
    let (outcome, started) = run(&config, &mnist, &paths, false)?;
    // 2 floors, 2 baselines, DC and DM class- and group-wise, DC and DM over inferred groups.
    assert_eq!((outcome, started), (Outcome::Complete, 10));

    // results.json: every cell, nothing pending, one summary row per method.
    let results: Results =
        serde_json::from_str(&std::fs::read_to_string(paths.out.join("results.json"))?)?;
    assert_eq!(results.cells.len(), 10);
    assert!(results.pending.is_empty());
    assert_eq!(results.summary.len(), 10);
    // The inferred groups: once per (ratio, seed), with report and heat map, marked inferred.
    let inferred = paths.out.join("inferred/r0.2-s0.safetensors");
    let data = debiasdd_data::file::load(&inferred)?;
    assert!(data.info.inferred.is_some() && data.true_train_attributes.is_some());
    let report: debiasdd_infer::InferReport =
        serde_json::from_str(&std::fs::read_to_string(inferred.with_extension("json"))?)?;
    assert!(report.agreement.is_some());
    image::open(inferred.with_extension("png"))?;
    for cell in &results.cells {
        let acc = cell.report.summary.accuracy.mean;
        assert!((0.0..=100.0).contains(&acc), "{}: {acc}", cell.id);
        assert_eq!(cell.report.runs.len(), 1);
        let dir = paths.out.join("cells").join(&cell.id);
        assert!(dir.join("result.json").is_file() && dir.join("heat.png").is_file());
    }
    // results.md: the four metric tables, every method, the published numbers.
    let md = std::fs::read_to_string(paths.out.join("results.md"))?;
    for needle in [
        "Unbiased test accuracy",
        "Bias-conflicting accuracy",
        "Worst-group accuracy",
        "DEO_M",
        "DC class-wise",
        "DC group-wise (debiased)",
        "random real, group-stratified",
        "full data, group-balanced ERM",
        "DM group-wise (debiased)",
        "DM group-wise (debiased), inferred groups",
        "## Inferred groups",
        "figures/synthetic-r0.2-dc.png",
        "figures/synthetic-r0.2-dm.png",
    ] {
        assert!(md.contains(needle), "results.md lacks {needle:?}:\n{md}");
    }
    // Figures: Figure 2 per method (two 10-row grids side by side), plots, one heat map per
    // method.
    for method in ["dc", "dm"] {
        let fig = image::open(
            paths
                .out
                .join(format!("figures/synthetic-r0.2-{method}.png")),
        )?;
        assert!(
            fig.width() > 2 * fig.height() / 2,
            "{method}: two panels side by side"
        );
    }
    for svg in ["accuracy-vs-ratio.svg", "worst-group-vs-ratio.svg"] {
        let text = std::fs::read_to_string(paths.out.join("figures").join(svg))?;
        assert!(
            text.starts_with("<svg") && text.contains("DC group-wise"),
            "{svg}"
        );
    }
    for cell in &results.cells {
        let heat = paths
            .out
            .join(format!("figures/heat-r0.2-{}.png", cell.cell.method.slug()));
        image::open(&heat)?;
    }
    for mode in ["dc-class", "dc-group", "dm-class", "dm-group"] {
        let dir = paths.out.join("cells").join(format!("r0.2-s0-{mode}"));
        image::open(dir.join("grid.png"))?;
        let history = std::fs::read_to_string(dir.join("history.jsonl"))?;
        assert_eq!(history.lines().count(), 2);
    }

    // A second run finds everything done.
    assert_eq!(run(&config, &mnist, &paths, false)?, (Outcome::Complete, 0));

    // Interrupted after the first distillation iteration, then resumed: the same sets.
    let resumed = Paths {
        out: tmp.path().join("results/interrupted"),
        ..paths.clone()
    };
    let (outcome, _) = run(&config, &mnist, &resumed, true)?;
    assert_eq!(outcome, Outcome::Interrupted);
    let first_distill = resumed.out.join("cells/r0.2-s0-dc-class");
    assert!(first_distill.join("checkpoint.safetensors").is_file());
    assert!(!first_distill.join("result.json").exists());
    assert_eq!(run(&config, &mnist, &resumed, false)?.0, Outcome::Complete);
    for mode in ["dc-class", "dc-group", "dm-class", "dm-group"] {
        let file = format!("cells/r0.2-s0-{mode}/synthetic.safetensors");
        let load = |root: &Path| SyntheticSet::load(&root.join(&file));
        let (a, b) = (load(&paths.out)?, load(&resumed.out)?);
        let max_diff = a
            .set
            .images
            .iter()
            .zip(&b.set.images)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert_eq!(max_diff, 0.0, "{mode}: the resumed run's images differ");
        assert_eq!(a, b, "{mode}: the resumed run's set differs");
        let history = std::fs::read_to_string(
            resumed
                .out
                .join(format!("cells/r0.2-s0-{mode}/history.jsonl")),
        )?;
        assert_eq!(
            history.lines().count(),
            2,
            "{mode}: one history line per iteration"
        );
    }

    // Changed evaluation settings: the finished cells are refused, not silently mixed in.
    let mut changed = config.clone();
    changed.eval.train.epochs = 3;
    let err = run(&changed, &mnist, &paths, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("other settings") && err.contains("delete"),
        "{err}"
    );
    Ok(())
}

/// The user's own images (imported PNGs: 2 classes x 2 attributes of 8 x 8) run through the same
/// grid with `data` set: no Colored MNIST is generated, the group floor takes ipc / 2 per group.
#[test]
fn grid_runs_on_an_imported_dataset_file() -> anyhow::Result<()> {
    use debiasdd_data::import::{ImportOptions, ImportRow, build};
    let tmp = tempfile::tempdir()?;
    let mut rows = Vec::new();
    for i in 0..48u32 {
        let (class, attr) = (i % 2, if i % 8 == 7 { 1 - i % 2 } else { i % 2 });
        let path = tmp.path().join(format!("{i}.png"));
        image::RgbImage::from_fn(8, 8, |x, y| {
            image::Rgb([
                (40 + 150 * attr + x) as u8,
                (60 + y) as u8,
                (40 + 150 * class) as u8,
            ])
        })
        .save(&path)?;
        rows.push(ImportRow {
            path,
            label: class.to_string(),
            attribute: Some(["land", "water"][attr as usize].into()),
            split: Some(if i < 40 { 0 } else { 2 }),
            origin: format!("row {i}"),
        });
    }
    let options = ImportOptions {
        name: "own".into(),
        size: 8,
        channels: None,
        valid_share: 0.0,
        test_share: 0.0,
        seed: 0,
    };
    let file = tmp.path().join("own.safetensors");
    debiasdd_data::file::save(&build(&rows, &options)?, &file)?;

    let mut config = miniature();
    config.ratios = vec![0.0];
    config.distill.width = Some(4);
    config.data = Some(debiasdd_reproduce::config::DataFile {
        path: file.clone(),
        n_attributes: 2,
    });
    config.baselines = false;
    // 40 train images of 8 x 8 are too few for a bias model (it stays at chance, an error).
    config.distillations.retain(|d| d.groups.is_annotated());
    let paths = Paths {
        out: tmp.path().join("results"),
        datasets: tmp.path().join("unused"),
    };
    let source = || -> Result<GreySource, ReproduceError> {
        panic!("a grid on a given file must not generate Colored MNIST")
    };
    let stop = AtomicBool::new(false);
    let outcome =
        debiasdd_reproduce::run(&config, &source, &paths, &Device::Cpu, &stop, &mut |_| {})?;
    assert!(matches!(outcome, Outcome::Complete));
    let results: Results = serde_json::from_slice(&std::fs::read(paths.out.join("results.json"))?)?;
    assert!(results.pending.is_empty());
    let floor = results
        .cells
        .iter()
        .find(|c| c.id.ends_with("random-group"))
        .expect("group floor");
    assert_eq!(floor.settings["train_set"]["per_stratum"], 5);
    assert_eq!(
        floor.report.n_train, 15,
        "5 from each of the 3 non-empty groups"
    );
    let report = std::fs::read_to_string(paths.out.join("results.md"))?;
    assert!(
        report.starts_with("# Debiased dataset distillation on `own`"),
        "{report}"
    );
    assert!(!paths.datasets.exists());
    Ok(())
}

#[test]
fn cells_run_as_parallel_tasks_give_the_serial_report() -> anyhow::Result<()> {
    use debiasdd_reproduce::{Scope, run_scope};

    let tmp = tempfile::tempdir()?;
    let mnist = tiny_mnist(tmp.path())?;
    let config = miniature();
    let serial = Paths {
        out: tmp.path().join("serial"),
        datasets: tmp.path().join("cmnist-serial"),
    };
    assert_eq!(run(&config, &mnist, &serial, false)?.0, Outcome::Complete);

    // Every cell as its own task, all at once, sharing one results folder and one (empty)
    // datasets folder, as a job array does; then the report alone.
    let sharded = Paths {
        out: tmp.path().join("sharded"),
        datasets: tmp.path().join("cmnist-sharded"),
    };
    let source = grey(&mnist);
    let n = debiasdd_reproduce::plan(&config).len();
    let task = |scope: Scope| {
        let stop = AtomicBool::new(false);
        let mut started = 0;
        let outcome = run_scope(
            &config,
            scope,
            &source,
            &sharded,
            &Device::Cpu,
            &stop,
            &mut |e| {
                if let Event::CellStarted { .. } = e {
                    started += 1;
                }
            },
        );
        outcome.map(|o| (o, started))
    };
    let outcomes: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| s.spawn(move || task(Scope::Cell(i))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, outcome) in outcomes.into_iter().enumerate() {
        assert_eq!(outcome?, (Outcome::Complete, 1), "cell {i}");
    }
    assert!(
        !sharded.out.join("results.json").exists(),
        "a cell task leaves the report alone"
    );
    assert_eq!(task(Scope::ReportOnly)?, (Outcome::Complete, 0));
    // A finished cell is skipped.
    assert_eq!(task(Scope::Cell(0))?, (Outcome::Complete, 0));

    let read = |paths: &Paths| -> anyhow::Result<Results> {
        Ok(serde_json::from_str(&std::fs::read_to_string(
            paths.out.join("results.json"),
        )?)?)
    };
    let (a, b) = (read(&serial)?, read(&sharded)?);
    assert!(a.pending.is_empty() && b.pending.is_empty());
    assert_eq!(
        serde_json::to_value(&a.summary)?,
        serde_json::to_value(&b.summary)?
    );
    assert_eq!(a.cells.len(), b.cells.len());
    for (x, y) in a.cells.iter().zip(&b.cells) {
        assert_eq!(x.cell.id(), y.cell.id());
        assert_eq!(
            serde_json::to_value(&x.report.summary)?,
            serde_json::to_value(&y.report.summary)?,
            "{}",
            x.cell.id()
        );
    }
    // No temporary file is left behind.
    for entry in walk(&sharded.out)
        .into_iter()
        .chain(walk(&sharded.datasets))
    {
        assert!(!entry.ends_with(".partial"), "{entry}");
    }

    let err = task(Scope::Cell(n)).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("there is no cell {n}: this grid has {n}")),
        "{err}"
    );
    Ok(())
}

/// Every file below `dir`, as strings.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path.display().to_string());
        }
    }
    out
}
