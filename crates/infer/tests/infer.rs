//! Group inference end to end on tiny generated Colored MNIST: it finds the colours without being
//! told, it is deterministic, the output is a dataset whose train groups are the inferred ones,
//! and bad input gets a message that names the fix.

use candle_core::Device;
use debiasdd_data::{Dataset, DatasetInfo, ImageShape, Split};
use debiasdd_infer::{GroupingMethod, InferConfig, InferError, infer_groups};
use debiasdd_model::{ConvNetConfig, ModelConfig};

/// Ten classes, ten colours: every image is a random pattern in its colour, class `k`
/// mostly in colour `k`; `conflicting` of every 100 images of a class in another colour. The
/// colour is all there is to learn, so a working bias model recovers it exactly: what these
/// tests check is the machinery (cross-fitting, grouping, mapping, report, output). That GCE
/// prefers colour over shape is measured on real MNIST (README, and the real-data test).
fn coloured_noise(n: usize, conflicting: usize) -> Dataset {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let shape = ImageShape::new(3, 16, 16).unwrap();
    let palette = debiasdd_cmnist::colored::LFF_PALETTE.to_vec();
    let mut info = DatasetInfo::new(
        "coloured-noise",
        shape,
        (0..10).map(|c| format!("digit {c}")).collect(),
        (0..10).map(|c| format!("colour {c}")).collect(),
    )
    .unwrap();
    info.aligned = (0..10).map(Some).collect();
    info.attribute_colours = Some(palette.clone());
    let mut split = |n: usize, conflicting: usize| {
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        let attributes: Vec<Option<u8>> = (0..n)
            .map(|i| {
                let class = (i % 10) as u8;
                // Image i is the (i / 10)-th of its class; the first `conflicting` of every
                // 100 per class take the next colours round.
                let k = (i / 10) % 100;
                Some(if k < conflicting {
                    (class + 1 + (k % 9) as u8) % 10
                } else {
                    class
                })
            })
            .collect();
        let mut images = Vec::with_capacity(n * shape.numel());
        for a in &attributes {
            let rgb = palette[usize::from(a.unwrap())];
            // A random intensity pattern in the image's colour (instance norm would erase a
            // flat colour).
            let pattern: Vec<f32> = (0..256).map(|_| rng.random_range(0.2..1.0)).collect();
            for channel in rgb {
                images.extend(pattern.iter().map(|&u| (f32::from(channel) * u) as u8));
            }
        }
        Split::new(shape, info.spec(), images, labels, attributes).unwrap()
    };
    let train = split(n, conflicting);
    let test = split(200, 90);
    Dataset::new(info.clone(), train, Split::empty(shape, info.spec()), test).unwrap()
}

fn small(method: GroupingMethod) -> InferConfig {
    InferConfig {
        model: ModelConfig::ConvNet(ConvNetConfig {
            width: 8,
            depth: 2,
            ..ConvNetConfig::default()
        }),
        epochs: 4,
        batch_size: 32,
        sgd: debiasdd_model::SgdConfig {
            lr: 0.05,
            ..InferConfig::default().sgd
        },
        method,
        seed: 5,
        ..InferConfig::default()
    }
}

#[test]
fn finds_the_colours_from_the_class_labels_alone() -> anyhow::Result<()> {
    let data = coloured_noise(1000, 10);
    let inference = infer_groups(
        &data,
        &small(GroupingMethod::Auto),
        &Device::Cpu,
        &mut |_| {},
    )?;
    let report = &inference.report;
    assert_eq!(
        report.method,
        GroupingMethod::Prediction,
        "{}",
        report.reason
    );
    let a = report.agreement.as_ref().expect("the data is annotated");
    assert_eq!((a.compared, a.conflicting), (1000, 100));
    // Held out, a conflicting image is judged by its colour, so its inferred attribute names
    // its annotated one (chance: 10 %). Four epochs of a width-8 model on 500 images leave
    // some colours confused (measured: 88 % / 89 %).
    assert!(a.bias_label_accuracy > 80.0, "{a:?}");
    assert!(
        a.bias_label_accuracy_conflicting.expect("conflicting") > 80.0,
        "{a:?}"
    );
    assert!(a.conflicting_recall.expect("conflicting") > 90.0, "{a:?}");
    assert!(a.adjusted_rand_index > 0.8, "{a:?}");
    assert_eq!(
        report.flagged_conflicting,
        (0..1000)
            .filter(|&i| inference.data.train.attributes[i] != Some(data.train.labels[i]))
            .count()
    );

    // The output: inferred train groups, annotations kept apart, valid and test untouched.
    let out = &inference.data;
    let inferred = out.info.inferred.as_ref().expect("marked inferred");
    assert_eq!(inferred.attributes.len(), 10);
    assert_eq!(out.train.spec.n_attributes(), 10);
    assert_eq!(
        out.true_train_attributes.as_deref(),
        Some(&data.train.attributes[..])
    );
    assert_eq!(out.test, data.test);
    assert_eq!(out.train.images, data.train.images);
    assert_eq!(out.aligned_attributes(), data.aligned_attributes());
    let counts: usize = report.group_counts.iter().flatten().sum();
    assert_eq!(counts, 1000);

    // Saved and loaded, it is the same dataset.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("inferred.safetensors");
    debiasdd_data::file::save(out, &path)?;
    assert_eq!(&debiasdd_data::file::load(&path)?, out);
    Ok(())
}

#[test]
fn the_same_seed_gives_the_same_groups_and_report() -> anyhow::Result<()> {
    let data = coloured_noise(600, 20);
    let config = InferConfig {
        epochs: 1,
        ..small(GroupingMethod::Kmeans)
    };
    let run = |seed| {
        let config = InferConfig {
            seed,
            ..config.clone()
        };
        infer_groups(&data, &config, &Device::Cpu, &mut |_| {})
    };
    let (a, b, other) = (run(1)?, run(1)?, run(2)?);
    assert_eq!(a.data, b.data);
    assert_eq!(a.report.folds, b.report.folds);
    assert_ne!(
        a.report.folds, other.report.folds,
        "the seed reaches the folds and the bias models"
    );
    assert_eq!(a.report.method, GroupingMethod::Kmeans);
    assert!(
        a.data
            .train
            .attributes
            .iter()
            .all(|a| a.is_some_and(|a| a < 2)),
        "k = 2"
    );
    Ok(())
}

#[test]
fn jtt_splits_each_class_into_right_and_wrong() -> anyhow::Result<()> {
    let data = coloured_noise(1000, 10);
    let inference = infer_groups(
        &data,
        &small(GroupingMethod::Jtt),
        &Device::Cpu,
        &mut |_| {},
    )?;
    let report = &inference.report;
    assert_eq!(report.attributes.len(), 2);
    let wrong: usize = report.group_counts.iter().map(|row| row[1]).sum();
    assert_eq!(wrong, report.flagged_conflicting);
    let a = report.agreement.as_ref().expect("annotated");
    assert!(
        a.conflicting_recall.expect("conflicting") > 90.0,
        "the conflicting are predicted wrongly: {a:?}"
    );
    // Each inferred group stands for its majority annotation: the aligned colour for group 0;
    // group 1 mixes nine colours and its majority names one of them, so most conflicting
    // images are "wrong" by construction.
    assert!(
        a.bias_label_accuracy_conflicting.expect("conflicting") < 50.0,
        "{a:?}"
    );
    Ok(())
}

/// A split of `n` blank images, labels cycling over `classes`, no attribute.
fn blank(n: usize, classes: usize) -> Dataset {
    let shape = ImageShape::new(3, 28, 28).unwrap();
    let info = DatasetInfo::new(
        "blank",
        shape,
        (0..classes).map(|c| format!("c{c}")).collect(),
        vec!["unknown".into()],
    )
    .unwrap();
    let labels: Vec<u8> = (0..n).map(|i| (i % classes) as u8).collect();
    let split = Split::new(
        shape,
        info.spec(),
        vec![0; n * shape.numel()],
        labels,
        vec![None; n],
    )
    .unwrap();
    Dataset::new(info, split.clone(), Split::empty(shape, split.spec), split).unwrap()
}

#[test]
fn bad_input_is_named() {
    let config = InferConfig {
        epochs: 1,
        ..small(GroupingMethod::Auto)
    };
    let err = infer_groups(&blank(20, 1), &config, &Device::Cpu, &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, InferError::TooFewClasses { classes: 1 }),
        "{err}"
    );

    // Identical images: nothing to learn, the bias model stays at chance.
    let err = infer_groups(&blank(60, 3), &config, &Device::Cpu, &mut |_| {}).unwrap_err();
    assert!(matches!(err, InferError::BiasModelAtChance { .. }), "{err}");
    assert!(err.to_string().contains("--epochs"), "{err}");

    let err = infer_groups(
        &blank(60, 3),
        &InferConfig {
            folds: 1,
            ..config.clone()
        },
        &Device::Cpu,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("`folds`"), "{err}");
    let err = infer_groups(
        &blank(60, 3),
        &InferConfig {
            q: 1.5,
            ..config.clone()
        },
        &Device::Cpu,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("`q`"), "{err}");
}

#[test]
fn a_break_from_the_callback_stops_the_inference() {
    use std::ops::ControlFlow;

    use debiasdd_infer::{InferProgress, infer_groups_until};

    let data = coloured_noise(600, 20);
    let config = InferConfig {
        epochs: 5,
        ..small(GroupingMethod::Prediction)
    };
    let mut seen = Vec::new();
    let err = infer_groups_until(&data, &config, &Device::Cpu, &mut |p| {
        if let InferProgress::Epoch { fold, epoch, .. } = p {
            seen.push((fold, epoch));
            if epoch == 1 {
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(matches!(err, InferError::Stopped), "{err}");
    assert_eq!(seen, [(0, 0), (0, 1)]);
}
