//! The training protocol end to end on tiny generated data: it learns, it is deterministic, it
//! reports divergence, and group-balanced sampling changes what is learned.

use candle_core::Device;
use debiasdd_cmnist::source::write_synthetic_source;
use debiasdd_cmnist::{ColoredMnistConfig, GreySource, Preset, SourceKind, Verification};
use debiasdd_data::{Dataset, ImageSet, Normalization};
use debiasdd_eval::EvalError;
use debiasdd_eval::augment::Augment;
use debiasdd_eval::evaluate::{EvalConfig, evaluate};
use debiasdd_eval::train::{Sampling, TrainConfig};
use debiasdd_model::{ConvNetConfig, ModelConfig};

fn tiny_cmnist(ratio: f64) -> Dataset {
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_source(dir.path(), 600, 200).unwrap();
    let source = GreySource::load(dir.path(), SourceKind::Mnist, Verification::Skip).unwrap();
    let config = ColoredMnistConfig {
        train_size: 500,
        valid_size: 100,
        ..ColoredMnistConfig::new(Preset::Seed, ratio, 0)
    };
    debiasdd_cmnist::build(&source, &config).unwrap()
}

fn small_config(epochs: usize, augment: Augment) -> EvalConfig {
    EvalConfig {
        model: ModelConfig::ConvNet(ConvNetConfig {
            width: 8,
            depth: 2,
            ..ConvNetConfig::default()
        }),
        train: TrainConfig {
            epochs,
            batch_size: 64,
            augment,
            ..TrainConfig::dc(false)
        },
        n_models: 1,
        seed: 3,
    }
}

#[test]
fn a_small_convnet_learns_the_synthetic_digits() -> anyhow::Result<()> {
    let data = tiny_cmnist(0.5);
    let train = ImageSet::from_split(&data.train);
    let norm = Normalization::of_split(&data.train);
    let mut epochs_seen = 0;
    let report = evaluate(
        &train,
        &norm,
        &data,
        &small_config(6, Augment::None),
        &Device::Cpu,
        &mut |p| {
            if let debiasdd_eval::evaluate::EvalProgress::Epoch { .. } = p {
                epochs_seen += 1;
            }
        },
    )?;
    assert_eq!(epochs_seen, 7, "E = 6 means 7 passes, as the DC code");
    let acc = report.summary.accuracy.mean;
    // The synthetic digits are bars at class-dependent columns: easy, but not before training.
    assert!(acc > 90.0, "test accuracy {acc}");
    assert!(
        report.runs[0].final_train_loss < 0.5,
        "{:?}",
        report.runs[0]
    );
    Ok(())
}

#[test]
fn same_seed_same_report() -> anyhow::Result<()> {
    let data = tiny_cmnist(0.2);
    let train = ImageSet::from_split(&data.train).subset(&(0..120).collect::<Vec<_>>());
    let norm = Normalization::of_split(&data.train);
    let config = small_config(1, Augment::default());
    let a = evaluate(&train, &norm, &data, &config, &Device::Cpu, &mut |_| {})?;
    let b = evaluate(&train, &norm, &data, &config, &Device::Cpu, &mut |_| {})?;
    assert_eq!(a.runs[0].metrics, b.runs[0].metrics);
    assert_eq!(a.runs[0].final_train_loss, b.runs[0].final_train_loss);
    let other = EvalConfig { seed: 4, ..config };
    let c = evaluate(&train, &norm, &data, &other, &Device::Cpu, &mut |_| {})?;
    assert_ne!(a.runs[0].final_train_loss, c.runs[0].final_train_loss);
    Ok(())
}

#[test]
fn divergence_is_an_error_not_a_number() {
    let data = tiny_cmnist(0.2);
    let train = ImageSet::from_split(&data.train).subset(&(0..64).collect::<Vec<_>>());
    let norm = Normalization::of_split(&data.train);
    let mut config = small_config(3, Augment::None);
    config.train.sgd.lr = 1e12;
    let err = evaluate(&train, &norm, &data, &config, &Device::Cpu, &mut |_| {}).unwrap_err();
    assert!(matches!(err, EvalError::NonFiniteLoss { .. }), "{err}");
    assert!(err.to_string().contains("lower the learning rate"));
}

#[test]
fn bad_settings_are_refused_before_training() {
    let data = tiny_cmnist(0.2);
    let train = ImageSet::from_split(&data.train);
    let norm = Normalization::of_split(&data.train);
    let mut config = small_config(1, Augment::None);
    config.n_models = 0;
    let err = evaluate(&train, &norm, &data, &config, &Device::Cpu, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("--models"), "{err}");
    let mut config = small_config(1, Augment::None);
    config.train.batch_size = 0;
    assert!(matches!(
        evaluate(&train, &norm, &data, &config, &Device::Cpu, &mut |_| {}),
        Err(EvalError::InvalidConfig(_))
    ));
    let mut no_groups = train.subset(&[0, 1, 2]);
    no_groups.groups[1] = None;
    let mut config = small_config(1, Augment::None);
    config.train.sampling = Sampling::GroupBalanced;
    assert!(matches!(
        evaluate(&no_groups, &norm, &data, &config, &Device::Cpu, &mut |_| {}),
        Err(EvalError::MissingGroups)
    ));
}

#[test]
fn a_break_from_the_callback_stops_the_evaluation() {
    use std::ops::ControlFlow;

    use debiasdd_eval::evaluate::{EvalProgress, evaluate_until};

    let data = tiny_cmnist(0.2);
    let train = ImageSet::from_split(&data.train).subset(&(0..64).collect::<Vec<_>>());
    let norm = Normalization::of_split(&data.train);
    let mut config = small_config(50, Augment::None);
    config.n_models = 3;
    let mut epochs = Vec::new();
    let err = evaluate_until(&train, &norm, &data, &config, &Device::Cpu, &mut |p| {
        if let EvalProgress::Epoch { model, report, .. } = p {
            epochs.push((model, report.epoch));
            if report.epoch == 2 {
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(matches!(err, EvalError::Stopped), "{err}");
    // Stopped in the first model's third epoch: nothing after it ran.
    assert_eq!(epochs, [(0, 0), (0, 1), (0, 2)]);
}
