//! Progress bars and summaries for evaluations (rendering only; the work is in debiasdd-eval).

use std::time::Duration;

use debiasdd_eval::evaluate::{EvalProgress, EvalReport};
use indicatif::{ProgressBar, ProgressStyle};

/// One bar over all epochs of all models: `model k/K  epoch e/E  loss  acc`.
pub struct EvalBar {
    bar: ProgressBar,
}

impl EvalBar {
    pub fn new(n_models: usize, epochs_per_model: usize) -> Self {
        let bar = ProgressBar::new((n_models * (epochs_per_model + 1)) as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} epochs  {msg}  (ETA {eta})",
            )
            .expect("valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(250));
        Self { bar }
    }

    pub fn update(&self, progress: EvalProgress<'_>) {
        match progress {
            EvalProgress::Epoch {
                model,
                n_models,
                report,
            } => {
                self.bar.inc(1);
                self.bar.set_message(format!(
                    "model {}/{n_models}  epoch {}/{}  loss {:.4}  train acc {:.1}%  lr {}",
                    model + 1,
                    report.epoch,
                    report.epochs,
                    report.loss,
                    report.accuracy,
                    report.lr
                ));
                tracing::debug!(
                    model,
                    epoch = report.epoch,
                    loss = report.loss,
                    acc = report.accuracy
                );
            }
            EvalProgress::Scored { run, n_models } => {
                let m = &run.metrics;
                self.bar.println(format!(
                    "model {}/{n_models}: test acc {:.2}%  worst group {:.2}%  ({:.0} s)",
                    run.index + 1,
                    m.accuracy,
                    m.worst_group_accuracy,
                    run.train_seconds
                ));
            }
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn opt(stat: Option<debiasdd_eval::metrics::Stat>) -> String {
    stat.map_or_else(
        || "n/a".into(),
        |s| format!("{:.2} +- {:.2}", s.mean, s.std),
    )
}

/// The summary table printed after an evaluation.
pub fn print_summary(report: &EvalReport) {
    let s = &report.summary;
    println!(
        "{} models trained on {} images, tested on {} (mean +- std, %):",
        s.n_runs, report.n_train, report.n_test
    );
    println!(
        "  accuracy             {:.2} +- {:.2}",
        s.accuracy.mean, s.accuracy.std
    );
    println!("  aligned accuracy     {}", opt(s.aligned_accuracy));
    println!("  conflicting accuracy {}", opt(s.conflicting_accuracy));
    println!(
        "  worst-group accuracy {:.2} +- {:.2}",
        s.worst_group_accuracy.mean, s.worst_group_accuracy.std
    );
    println!(
        "  DEO_M                {:.2} +- {:.2}",
        s.deo_max.mean, s.deo_max.std
    );
    println!(
        "  DEO_A                {:.2} +- {:.2}",
        s.deo_mean.mean, s.deo_mean.std
    );
}
