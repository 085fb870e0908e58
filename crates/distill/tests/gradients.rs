//! The hand-written backward pass against independent references: candle's autograd through
//! `debiasdd_model::Network` (first order), the other conv path, and central finite differences of
//! the matching loss with respect to the synthetic pixels (second order), in f64.

use candle_core::{DType, Device, Result, Tensor, Var};
use debiasdd_distill::dc::distance::{Distance, distance};
use debiasdd_model::backend::{ConvPath, Segments, candle_ops as grads};
use debiasdd_model::{Activation, ConvNetConfig, ModelConfig, Network, Norm, Pooling};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn small(norm: Norm, activation: Activation, pooling: Pooling, image_size: usize) -> ConvNetConfig {
    ConvNetConfig {
        in_channels: 3,
        image_size,
        n_classes: 4,
        width: 3,
        depth: 2,
        norm,
        activation,
        pooling,
    }
}

fn random(shape: &[usize], rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn network(config: &ConvNetConfig, seed: u64) -> (Network, Vec<Tensor>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let net = Network::new(
        &ModelConfig::ConvNet(config.clone()),
        &mut rng,
        &Device::Cpu,
        DType::F64,
    )
    .unwrap();
    // Non-trivial norm affine parameters, so that their gradients are exercised.
    for (name, var) in net.parameters() {
        if name.contains("norm") {
            let t = random(var.dims(), &mut rng).unwrap();
            var.set(&((t * 0.5).unwrap() + 1.0).unwrap()).unwrap();
        }
    }
    let params = net.vars().iter().map(|v| v.as_detached_tensor()).collect();
    (net, params)
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    // Floor: a conv bias before instance norm has an exactly zero gradient (rounding noise).
    let scale = scale.to_scalar::<f64>().unwrap().max(1e-3);
    diff.max(0).unwrap().to_scalar::<f64>().unwrap() / scale
}

/// Mean cross-entropy from logits, written independently of the engine.
fn mean_cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    let n = labels.len();
    let lse = logits.exp()?.sum_keepdim(1)?.log()?;
    let idx = Tensor::new(labels, &Device::Cpu)?.unsqueeze(1)?;
    let picked = logits.gather(&idx, 1)?;
    (lse - picked)?.sum_all()? / n as f64
}

#[test]
fn segment_gradients_match_candle_autograd_per_segment() -> Result<()> {
    let configs = [
        small(Norm::Instance, Activation::Relu, Pooling::Avg, 8),
        small(Norm::Instance, Activation::Relu, Pooling::Avg, 28),
        small(Norm::None, Activation::LeakyRelu, Pooling::Avg, 8),
        small(Norm::Instance, Activation::LeakyRelu, Pooling::None, 6),
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for (k, config) in configs.iter().enumerate() {
        let (net, params) = network(config, k as u64);
        let s = config.image_size;
        for lens in [vec![2, 2, 2], vec![1, 3, 2]] {
            let segments = Segments::new(lens.clone())?;
            let n = segments.total();
            let xs = random(&[n, 3, s, s], &mut rng)?;
            let labels: Vec<u32> = (0..n).map(|i| (i % 4) as u32).collect();
            let y = Tensor::new(labels.as_slice(), &Device::Cpu)?;
            for path in [ConvPath::Im2col, ConvPath::Candle] {
                let fwd = grads::forward(config, &params, &xs, path)?;
                let reference_logits = net.forward_t(&xs, true)?;
                assert!(max_rel_diff(&fwd.logits, &reference_logits) < 1e-12);
                let ours = grads::segment_gradients(config, &params, &fwd, &y, &segments, path)?;
                for (seg, (start, len)) in segments.ranges().enumerate() {
                    let logits = net.forward_t(&xs.narrow(0, start, len)?, true)?;
                    let loss = mean_cross_entropy(&logits, &labels[start..start + len])?;
                    let store = loss.backward()?;
                    for (p, (name, var)) in net.parameters().iter().enumerate() {
                        let reference = store.get(var).expect("every parameter has a gradient");
                        let mine = ours[p].get(seg)?;
                        let d = max_rel_diff(&mine, reference);
                        assert!(
                            d < 1e-10,
                            "config {k} {path:?} segments {lens:?} segment {seg} {name}: relative difference {d}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// d loss / d x by central differences at `coords` (flat indices into `x`).
fn finite_differences(
    f: &dyn Fn(&Tensor) -> Result<f64>,
    x: &Tensor,
    coords: &[usize],
    h: f64,
) -> Result<Vec<f64>> {
    let base: Vec<f64> = x.flatten_all()?.to_vec1()?;
    coords
        .iter()
        .map(|&i| {
            let mut plus = base.clone();
            plus[i] += h;
            let mut minus = base.clone();
            minus[i] -= h;
            let fp = f(&Tensor::from_vec(plus, x.shape(), &Device::Cpu)?)?;
            let fm = f(&Tensor::from_vec(minus, x.shape(), &Device::Cpu)?)?;
            Ok((fp - fm) / (2.0 * h))
        })
        .collect()
}

/// The matching loss of one term structure: synthetic segments `syn_lens`, real segments
/// `real_lens`, and `pairs` (synthetic segment, real segment), as the engine's three modes build
/// them; checked against finite differences for every distance.
fn check_second_order(
    config: &ConvNetConfig,
    syn_lens: Vec<usize>,
    real_lens: Vec<usize>,
    pairs: Vec<(u32, u32)>,
    seed: u64,
) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (_, params) = network(config, seed);
    let s = config.image_size;
    let syn_segments = Segments::new(syn_lens)?;
    let real_segments = Segments::new(real_lens)?;
    let label_of = |segments: &Segments| -> Vec<u32> {
        segments
            .lens()
            .iter()
            .enumerate()
            .flat_map(|(i, &l)| std::iter::repeat_n((i % 4) as u32, l))
            .collect()
    };
    let syn_y = Tensor::new(label_of(&syn_segments).as_slice(), &Device::Cpu)?;
    let real_y = Tensor::new(label_of(&real_segments).as_slice(), &Device::Cpu)?;
    let real_x = random(&[real_segments.total(), 3, s, s], &mut rng)?;
    let fwd = grads::forward(config, &params, &real_x, ConvPath::Im2col)?;
    let g_real = grads::segment_gradients(
        config,
        &params,
        &fwd,
        &real_y,
        &real_segments,
        ConvPath::Im2col,
    )?;
    let syn_idx = Tensor::new(
        pairs.iter().map(|p| p.0).collect::<Vec<_>>().as_slice(),
        &Device::Cpu,
    )?;
    let real_idx = Tensor::new(
        pairs.iter().map(|p| p.1).collect::<Vec<_>>().as_slice(),
        &Device::Cpu,
    )?;
    let g_real: Vec<Tensor> = g_real
        .iter()
        .map(|g| g.index_select(&real_idx, 0))
        .collect::<Result<_>>()?;
    let x0 = random(&[syn_segments.total(), 3, s, s], &mut rng)?;
    for kind in Distance::ALL {
        for path in [ConvPath::Im2col, ConvPath::Candle] {
            let loss_of = |x: &Tensor| -> Result<Tensor> {
                let fwd = grads::forward(config, &params, x, path)?;
                let g =
                    grads::segment_gradients(config, &params, &fwd, &syn_y, &syn_segments, path)?;
                let g: Vec<Tensor> = g
                    .iter()
                    .map(|g| g.index_select(&syn_idx, 0))
                    .collect::<Result<_>>()?;
                distance(kind, &g, &g_real)
            };
            let var = Var::from_tensor(&x0)?;
            let analytic = loss_of(var.as_tensor())?
                .backward()?
                .get(var.as_tensor())
                .expect("gradient of the synthetic images")
                .flatten_all()?
                .to_vec1::<f64>()?;
            let n = x0.elem_count();
            let coords: Vec<usize> = (0..24).map(|_| rng.random_range(0..n)).collect();
            let numeric =
                finite_differences(&|x| loss_of(x)?.to_scalar::<f64>(), &x0, &coords, 1e-5)?;
            let scale = analytic.iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{kind} {path:?}: zero gradient");
            for (&i, &num) in coords.iter().zip(&numeric) {
                let err = (analytic[i] - num).abs() / scale;
                assert!(
                    err < 1e-6,
                    "{kind} {path:?} pixel {i}: analytic {} vs finite differences {num} (relative {err})",
                    analytic[i]
                );
            }
        }
    }
    Ok(())
}

#[test]
fn class_mode_second_order_matches_finite_differences() -> Result<()> {
    // Two classes, 2 synthetic images each, 3 real images each; term c pairs class c with itself.
    let config = small(Norm::Instance, Activation::Relu, Pooling::Avg, 8);
    check_second_order(&config, vec![2, 2], vec![3, 3], vec![(0, 0), (1, 1)], 1)
}

#[test]
fn group_mode_second_order_matches_finite_differences() -> Result<()> {
    // Four groups with one synthetic image each; group 2 has no real images and no term.
    let config = small(Norm::Instance, Activation::Relu, Pooling::Avg, 8);
    check_second_order(
        &config,
        vec![1, 1, 1, 1],
        vec![3, 1, 2],
        vec![(0, 0), (1, 1), (3, 2)],
        2,
    )
}

#[test]
fn class_vs_groups_second_order_matches_finite_differences() -> Result<()> {
    // Two classes (2 synthetic images each) against three groups: class 0 against groups 0 and
    // 1, class 1 against group 2.
    let config = small(Norm::Instance, Activation::Relu, Pooling::Avg, 8);
    check_second_order(
        &config,
        vec![2, 2],
        vec![2, 3, 1],
        vec![(0, 0), (0, 1), (1, 2)],
        3,
    )
}

#[test]
fn second_order_with_the_protocol_input_size_and_no_norm() -> Result<()> {
    let config = small(Norm::Instance, Activation::Relu, Pooling::Avg, 28);
    check_second_order(&config, vec![1, 2], vec![2, 2], vec![(0, 0), (1, 1)], 4)?;
    let config = small(Norm::None, Activation::LeakyRelu, Pooling::Avg, 8);
    check_second_order(&config, vec![1, 2], vec![2, 2], vec![(0, 0), (1, 1)], 5)
}
