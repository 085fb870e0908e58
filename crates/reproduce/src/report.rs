//! The report of a grid, rewritten after every finished cell: `results.json` (every cell),
//! `results.md` (tables of mean +- std per ratio and method, next to the published numbers),
//! and the figures of [`crate::figures`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use debiasdd_distill::{MatchMode, MethodKind};
use debiasdd_eval::metrics::{MetricSummary, Stat};
use debiasdd_eval::train::Sampling;
use serde::{Deserialize, Serialize};

use crate::cell::{Method, plan};
use crate::config::{Distilled, ReproduceConfig};
use crate::error::ReproduceError;
use crate::figures;
use crate::store::{CellResult, Paths, collect, read_inferred_report, write_atomic, write_json};
use crate::summary::{MethodSummary, summarise};

pub const RESULTS_FORMAT: &str = "debiasdd-results/1";

/// The content of `results.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub format: String,
    pub config: ReproduceConfig,
    /// Cells of the grid not finished yet.
    pub pending: Vec<String>,
    pub cells: Vec<CellResult>,
    /// Per method and ratio, over every network of every seed.
    pub summary: Vec<MethodSummary>,
}

/// A published number and the method and ratio of ours it stands next to.
#[derive(Debug, Clone, Copy)]
pub struct Reference {
    pub method: Method,
    pub ratio: f64,
    /// Unbiased test accuracy, %.
    pub accuracy: f64,
    pub setting: &'static str,
}

/// DC over the strata `mode`.
fn dc(mode: MatchMode) -> Method {
    Method::Distill(Distilled::annotated(MethodKind::Dc, mode))
}

/// The published numbers of the protocol (§4, §8) that have a counterpart in a grid on
/// `benchmark`: Colored MNIST's for `seed` and `fairdd`, FairDD's Table 7 for `cmnist-bg`,
/// none for the others.
pub fn references(benchmark: debiasdd_cmnist::Preset) -> Vec<Reference> {
    use debiasdd_cmnist::Preset;
    match benchmark {
        Preset::Seed | Preset::Fairdd => colored_mnist_references(),
        Preset::CmnistBg => {
            let setting = "FairDD Table 7, C-MNIST (BG), ipc 10, width 128, 1000 iterations; 10 ConvNets, 300 epochs";
            [(MatchMode::Class, 65.9), (MatchMode::ClassVsGroups, 90.8)]
                .into_iter()
                .map(|(mode, accuracy)| Reference {
                    method: dc(mode),
                    ratio: 0.1,
                    accuracy,
                    setting,
                })
                .collect()
        }
        Preset::Grey | Preset::CfmnistFg | Preset::CfmnistBg => Vec::new(),
    }
}

fn colored_mnist_references() -> Vec<Reference> {
    let mut refs = Vec::new();
    let lff =
        "LfF Colored MNIST, full data (DeNetDM, NeurIPS 2024); their network and training differ";
    for (ratio, erm, best) in [
        (0.005, 35.3, 74.7),
        (0.01, 50.3, 85.2),
        (0.02, 62.3, 89.3),
        (0.05, 77.6, 93.5),
    ] {
        refs.push(Reference {
            method: Method::Baseline(Sampling::Shuffle),
            ratio,
            accuracy: erm,
            setting: lff,
        });
        refs.push(Reference {
            method: Method::Baseline(Sampling::GroupBalanced),
            ratio,
            accuracy: best,
            setting: "best full-data debiasing (DeNetDM), not balanced ERM; an upper reference",
        });
    }
    let fairdd = "FairDD protocol (ReBias palette, binarised digits, 60k train), ipc 10, width 128, 1000 iterations";
    refs.push(Reference {
        method: dc(MatchMode::Class),
        ratio: 0.1,
        accuracy: 71.4,
        setting: fairdd,
    });
    refs.push(Reference {
        method: dc(MatchMode::ClassVsGroups),
        ratio: 0.1,
        accuracy: 90.6,
        setting: fairdd,
    });
    let fairdd_dm = "FairDD protocol (ReBias palette, binarised digits, 60k train), ipc 10, width 128, DM's 20,000 iterations";
    for (mode, accuracy) in [(MatchMode::Class, 25.0), (MatchMode::ClassVsGroups, 94.6)] {
        refs.push(Reference {
            method: Method::Distill(Distilled::annotated(MethodKind::Dm, mode)),
            ratio: 0.1,
            accuracy,
            setting: fairdd_dm,
        });
    }
    let small = "official DC code, width 32, loops 5/10, real batch 64 per class or group, 20 iterations; 2 ConvNets, 300 epochs";
    refs.push(Reference {
        method: dc(MatchMode::Class),
        ratio: 0.01,
        accuracy: 28.7,
        setting: small,
    });
    refs.push(Reference {
        method: dc(MatchMode::Group),
        ratio: 0.01,
        accuracy: 73.7,
        setting: small,
    });
    refs
}

/// Rewrites `results.json`, `results.md` and the figures from the finished cells.
pub fn write(config: &ReproduceConfig, paths: &Paths) -> Result<(), ReproduceError> {
    let cells = collect(config, paths)?;
    let finished: Vec<String> = cells.iter().map(|c| c.id.clone()).collect();
    let pending: Vec<String> = plan(config)
        .iter()
        .map(|c| c.id())
        .filter(|id| !finished.contains(id))
        .collect();
    let summary = summarise(config, &cells)?;
    let figures = figures::write_all(config, paths, &cells, &summary)?;
    let markdown = markdown(config, paths, &cells, &summary, &pending, &figures);
    let results = Results {
        format: RESULTS_FORMAT.to_owned(),
        config: config.clone(),
        pending,
        cells,
        summary,
    };
    write_json(&paths.out.join("results.json"), &results)?;
    write_atomic(&paths.out.join("results.md"), markdown.as_bytes())
}

fn fmt_stat(stat: Option<&Stat>) -> String {
    match stat {
        Some(s) => format!("{:.1} ± {:.1}", s.mean, s.std),
        None => "n/a".to_owned(),
    }
}

fn ratio_header(config: &ReproduceConfig) -> String {
    let mut s = "| method |".to_owned();
    for r in &config.ratios {
        let _ = write!(s, " {r} |");
    }
    s.push_str("\n|---|");
    for _ in &config.ratios {
        s.push_str("---:|");
    }
    s.push('\n');
    s
}

/// The markdown report.
fn markdown(
    config: &ReproduceConfig,
    paths: &Paths,
    cells: &[CellResult],
    summary: &[MethodSummary],
    pending: &[String],
    figures: &figures::Written,
) -> String {
    let mut md = String::new();
    let total = cells.len() + pending.len();
    let compute: f64 = cells
        .iter()
        .map(|c| c.produce_seconds + c.eval_seconds)
        .sum();
    let on = match &config.data {
        Some(file) => format!(
            "`{}`",
            file.path.file_stem().unwrap_or_default().to_string_lossy()
        ),
        None if config.cmnist.preset == debiasdd_cmnist::Preset::Seed => "Colored MNIST".into(),
        None => format!("`{}`", config.cmnist.preset.name()),
    };
    let _ = writeln!(
        md,
        "# Debiased dataset distillation on {on}: preset `{}`\n",
        config.preset
    );
    let _ = writeln!(
        md,
        "Written by `{}`. {} of {total} cells done{}; {:.1} min of \
         distillation and evaluation in all.\n",
        command_line(config),
        cells.len(),
        if pending.is_empty() {
            String::new()
        } else {
            format!(" ({} pending, listed in results.json)", pending.len())
        },
        compute / 60.0
    );
    // One sentence per method of the grid, from its class- and group-wise configs.
    let mut methods: Vec<MethodKind> = Vec::new();
    for d in config.distillations() {
        if !methods.contains(&d.method) {
            methods.push(d.method);
        }
    }
    let distillation: Vec<String> = methods
        .iter()
        .map(|&method| {
            let of = |mode| config.distill_config(Distilled::annotated(method, mode), 0);
            let (d, dg) = (of(MatchMode::Class), of(MatchMode::Group));
            format!(
                "Distillation ({}): ipc {}, width {}, {}, {} iterations from {} init, real batch {} \
                 per class ({} per group in the group-based modes), {}.",
                method.label(),
                d.settings.ipc,
                d.settings.model.width,
                d.method.describe(),
                d.settings.iterations,
                d.settings.init,
                d.settings.batch_real,
                dg.settings.batch_real,
                if d.settings.dsa.is_some() {
                    "DSA"
                } else {
                    "no DSA"
                },
            )
        })
        .collect();
    let mut distillation = distillation;
    if config
        .distillations
        .iter()
        .any(|d| !d.groups.is_annotated())
    {
        let i = &config.infer;
        distillation.push(format!(
            "Inferred groups: a bias model (ConvNet of width {}, GCE q {}, {} epochs, SGD lr {}) \
             per ratio and seed, {} cross-fitting folds, grouping `{}`.",
            model_width(&i.model),
            i.q,
            i.epochs,
            i.sgd.lr,
            i.folds,
            i.method.name()
        ));
    }
    let baselines = if config.baselines {
        format!(
            " Full-data baselines: {} of width {}, {} over the train split.",
            count(config.baseline.n_models, "ConvNet", "ConvNets"),
            model_width(&config.baseline.model),
            count(config.baseline.train.epochs + 1, "pass", "passes"),
        )
    } else {
        " No full-data baselines.".to_owned()
    };
    let data = match &config.data {
        Some(file) => format!("dataset file `{}`", file.path.display()),
        None => format!(
            "Colored MNIST preset `{}` ({} train images; the ratio is the share of \
             bias-conflicting images per class)",
            config.cmnist.preset.name(),
            config.cmnist.train_size
        ),
    };
    let _ = writeln!(
        md,
        "Settings: {data}; seeds {:?}. {} Distilled sets and random subsets \
         of the same size are scored by {} of width {} trained for E = {} epochs (E + 1 passes, \
         as DC counts), augmentation: {}.{} Mean ± std over every network of every seed; all numbers on the \
         unbiased test split.\n",
        config.seeds,
        distillation.join(" "),
        count(config.eval.n_models, "ConvNet", "ConvNets"),
        model_width(&config.eval.model),
        config.eval.train.epochs,
        config.eval.train.augment.describe(),
        baselines,
    );
    let lookup: BTreeMap<(String, String), &MethodSummary> = summary
        .iter()
        .map(|s| ((s.method.slug(), s.ratio.to_string()), s))
        .collect();
    type Pick = fn(&MetricSummary) -> Option<&Stat>;
    let tables: [(&str, Pick); 4] = [
        ("Unbiased test accuracy (%)", |s| Some(&s.accuracy)),
        ("Bias-conflicting accuracy (%)", |s| {
            s.conflicting_accuracy.as_ref()
        }),
        ("Worst-group accuracy (%)", |s| {
            Some(&s.worst_group_accuracy)
        }),
        (
            "DEO_M (%, max gap between groups of a class; lower is fairer)",
            |s| Some(&s.deo_max),
        ),
    ];
    for (title, pick) in tables {
        let _ = writeln!(md, "## {title}\n");
        md.push_str(&ratio_header(config));
        for method in Method::all(config) {
            let _ = write!(md, "| {} |", method.label());
            for r in &config.ratios {
                let cell = lookup
                    .get(&(method.slug(), r.to_string()))
                    .map_or("—".to_owned(), |s| fmt_stat(pick(&s.summary)));
                let _ = write!(md, " {cell} |");
            }
            md.push('\n');
        }
        md.push('\n');
    }

    md.push_str("## Published numbers next to ours (unbiased accuracy, %)\n\n");
    md.push_str(
        "| ratio | method | published | ours | published setting |\n|---:|---|---:|---:|---|\n",
    );
    for r in references(config.cmnist.preset) {
        if !config.ratios.contains(&r.ratio) || !Method::all(config).contains(&r.method) {
            continue;
        }
        let ours = lookup
            .get(&(r.method.slug(), r.ratio.to_string()))
            .map_or("—".to_owned(), |s| fmt_stat(Some(&s.summary.accuracy)));
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {ours} | {} |",
            r.ratio,
            r.method.label(),
            r.accuracy,
            r.setting
        );
    }
    md.push_str(
        "\nNo published number uses exactly this grid's settings: read the comparison as a \
         sanity check of magnitudes, not as a reproduction of a table.\n\n",
    );

    inferred_section(&mut md, config, paths);

    md.push_str("## Figures\n\n");
    for (ratio, method, columns, file) in &figures.synthetic {
        let _ = writeln!(
            md,
            "Ratio {ratio}, {method}'s synthetic sets side by side ({}; rows = classes):\n\n![]({file})\n",
            columns.join(" | ")
        );
    }
    for (title, file) in &figures.plots {
        let _ = writeln!(md, "{title}:\n\n![]({file})\n");
    }
    if !figures.heatmaps.is_empty() {
        let _ = writeln!(
            md,
            "Per-group test accuracy at ratio {} (rows = digits, columns = colours; the diagonal \
             is bias-aligned):\n",
            figures.heatmap_ratio
        );
        md.push_str("| method | heat map |\n|---|---|\n");
        for (label, file) in &figures.heatmaps {
            let _ = writeln!(md, "| {label} | ![]({file}) |");
        }
        md.push('\n');
    }

    md.push_str("## Time per cell\n\n| cell | train set (s) | evaluation (s) |\n|---|---:|---:|\n");
    for c in cells {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} |",
            c.id, c.produce_seconds, c.eval_seconds
        );
    }
    md
}

/// How the inferred groups of each (ratio, seed) agree with the annotations: the reports the
/// runner wrote beside the inferred datasets.
fn inferred_section(md: &mut String, config: &ReproduceConfig, paths: &Paths) {
    let mut rows = Vec::new();
    let mut unreadable = Vec::new();
    for &ratio in &config.ratios {
        for &seed in &config.seeds {
            match read_inferred_report(paths, ratio, seed) {
                Ok(Some(report)) => rows.push((ratio, seed, report)),
                Ok(None) => {}
                Err(e) => unreadable.push(e.to_string()),
            }
        }
    }
    if rows.is_empty() && unreadable.is_empty() {
        return;
    }
    md.push_str(
        "## Inferred groups\n\nThe rows \"inferred groups\" distil over groups inferred from the \
         class labels alone: a bias model (GCE, cross-fitted) per (ratio, seed); the annotations \
         are only compared against. Bias label: share of train images whose inferred attribute \
         names their annotated one (on all / on the bias-conflicting ones); ARI: adjusted Rand \
         index of inferred vs annotated groups; precision and recall of the flagged \
         bias-conflicting images.\n\n\
         | ratio | seed | method | bias label (%) | on conflicting (%) | ARI | precision (%) | recall (%) | held-out acc. (%) | time (s) |\n\
         |---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let opt = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1}"));
    for (ratio, seed, r) in rows {
        let a = r.agreement.as_ref();
        let _ = writeln!(
            md,
            "| {ratio} | {seed} | {} | {} | {} | {} | {} | {} | {:.1} | {:.0} |",
            r.method.name(),
            opt(a.map(|a| a.bias_label_accuracy)),
            opt(a.and_then(|a| a.bias_label_accuracy_conflicting)),
            a.map_or("n/a".to_owned(), |a| format!(
                "{:.3}",
                a.adjusted_rand_index
            )),
            opt(a.and_then(|a| a.conflicting_precision)),
            opt(a.and_then(|a| a.conflicting_recall)),
            r.held_out_accuracy,
            r.seconds
        );
    }
    for problem in unreadable {
        let _ = writeln!(
            md,
            "\nLeft out: {problem}; delete it to infer that ratio again."
        );
    }
    md.push('\n');
}

/// The `cargo xtask reproduce` command that gives this grid: the preset, plus the benchmark,
/// the dataset file, the ratios and the kept methods and strata where they differ from it.
fn command_line(config: &ReproduceConfig) -> String {
    let preset = ReproduceConfig::preset(config.preset);
    let mut cmd = format!("cargo xtask reproduce --preset {}", config.preset);
    let join = |items: Vec<String>| items.join(",");
    match &config.data {
        Some(file) => {
            let _ = write!(cmd, " --data {}", file.path.display());
        }
        None => {
            if config.cmnist.preset != debiasdd_cmnist::Preset::Seed {
                let _ = write!(cmd, " --benchmark {}", config.cmnist.preset.name());
            }
            if config.ratios != preset.ratios {
                let _ = write!(
                    cmd,
                    " --ratios {}",
                    join(config.ratios.iter().map(f64::to_string).collect())
                );
            }
        }
    }
    if config.distillations != preset.distillations {
        let mut methods: Vec<MethodKind> = Vec::new();
        let mut modes: Vec<MatchMode> = Vec::new();
        for d in &config.distillations {
            if !methods.contains(&d.method) {
                methods.push(d.method);
            }
            if !modes.contains(&d.mode) {
                modes.push(d.mode);
            }
        }
        let _ = write!(
            cmd,
            " --methods {} --modes {}",
            join(methods.iter().map(|m| m.name().to_owned()).collect()),
            join(modes.iter().map(|m| m.name().to_owned()).collect())
        );
    }
    if config.seeds != preset.seeds {
        let _ = write!(
            cmd,
            " --seeds {}",
            join(config.seeds.iter().map(u64::to_string).collect())
        );
    }
    cmd
}

fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn model_width(model: &debiasdd_model::ModelConfig) -> String {
    match model {
        debiasdd_model::ModelConfig::ConvNet(c) => c.width.to_string(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ReproducePreset;

    #[test]
    fn the_written_by_line_gives_back_the_grid() {
        let mut config = ReproduceConfig::preset(ReproducePreset::Quick);
        assert_eq!(
            command_line(&config),
            "cargo xtask reproduce --preset quick"
        );
        config.ratios = vec![0.01, 0.05];
        config.retain(None, Some(&[MatchMode::Group]));
        config.cmnist.preset = debiasdd_cmnist::Preset::CmnistBg;
        assert_eq!(
            command_line(&config),
            "cargo xtask reproduce --preset quick --benchmark cmnist-bg --ratios 0.01,0.05 \
             --methods dc,dm --modes group"
        );
    }
}
