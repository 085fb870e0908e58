//! Cost of one matching step (real gradients of every term, synthetic gradients, distance,
//! backward, update) per matching mode, on a Colored-MNIST-shaped train split with the group
//! sizes of ratio 0.01 (45,000 random images; aligned groups ~4,450, conflicting groups ~5).
//! The goal: a group-wise step costs at most 1.5x a class-wise step on the same device.
//!
//! `cargo bench -p debiasdd-distill --bench matching` (or `cargo xtask bench`).

use candle_core::{DType, Device};
use criterion::{Criterion, criterion_group, criterion_main};
use debiasdd_cmnist::colored::Split;
use debiasdd_distill::{DistillConfig, Distiller, MatchMode, Preset};
use rand::{Rng, SeedableRng};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const IMAGE: usize = 3 * 28 * 28;

fn biased_split(n: usize, ratio: f64) -> Split {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut split = Split {
        images: (0..n * IMAGE)
            .map(|_| rng.random_range(0..=255u8))
            .collect(),
        labels: Vec::with_capacity(n),
        colours: Vec::with_capacity(n),
        groups: Vec::with_capacity(n),
    };
    for i in 0..n {
        let class = (i % 10) as u8;
        let colour = if rng.random_bool(ratio) {
            (class + rng.random_range(1..10u8)) % 10
        } else {
            class
        };
        split.labels.push(class);
        split.colours.push(colour);
        split.groups.push(u16::from(class) * 10 + u16::from(colour));
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
            let mut config = DistillConfig::preset(preset, mode, 10);
            config.outer_loop = 1; // one matching step per `step()`, no inner training
            config.iterations = usize::MAX;
            let mut distiller =
                Distiller::new(config, &split, &Device::Cpu, DType::F32).expect("distiller");
            group.bench_function(mode.name(), |b| b.iter(|| distiller.step().expect("step")));
        }
        group.finish();
    }
}

criterion_group!(benches, matching_step);
criterion_main!(benches);
