//! Groups without group labels: infer a biased dataset's (class, bias attribute) groups from its
//! class labels alone, so that group-wise distillation can debias it.
//!
//! The recipe ([`infer_groups`]):
//!
//! 1. **Bias model** ([`bias_model`]): a ConvNet trained on the class labels with LfF's
//!    generalised cross-entropy (q = 0.7), which rewards what is easy to predict and so locks
//!    onto the shortcut (a colour, a background). It is never told what the bias is.
//! 2. **Cross-fitting**: the train split is cut into class-stratified folds; each fold is judged
//!    by a model trained on the others, so a minority image the model memorised is never called
//!    aligned by that model.
//! 3. **Grouping** ([`GroupingMethod`]): the pseudo-attribute of an image is the class its bias
//!    model predicts (groups = (class, predicted class)); when the bias model flags almost
//!    nothing as conflicting (it learned the classes themselves) `auto` falls back to k-means on
//!    its features per class ([`kmeans`]); JTT's aligned / conflicting split is a third choice.
//!    The choice and its reason are reported.
//! 4. **Report** ([`InferReport`]): inferred-group counts and, when the data has annotations,
//!    their agreement with them ([`agreement`]); the heat map ([`heatmap`]).
//!
//! The result is the same dataset with the train split's groups replaced
//! ([`debiasdd_data::Dataset::with_inferred_train_groups`]); the annotations are kept apart for
//! the report, valid and test keep theirs for the evaluator.
//!
//! Sits on the data layer and the model crate, beside the evaluator and the distillation engine.

pub mod agreement;
pub mod bias_model;
pub mod config;
pub mod error;
pub mod heatmap;
pub mod kmeans;

use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::Device;
use debiasdd_data::{Dataset, ImageSet, InferredGroups, Normalization};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use agreement::Agreement;
pub use config::{GroupingMethod, InferConfig, InferOverrides};
pub use error::InferError;

/// One random stream per purpose, all from the config's seed.
#[derive(Clone, Copy)]
enum Stream {
    Folds = 0,
    Kmeans = 1,
    /// Fold `f`'s bias model uses stream `Model + f`.
    Model = 16,
}

fn stream(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// What inference reports while it runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InferProgress {
    /// Fold `fold`'s bias model finished an epoch.
    Epoch {
        fold: usize,
        folds: usize,
        epoch: usize,
        epochs: usize,
        loss: f64,
        accuracy: f64,
    },
    /// Fold `fold`'s held-out images were judged by its bias model.
    Judged { fold: usize, folds: usize },
}

/// One fold of the cross-fitting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FoldReport {
    /// Images the fold's bias model trained on (the other folds).
    pub trained_on: usize,
    /// Images it judged (this fold).
    pub judged: usize,
    /// Its accuracy on the class labels of the judged images, percent.
    pub held_out_accuracy: f64,
    /// Its GCE loss and train accuracy in the last epoch.
    pub last_loss: f64,
    pub last_train_accuracy: f64,
}

/// Everything inference found, for people (the CLI prints it) and files (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferReport {
    /// The method that formed the groups and why it was chosen (`config.method` is the one
    /// asked for).
    pub method: GroupingMethod,
    pub reason: String,
    pub config: InferConfig,
    pub train_images: usize,
    pub classes: Vec<String>,
    /// The inferred attributes' names.
    pub attributes: Vec<String>,
    /// Train images per inferred group: `group_counts[class][attribute]`.
    pub group_counts: Vec<Vec<usize>>,
    pub empty_groups: usize,
    /// Classes whose images all fell into one inferred group (group-wise = class-wise there).
    pub classes_with_one_group: Vec<usize>,
    /// Images the inference calls bias-conflicting.
    pub flagged_conflicting: usize,
    pub folds: Vec<FoldReport>,
    /// Held-out accuracy of the bias models on the class labels, and chance (largest class).
    pub held_out_accuracy: f64,
    pub chance_accuracy: f64,
    /// Agreement with the annotations, when the train split had some.
    pub agreement: Option<Agreement>,
    /// Rows: annotated attribute when there is an agreement, else class; columns: inferred
    /// attribute.
    pub contingency: Vec<Vec<usize>>,
    pub seconds: f64,
}

/// The dataset with inferred train groups, and the report.
#[derive(Debug, Clone)]
pub struct Inference {
    pub data: Dataset,
    pub report: InferReport,
}

/// Infers the train split's groups of `data` from its class labels (see the crate docs). The
/// annotated train attributes, if any, are read only for the report.
pub fn infer_groups(
    data: &Dataset,
    config: &InferConfig,
    device: &Device,
    progress: &mut dyn FnMut(InferProgress),
) -> Result<Inference, InferError> {
    infer_groups_until(data, config, device, &mut |p| {
        progress(p);
        ControlFlow::Continue(())
    })
}

/// [`infer_groups`] whose `progress` may stop it after any epoch or fold with
/// `ControlFlow::Break` (an interrupt): the inference then ends with [`InferError::Stopped`].
pub fn infer_groups_until(
    data: &Dataset,
    config: &InferConfig,
    device: &Device,
    progress: &mut dyn FnMut(InferProgress) -> ControlFlow<()>,
) -> Result<Inference, InferError> {
    let started = Instant::now();
    config.validate()?;
    let labels = &data.train.labels;
    let n_classes = data.info.classes.len();
    let mut class_members: Vec<Vec<usize>> = vec![Vec::new(); n_classes];
    for (i, &l) in labels.iter().enumerate() {
        class_members[usize::from(l)].push(i);
    }
    let present = class_members.iter().filter(|m| !m.is_empty()).count();
    if present < 2 {
        return Err(InferError::TooFewClasses { classes: present });
    }
    for (class, members) in class_members.iter().enumerate() {
        if !members.is_empty() && members.len() < config.folds {
            return Err(InferError::ClassTooSmall {
                class,
                count: members.len(),
                folds: config.folds,
            });
        }
    }

    // The bias model sees images and class labels only: the attributes are blanked.
    let mut blind = ImageSet::from_split(&data.train);
    blind.groups = vec![None; blind.len()];
    let norm = Normalization::of_split(&data.train);

    // Class-stratified folds.
    let mut fold_of = vec![0usize; labels.len()];
    let mut rng = stream(config.seed, Stream::Folds as u64);
    for members in &class_members {
        let mut shuffled = members.clone();
        shuffled.shuffle(&mut rng);
        for (j, &i) in shuffled.iter().enumerate() {
            fold_of[i] = j % config.folds;
        }
    }

    let n = labels.len();
    let mut predicted = vec![0u8; n];
    let mut features: Vec<f32> = Vec::new();
    let mut feature_dim = 0;
    let mut folds = Vec::with_capacity(config.folds);
    for fold in 0..config.folds {
        let train_idx: Vec<usize> = (0..n).filter(|&i| fold_of[i] != fold).collect();
        let judged_idx: Vec<usize> = (0..n).filter(|&i| fold_of[i] == fold).collect();
        let mut last = (f64::NAN, f64::NAN);
        let net = bias_model::train_bias_model(
            &blind.subset(&train_idx),
            &norm,
            config,
            fold,
            rand::Rng::random(&mut stream(config.seed, Stream::Model as u64 + fold as u64)),
            device,
            &mut |epoch, loss, accuracy| {
                last = (loss, accuracy);
                progress(InferProgress::Epoch {
                    fold,
                    folds: config.folds,
                    epoch,
                    epochs: config.epochs,
                    loss,
                    accuracy,
                })
            },
        )?;
        let verdicts = bias_model::judge(&net, &blind.subset(&judged_idx), &norm)?;
        if features.is_empty() {
            feature_dim = verdicts.feature_dim;
            features = vec![0f32; n * feature_dim];
        }
        let mut right = 0;
        for (k, &i) in judged_idx.iter().enumerate() {
            predicted[i] = verdicts.predicted[k];
            right += usize::from(verdicts.predicted[k] == labels[i]);
            features[i * feature_dim..(i + 1) * feature_dim]
                .copy_from_slice(&verdicts.features[k * feature_dim..(k + 1) * feature_dim]);
        }
        folds.push(FoldReport {
            trained_on: train_idx.len(),
            judged: judged_idx.len(),
            held_out_accuracy: 100.0 * right as f64 / judged_idx.len().max(1) as f64,
            last_loss: last.0,
            last_train_accuracy: last.1,
        });
        if progress(InferProgress::Judged {
            fold,
            folds: config.folds,
        })
        .is_break()
        {
            return Err(InferError::Stopped);
        }
    }

    let right = (0..n).filter(|&i| predicted[i] == labels[i]).count();
    let held_out_accuracy = 100.0 * right as f64 / n as f64;
    let chance_accuracy =
        100.0 * class_members.iter().map(Vec::len).max().unwrap_or(0) as f64 / n as f64;
    if held_out_accuracy <= chance_accuracy + 1.0 {
        return Err(InferError::BiasModelAtChance {
            accuracy: held_out_accuracy,
            chance: chance_accuracy,
        });
    }
    let wrong: Vec<bool> = (0..n).map(|i| predicted[i] != labels[i]).collect();
    let flagged_by_prediction = n - right;
    let share = flagged_by_prediction as f64 / n as f64;
    let (method, reason) = match config.method {
        GroupingMethod::Auto if share >= config.min_conflicting_share => (
            GroupingMethod::Prediction,
            format!(
                "auto: the bias models flag {:.2} % of the train images as conflicting \
                 (prediction != label), at least the {:.2} % needed to trust their predictions",
                100.0 * share,
                100.0 * config.min_conflicting_share
            ),
        ),
        GroupingMethod::Auto => (
            GroupingMethod::Kmeans,
            format!(
                "auto: the bias models flag only {:.3} % of the train images as conflicting \
                 (under {:.2} %): they learned the classes themselves, or see no bias; \
                 k-means (k = {}) on their features per class instead",
                100.0 * share,
                100.0 * config.min_conflicting_share,
                config.clusters
            ),
        ),
        chosen => (chosen, format!("{} as requested", chosen.name())),
    };

    let (attributes, names, flagged): (Vec<u8>, Vec<String>, Vec<bool>) = match method {
        GroupingMethod::Prediction | GroupingMethod::Auto => (
            predicted.clone(),
            data.info
                .classes
                .iter()
                .map(|c| format!("looks like {c}"))
                .collect(),
            wrong,
        ),
        GroupingMethod::Jtt => (
            wrong.iter().map(|&w| u8::from(w)).collect(),
            vec![
                "aligned (bias model right)".into(),
                "conflicting (bias model wrong)".into(),
            ],
            wrong,
        ),
        GroupingMethod::Kmeans => {
            let mut rng = stream(config.seed, Stream::Kmeans as u64);
            let mut attributes = vec![0u8; n];
            for members in &class_members {
                let points: Vec<f32> = members
                    .iter()
                    .flat_map(|&i| {
                        features[i * feature_dim..(i + 1) * feature_dim]
                            .iter()
                            .copied()
                    })
                    .collect();
                let clusters =
                    kmeans::kmeans(&points, feature_dim.max(1), config.clusters, &mut rng);
                for (&i, c) in members.iter().zip(clusters) {
                    attributes[i] = c;
                }
            }
            let flagged = attributes.iter().map(|&a| a != 0).collect();
            (
                attributes,
                (0..config.clusters)
                    .map(|c| format!("cluster {c}"))
                    .collect(),
                flagged,
            )
        }
    };
    let n_inferred = names.len();
    let mut group_counts = vec![vec![0usize; n_inferred]; n_classes];
    for (&l, &a) in labels.iter().zip(&attributes) {
        group_counts[usize::from(l)][usize::from(a)] += 1;
    }
    let empty_groups = group_counts
        .iter()
        .enumerate()
        .filter(|(c, _)| !class_members[*c].is_empty())
        .map(|(_, row)| row.iter().filter(|&&k| k == 0).count())
        .sum();
    let classes_with_one_group: Vec<usize> = (0..n_classes)
        .filter(|&c| {
            !class_members[c].is_empty() && group_counts[c].iter().filter(|&&k| k > 0).count() == 1
        })
        .collect();
    if classes_with_one_group.len() == present {
        return Err(InferError::NoSplit {
            reason: format!(
                "{} put every image of a class into one group (the bias models flag {} of {n} \
                 images as conflicting)",
                method.name(),
                flagged_by_prediction
            ),
        });
    }

    let annotated = data.annotated_train_attributes();
    let n_annotated = data.info.attributes.len();
    let aligned = data.aligned_attributes();
    // Majority annotated attribute of each inferred group.
    let mut votes = vec![vec![0usize; n_annotated]; n_classes * n_inferred];
    for i in 0..n {
        if let Some(t) = annotated[i] {
            votes[usize::from(labels[i]) * n_inferred + usize::from(attributes[i])]
                [usize::from(t)] += 1;
        }
    }
    let majority = |class: u8, a: u8| -> Option<u8> {
        let row = &votes[usize::from(class) * n_inferred + usize::from(a)];
        let best = *row.iter().max()?;
        (best > 0).then(|| row.iter().position(|&v| v == best).expect("max") as u8)
    };
    // A predicted class stands for the attribute that class is biased towards.
    let mapping = |class: u8, a: u8| -> Option<u8> {
        match method {
            GroupingMethod::Prediction => aligned[usize::from(a)].or_else(|| majority(class, a)),
            _ => majority(class, a),
        }
    };
    let agreement = agreement::agreement(agreement::Compared {
        labels,
        inferred: &attributes,
        flagged: &flagged,
        annotated,
        aligned: &aligned,
        mapping: &mapping,
        n_inferred,
        n_annotated,
    });
    let rows_annotated = agreement.is_some();
    let rows = if rows_annotated {
        n_annotated
    } else {
        n_classes
    };
    let mut contingency = vec![vec![0usize; n_inferred]; rows];
    for i in 0..n {
        let row = if rows_annotated {
            annotated[i].map(usize::from)
        } else {
            Some(usize::from(labels[i]))
        };
        if let Some(r) = row {
            contingency[r][usize::from(attributes[i])] += 1;
        }
    }

    let report = InferReport {
        method,
        reason,
        config: config.clone(),
        train_images: n,
        classes: data.info.classes.clone(),
        attributes: names.clone(),
        group_counts,
        empty_groups,
        classes_with_one_group,
        flagged_conflicting: flagged.iter().filter(|&&f| f).count(),
        folds,
        held_out_accuracy,
        chance_accuracy,
        agreement,
        contingency,
        seconds: started.elapsed().as_secs_f64(),
    };
    let method_json = serde_json::json!({
        "inference": "bias-model-gce",
        "method": report.method,
        "reason": report.reason,
        "config": report.config,
        "held_out_accuracy": report.held_out_accuracy,
        "flagged_conflicting": report.flagged_conflicting,
        "agreement": report.agreement,
    });
    let inferred = InferredGroups {
        attributes: names,
        method: method_json.to_string(),
    };
    let data = data
        .clone()
        .with_inferred_train_groups(inferred, attributes.into_iter().map(Some).collect())?;
    Ok(Inference { data, report })
}

impl InferReport {
    /// Whether the contingency rows are annotated attributes (else classes).
    pub fn rows_are_annotated(&self) -> bool {
        self.agreement.is_some()
    }

    /// Writes the contingency heat map ([`heatmap`]) as a PNG; `attribute_colours` (the
    /// dataset's, one per annotated attribute) are drawn beside the rows when the rows are
    /// annotated attributes.
    pub fn write_heatmap(
        &self,
        path: &std::path::Path,
        attribute_colours: Option<&[[u8; 3]]>,
    ) -> Result<(), InferError> {
        let rows = self.contingency.len();
        let columns = self.contingency.first().map_or(0, Vec::len);
        let colours = attribute_colours.filter(|_| self.rows_are_annotated());
        heatmap::write(path, &self.contingency.concat(), rows, columns, colours)
    }
}
