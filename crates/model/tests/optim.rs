//! SGD against hand-computed PyTorch updates.
//!
//! The reference values follow `torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)`
//! on L(p) = 0.5 * |p|^2 + c . p, whose gradient is p + c, worked by hand below.

use anyhow::{Result, ensure};
use candle_core::{Device, Tensor, Var};
use debiasdd_model::{ModelError, Sgd, SgdConfig};

const CPU: Device = Device::Cpu;

fn loss(p: &Var, c: &Tensor) -> Result<Tensor> {
    Ok(((p.sqr()?.sum_all()? * 0.5)? + (p.as_tensor() * c)?.sum_all()?)?)
}

fn values(p: &Var) -> Result<Vec<f64>> {
    Ok(p.to_vec1::<f64>()?)
}

fn assert_close(actual: &[f64], expected: &[f64]) -> Result<()> {
    for (a, e) in actual.iter().zip(expected) {
        ensure!((a - e).abs() < 1e-12, "{actual:?} vs {expected:?}");
    }
    Ok(())
}

#[test]
fn two_steps_with_momentum_and_weight_decay() -> Result<()> {
    let p = Var::new(&[1f64, -2.], &CPU)?;
    let c = Tensor::new(&[0.5f64, 3.], &CPU)?;
    let config = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.01,
        nesterov: false,
    };
    let mut sgd = Sgd::new(vec![p.clone()], config)?;

    // Step 1: grad = p0 + c = (1.5, 1.0); g = grad + 0.01 p0 = (1.51, 0.98); buf = g;
    // p1 = p0 - 0.1 buf = (0.849, -2.098).
    sgd.backward_step(&loss(&p, &c)?)?;
    assert_close(&values(&p)?, &[0.849, -2.098])?;

    // Step 2: grad = p1 + c = (1.349, 0.902); g = grad + 0.01 p1 = (1.35749, 0.88102);
    // buf = 0.9 (1.51, 0.98) + g = (2.71649, 1.76302); p2 = p1 - 0.1 buf = (0.577351, -2.274302).
    sgd.backward_step(&loss(&p, &c)?)?;
    assert_close(&values(&p)?, &[0.577351, -2.274302])?;

    // A new learning rate applies from the next step; momentum is kept:
    // grad = p2 + c = (1.077351, 0.725698); g = grad + 0.01 p2 = (1.08312451, 0.70295498);
    // buf = 0.9 (2.71649, 1.76302) + g = (3.52796551, 2.28967298); p3 = p2 - 0.01 buf.
    sgd.set_lr(0.01);
    assert_eq!(sgd.lr(), 0.01);
    sgd.backward_step(&loss(&p, &c)?)?;
    assert_close(
        &values(&p)?,
        &[0.577351 - 0.0352796551, -2.274302 - 0.0228967298],
    )?;
    Ok(())
}

#[test]
fn plain_and_nesterov_steps() -> Result<()> {
    let c = Tensor::new(&[0.5f64, 3.], &CPU)?;
    // Plain SGD: p1 = p0 - 0.1 (p0 + c) = (0.85, -2.1).
    let p = Var::new(&[1f64, -2.], &CPU)?;
    let mut sgd = Sgd::new(
        vec![p.clone()],
        SgdConfig {
            lr: 0.1,
            ..SgdConfig::default()
        },
    )?;
    sgd.backward_step(&loss(&p, &c)?)?;
    assert_close(&values(&p)?, &[0.85, -2.1])?;

    // Nesterov, first step: buf = g, update g + 0.9 buf = 1.9 g with g = (1.5, 1.0).
    let p = Var::new(&[1f64, -2.], &CPU)?;
    let config = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.0,
        nesterov: true,
    };
    let mut sgd = Sgd::new(vec![p.clone()], config)?;
    sgd.backward_step(&loss(&p, &c)?)?;
    assert_close(&values(&p)?, &[1. - 0.19 * 1.5, -2. - 0.19 * 1.0])?;
    Ok(())
}

#[test]
fn variables_without_gradient_are_left_alone() -> Result<()> {
    let used = Var::new(&[1f64], &CPU)?;
    let unused = Var::new(&[5f64], &CPU)?;
    let config = SgdConfig {
        lr: 0.5,
        momentum: 0.9,
        weight_decay: 0.1,
        nesterov: false,
    };
    let mut sgd = Sgd::new(vec![used.clone(), unused.clone()], config)?;
    sgd.backward_step(&(used.as_tensor() * 2.)?.sum_all()?)?;
    // g = 2 + 0.1 * 1 = 2.1; p = 1 - 0.5 * 2.1.
    assert_close(&values(&used)?, &[-0.05])?;
    assert_close(&values(&unused)?, &[5.])?;
    Ok(())
}

#[test]
fn invalid_configs_are_refused() {
    let bad = |config: SgdConfig| match Sgd::new(vec![], config) {
        Err(ModelError::InvalidOptimizer(message)) => message,
        other => panic!("{other:?}"),
    };
    let d = SgdConfig::default;
    assert!(bad(SgdConfig { lr: -1., ..d() }).contains("lr"));
    assert!(
        bad(SgdConfig {
            momentum: f64::NAN,
            ..d()
        })
        .contains("momentum")
    );
    assert!(
        bad(SgdConfig {
            nesterov: true,
            ..d()
        })
        .contains("nesterov")
    );
}
