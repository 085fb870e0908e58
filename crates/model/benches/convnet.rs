//! ConvNet throughput on the CPU: forward, and forward + backward of the cross-entropy loss, for
//! a batch of 256 3x28x28 images in f32, at width 128 (DC's default) and 32. Reported in
//! images/s.
//!
//! `cargo bench -p debiasdd-model --bench convnet`
//!
//! `forward` is candle's ops with autograd on (as a tracked forward pass runs);
//! `forward_nograd_native` the native forward pass that evaluation uses for predictions.
//!
//! Three ways to the same parameter gradients: `forward_backward` goes through candle's autograd;
//! `forward_backward_explicit` through the hand-written backward pass in candle ops
//! (`debiasdd_model::backend::candle_ops`, what tracked synthetic images use);
//! `forward_backward_native` through the native CPU kernels (`debiasdd_model::backend::cpu`, what
//! the engine and the evaluator use for everything untracked). Their ids match the PyTorch reference's, so `cargo xtask bench`
//! puts PyTorch's `forward_backward` beside each.
//!
//! Like the `debiasdd` and `xtask` binaries, the bench runs on mimalloc, which keeps freed memory
//! for reuse; on glibc's allocator much of a backward pass goes to page faults.

#![allow(missing_debug_implementations)]

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use debiasdd_model::backend::{Route, Segments, candle_ops};
use debiasdd_model::{ConvNetConfig, ModelConfig, Network};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;
use std::time::Duration;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 256;

fn setup(width: usize, device: &Device) -> candle_core::Result<(Network, Tensor, Tensor)> {
    let config = ModelConfig::ConvNet(ConvNetConfig {
        width,
        ..ConvNetConfig::default()
    });
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let net =
        Network::new(&config, &mut rng, device, DType::F32).map_err(candle_core::Error::wrap)?;
    let images = Tensor::rand(0f32, 1., (BATCH, 3, 28, 28), device)?;
    let labels = Tensor::from_vec((0..BATCH as u32).map(|i| i % 10).collect(), BATCH, device)?;
    Ok((net, images, labels))
}

fn bench_convnet(c: &mut Criterion) {
    let device = Device::Cpu;
    for width in [128, 32] {
        let (net, images, labels) = setup(width, &device).expect("setup");
        let mut group = c.benchmark_group(format!("convnet_w{width}_b{BATCH}_cpu"));
        group.throughput(Throughput::Elements(BATCH as u64));
        group.sample_size(10);
        group.warm_up_time(Duration::from_secs(2));
        group.measurement_time(Duration::from_secs(if width == 128 { 30 } else { 10 }));
        group.bench_function("forward", |b| {
            b.iter(|| {
                let logits = net.forward_t(black_box(&images), true).unwrap();
                device.synchronize().unwrap();
                logits
            })
        });
        // Inference, as the evaluator predicts: the native forward pass with no gradient
        // tracking (`Network::predict_logits`), beside PyTorch's `forward_nograd`.
        group.bench_function("forward_nograd_native", |b| {
            b.iter(|| net.predict_logits(black_box(&images)).unwrap())
        });
        group.bench_function("forward_backward", |b| {
            b.iter(|| {
                let logits = net.forward_t(black_box(&images), true).unwrap();
                let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
                let grads = loss.backward().unwrap();
                device.synchronize().unwrap();
                grads
            })
        });
        // The same gradients through the explicit backward pass (`backend::candle_ops`), which
        // the evaluator and the distillation engine use for ConvNets.
        let params: Vec<Tensor> = net.vars().iter().map(|v| v.as_detached_tensor()).collect();
        let ModelConfig::ConvNet(config) = net.config().clone() else {
            unreachable!("a ConvNet")
        };
        let route = Route::select(&device, DType::F32, &config).expect("a route");
        let path = route.conv_path();
        let segments = Segments::uniform(1, BATCH).expect("segments");
        group.bench_function("forward_backward_explicit", |b| {
            b.iter(|| {
                let fwd = candle_ops::forward(&config, &params, black_box(&images), path).unwrap();
                let g =
                    candle_ops::segment_gradients(&config, &params, &fwd, &labels, &segments, path)
                        .unwrap();
                device.synchronize().unwrap();
                g
            })
        });
        group.bench_function("forward_backward_native", |b| {
            b.iter(|| {
                debiasdd_model::backend::cpu::segment_gradients(
                    &config,
                    &params,
                    black_box(&images),
                    &labels,
                    &segments,
                )
                .unwrap()
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench_convnet);
criterion_main!(benches);
