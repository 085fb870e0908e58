//! Networks and layers: hand-computed forward passes, output shapes, parameter names and counts,
//! initialisation statistics and determinism, config validation and parsing, weight files.

use anyhow::{Result, ensure};
use candle_core::{DType, Device, Module, Tensor, Var};
use debiasdd_model::config::GROUP_NORM_GROUPS;
use debiasdd_model::layers::{BatchNorm2d, GroupNorm, LayerNorm, activate, pool2d};
use debiasdd_model::{
    Activation, ConvNetConfig, LeNetConfig, MlpConfig, ModelConfig, ModelError, Network, Norm,
    Pooling,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const CPU: Device = Device::Cpu;

fn build(config: impl Into<ModelConfig>, seed: u64) -> Result<Network> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Ok(Network::new(&config.into(), &mut rng, &CPU, DType::F32)?)
}

fn flat(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?)
}

fn assert_close(actual: &[f64], expected: &[f64], tolerance: f64) -> Result<()> {
    ensure!(actual.len() == expected.len(), "{actual:?} vs {expected:?}");
    for (a, e) in actual.iter().zip(expected) {
        ensure!((a - e).abs() <= tolerance, "{actual:?} vs {expected:?}");
    }
    Ok(())
}

// ----- hand-computed forward passes -----

#[test]
fn instance_norm_by_hand() -> Result<()> {
    // Channel 0: [1, 2, 3, 4], mean 2.5, biased variance 1.25.
    // Channel 1: [0, 0, 0, 8], mean 2, biased variance (4 + 4 + 4 + 36) / 4 = 12.
    let xs = Tensor::new(&[[[[1f64, 2.], [3., 4.]], [[0., 0.], [0., 8.]]]], &CPU)?;
    let norm = GroupNorm::new(2, 2, &CPU, DType::F64)?;
    let (s0, s1) = ((1.25f64 + 1e-5).sqrt(), (12f64 + 1e-5).sqrt());
    let unit = [
        -1.5 / s0,
        -0.5 / s0,
        0.5 / s0,
        1.5 / s0,
        -2. / s1,
        -2. / s1,
        -2. / s1,
        6. / s1,
    ];
    assert_close(&flat(&norm.forward(&xs)?)?, &unit, 1e-12)?;

    // Affine: per-channel weight (2, 3) and bias (0.5, -1).
    norm.weight().set(&Tensor::new(&[2f64, 3.], &CPU)?)?;
    norm.bias().set(&Tensor::new(&[0.5f64, -1.], &CPU)?)?;
    let affine: Vec<f64> = unit
        .iter()
        .enumerate()
        .map(|(i, u)| if i < 4 { 2. * u + 0.5 } else { 3. * u - 1. })
        .collect();
    assert_close(&flat(&norm.forward(&xs)?)?, &affine, 1e-12)
}

#[test]
fn group_and_layer_norm_agree_on_one_group() -> Result<()> {
    // One group over (C, H, W) is layer norm with unit affine: all 8 values [1,2,3,4,0,0,0,8]
    // have mean 2.25 and biased variance
    // (1.5625 + 0.0625 + 0.5625 + 3.0625 + 3 * 5.0625 + 33.0625) / 8 = 6.6875.
    let xs = Tensor::new(&[[[[1f64, 2.], [3., 4.]], [[0., 0.], [0., 8.]]]], &CPU)?;
    let s = (6.6875f64 + 1e-5).sqrt();
    let expected: Vec<f64> = [1., 2., 3., 4., 0., 0., 0., 8.]
        .iter()
        .map(|x| (x - 2.25) / s)
        .collect();
    let group = GroupNorm::new(1, 2, &CPU, DType::F64)?;
    let layer = LayerNorm::new(2, 2, &CPU, DType::F64)?;
    assert_close(&flat(&group.forward(&xs)?)?, &expected, 1e-12)?;
    assert_close(&flat(&layer.forward(&xs)?)?, &expected, 1e-12)?;
    ensure!(GroupNorm::new(3, 4, &CPU, DType::F64).is_err());
    Ok(())
}

#[test]
fn batch_norm_by_hand() -> Result<()> {
    // One channel, values [1, 3, 5, 7] over batch and width: mean 4, biased variance 5,
    // unbiased 20/3.
    let xs = Tensor::new(&[[[[1f64, 3.]]], [[[5., 7.]]]], &CPU)?;
    let norm = BatchNorm2d::new(1, &CPU, DType::F64)?;
    let s = (5f64 + 1e-5).sqrt();
    let train = norm_forward(&norm, &xs, true)?;
    assert_close(&train, &[-3. / s, -1. / s, 1. / s, 3. / s], 1e-12)?;
    // Running statistics: 0.9 * 0 + 0.1 * 4 and 0.9 * 1 + 0.1 * 20/3.
    let (mean, var) = (0.4, 0.9 + 2. / 3.);
    assert_close(&flat(norm.running_mean())?, &[mean], 1e-12)?;
    assert_close(&flat(norm.running_var())?, &[var], 1e-12)?;
    let eval = norm_forward(&norm, &xs, false)?;
    let s = (var + 1e-5).sqrt();
    let expected: Vec<f64> = [1., 3., 5., 7.].iter().map(|x| (x - mean) / s).collect();
    assert_close(&eval, &expected, 1e-12)?;
    // Evaluation leaves the running statistics alone.
    assert_close(&flat(norm.running_mean())?, &[mean], 1e-12)?;
    Ok(())
}

fn norm_forward(norm: &BatchNorm2d, xs: &Tensor, train: bool) -> Result<Vec<f64>> {
    let layer = debiasdd_model::layers::Norm2d::Batch(norm.clone());
    flat(&layer.forward_t(xs, train)?)
}

#[test]
fn pooling_by_hand() -> Result<()> {
    let x4 = Tensor::arange(0f64, 16., &CPU)?.reshape((1, 1, 4, 4))?;
    assert_close(
        &flat(&pool2d(&x4, Pooling::Avg)?)?,
        &[2.5, 4.5, 10.5, 12.5],
        0.,
    )?;
    assert_close(&flat(&pool2d(&x4, Pooling::Max)?)?, &[5., 7., 13., 15.], 0.)?;
    assert_close(&flat(&pool2d(&x4, Pooling::None)?)?, &flat(&x4)?, 0.)?;
    // 5x5: the last row and column are dropped, as PyTorch does.
    let x5 = Tensor::arange(0f64, 25., &CPU)?.reshape((1, 1, 5, 5))?;
    assert_close(&flat(&pool2d(&x5, Pooling::Avg)?)?, &[3., 5., 13., 15.], 0.)?;
    assert_close(&flat(&pool2d(&x5, Pooling::Max)?)?, &[6., 8., 16., 18.], 0.)?;
    Ok(())
}

#[test]
fn max_pooling_gradient_goes_to_one_element() -> Result<()> {
    // A unique maximum gets the whole gradient (candle's max_pool2d gives it a quarter) ...
    let x = Var::from_vec(vec![1f64, 4., 2., 3.], (1, 1, 2, 2), &CPU)?;
    let grads = pool2d(&x, Pooling::Max)?.sum_all()?.backward()?;
    assert_close(&flat(grads.get(&x).unwrap())?, &[0., 1., 0., 0.], 0.)?;
    // ... and of tied maxima only the first, in row-major order, as PyTorch.
    let x = Var::from_vec(vec![1f64, 5., 5., 5.], (1, 1, 2, 2), &CPU)?;
    let grads = pool2d(&x, Pooling::Max)?.sum_all()?.backward()?;
    assert_close(&flat(grads.get(&x).unwrap())?, &[0., 1., 0., 0.], 0.)
}

#[test]
fn activations_by_hand() -> Result<()> {
    let xs = Tensor::new(&[-2f64, 0., 1.], &CPU)?;
    let sig = |x: f64| 1. / (1. + (-x).exp());
    let cases = [
        (Activation::Relu, [0., 0., 1.]),
        (Activation::LeakyRelu, [-0.02, 0., 1.]),
        (Activation::Sigmoid, [sig(-2.), 0.5, sig(1.)]),
        (Activation::Swish, [-2. * sig(-2.), 0., sig(1.)]),
    ];
    for (activation, expected) in cases {
        assert_close(&flat(&activate(&xs, activation)?)?, &expected, 1e-12)?;
    }
    Ok(())
}

// ----- shapes, names, counts -----

#[test]
fn default_convnet_layout() -> Result<()> {
    let config = ConvNetConfig::default();
    assert_eq!(config.block_sizes(), [32, 16, 8]);
    assert_eq!(config.output_size(), 4);
    assert_eq!(config.feature_dim(), 2048);
    let net = build(config, 0)?;
    let expected_count =
        128 * 3 * 9 + 128 + 2 * 128 + (128 * 128 * 9 + 128 + 2 * 128) * 2 + 2048 * 10 + 10;
    assert_eq!(net.n_parameters(), expected_count);
    assert_eq!(net.n_parameters(), 320_010);

    let layout: Vec<(String, Vec<usize>)> = net
        .parameters()
        .into_iter()
        .map(|(name, var)| (name, var.dims().to_vec()))
        .collect();
    let mut expected = Vec::new();
    for (d, c_in) in [(0, 3), (1, 128), (2, 128)] {
        expected.push((format!("features.{d}.conv.weight"), vec![128, c_in, 3, 3]));
        expected.push((format!("features.{d}.conv.bias"), vec![128]));
        expected.push((format!("features.{d}.norm.weight"), vec![128]));
        expected.push((format!("features.{d}.norm.bias"), vec![128]));
    }
    expected.push(("classifier.weight".to_owned(), vec![10, 2048]));
    expected.push(("classifier.bias".to_owned(), vec![10]));
    assert_eq!(layout, expected);
    assert!(net.buffers().is_empty());

    let images = Tensor::zeros((2, 3, 28, 28), DType::F32, &CPU)?;
    assert_eq!(net.forward_t(&images, true)?.dims(), [2, 10]);
    assert_eq!(net.embed(&images, false)?.dims(), [2, 2048]);
    // Wrong input shapes are refused with the expected shape in the message.
    let wrong = Tensor::zeros((2, 1, 28, 28), DType::F32, &CPU)?;
    let message = net.forward_t(&wrong, true).unwrap_err().to_string();
    assert!(message.contains("(N, 3, 28, 28)"), "{message}");
    Ok(())
}

#[test]
fn every_convnet_config_has_the_right_shapes() -> Result<()> {
    for &norm in Norm::ALL {
        for &pooling in Pooling::ALL {
            for &activation in Activation::ALL {
                for (in_channels, image_size, depth) in [(3, 28, 3), (1, 16, 2), (3, 32, 1)] {
                    let config = ConvNetConfig {
                        in_channels,
                        image_size,
                        n_classes: 7,
                        width: 8,
                        depth,
                        norm,
                        activation,
                        pooling,
                    };
                    let net = build(config.clone(), 1)?;
                    let images =
                        Tensor::ones((2, in_channels, image_size, image_size), DType::F32, &CPU)?;
                    for train in [true, false] {
                        let logits = net.forward_t(&images, train)?;
                        assert_eq!(logits.dims(), [2, 7], "{config:?}");
                    }
                    assert_eq!(net.embed(&images, true)?.dims(), [2, config.feature_dim()]);
                    let names: Vec<String> = net.parameters().into_iter().map(|(n, _)| n).collect();
                    let per_block = if norm == Norm::None { 2 } else { 4 };
                    assert_eq!(names.len(), depth * per_block + 2, "{config:?}");
                    assert_eq!(
                        net.buffers().len(),
                        if norm == Norm::Batch { 2 * depth } else { 0 }
                    );
                    if norm == Norm::Layer {
                        let s = config.block_sizes()[0];
                        assert_eq!(net.parameters()[2].1.dims(), [8, s, s]);
                    }
                }
            }
        }
    }
    // Pooling none keeps the size: 28 -> 32 throughout.
    let flat_net = ConvNetConfig {
        pooling: Pooling::None,
        ..ConvNetConfig::default()
    };
    assert_eq!(flat_net.feature_dim(), 128 * 32 * 32);
    Ok(())
}

/// Inference logits (the native kernels where they apply, else `forward_t`) equal the
/// evaluation-mode forward pass for every ConvNet config and the other networks, and carry no
/// gradient tracking.
#[test]
fn predict_logits_equal_the_eval_forward() -> Result<()> {
    let images = Tensor::rand(0f32, 1., (3, 3, 28, 28), &CPU)?;
    let mut configs: Vec<ModelConfig> =
        vec![MlpConfig::default().into(), LeNetConfig::default().into()];
    for &norm in Norm::ALL {
        for &pooling in Pooling::ALL {
            for &activation in Activation::ALL {
                configs.push(
                    ConvNetConfig {
                        width: 8,
                        depth: 2,
                        norm,
                        activation,
                        pooling,
                        ..ConvNetConfig::default()
                    }
                    .into(),
                );
            }
        }
    }
    for (i, config) in configs.iter().enumerate() {
        let net = build(config.clone(), i as u64)?;
        let ours = net.predict_logits(&images)?;
        ensure!(!ours.track_op(), "{config:?}: tracked logits");
        let theirs = net.forward_t(&images, false)?;
        let scale = flat(&theirs)?.iter().fold(1f64, |m, v| m.max(v.abs()));
        assert_close(&flat(&ours)?, &flat(&theirs)?, 1e-5 * scale)
            .map_err(|e| e.context(format!("{config:?}")))?;
    }
    Ok(())
}

#[test]
fn mlp_and_lenet_shapes() -> Result<()> {
    let mlp = build(MlpConfig::default(), 2)?;
    let images = Tensor::ones((4, 3, 28, 28), DType::F32, &CPU)?;
    assert_eq!(mlp.forward_t(&images, true)?.dims(), [4, 10]);
    assert_eq!(
        mlp.n_parameters(),
        (3 * 28 * 28 * 128 + 128) + (128 * 128 + 128) + (128 * 10 + 10)
    );
    let names: Vec<String> = mlp.parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "fc_1.weight",
            "fc_1.bias",
            "fc_2.weight",
            "fc_2.bias",
            "fc_3.weight",
            "fc_3.bias"
        ]
    );

    for (in_channels, image_size) in [(3, 28), (1, 28), (1, 32), (3, 32)] {
        let config = LeNetConfig {
            in_channels,
            image_size,
            n_classes: 10,
        };
        assert_eq!(config.feature_dim(), 16 * 5 * 5);
        let lenet = build(config, 3)?;
        let images = Tensor::ones((2, in_channels, image_size, image_size), DType::F32, &CPU)?;
        assert_eq!(lenet.forward_t(&images, true)?.dims(), [2, 10]);
        assert_eq!(lenet.embed(&images, true)?.dims(), [2, 84]);
        let expected = (6 * in_channels * 25 + 6)
            + (16 * 6 * 25 + 16)
            + (400 * 120 + 120)
            + (120 * 84 + 84)
            + (84 * 10 + 10);
        assert_eq!(lenet.n_parameters(), expected);
    }
    Ok(())
}

// ----- initialisation -----

#[test]
fn init_follows_pytorch_defaults() -> Result<()> {
    let net = build(ConvNetConfig::default(), 7)?;
    for (name, var) in net.parameters() {
        let values = flat(&var)?;
        let n = values.len() as f64;
        if name.contains(".norm.") {
            let expected = if name.ends_with("weight") { 1. } else { 0. };
            ensure!(values.iter().all(|&v| v == expected), "{name}");
            continue;
        }
        // Conv and linear: weight (out, fan_in...) and bias share U(-1/sqrt(fan_in), +).
        let fan_in: usize = if name.ends_with("weight") {
            var.dims()[1..].iter().product()
        } else {
            let weight = name.replace("bias", "weight");
            let (_, w) = net
                .parameters()
                .into_iter()
                .find(|(n, _)| *n == weight)
                .unwrap();
            w.dims()[1..].iter().product()
        };
        let bound = 1. / (fan_in as f64).sqrt();
        let (min, max) = values
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        ensure!(
            min >= -bound && max <= bound,
            "{name}: [{min}, {max}] outside ±{bound}"
        );
        let mean = values.iter().sum::<f64>() / n;
        let var_hat = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let expected = bound * bound / 3.;
        // The variance estimate of a uniform has relative standard error sqrt(0.8 / n): 1.5% for
        // the smallest weight (3456 values), 8% for a 128-element bias; allow 3.5 of them (5.3%
        // for that weight, 1.4% for the 2048 x 10 classifier).
        let tolerance = 3.5 * (0.8 / n).sqrt();
        ensure!(
            (var_hat / expected - 1.).abs() < tolerance,
            "{name}: variance {var_hat:e}, expected {expected:e} (±{:.1}%)",
            100. * tolerance
        );
        ensure!(
            mean.abs() < 4. * (expected / n).sqrt(),
            "{name}: mean {mean}"
        );
        // Bounds are those of PyTorch: for the default ConvNet the first conv's is 1/sqrt(27).
        if name == "features.0.conv.weight" {
            ensure!((bound - 1. / 27f64.sqrt()).abs() < 1e-15);
        }
    }
    Ok(())
}

#[test]
fn init_is_deterministic_in_the_seed() -> Result<()> {
    let weights = |net: &Network| -> Result<Vec<Vec<f64>>> {
        net.parameters().iter().map(|(_, v)| flat(v)).collect()
    };
    let config = ConvNetConfig {
        width: 16,
        ..ConvNetConfig::default()
    };
    let a = weights(&build(config.clone(), 42)?)?;
    let b = weights(&build(config.clone(), 42)?)?;
    let c = weights(&build(config.clone(), 43)?)?;
    assert_eq!(a, b);
    for ((x, z), (name, _)) in a.iter().zip(&c).zip(build(config.clone(), 0)?.parameters()) {
        if !name.contains(".norm.") {
            assert_ne!(x, z, "{name}");
        }
    }
    // f64 and f32 networks from one seed hold the same values up to f32 rounding.
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let f64_net = Network::new(&config.into(), &mut rng, &CPU, DType::F64)?;
    for (x, y) in a.iter().zip(weights(&f64_net)?) {
        for (p, q) in x.iter().zip(y) {
            ensure!((p - q).abs() <= 1e-7 * q.abs().max(1e-3));
        }
    }
    Ok(())
}

// ----- configs -----

fn err(config: impl Into<ModelConfig>) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    match Network::new(&config.into(), &mut rng, &CPU, DType::F32) {
        Ok(_) => panic!("config accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn invalid_configs_are_refused() {
    let d = ConvNetConfig::default;
    let message = err(ConvNetConfig { width: 0, ..d() });
    assert_eq!(message, "convnet: `width` must be at least 1, got 0");
    assert!(err(ConvNetConfig { depth: 0, ..d() }).contains("`depth`"));
    assert!(
        err(ConvNetConfig {
            n_classes: 0,
            ..d()
        })
        .contains("`n_classes`")
    );
    assert!(
        err(ConvNetConfig {
            in_channels: 0,
            ..d()
        })
        .contains("`in_channels`")
    );
    // 28 -> 32 halves 5 times to 1; a sixth block is one too many.
    assert!(
        Network::new(
            &ConvNetConfig {
                depth: 5,
                width: 4,
                ..d()
            }
            .into(),
            &mut ChaCha8Rng::seed_from_u64(0),
            &CPU,
            DType::F32
        )
        .is_ok()
    );
    let message = err(ConvNetConfig { depth: 6, ..d() });
    assert!(
        message.contains("depth 6 is too deep for 28x28") && message.contains("at most 5"),
        "{message}"
    );
    assert!(
        err(ConvNetConfig {
            image_size: 3,
            depth: 2,
            ..d()
        })
        .contains("at most 1")
    );
    // Without pooling any depth fits.
    assert!(
        ConvNetConfig {
            depth: 10,
            pooling: Pooling::None,
            ..d()
        }
        .validate()
        .is_ok()
    );
    let message = err(ConvNetConfig {
        width: 6,
        norm: Norm::Group,
        ..d()
    });
    assert!(
        message.contains(&format!("multiple of {GROUP_NORM_GROUPS}")),
        "{message}"
    );

    assert!(
        err(MlpConfig {
            hidden: 0,
            ..MlpConfig::default()
        })
        .contains("mlp: `hidden`")
    );
    let message = err(LeNetConfig {
        image_size: 8,
        ..LeNetConfig::default()
    });
    assert!(
        message.contains("lenet: 8x8 input is too small"),
        "{message}"
    );
    assert!(
        LeNetConfig {
            image_size: 16,
            ..LeNetConfig::default()
        }
        .validate()
        .is_ok()
    );

    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let e = Network::new(&ModelConfig::default(), &mut rng, &CPU, DType::U8).unwrap_err();
    assert!(matches!(e, ModelError::UnsupportedDType(DType::U8)));
}

#[test]
fn enums_parse_from_cli_strings() -> Result<()> {
    assert_eq!("instance".parse::<Norm>()?, Norm::Instance);
    assert_eq!("InstanceNorm".parse::<Norm>()?, Norm::Instance);
    assert_eq!("batchnorm".parse::<Norm>()?, Norm::Batch);
    assert_eq!("none".parse::<Norm>()?, Norm::None);
    assert_eq!("leakyrelu".parse::<Activation>()?, Activation::LeakyRelu);
    assert_eq!("leaky-relu".parse::<Activation>()?, Activation::LeakyRelu);
    assert_eq!("maxpooling".parse::<Pooling>()?, Pooling::Max);
    for &n in Norm::ALL {
        assert_eq!(n.to_string().parse::<Norm>()?, n);
    }
    for &a in Activation::ALL {
        assert_eq!(a.to_string().parse::<Activation>()?, a);
    }
    for &p in Pooling::ALL {
        assert_eq!(p.to_string().parse::<Pooling>()?, p);
    }
    let message = "fancy".parse::<Norm>().unwrap_err().to_string();
    assert_eq!(
        message,
        "unknown norm `fancy`; expected one of: instance batch layer group none "
    );
    Ok(())
}

#[test]
fn configs_round_trip_through_json() -> Result<()> {
    let partial: ModelConfig = serde_json::from_str(
        r#"{"kind": "convnet", "width": 32, "norm": "batch", "activation": "leaky-relu"}"#,
    )?;
    let expected = ModelConfig::ConvNet(ConvNetConfig {
        width: 32,
        norm: Norm::Batch,
        activation: Activation::LeakyRelu,
        ..ConvNetConfig::default()
    });
    assert_eq!(partial, expected);
    for config in [
        ModelConfig::default(),
        expected,
        MlpConfig::default().into(),
        LeNetConfig {
            in_channels: 1,
            image_size: 32,
            n_classes: 10,
        }
        .into(),
    ] {
        let json = serde_json::to_string(&config)?;
        assert_eq!(
            serde_json::from_str::<ModelConfig>(&json)?,
            config,
            "{json}"
        );
    }
    assert_eq!(
        serde_json::to_value(ModelConfig::default())?["kind"],
        "convnet"
    );
    assert!(serde_json::from_str::<ModelConfig>(r#"{"kind": "convnet", "widht": 32}"#).is_err());
    assert!(serde_json::from_str::<ModelConfig>(r#"{"kind": "resnet"}"#).is_err());
    Ok(())
}

// ----- weight files -----

#[test]
fn weights_round_trip_through_safetensors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("net.safetensors");
    let config = ConvNetConfig {
        width: 8,
        norm: Norm::Batch,
        ..ConvNetConfig::default()
    };
    let a = build(config.clone(), 1)?;
    let images = Tensor::randn(0f32, 1., (4, 3, 28, 28), &CPU)?;
    a.forward_t(&images, true)?; // non-trivial running statistics
    a.save(&path)?;

    let mut b = build(config.clone(), 2)?;
    ensure!(flat(&a.forward_t(&images, false)?)? != flat(&b.forward_t(&images, false)?)?);
    b.load_weights(&path)?;
    for ((na, va), (nb, vb)) in a
        .parameters()
        .into_iter()
        .chain(a.buffers())
        .zip(b.parameters().into_iter().chain(b.buffers()))
    {
        assert_eq!(na, nb);
        assert_eq!(flat(&va)?, flat(&vb)?, "{na}");
    }
    assert_eq!(
        flat(&a.forward_t(&images, false)?)?,
        flat(&b.forward_t(&images, false)?)?
    );

    // Loading into f64 casts.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut c = Network::new(&config.clone().into(), &mut rng, &CPU, DType::F64)?;
    c.load_weights(&path)?;
    assert_eq!(flat(&c.parameters()[0].1)?, flat(&a.parameters()[0].1)?);

    // Other architectures are refused, and nothing is changed.
    let mut wider = build(
        ConvNetConfig {
            width: 16,
            norm: Norm::Batch,
            ..ConvNetConfig::default()
        },
        4,
    )?;
    let before = flat(&wider.parameters()[0].1)?;
    let e = wider.load_weights(&path).unwrap_err();
    assert!(
        matches!(e, ModelError::ShapeMismatch { ref name, .. } if name == "features.0.conv.weight"),
        "{e}"
    );
    assert_eq!(flat(&wider.parameters()[0].1)?, before);
    let mut instance = build(
        ConvNetConfig {
            width: 8,
            ..ConvNetConfig::default()
        },
        5,
    )?;
    let e = instance.load_weights(&path).unwrap_err();
    assert!(
        matches!(e, ModelError::UnexpectedTensor { ref name, .. } if name.ends_with("running_mean")),
        "{e}"
    );
    let mut mlp = build(MlpConfig::default(), 6)?;
    let e = mlp.load_weights(&path).unwrap_err();
    assert!(
        matches!(e, ModelError::MissingTensor { ref name, .. } if name == "fc_1.weight"),
        "{e}"
    );
    let e = mlp
        .load_weights(dir.path().join("absent.safetensors"))
        .unwrap_err();
    assert!(e.to_string().contains("absent.safetensors"), "{e}");
    Ok(())
}
