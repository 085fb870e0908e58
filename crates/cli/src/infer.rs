//! `debiasdd infer-groups`: a dataset with class labels only (or with annotations to check
//! against) in, the same dataset with inferred train groups out, plus a report (stdout, JSON,
//! heat map). The work is `debiasdd_infer`'s.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use debiasdd_infer::{GroupingMethod, InferConfig, InferOverrides, InferProgress, InferReport};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct InferArgs {
    /// Dataset file from `debiasdd generate` or `debiasdd import` (its train split's groups are
    /// inferred; annotations, if any, are only compared against).
    #[arg(long)]
    data: PathBuf,
    /// Where to write the dataset with inferred train groups (valid and test unchanged).
    #[arg(long)]
    out: PathBuf,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the contingency heat map (annotated attribute x inferred attribute; classes x
    /// inferred attribute without annotations) as PNG.
    #[arg(long)]
    heatmap: Option<PathBuf>,
    /// auto (prediction unless the bias model flags under --min-conflicting-share, then
    /// kmeans), prediction (pseudo-attribute = predicted class), kmeans (on the bias model's
    /// features, per class) or jtt (aligned vs conflicting).
    #[arg(long, default_value = "auto")]
    method: GroupingMethod,
    /// Clusters per class for kmeans [2].
    #[arg(long)]
    clusters: Option<usize>,
    /// Passes of each bias model over its training folds [2].
    #[arg(long)]
    epochs: Option<usize>,
    /// Cross-fitting folds [2].
    #[arg(long)]
    folds: Option<usize>,
    /// GCE's q [0.7, LfF's].
    #[arg(long)]
    q: Option<f64>,
    /// SGD learning rate of the bias model [0.05].
    #[arg(long)]
    lr: Option<f64>,
    /// Width of the bias model's ConvNet [16].
    #[arg(long)]
    width: Option<usize>,
    /// Least share of flagged conflicting images for auto to keep prediction [0.001].
    #[arg(long)]
    min_conflicting_share: Option<f64>,
    /// cpu, cuda[:N] or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: InferArgs) -> anyhow::Result<()> {
    let device = debiasdd_model::device::parse_device(&args.device)?;
    let data = debiasdd_data::file::load(&args.data)?;
    let config = InferConfig {
        method: args.method,
        seed: args.seed,
        ..InferConfig::default()
    }
    .with_overrides(&InferOverrides {
        width: args.width,
        clusters: args.clusters,
        epochs: args.epochs,
        folds: args.folds,
        q: args.q,
        lr: args.lr,
        min_conflicting_share: args.min_conflicting_share,
    });
    let bar = ProgressBar::new((config.folds * config.epochs) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} epochs  {msg}  (ETA {eta})",
        )
        .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    let inference = debiasdd_infer::infer_groups(&data, &config, &device, &mut |p| match p {
        InferProgress::Epoch {
            fold,
            folds,
            epoch,
            epochs,
            loss,
            accuracy,
        } => {
            bar.inc(1);
            bar.set_message(format!(
                "bias model {}/{folds}  epoch {}/{epochs}  GCE {loss:.4}  train acc {accuracy:.1}%",
                fold + 1,
                epoch + 1
            ));
        }
        InferProgress::Judged { fold, folds } => {
            bar.set_message(format!("fold {}/{folds} judged", fold + 1));
        }
    });
    bar.finish_and_clear();
    let inference = inference?;
    let report = &inference.report;
    debiasdd_data::file::save(&inference.data, &args.out)?;
    print_summary(report);
    println!("dataset: {}", args.out.display());
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(report).expect("report serialises");
        debiasdd_data::write_atomically(path, json.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("report:  {}", path.display());
    }
    if let Some(path) = &args.heatmap {
        report.write_heatmap(path, data.info.attribute_colours.as_deref())?;
        println!("heat map: {}", path.display());
    }
    Ok(())
}

fn print_summary(report: &InferReport) {
    println!(
        "inferred groups: {} ({}), {} train images in {} groups ({} empty), {} flagged conflicting, {:.0} s",
        report.method.name(),
        report.reason,
        report.train_images,
        report
            .group_counts
            .iter()
            .flatten()
            .filter(|&&k| k > 0)
            .count(),
        report.empty_groups,
        report.flagged_conflicting,
        report.seconds
    );
    println!(
        "bias models: held-out accuracy on the classes {:.1} % (chance {:.1} %)",
        report.held_out_accuracy, report.chance_accuracy
    );
    if report.empty_groups > 0 {
        println!(
            "note: {} inferred groups are empty; group-wise distillation matches no term for \
             them and leaves their synthetic images at their initialisation",
            report.empty_groups
        );
    }
    if !report.classes_with_one_group.is_empty() {
        println!(
            "warning: classes {:?} have one inferred group only: group-wise distillation \
             treats them class-wise",
            report.classes_with_one_group
        );
    }
    match &report.agreement {
        Some(a) => {
            let opt = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1} %"));
            println!(
                "agreement with the annotations ({} images, {} conflicting): bias label {:.1} % \
                 (conflicting {}), ARI {:.3}, conflicting precision {} recall {}",
                a.compared,
                a.conflicting,
                a.bias_label_accuracy,
                opt(a.bias_label_accuracy_conflicting),
                a.adjusted_rand_index,
                opt(a.conflicting_precision),
                opt(a.conflicting_recall)
            );
        }
        None => println!("agreement: the train split has no annotations to compare with"),
    }
}
