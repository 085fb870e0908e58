//! The distillation engine's costs, on a Colored-MNIST-shaped train split with the group sizes
//! of ratio 0.01 (45,000 random images; aligned groups ~4,450, conflicting groups ~5):
//!
//! - `dc_matching_wW/one_class`: DC's matching-loss gradient for one class at width W: the
//!   gradients of 256 real images, of 10 synthetic images, the layer-wise distance and its
//!   backward to the synthetic images, through `MatchingTarget::loss` as the engine calls it
//!   (on the CPU: native kernels, second-order term included). The PyTorch reference
//!   (`xtask/bench/torch_reference.py`) times the same under the same id.
//! - `dc_iteration_quick_w32/{class,group}`: one whole DC iteration of the quick preset (fresh
//!   network, 5 outer steps of matching + image update, 10 inner epochs between them; real batch
//!   64 per class or 16 per group), also timed by the PyTorch reference.
//! - `dc_iteration_quick_w32/{class,group}_dsa`: the same with DSA on (Siamese augmentation of
//!   every term, per-image augmentation of the inner loop), for DSA's overhead.
//! - `dm_iteration_quick_w32/{class,group}`: one whole DM iteration of the quick preset without
//!   DSA (fresh network, real embeddings of 256 per class or 64 per group, synthetic embedding
//!   backward, image update), timed by the PyTorch reference as `main_DM.py` writes it;
//!   `{class,group}_dsa` with DSA on (DM's default), for DSA's overhead.
//! - `dc_matching_step_quick_w32_cpu/<mode>`: one matching step (real gradients of every term,
//!   synthetic gradients, distance, backward, update) per matching mode; a group-wise step
//!   should cost at most 1.5x a class-wise one. `DEBIASDD_BENCH_PAPER=1` adds width 128.
//!
//! `cargo bench -p debiasdd-distill --bench matching` (or `cargo xtask bench`).

use candle_core::{DType, Device, Tensor, Var};
use criterion::{Criterion, criterion_group, criterion_main};
use debiasdd_data::{ImageShape, Split};
use debiasdd_distill::{
    Distance, DistillConfig, Distiller, MatchMode, MatchingTarget, MethodKind, Preset,
};
use debiasdd_groups::GroupSpec;
use debiasdd_model::backend::{Route, Segments};
use debiasdd_model::{ConvNetConfig, ModelConfig, Network};
use rand::{Rng, SeedableRng};
use std::time::Duration;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const IMAGE: usize = 3 * 28 * 28;

fn biased_split(n: usize, ratio: f64) -> Split {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut split = Split::empty(
        ImageShape::new(3, 28, 28).unwrap(),
        GroupSpec::new(10, 10).unwrap(),
    );
    split.images = (0..n * IMAGE)
        .map(|_| rng.random_range(0..=255u8))
        .collect();
    for i in 0..n {
        let class = (i % 10) as u8;
        let colour = if rng.random_bool(ratio) {
            (class + rng.random_range(1..10u8)) % 10
        } else {
            class
        };
        split.labels.push(class);
        split.attributes.push(Some(colour));
    }
    split
}

fn matching_step(c: &mut Criterion) {
    let split = biased_split(45_000, 0.01);
    // The paper size (width 128, real batch 256) takes tens of seconds per step on a 2-core CPU;
    // set DEBIASDD_BENCH_PAPER=1 to include it.
    let mut sizes = vec![(Preset::Quick, "quick_w32")];
    if std::env::var_os("DEBIASDD_BENCH_PAPER").is_some() {
        sizes.push((Preset::Paper, "paper_w128"));
    }
    for (preset, name) in sizes {
        let mut group = c.benchmark_group(format!("dc_matching_step_{name}_cpu"));
        group.sample_size(10);
        for mode in MatchMode::ALL {
            let mut config = DistillConfig::preset(MethodKind::Dc, preset, mode, 10);
            // One matching step per `step()`, no inner training.
            config.method.dc_mut().expect("a DC config").outer_loop = 1;
            config.settings.iterations = usize::MAX;
            let mut distiller =
                Distiller::new(config, &split, &Device::Cpu, DType::F32).expect("distiller");
            group.bench_function(mode.name(), |b| b.iter(|| distiller.step().expect("step")));
        }
        group.finish();
    }
}

/// DC's matching-loss gradient for one class: 256 real and 10 synthetic images.
fn one_class_matching(c: &mut Criterion) {
    let device = Device::Cpu;
    let route = Route::select(&device, DType::F32, &ConvNetConfig::default()).expect("a route");
    for width in [128, 32] {
        let config = ConvNetConfig {
            width,
            ..ConvNetConfig::default()
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let net = Network::new(
            &ModelConfig::ConvNet(config.clone()),
            &mut rng,
            &device,
            DType::F32,
        )
        .expect("network");
        let params: Vec<Tensor> = net.vars().iter().map(|v| v.as_detached_tensor()).collect();
        let real = Tensor::rand(0f32, 1., (256, 3, 28, 28), &device).expect("real");
        let real_y = Tensor::zeros(256, DType::U32, &device).expect("labels");
        let syn = Var::from_tensor(&Tensor::randn(0f32, 1., (10, 3, 28, 28), &device).unwrap())
            .expect("synthetic");
        let syn_y = Tensor::zeros(10, DType::U32, &device).expect("labels");
        let (real_seg, syn_seg) = (
            Segments::uniform(1, 256).unwrap(),
            Segments::uniform(1, 10).unwrap(),
        );
        let mut group = c.benchmark_group(format!("dc_matching_w{width}"));
        group.sample_size(10);
        group.bench_function("one_class", |b| {
            b.iter(|| {
                let g_real = route
                    .segment_gradients(&config, &params, &real, &real_y, &real_seg)
                    .unwrap()
                    .grads;
                let target = MatchingTarget::new(
                    config.clone(),
                    Distance::Ours,
                    params.clone(),
                    g_real,
                    syn_y.clone(),
                    syn_seg.clone(),
                    route,
                );
                let loss = target.loss(syn.as_tensor()).unwrap();
                let g = loss.backward().unwrap();
                g.get(syn.as_tensor())
                    .expect("a gradient reaches the images")
                    .clone()
            })
        });
        group.finish();
    }
}

/// One whole DC iteration of the quick preset, per mode the PyTorch reference also runs.
fn quick_iteration(c: &mut Criterion) {
    let split = biased_split(45_000, 0.01);
    let mut group = c.benchmark_group("dc_iteration_quick_w32");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    iterations(&mut group, &split, MethodKind::Dc);
    group.finish();
    let mut group = c.benchmark_group("dm_iteration_quick_w32");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    iterations(&mut group, &split, MethodKind::Dm);
    group.finish();
}

/// One `method` iteration of the quick preset, class- and group-wise, without and with DSA.
fn iterations(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    split: &Split,
    method: MethodKind,
) {
    for dsa in [false, true] {
        for mode in [MatchMode::Class, MatchMode::Group] {
            let mut config = DistillConfig::preset(method, Preset::Quick, mode, 10);
            config.settings.iterations = usize::MAX;
            config.settings.set_dsa(dsa);
            let mut distiller =
                Distiller::new(config, split, &Device::Cpu, DType::F32).expect("distiller");
            let id = if dsa {
                format!("{}_dsa", mode.name())
            } else {
                mode.name().to_owned()
            };
            group.bench_function(id, |b| b.iter(|| distiller.step().expect("step")));
        }
    }
}

criterion_group!(benches, one_class_matching, quick_iteration, matching_step);
criterion_main!(benches);
