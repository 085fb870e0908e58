//! Generation speed: all three splits of the seed preset from the loaded grey source, and the
//! load (decompress + verify) itself. Uses `DEBIASDD_MNIST_DIR`, else `../shared/data/mnist`,
//! else a synthetic 60k/10k source of the same size.
//!
//! `cargo bench -p debiasdd-cmnist --bench generate` (or `cargo xtask bench`).

#![allow(clippy::print_stderr)]

use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use debiasdd_cmnist::source::write_synthetic_source;
use debiasdd_cmnist::{ColoredMnistConfig, GreySource, Preset, SourceKind, Verification};

fn source_dir() -> (PathBuf, Verification, Option<tempfile::TempDir>) {
    let candidates = [
        std::env::var_os("DEBIASDD_MNIST_DIR").map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/mnist")),
    ];
    if let Some(dir) = candidates.into_iter().flatten().find(|d| d.is_dir()) {
        return (dir, Verification::Checksums, None);
    }
    eprintln!("no MNIST folder found: benchmarking on a synthetic source of the same size");
    let tmp = tempfile::tempdir().expect("temp dir");
    write_synthetic_source(tmp.path(), 60_000, 10_000).expect("synthetic source");
    (tmp.path().to_owned(), Verification::Skip, Some(tmp))
}

fn bench(c: &mut Criterion) {
    let (dir, verification, _keep) = source_dir();
    let source = GreySource::load(&dir, SourceKind::Mnist, verification).expect("grey source");
    let config = ColoredMnistConfig::new(Preset::Seed, 0.01, 0);
    let mut group = c.benchmark_group("cmnist");
    group.sample_size(10);
    group.bench_function("generate_all_splits_seed_preset", |b| {
        b.iter(|| debiasdd_cmnist::build(&source, &config).expect("build"))
    });
    group.bench_function("load_and_verify_mnist", |b| {
        b.iter(|| GreySource::load(&dir, SourceKind::Mnist, verification).expect("load"))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
