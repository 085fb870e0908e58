//! DM on the tiny hand-made split: the loss against a hand computation from the embeddings, the
//! CPU op against the op-by-op route, finite differences, strata, determinism and resume.

use candle_core::{DType, Device, Tensor, Var};
use debiasdd_distill::dm::Dm;
use debiasdd_distill::{DistillConfig, Distiller, MatchMode, MethodKind, Preset};
use debiasdd_model::backend::Route;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
use common::{tiny_split, values};

fn tiny_config(mode: MatchMode) -> DistillConfig {
    let mut config = DistillConfig::preset(MethodKind::Dm, Preset::Quick, mode, 10);
    let s = &mut config.settings;
    s.model.width = 3;
    s.model.depth = 2;
    s.batch_real = 3;
    s.iterations = 3;
    s.seed = 8;
    config
}

fn distiller(mode: MatchMode, dtype: DType) -> Distiller<Dm> {
    let config = tiny_config(mode);
    let dm = Dm::new(config.method.dm().expect("a DM config").clone());
    Distiller::with_matcher(config.settings, dm, &tiny_split(None), &Device::Cpu, dtype).unwrap()
}

#[test]
fn presets_follow_the_official_code() {
    for mode in MatchMode::ALL {
        let paper = DistillConfig::preset(MethodKind::Dm, Preset::Paper, mode, 10);
        paper.validate().unwrap();
        let s = &paper.settings;
        assert_eq!((s.lr_img, s.momentum_img), (1.0, 0.5));
        assert_eq!(
            (s.batch_real, s.iterations, s.model.width),
            (256, 20_000, 128)
        );
        assert_eq!(s.init, debiasdd_distill::Init::Real);
        DistillConfig::preset(MethodKind::Dm, Preset::Quick, mode, 10)
            .validate()
            .unwrap();
    }
}

#[test]
fn loss_is_the_summed_squared_distance_of_mean_embeddings() {
    // By hand from the route's embeddings: for every term, the real statistic is its stratum's
    // mean embedding (or, class-vs-group-mean, the unweighted mean of its groups' means).
    for mode in MatchMode::ALL {
        let d = distiller(mode, DType::F64);
        let problem = d.problem();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let params = debiasdd_distill::matcher::fresh_network(&problem, &mut rng).unwrap();
        let real = d.draw_real(&mut rng).unwrap();
        let target = Dm::target_on(&problem, &params, &real).unwrap();
        let model = &problem.settings.model;
        let route = Route::native();
        let mean_of = |x: &Tensor, start: usize, len: usize| -> Vec<f64> {
            let e = route.embeddings(model, &params, &x.narrow(0, start, len).unwrap());
            values(&e.unwrap().mean(0).unwrap())
        };
        let strata: Vec<(usize, usize)> = real.segments.ranges().collect();
        let syn: Vec<(usize, usize)> = d.plan().syn_segments().ranges().collect();
        let mut expected = 0.0;
        for term in d.plan().terms() {
            let means: Vec<Vec<f64>> = term
                .strata
                .iter()
                .map(|&s| mean_of(&real.images, strata[s].0, strata[s].1))
                .collect();
            let (start, len) = syn[term.syn_segment];
            let syn_mean = mean_of(d.images(), start, len);
            for (k, s) in syn_mean.iter().enumerate() {
                let r = means.iter().map(|m| m[k]).sum::<f64>() / means.len() as f64;
                expected += (s - r).powi(2);
            }
        }
        let loss = target.loss(d.images()).unwrap().to_scalar::<f64>().unwrap();
        assert!(
            (loss - expected).abs() < 1e-9 * expected.max(1.0),
            "{mode}: {loss} vs {expected}"
        );
        if mode == MatchMode::ClassVsGroupMean {
            assert!(d.plan().terms().iter().any(|t| t.strata.len() == 2));
            assert_eq!(target.n_terms().unwrap(), 10);
        }
    }
}

#[test]
fn native_op_equals_the_op_by_op_loss_and_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for mode in MatchMode::ALL {
        let d = distiller(mode, DType::F64);
        let target = d.probe(3).unwrap();
        let var = Var::from_tensor(d.images()).unwrap();
        let native = target.loss(var.as_tensor()).unwrap();
        let by_ops = target.loss_by_ops(var.as_tensor()).unwrap();
        let (a, b) = (
            native.to_scalar::<f64>().unwrap(),
            by_ops.to_scalar::<f64>().unwrap(),
        );
        assert!(
            (a - b).abs() < 1e-10 * b.abs().max(1.0),
            "{mode}: {a} vs {b}"
        );
        let ga = values(native.backward().unwrap().get(var.as_tensor()).unwrap());
        let gb = values(by_ops.backward().unwrap().get(var.as_tensor()).unwrap());
        let scale = gb.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{mode}: zero gradient");
        let worst = ga
            .iter()
            .zip(&gb)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst < 1e-9 * scale, "{mode}: {worst} of {scale}");
        // Central differences of the native loss at random pixels.
        let base = values(d.images());
        let h = 1e-5;
        for _ in 0..6 {
            let i = rng.random_range(0..base.len());
            let at = |delta: f64| -> f64 {
                let mut v = base.clone();
                v[i] += delta;
                let x = Tensor::from_vec(v, d.images().shape(), &Device::Cpu).unwrap();
                target.loss(&x).unwrap().to_scalar::<f64>().unwrap()
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            let err = (ga[i] - numeric).abs() / scale;
            assert!(err < 1e-5, "{mode} pixel {i}: {} vs {numeric}", ga[i]);
        }
    }
}

#[test]
fn dm_lowers_its_loss_and_resumes_bit_identically() {
    let split = tiny_split(None);
    for mode in [MatchMode::Group, MatchMode::ClassVsGroupMean] {
        let mut config = tiny_config(mode);
        config.settings.iterations = 6;
        // The loss of a fixed network and batch before and after distilling.
        let mut a = Distiller::new(config.clone(), &split, &Device::Cpu, DType::F32).unwrap();
        let first: Vec<f64> = (0..3).map(|_| a.step().unwrap().loss).collect();
        let mut b = Distiller::new(config.clone(), &split, &Device::Cpu, DType::F32).unwrap();
        for _ in 0..3 {
            b.step().unwrap();
        }
        assert_eq!(values(a.images()), values(b.images()), "{mode}: same seed");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dm.ckpt.safetensors");
        a.save_checkpoint(&path).unwrap();
        let mut resumed = Distiller::new(config, &split, &Device::Cpu, DType::F32).unwrap();
        resumed.load_checkpoint(&path).unwrap();
        for _ in 0..3 {
            let x = a.step().unwrap();
            let y = resumed.step().unwrap();
            assert_eq!(x.loss.to_bits(), y.loss.to_bits(), "{mode}: resumed loss");
        }
        assert_eq!(values(a.images()), values(resumed.images()), "{mode}");
        assert!(first.iter().all(|l| l.is_finite() && *l > 0.0), "{first:?}");
    }
}

#[test]
fn dsa_is_siamese_deterministic_and_changes_the_run() {
    // One real image per class, in the class's colour: group mode with real init starts every
    // matched synthetic image as its group's only real image, so a term's real and synthetic
    // means are equal exactly when both sides get the same transform.
    let split = tiny_split(None);
    let keep: Vec<usize> = (0..split.labels.len()).step_by(6).collect();
    let split = split.subset(&keep);
    let mut config = tiny_config(MatchMode::Group);
    config.settings.iterations = 4;
    assert!(config.settings.dsa.is_some(), "DM's preset turns DSA on");
    let mut d = Distiller::new(config.clone(), &split, &Device::Cpu, DType::F64).unwrap();
    for _ in 0..4 {
        let stats = d.step().unwrap();
        assert!(stats.loss.abs() < 1e-20, "not Siamese: loss {}", stats.loss);
    }

    // On the usual split: same seed, same bytes; DSA on and off differ.
    let split = tiny_split(None);
    let run = |dsa: bool| -> Vec<f64> {
        let mut config = tiny_config(MatchMode::ClassVsGroups);
        config.settings.set_dsa(dsa);
        let mut d = Distiller::new(config, &split, &Device::Cpu, DType::F32).unwrap();
        for _ in 0..3 {
            d.step().unwrap();
        }
        values(d.images())
    };
    let (a, b, off) = (run(true), run(true), run(false));
    assert_eq!(a, b);
    assert_ne!(a, off);
}

#[test]
fn dc_runs_with_dsa_in_matching_and_inner_loop() {
    let split = tiny_split(None);
    let mut config = DistillConfig::preset(MethodKind::Dc, Preset::Quick, MatchMode::Group, 10);
    let s = &mut config.settings;
    s.model.width = 2;
    s.model.depth = 1;
    s.batch_real = 3;
    s.iterations = 2;
    s.set_dsa(true);
    let dc = config.method.dc_mut().unwrap();
    dc.outer_loop = 2;
    dc.inner_loop = 1;
    let mut with = Distiller::new(config.clone(), &split, &Device::Cpu, DType::F32).unwrap();
    config.settings.set_dsa(false);
    let mut without = Distiller::new(config, &split, &Device::Cpu, DType::F32).unwrap();
    for _ in 0..2 {
        assert!(with.step().unwrap().loss.is_finite());
        without.step().unwrap();
    }
    assert_ne!(values(with.images()), values(without.images()));
}
