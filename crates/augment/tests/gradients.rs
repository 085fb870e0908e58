//! DSA through candle: the custom op's backward against central finite differences in f64, for
//! every family, and the op's errors.

use candle_core::{DType, Device, Tensor, Var};
use debiasdd_augment::{DsaConfig, Family, Transform, augment};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A batch of 2 non-square images (3 x 5 x 7) and random weights, in f64.
fn inputs(rng: &mut impl Rng) -> anyhow::Result<(Vec<f64>, Tensor)> {
    let len = 2 * 3 * 5 * 7;
    let x: Vec<f64> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
    let w: Vec<f64> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
    Ok((x, Tensor::from_vec(w, (2, 3, 5, 7), &Device::Cpu)?))
}

/// `sum(w * augment(x))`.
fn loss(x: &Tensor, w: &Tensor, transforms: &[Transform]) -> anyhow::Result<f64> {
    Ok((augment(x, transforms)? * w)?
        .sum_all()?
        .to_scalar::<f64>()?)
}

fn check_family(family: Family, siamese: bool) -> anyhow::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(17 + family as u64);
    let config = DsaConfig {
        families: vec![family],
        flip: 1.0,
        ..DsaConfig::default()
    };
    let transforms = if siamese {
        vec![config.draw_siamese(&mut rng)]
    } else {
        config.draw_batch(2, &mut rng)
    };
    let (x, w) = inputs(&mut rng)?;
    let var = Var::from_tensor(&Tensor::from_vec(x.clone(), (2, 3, 5, 7), &Device::Cpu)?)?;
    let grads = (augment(var.as_tensor(), &transforms)? * &w)?
        .sum_all()?
        .backward()?;
    let grad: Vec<f64> = grads
        .get(var.as_tensor())
        .expect("the augmentation passes a gradient to its input")
        .flatten_all()?
        .to_vec1()?;
    let eps = 1e-4;
    let at = |v: Vec<f64>| Tensor::from_vec(v, (2, 3, 5, 7), &Device::Cpu);
    // Several coordinates, plus random directions.
    for index in [0, 7, 36, 104, 105, 140, 209] {
        let (mut plus, mut minus) = (x.clone(), x.clone());
        plus[index] += eps;
        minus[index] -= eps;
        let fd = (loss(&at(plus)?, &w, &transforms)? - loss(&at(minus)?, &w, &transforms)?)
            / (2.0 * eps);
        assert!(
            (fd - grad[index]).abs() < 1e-8,
            "{family} coordinate {index}: backward {} vs finite difference {fd}",
            grad[index]
        );
    }
    for _ in 0..3 {
        let d: Vec<f64> = (0..x.len()).map(|_| rng.random_range(-1.0..1.0)).collect();
        let plus: Vec<f64> = x.iter().zip(&d).map(|(a, b)| a + eps * b).collect();
        let minus: Vec<f64> = x.iter().zip(&d).map(|(a, b)| a - eps * b).collect();
        let fd = (loss(&at(plus)?, &w, &transforms)? - loss(&at(minus)?, &w, &transforms)?)
            / (2.0 * eps);
        let directional: f64 = grad.iter().zip(&d).map(|(g, d)| g * d).sum();
        assert!(
            (fd - directional).abs() < 1e-8 * (1.0 + fd.abs()),
            "{family}: directional backward {directional} vs finite difference {fd}"
        );
    }
    Ok(())
}

#[test]
fn backward_matches_finite_differences_for_every_family() -> anyhow::Result<()> {
    for family in Family::ALL {
        check_family(family, false)?;
        check_family(family, true)?;
    }
    Ok(())
}

#[test]
fn f32_and_f64_agree_and_the_shape_is_kept() -> anyhow::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let transforms = DsaConfig::default().draw_batch(2, &mut rng);
    let (x, _) = inputs(&mut rng)?;
    let x64 = Tensor::from_vec(x, (2, 3, 5, 7), &Device::Cpu)?;
    let y64 = augment(&x64, &transforms)?;
    let y32 = augment(&x64.to_dtype(DType::F32)?, &transforms)?;
    assert_eq!(y32.dims(), &[2, 3, 5, 7]);
    assert_eq!(y32.dtype(), DType::F32);
    let gap = (y32.to_dtype(DType::F64)? - &y64)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?;
    assert!(gap < 1e-5, "f32 and f64 differ by {gap}");
    // A non-contiguous input (a transposed view) gives the result of its contiguous copy.
    let t = x64.transpose(2, 3)?;
    let from_view = augment(&t, &transforms)?;
    let from_copy = augment(&t.contiguous()?, &transforms)?;
    let gap = (from_view - from_copy)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?;
    assert_eq!(gap, 0.0);
    Ok(())
}

#[test]
fn one_channel_images_work_and_saturation_is_the_identity() -> anyhow::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x = Tensor::rand(0f64, 1.0, (3, 1, 6, 4), &Device::Cpu)?;
    let config = DsaConfig::default();
    let y = augment(&x, &config.draw_batch(3, &mut rng))?;
    assert_eq!(y.dims(), &[3, 1, 6, 4]);
    // Colour without brightness on one channel: saturation is the identity, so what is left
    // is contrast alone, y = (x - M) f + M: (y - M) / (x - M) is one factor f in [1, 2) per
    // image (contrast 1.0 + u).
    let colour = DsaConfig {
        families: vec![Family::Color],
        brightness: 0.0,
        contrast: 1.0,
        ..config
    };
    let y = augment(&x, &colour.draw_batch(3, &mut rng))?;
    for k in 0..3 {
        let xs: Vec<f64> = x.get(k)?.flatten_all()?.to_vec1()?;
        let ys: Vec<f64> = y.get(k)?.flatten_all()?.to_vec1()?;
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let ratios: Vec<f64> = xs
            .iter()
            .zip(&ys)
            .map(|(a, b)| (b - mean) / (a - mean))
            .collect();
        assert!(
            ratios.iter().all(|r| (r - ratios[0]).abs() < 1e-9),
            "{ratios:?}"
        );
        assert!((1.0..2.0).contains(&ratios[0]));
    }
    Ok(())
}

#[test]
fn errors_name_the_problem() -> anyhow::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let config = DsaConfig::default();
    let x = Tensor::zeros((4, 3, 5, 5), DType::F32, &Device::Cpu)?;
    let message = augment(&x, &config.draw_batch(3, &mut rng))
        .unwrap_err()
        .to_string();
    assert!(message.contains('3') && message.contains('4'), "{message}");
    assert!(augment(&x, &config.draw_batch(4, &mut rng)).is_ok());
    assert!(augment(&x, &[config.draw_siamese(&mut rng)]).is_ok());
    let flat = Tensor::zeros((4, 75), DType::F32, &Device::Cpu)?;
    let message = augment(&flat, &[config.draw_siamese(&mut rng)])
        .unwrap_err()
        .to_string();
    assert!(message.contains("rank 4"), "{message}");
    let ints = Tensor::zeros((1, 1, 2, 2), DType::U32, &Device::Cpu)?;
    let message = augment(&ints, &[config.draw_siamese(&mut rng)])
        .unwrap_err()
        .to_string();
    assert!(message.contains("f32 and f64"), "{message}");
    Ok(())
}
