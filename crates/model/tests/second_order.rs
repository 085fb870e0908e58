//! Gradients of parameter gradients with respect to the input images (what DC's gradient
//! matching differentiates), against central finite differences, in f64.
//!
//! candle detaches the gradients `backward` returns unless the environment variable
//! `CANDLE_GRAD_DO_NOT_DETACH` is set when the process starts, so these tests are ignored by
//! default; run them with
//!
//! ```text
//! CANDLE_GRAD_DO_NOT_DETACH=1 cargo test -p debiasdd-model --test second_order -- --ignored
//! ```
//!
//! Objective: G(x) = sum over parameters p of <dL/dp (x), r_p> with fixed random r_p, i.e. a
//! linear probe of the parameter gradients. Measure as in `gradcheck.rs`, looser (1e-4) because
//! G is itself a difference quotient away from L in rounding.

use anyhow::{Context, Result, ensure};
use candle_core::{DType, Device, Tensor, Var};
use debiasdd_model::{
    Activation, ConvNetConfig, LeNetConfig, MlpConfig, ModelConfig, Network, Norm, Pooling,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const H: f64 = 1e-6;
const TOLERANCE: f64 = 1e-4;
const FLOOR: f64 = 1e-4;

fn objective(net: &Network, images: &Tensor, labels: &Tensor, probes: &[Tensor]) -> Result<Tensor> {
    let logits = net.forward_t(images, true)?;
    let loss = candle_nn::loss::cross_entropy(&logits, labels)?;
    let grads = loss.backward()?;
    let mut total = Tensor::zeros((), DType::F64, images.device())?;
    for ((name, var), probe) in net.parameters().iter().zip(probes) {
        let g = grads
            .get(var)
            .with_context(|| format!("no gradient for {name}"))?;
        total = (total + (g * probe)?.sum_all()?)?;
    }
    Ok(total)
}

fn check(config: impl Into<ModelConfig>, seed: u64) -> Result<()> {
    ensure!(
        std::env::var("CANDLE_GRAD_DO_NOT_DETACH").is_ok_and(|v| !v.is_empty() && v != "0"),
        "run with CANDLE_GRAD_DO_NOT_DETACH=1"
    );
    let config = config.into();
    let device = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let net = Network::new(&config, &mut rng, &device, DType::F64)?;
    let (c, s, k) = (
        config.in_channels(),
        config.image_size(),
        config.n_classes(),
    );
    let n = 2;
    let pixels: Vec<f64> = (0..n * c * s * s)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let images = Var::from_vec(pixels.clone(), (n, c, s, s), &device)?;
    let labels = Tensor::new(
        (0..n as u32).map(|i| i % k as u32).collect::<Vec<_>>(),
        &device,
    )?;
    let probes = net
        .parameters()
        .iter()
        .map(|(_, v)| {
            let values: Vec<f64> = (0..v.elem_count())
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            Ok(Tensor::from_vec(values, v.shape(), &device)?)
        })
        .collect::<Result<Vec<_>>>()?;

    let grads = objective(&net, &images, &labels, &probes)?.backward()?;
    let analytic = grads
        .get(&images)
        .context("no second-order gradient for the input")?
        .flatten_all()?
        .to_vec1::<f64>()?;
    for _ in 0..5 {
        let i = rng.random_range(0..pixels.len());
        let at = |value: f64| -> Result<f64> {
            let mut p = pixels.clone();
            p[i] = value;
            images.set(&Tensor::from_vec(p, images.shape(), &device)?)?;
            Ok(objective(&net, &images, &labels, &probes)?.to_scalar::<f64>()?)
        };
        let fd = (at(pixels[i] + H)? - at(pixels[i] - H)?) / (2.0 * H);
        let an = analytic[i];
        let rel = (fd - an).abs() / (fd.abs() + an.abs()).max(FLOOR);
        ensure!(
            rel <= TOLERANCE,
            "{config:?}: input[{i}]: analytic {an:e} vs finite difference {fd:e} (relative error {rel:e})"
        );
    }
    Ok(())
}

fn small(norm: Norm, activation: Activation, pooling: Pooling) -> ConvNetConfig {
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
#[ignore = "needs CANDLE_GRAD_DO_NOT_DETACH=1 in the environment"]
fn convnet_default_kind() -> Result<()> {
    check(small(Norm::Instance, Activation::Relu, Pooling::Avg), 1)
}

#[test]
#[ignore = "needs CANDLE_GRAD_DO_NOT_DETACH=1 in the environment"]
fn convnet_variants() -> Result<()> {
    for (i, &norm) in Norm::ALL.iter().enumerate() {
        check(small(norm, Activation::Swish, Pooling::Avg), 10 + i as u64)?;
    }
    for (i, &activation) in Activation::ALL.iter().enumerate() {
        check(
            small(Norm::Instance, activation, Pooling::Max),
            20 + i as u64,
        )?;
    }
    Ok(())
}

#[test]
#[ignore = "needs CANDLE_GRAD_DO_NOT_DETACH=1 in the environment"]
fn mlp_and_lenet() -> Result<()> {
    check(
        MlpConfig {
            hidden: 8,
            ..MlpConfig::default()
        },
        30,
    )?;
    check(LeNetConfig::default(), 31)
}
