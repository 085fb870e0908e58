//! One distillation over several ranks (in-process threads): 1, 2 and 3 ranks give the same
//! images within 1e-6 relative for every method and strata, with and without DSA (f32, short
//! loops), and within 1e-12 in f64 at DC's quick loops, where f32 rounding would be amplified
//! by the inner loop; one rank is the plain run to the bit; a stop on one rank stops all at the
//! same iteration; a failing rank stops the others and its error is the one returned.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};
use debiasdd_distill::driver::RunFiles;
use debiasdd_distill::{
    CollectiveKind, DistillConfig, DistillError, Distiller, MatchMode, MethodKind, Preset,
    RunOutcome, drive, drive_ranks,
};

mod common;
use common::{tiny_split, values};

fn config(method: MethodKind, mode: MatchMode, dsa: bool) -> DistillConfig {
    let mut config = DistillConfig::preset(method, Preset::Quick, mode, 10);
    let s = &mut config.settings;
    s.model.width = 3;
    s.model.depth = 2;
    s.batch_real = 3;
    s.iterations = 2;
    s.seed = 5;
    s.set_dsa(dsa);
    if let Some(dc) = config.method.dc_mut() {
        dc.outer_loop = 2;
        dc.inner_loop = 1;
    }
    config
}

/// `n` CPU ranks (which `auto` sums through host memory).
fn cpus(n: usize) -> Vec<Device> {
    vec![Device::Cpu; n]
}

const NO_FILES: RunFiles<'static> = RunFiles {
    checkpoint: None,
    checkpoint_every: 1,
    history: None,
};

/// The images and per-iteration losses of `config` over `ranks` ranks (`None`: the plain
/// driver, no collective).
fn run(config: &DistillConfig, ranks: Option<usize>) -> (Vec<f64>, Vec<f64>) {
    run_in(config, ranks, DType::F32)
}

fn run_in(config: &DistillConfig, ranks: Option<usize>, dtype: DType) -> (Vec<f64>, Vec<f64>) {
    let split = tiny_split(None);
    let build = |_rank: usize| Distiller::new(config.clone(), &split, &Device::Cpu, dtype);
    let mut losses = Vec::new();
    let stop = AtomicBool::new(false);
    let mut record = |_: &Distiller, stats: &debiasdd_distill::IterationStats| {
        losses.push(stats.loss);
        Ok(())
    };
    let images = match ranks {
        None => {
            let mut d = build(0).unwrap();
            assert_eq!(
                drive(&mut d, NO_FILES, &stop, &mut record).unwrap(),
                RunOutcome::Finished
            );
            values(d.images())
        }
        Some(n) => {
            let (outcome, d) = drive_ranks(
                &cpus(n),
                CollectiveKind::Auto,
                build,
                NO_FILES,
                &stop,
                &mut record,
            )
            .unwrap();
            assert_eq!(outcome, RunOutcome::Finished);
            assert_eq!(d.rank(), (0, n));
            values(d.images())
        }
    };
    (images, losses)
}

fn relative_difference(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f64, |m, v| m.max(v.abs()));
    let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

#[test]
fn rank_counts_give_the_same_images_for_every_method_and_strata() {
    let mut cases: Vec<(MethodKind, MatchMode, bool)> = Vec::new();
    for method in MethodKind::ALL {
        for mode in MatchMode::ALL {
            // Each method's own default: DC without DSA, DM with it.
            cases.push((method, mode, method == MethodKind::Dm));
        }
    }
    cases.push((MethodKind::Dc, MatchMode::Group, true));
    cases.push((MethodKind::Dm, MatchMode::ClassVsGroups, false));
    for (method, mode, dsa) in cases {
        let config = config(method, mode, dsa);
        let what = format!("{method} {mode} dsa={dsa}");
        let (plain, plain_losses) = run(&config, None);
        let (one, one_losses) = run(&config, Some(1));
        assert_eq!(plain, one, "{what}: one rank is the plain run");
        assert_eq!(plain_losses, one_losses, "{what}");
        let (start, _) = {
            let split = tiny_split(None);
            let d = Distiller::new(config.clone(), &split, &Device::Cpu, DType::F32).unwrap();
            (values(d.images()), ())
        };
        assert!(
            relative_difference(&start, &plain) > 1e-3,
            "{what}: the run moves the images"
        );
        for ranks in [2, 3] {
            let (images, losses) = run(&config, Some(ranks));
            let d = relative_difference(&plain, &images);
            assert!(
                d <= 1e-6,
                "{what}, {ranks} ranks: images differ by {d:e} relative"
            );
            for (a, b) in plain_losses.iter().zip(&losses) {
                assert!(
                    (a - b).abs() <= 1e-6 * a.abs(),
                    "{what}, {ranks} ranks: loss {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn in_f64_the_rank_count_changes_nothing_but_rounding_at_dcs_own_loops() {
    // DC's quick loops (5 outer steps, 10 inner epochs): in f32 the inner loop amplifies the
    // 6e-8 differences of the first step to about 2e-5 on this split; in f64 they stay at
    // rounding.
    for mode in MatchMode::ALL {
        let mut config = config(MethodKind::Dc, mode, false);
        let dc = config.method.dc_mut().unwrap();
        (dc.outer_loop, dc.inner_loop) = (5, 10);
        config.settings.iterations = 1;
        let (plain, _) = run_in(&config, None, DType::F64);
        let ranks = 3;
        let (images, _) = run_in(&config, Some(ranks), DType::F64);
        let d = relative_difference(&plain, &images);
        assert!(d <= 1e-12, "{mode}, {ranks} ranks: {d:e} relative");
    }
}

#[test]
fn ranks_beyond_the_terms_idle_and_change_nothing() {
    // 10 class terms over 12 ranks: two ranks compute nothing and add zeros.
    for method in MethodKind::ALL {
        let config = config(method, MatchMode::Class, method == MethodKind::Dm);
        let (plain, _) = run(&config, None);
        let (images, _) = run(&config, Some(12));
        let d = relative_difference(&plain, &images);
        assert!(d <= 1e-6, "{method}, 12 ranks: {d:e} relative");
    }
}

#[test]
fn a_stop_on_one_rank_stops_every_rank_at_the_same_iteration() {
    let config = {
        let mut c = config(MethodKind::Dm, MatchMode::Group, true);
        c.settings.iterations = 5;
        c
    };
    let split = tiny_split(None);
    let stop = AtomicBool::new(false);
    let build = |_rank: usize| Distiller::new(config.clone(), &split, &Device::Cpu, DType::F32);
    let (outcome, d) = drive_ranks(
        &cpus(3),
        CollectiveKind::Auto,
        build,
        NO_FILES,
        &stop,
        &mut |d, _| {
            if d.iteration() == 2 {
                stop.store(true, Ordering::SeqCst);
            }
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(outcome, RunOutcome::Interrupted);
    assert_eq!(d.iteration(), 2);
}

/// The error of a run over `n` CPU ranks that must fail.
fn fails_on<F>(n: usize, build: &F) -> DistillError
where
    F: Fn(usize) -> Result<Distiller, DistillError> + Sync,
{
    let stop = AtomicBool::new(false);
    drive_ranks(
        &cpus(n),
        CollectiveKind::Auto,
        build,
        NO_FILES,
        &stop,
        &mut |_, _| Ok(()),
    )
    .unwrap_err()
}

#[test]
fn a_failing_rank_stops_the_others_with_its_own_error() {
    let config = config(MethodKind::Dc, MatchMode::Class, false);
    let split = tiny_split(None);
    // Rank 2 cannot be built (as if its device were missing): the run fails with that error.
    let build = |rank: usize| {
        if rank == 2 {
            return Err(DistillError::InvalidConfig {
                field: "device",
                problem: "cuda:2 is not there".into(),
            });
        }
        Distiller::new(config.clone(), &split, &Device::Cpu, DType::F32)
    };
    let err = fails_on(3, &build);
    assert!(err.to_string().contains("cuda:2 is not there"), "{err}");
    assert!(!matches!(err, DistillError::RankFailed { .. }), "{err}");

    // A loss that turns NaN is seen by every rank at the same step (after the sum).
    let mut exploding = config.clone();
    exploding.settings.lr_img = 1e30;
    exploding.settings.iterations = 4;
    let build = |_rank: usize| Distiller::new(exploding.clone(), &split, &Device::Cpu, DType::F32);
    let err = fails_on(2, &build);
    assert!(matches!(err, DistillError::NonFiniteLoss { .. }), "{err}");

    let err = fails_on(0, &build);
    assert!(err.to_string().contains("ranks"), "{err}");
}
