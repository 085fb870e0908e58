//! Backward passes against central finite differences, in f64, on tiny networks: every parameter
//! tensor of every layer kind (5 random entries each) and the input images.
//!
//! Measure: |fd - an| / max(|fd| + |an|, 1e-4) <= 1e-5 with h = 1e-6.
//!
//! h = 1e-6 rather than 1e-5 because with ReLU and max pooling a step of 1e-5 sometimes crosses a
//! kink (the batch-norm, leaky-ReLU, max-pooling case did: relative error 3e-5 at h = 1e-5, 1e-6
//! at h = 1e-6). The floor only matters for gradients that are exactly zero in theory (a conv
//! bias right before instance or batch norm, whose per-channel shift the norm removes): there the
//! finite difference is rounding noise, about eps * |L| / h ~ 2e-10, i.e. 2e-6 after the floor.
//! Entries with non-zero gradients agreed to 3e-6 or better when this was written.

use anyhow::{Context, Result, ensure};
use candle_core::{DType, Device, Tensor, Var};
use debiasdd_model::{
    Activation, ConvNetConfig, LeNetConfig, MlpConfig, ModelConfig, Network, Norm, Pooling,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const H: f64 = 1e-6;
const TOLERANCE: f64 = 1e-5;
const FLOOR: f64 = 1e-4;
const ENTRIES_PER_TENSOR: usize = 5;
const BATCH: usize = 3;

fn loss(net: &Network, images: &Tensor, labels: &Tensor, train: bool) -> Result<Tensor> {
    let logits = net.forward_t(images, train)?;
    Ok(candle_nn::loss::cross_entropy(&logits, labels)?)
}

fn loss_value(net: &Network, images: &Tensor, labels: &Tensor, train: bool) -> Result<f64> {
    Ok(loss(net, images, labels, train)?.to_scalar::<f64>()?)
}

/// Sets entry `index` of `var` (flattened) to `value`.
fn set_entry(var: &Var, values: &[f64], index: usize, value: f64) -> Result<()> {
    let mut values = values.to_vec();
    values[index] = value;
    var.set(&Tensor::from_vec(values, var.shape(), var.device())?)?;
    Ok(())
}

/// Compares the analytic gradient of `var` to central differences at a few random entries and
/// returns the worst relative error; `var` is restored afterwards.
fn check_var(
    name: &str,
    var: &Var,
    analytic: &Tensor,
    mut loss_at: impl FnMut() -> Result<f64>,
    rng: &mut ChaCha8Rng,
) -> Result<f64> {
    let values = var.flatten_all()?.to_vec1::<f64>()?;
    let analytic = analytic.flatten_all()?.to_vec1::<f64>()?;
    let n = values.len();
    let mut worst = 0f64;
    for _ in 0..ENTRIES_PER_TENSOR.min(n) {
        let i = rng.random_range(0..n);
        set_entry(var, &values, i, values[i] + H)?;
        let plus = loss_at()?;
        set_entry(var, &values, i, values[i] - H)?;
        let minus = loss_at()?;
        set_entry(var, &values, i, values[i])?;
        let fd = (plus - minus) / (2.0 * H);
        let an = analytic[i];
        let rel = (fd - an).abs() / (fd.abs() + an.abs()).max(FLOOR);
        ensure!(
            rel <= TOLERANCE,
            "{name}[{i}]: analytic {an:e} vs finite difference {fd:e} (relative error {rel:e})"
        );
        worst = worst.max(rel);
    }
    Ok(worst)
}

/// Checks every parameter and the input of a network built from `config`, in train mode and,
/// for batch norm, in eval mode too.
fn check(config: impl Into<ModelConfig>, seed: u64) -> Result<()> {
    let config = config.into();
    let device = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let net = Network::new(&config, &mut rng, &device, DType::F64)?;
    let (c, s, k) = (
        config.in_channels(),
        config.image_size(),
        config.n_classes(),
    );
    let pixels: Vec<f64> = (0..BATCH * c * s * s)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let images = Var::from_vec(pixels, (BATCH, c, s, s), &device)?;
    let labels: Vec<u32> = (0..BATCH).map(|_| rng.random_range(0..k as u32)).collect();
    let labels = Tensor::new(labels, &device)?;

    let has_buffers = !net.buffers().is_empty();
    let modes: &[bool] = if has_buffers { &[true, false] } else { &[true] };
    for &train in modes {
        if !train {
            // Move the running statistics away from (0, 1) so that eval mode is not trivial.
            for _ in 0..3 {
                net.forward_t(&(images.as_tensor() * 2.0)?, true)?;
            }
        }
        let grads = loss(&net, &images, &labels, train)?.backward()?;
        let mut worst = 0f64;
        for (name, var) in net.parameters() {
            let analytic = grads
                .get(&var)
                .with_context(|| format!("no gradient for {name}"))?;
            let rel = check_var(
                &name,
                &var,
                analytic,
                || loss_value(&net, &images, &labels, train),
                &mut rng,
            )
            .with_context(|| format!("{config:?}, train = {train}"))?;
            worst = worst.max(rel);
        }
        let analytic = grads.get(&images).context("no gradient for the input")?;
        let rel = check_var(
            "input",
            &images,
            analytic,
            || loss_value(&net, &images, &labels, train),
            &mut rng,
        )
        .with_context(|| format!("{config:?}, train = {train}"))?;
        worst = worst.max(rel);
        ensure!(worst.is_finite());
    }
    Ok(())
}

fn convnet(norm: Norm, activation: Activation, pooling: Pooling) -> ConvNetConfig {
    ConvNetConfig {
        in_channels: 3,
        image_size: 28,
        n_classes: 10,
        width: 4,
        depth: 3,
        norm,
        activation,
        pooling,
    }
}

#[test]
fn convnet_every_norm() -> Result<()> {
    for (i, &norm) in Norm::ALL.iter().enumerate() {
        check(convnet(norm, Activation::Relu, Pooling::Avg), 10 + i as u64)?;
    }
    Ok(())
}

#[test]
fn convnet_every_activation() -> Result<()> {
    for (i, &activation) in Activation::ALL.iter().enumerate() {
        check(
            convnet(Norm::Instance, activation, Pooling::Avg),
            20 + i as u64,
        )?;
    }
    Ok(())
}

#[test]
fn convnet_every_pooling() -> Result<()> {
    check(convnet(Norm::Instance, Activation::Relu, Pooling::Max), 30)?;
    check(
        convnet(Norm::Batch, Activation::LeakyRelu, Pooling::Max),
        31,
    )?;
    let no_pooling = ConvNetConfig {
        image_size: 8,
        depth: 2,
        ..convnet(Norm::Instance, Activation::Relu, Pooling::None)
    };
    check(no_pooling, 32)
}

#[test]
fn convnet_16x16_one_channel() -> Result<()> {
    for (i, &norm) in [Norm::Layer, Norm::Group].iter().enumerate() {
        // Width 8: group norm's 4 groups hold 2 channels each.
        let config = ConvNetConfig {
            in_channels: 1,
            image_size: 16,
            width: 8,
            depth: 2,
            ..convnet(norm, Activation::Swish, Pooling::Max)
        };
        check(config, 40 + i as u64)?;
    }
    Ok(())
}

/// 14 -> 7 -> 3: pooling an odd-sized map, where candle's own pooling backward goes wrong.
#[test]
fn convnet_odd_feature_maps() -> Result<()> {
    for (i, &pooling) in [Pooling::Avg, Pooling::Max].iter().enumerate() {
        let config = ConvNetConfig {
            image_size: 14,
            depth: 2,
            ..convnet(Norm::Instance, Activation::Relu, pooling)
        };
        check(config, 50 + i as u64)?;
    }
    Ok(())
}

#[test]
fn mlp() -> Result<()> {
    let config = MlpConfig {
        hidden: 8,
        ..MlpConfig::default()
    };
    check(config, 60)
}

#[test]
fn lenet() -> Result<()> {
    check(LeNetConfig::default(), 70)?;
    let grey_32 = LeNetConfig {
        in_channels: 1,
        image_size: 32,
        n_classes: 4,
    };
    check(grey_32, 71)
}
