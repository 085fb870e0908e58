//! The distillation loop on a tiny hand-made split: plans per mode, determinism, bit-identical
//! resume, checkpoint checks, errors, and the engine's own loss against finite differences.

use candle_core::{DType, Device, Tensor, Var};
use debiasdd_distill::{
    Dc, DistillConfig, DistillError, Distiller, Init, MatchMode, MethodKind, Preset,
};
use debiasdd_model::backend::{ConvPath, Route};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
use common::{IMAGE, tiny_split, values};

fn tiny_config(mode: MatchMode) -> DistillConfig {
    let mut config = DistillConfig::preset(MethodKind::Dc, Preset::Quick, mode, 10);
    let s = &mut config.settings;
    s.model.width = 2;
    s.model.depth = 1;
    s.batch_real = 3;
    s.iterations = 2;
    s.seed = 5;
    let dc = config.method.dc_mut().expect("a DC config");
    dc.outer_loop = 2;
    dc.inner_loop = 2;
    config
}

/// Largest elementwise difference of two tensors of the same shape.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    values(a)
        .iter()
        .zip(&values(b))
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn plans_follow_the_mode() -> anyhow::Result<()> {
    let split = tiny_split(None);
    for (mode, terms, groups) in [
        (MatchMode::Class, 10, false),
        (MatchMode::Group, 20, true),
        (MatchMode::ClassVsGroups, 20, false),
        (MatchMode::ClassVsGroupMean, 10, false),
    ] {
        let d = Dc::distiller(tiny_config(mode), &split, &Device::Cpu, DType::F32)?;
        assert_eq!(d.n_terms(), terms, "{mode}");
        assert_eq!(d.empty_groups().len(), 80, "{mode}");
        let set = d.synthetic_set()?;
        assert_eq!(set.set.len(), 100);
        // Class by class, 10 images each.
        assert_eq!(set.set.labels[..10], [0; 10]);
        assert_eq!(set.set.labels[90..], [9; 10]);
        if groups {
            // One image per (class, colour), in colour order within the class.
            let g: Vec<u16> = set.set.groups.iter().map(|g| g.unwrap()).collect();
            assert_eq!(g, (0..100).collect::<Vec<u16>>());
        } else {
            assert!(set.set.groups.iter().all(Option::is_none));
        }
        // The probe draws every group whole (3 < 4 real images in aligned groups, 2 otherwise).
        let probe = d.probe(99)?;
        let expected_real = match mode {
            MatchMode::Class => 10 * 3,
            _ => 10 * (3 + 2),
        };
        assert_eq!(probe.real_images, expected_real, "{mode}");
    }
    Ok(())
}

#[test]
fn real_init_draws_from_the_image_group_or_class() -> anyhow::Result<()> {
    let split = tiny_split(None);
    let mut config = tiny_config(MatchMode::Group);
    config.settings.init = Init::Real;
    let d = Distiller::new(config, &split, &Device::Cpu, DType::F32)?;
    let set = d.synthetic_set()?;
    // Every synthetic image equals some real image of its class (pixel values k/255).
    for (i, &label) in set.set.labels.iter().enumerate() {
        let syn = &set.set.images[i * IMAGE..(i + 1) * IMAGE];
        let found = (0..split.len()).find(|&j| {
            split
                .image(j)
                .iter()
                .zip(syn)
                .all(|(&r, &s)| (f32::from(r) / 255.0 - s).abs() < 1e-4)
        });
        let j = found.unwrap_or_else(|| panic!("synthetic image {i} is no real image"));
        assert_eq!(split.labels[j], label);
        let group = set.set.groups[i].unwrap();
        if split.group_ids().contains(&Some(group)) {
            assert_eq!(
                split.group_of(j),
                Some(group),
                "image {i} should come from its own group"
            );
        }
    }
    Ok(())
}

#[test]
fn same_seed_same_result_and_resume_is_bit_identical() -> anyhow::Result<()> {
    let split = tiny_split(None);
    let dir = tempfile::tempdir()?;
    for mode in [MatchMode::Group, MatchMode::ClassVsGroups] {
        let config = tiny_config(mode);
        let mut straight = Distiller::new(config.clone(), &split, &Device::Cpu, DType::F32)?;
        let mut losses = Vec::new();
        while !straight.is_done() {
            losses.push(straight.step()?.loss);
        }
        assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");

        let mut again = Distiller::new(config.clone(), &split, &Device::Cpu, DType::F32)?;
        again.step()?;
        let ckpt = dir.path().join(format!("{mode}.ckpt"));
        again.save_checkpoint(&ckpt)?;
        drop(again);

        let mut resumed = Distiller::new(config.clone(), &split, &Device::Cpu, DType::F32)?;
        resumed.load_checkpoint(&ckpt)?;
        assert_eq!(resumed.iteration(), 1);
        let last = resumed.step()?;
        assert_eq!(last.loss, losses[1], "{mode}");
        assert!(resumed.is_done());
        assert_eq!(
            values(resumed.images()),
            values(straight.images()),
            "{mode}"
        );
        // The images moved away from their initialisation.
        let fresh = Distiller::new(config, &split, &Device::Cpu, DType::F32)?;
        assert_ne!(values(fresh.images()), values(straight.images()));
    }
    Ok(())
}

#[test]
fn checkpoint_of_other_settings_is_refused_by_name() -> anyhow::Result<()> {
    let split = tiny_split(None);
    let dir = tempfile::tempdir()?;
    let ckpt = dir.path().join("run.ckpt");
    Distiller::new(
        tiny_config(MatchMode::Class),
        &split,
        &Device::Cpu,
        DType::F32,
    )?
    .save_checkpoint(&ckpt)?;
    let mut other_config = tiny_config(MatchMode::Class);
    other_config.settings.lr_img = 0.5;
    let mut other = Distiller::new(other_config, &split, &Device::Cpu, DType::F32)?;
    let err = other.load_checkpoint(&ckpt).unwrap_err().to_string();
    assert!(err.contains("lr_img"), "{err}");
    // More iterations is fine.
    let mut longer_config = tiny_config(MatchMode::Class);
    longer_config.settings.iterations = 10;
    Distiller::new(longer_config, &split, &Device::Cpu, DType::F32)?.load_checkpoint(&ckpt)?;
    let garbage = dir.path().join("garbage.ckpt");
    std::fs::write(&garbage, b"not a checkpoint")?;
    let err = other.load_checkpoint(&garbage).unwrap_err();
    assert!(matches!(err, DistillError::BadCheckpoint { .. }), "{err}");
    Ok(())
}

#[test]
fn empty_class_is_a_clear_error() {
    let split = tiny_split(Some(3));
    let err = Distiller::new(
        tiny_config(MatchMode::Class),
        &split,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_err();
    assert!(
        matches!(err, DistillError::EmptyClass { class: 3 }),
        "{err}"
    );
}

#[test]
fn conv_paths_agree_on_a_whole_iteration() -> anyhow::Result<()> {
    let split = tiny_split(None);
    let config = tiny_config(MatchMode::Group);
    let mut a = Distiller::new(config.clone(), &split, &Device::Cpu, DType::F64)?;
    let mut b = Distiller::new(config, &split, &Device::Cpu, DType::F64)?
        .with_route(Route::candle_ops(ConvPath::Candle));
    let (la, lb) = (a.step()?.loss, b.step()?.loss);
    assert!((la - lb).abs() < 1e-10 * la.abs().max(1.0), "{la} vs {lb}");
    let worst = max_abs_diff(a.images(), b.images());
    assert!(worst < 1e-9, "images differ by {worst}");
    Ok(())
}

#[test]
fn splitting_the_real_batch_into_passes_changes_nothing() -> anyhow::Result<()> {
    // One pass per stratum against the default single pass, every mode, a whole iteration.
    let split = tiny_split(None);
    for mode in MatchMode::ALL {
        let config = tiny_config(mode);
        let mut a = Distiller::new(config.clone(), &split, &Device::Cpu, DType::F64)?;
        let dc = Dc::new(config.method.dc().expect("a DC config").clone()).with_real_pass_images(1);
        let mut b = Distiller::with_matcher(config.settings, dc, &split, &Device::Cpu, DType::F64)?;
        let (la, lb) = (a.step()?.loss, b.step()?.loss);
        assert!(
            (la - lb).abs() < 1e-10 * la.abs().max(1.0),
            "{mode}: {la} vs {lb}"
        );
        let worst = max_abs_diff(a.images(), b.images());
        assert!(worst < 1e-9, "{mode}: images differ by {worst}");
    }
    Ok(())
}

#[test]
fn engine_loss_gradient_matches_finite_differences() -> anyhow::Result<()> {
    // The engine's own matching loss (real batches, pairing, distance) for every mode, f64.
    let split = tiny_split(None);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for mode in MatchMode::ALL {
        let d = Dc::distiller(tiny_config(mode), &split, &Device::Cpu, DType::F64)?;
        let target = d.probe(7)?;
        let x0 = d.images().clone();
        let var = Var::from_tensor(&x0)?;
        let grads = target.loss(var.as_tensor())?.backward()?;
        let analytic = values(grads.get(var.as_tensor()).unwrap());
        let scale = analytic.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0);
        let base = values(&x0);
        let h = 1e-5;
        for _ in 0..8 {
            let i = rng.random_range(0..base.len());
            let at = |delta: f64| -> anyhow::Result<f64> {
                let mut v = base.clone();
                v[i] += delta;
                let x = Tensor::from_vec(v, x0.shape(), &Device::Cpu)?;
                Ok(target.loss(&x)?.to_scalar::<f64>()?)
            };
            let numeric = (at(h)? - at(-h)?) / (2.0 * h);
            let err = (analytic[i] - numeric).abs() / scale;
            assert!(err < 1e-6, "{mode} pixel {i}: {} vs {numeric}", analytic[i]);
        }
    }
    Ok(())
}

#[test]
fn native_loss_equals_the_op_by_op_loss() -> anyhow::Result<()> {
    // The CPU route (one op, native second-order kernels) against the route of other devices
    // (candle ops + autograd): value and gradient, every mode and distance, f64.
    let split = tiny_split(None);
    for mode in MatchMode::ALL {
        for kind in debiasdd_distill::Distance::ALL {
            let mut config = tiny_config(mode);
            config.method.dc_mut().expect("a DC config").distance = kind;
            let d = Dc::distiller(config, &split, &Device::Cpu, DType::F64)?;
            let target = d.probe(5)?;
            let var = Var::from_tensor(d.images())?;
            let native = target.loss(var.as_tensor())?;
            let by_ops = target.loss_by_ops(var.as_tensor())?;
            let (a, b) = (native.to_scalar::<f64>()?, by_ops.to_scalar::<f64>()?);
            assert!(
                (a - b).abs() < 1e-10 * b.abs().max(1.0),
                "{mode} {kind}: {a} vs {b}"
            );
            let ga = native.backward()?.get(var.as_tensor()).unwrap().clone();
            let gb = by_ops.backward()?.get(var.as_tensor()).unwrap().clone();
            let scale = values(&gb).iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{mode} {kind}: zero gradient");
            let worst = max_abs_diff(&ga, &gb);
            assert!(
                worst < 1e-9 * scale.max(1.0),
                "{mode} {kind}: {worst} of {scale}"
            );
        }
    }
    Ok(())
}

#[test]
fn class_mode_counts_images_of_unknown_attribute() -> anyhow::Result<()> {
    let split = tiny_split(None);
    let mut unknown = split.clone();
    for (i, a) in unknown.attributes.iter_mut().enumerate() {
        if i % 2 == 0 {
            *a = None;
        }
    }
    let config = tiny_config(MatchMode::Class);
    // Class-wise distillation never reads attributes: the same classes hold the same images,
    // so a step draws the same real batches and gives the same bytes.
    let step = |split: &debiasdd_data::Split| -> anyhow::Result<(f64, Vec<f64>)> {
        let mut d = Distiller::new(config.clone(), split, &Device::Cpu, DType::F32)?;
        let loss = d.step()?.loss;
        Ok((loss, values(d.images())))
    };
    let known = step(&split)?;
    assert_eq!(step(&unknown)?, known);
    // All unknown: still every image, not "class 0 has no training images".
    unknown.attributes.iter_mut().for_each(|a| *a = None);
    assert_eq!(step(&unknown)?, known);
    // Group modes refuse them, naming the fix.
    let err = Distiller::new(
        tiny_config(MatchMode::Group),
        &unknown,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_err();
    assert!(err.to_string().contains("use --mode class"), "{err}");
    Ok(())
}

#[test]
fn float_images_distil_like_their_bytes() -> anyhow::Result<()> {
    let split = tiny_split(None);
    let config = tiny_config(MatchMode::Group);
    let set = debiasdd_data::ImageSet::from_split(&split);
    let mut from_bytes = Distiller::new(config.clone(), &split, &Device::Cpu, DType::F64)?;
    let mut from_floats = Distiller::on_images(config.clone(), &set, &Device::Cpu, DType::F64)?;
    for _ in 0..2 {
        let (a, b) = (from_bytes.step()?.loss, from_floats.step()?.loss);
        assert!((a - b).abs() < 1e-9 * a.abs().max(1.0), "{a} vs {b}");
    }
    let worst = max_abs_diff(from_bytes.images(), from_floats.images());
    assert!(worst < 1e-9, "images differ by {worst}");
    let mut nan = set.clone();
    nan.images[IMAGE + 3] = f32::NAN;
    let err = Distiller::on_images(config, &nan, &Device::Cpu, DType::F32).unwrap_err();
    assert!(
        err.to_string()
            .contains("images[1]: value 3 of the image is NaN"),
        "{err}"
    );
    Ok(())
}
