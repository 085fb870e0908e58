//! The three ways through `debiasdd_model::backend` against each other on the CPU, in f64: the
//! native kernels, the candle-op passes with im2col and with candle's conv (every pass of the
//! `Backend` trait), and `Route::select`'s choices.

use candle_core::{DType, Device, Tensor};
use debiasdd_model::backend::{ConvPath, Route, Segments, Untracked};
use debiasdd_model::{Activation, ConvNetConfig, ModelConfig, Network, Norm, Pooling};
use rand::SeedableRng;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn scale(a: &Tensor) -> f64 {
    max_abs_diff(a, &a.zeros_like().unwrap()).max(1.0)
}

fn configs() -> Vec<ConvNetConfig> {
    let base = ConvNetConfig {
        width: 4,
        depth: 2,
        image_size: 8,
        n_classes: 3,
        ..ConvNetConfig::default()
    };
    vec![
        base.clone(),
        ConvNetConfig {
            norm: Norm::None,
            activation: Activation::LeakyRelu,
            ..base.clone()
        },
        ConvNetConfig {
            pooling: Pooling::None,
            image_size: 6,
            ..base.clone()
        },
        ConvNetConfig {
            image_size: 28,
            depth: 3,
            in_channels: 1,
            ..base
        },
    ]
}

#[test]
fn every_route_computes_the_same_passes() {
    let routes = [
        Route::native(),
        Route::candle_ops(ConvPath::Im2col),
        Route::candle_ops(ConvPath::Candle),
    ];
    for (k, config) in configs().iter().enumerate() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(k as u64);
        let model = ModelConfig::ConvNet(config.clone());
        let net = Network::new(&model, &mut rng, &Device::Cpu, DType::F64).unwrap();
        let params: Vec<Tensor> = net.vars().iter().map(|v| v.as_detached_tensor()).collect();
        let s = config.image_size;
        let xs = Tensor::randn(0f64, 1., (5, config.in_channels, s, s), &Device::Cpu).unwrap();
        let labels = Tensor::new(&[0u32, 2, 1, 1, 0], &Device::Cpu).unwrap();
        let segments = Segments::new(vec![2, 3]).unwrap();
        let directions: Vec<Tensor> = params
            .iter()
            .map(|p| {
                let mut shape = vec![2];
                shape.extend_from_slice(p.dims());
                Tensor::randn(0f64, 1., shape, &Device::Cpu).unwrap()
            })
            .collect();
        let reference_embeddings = net.embed(&xs, false).unwrap();
        let emb_directions = reference_embeddings.randn_like(0., 1.).unwrap();
        let first_eig = routes[0]
            .embedding_input_gradient(config, &params, &xs, &emb_directions)
            .unwrap();
        let reference_logits = net.forward_t(&xs, false).unwrap();
        let first = routes[0]
            .segment_gradients(config, &params, &xs, &labels, &segments)
            .unwrap();
        let first_gog = routes[0]
            .gradient_of_gradients(config, &params, &xs, &labels, &segments, &directions)
            .unwrap();
        for route in routes {
            let what = format!("config {k} {route:?}");
            let emb = route.embeddings(config, &params, &xs).unwrap();
            assert!(
                max_abs_diff(&emb, &reference_embeddings) < 1e-10,
                "{what}: embeddings"
            );
            let logits = route.logits(config, &params, &xs).unwrap();
            assert!(
                max_abs_diff(&logits, &reference_logits) < 1e-10,
                "{what}: logits"
            );
            let out = route
                .segment_gradients(config, &params, &xs, &labels, &segments)
                .unwrap();
            for (a, b) in out.losses.iter().zip(&first.losses) {
                assert!((a - b).abs() < 1e-10, "{what}: loss {a} vs {b}");
            }
            for (i, (a, b)) in out.grads.iter().zip(&first.grads).enumerate() {
                let d = max_abs_diff(a, b);
                assert!(d < 1e-9 * scale(b), "{what}: parameter {i} differs by {d}");
            }
            let gog = route
                .gradient_of_gradients(config, &params, &xs, &labels, &segments, &directions)
                .unwrap();
            let d = max_abs_diff(&gog, &first_gog);
            assert!(
                d < 1e-9 * scale(&first_gog),
                "{what}: gradient of gradients differs by {d}"
            );
            let eig = route
                .embedding_input_gradient(config, &params, &xs, &emb_directions)
                .unwrap();
            let d = max_abs_diff(&eig, &first_eig);
            assert!(
                d < 1e-9 * scale(&first_eig),
                "{what}: embedding input gradient differs by {d}"
            );
        }
    }
}

/// A tensor of U(-1, 1) values drawn from `rng` (so that the test is the same every run).
fn seeded(shape: &[usize], rng: &mut rand_chacha::ChaCha8Rng) -> Tensor {
    use rand::Rng;
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The native embedding input gradient against central finite differences of
/// `sum_i <V_i, phi(x_i)>` along random directions, in f64. The step is small (1e-7) so that it
/// rarely crosses a ReLU kink; the inputs are seeded, so the test is the same every run.
#[test]
fn embedding_input_gradient_matches_finite_differences() {
    for (k, config) in configs().iter().enumerate() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10 + k as u64);
        let model = ModelConfig::ConvNet(config.clone());
        let net = Network::new(&model, &mut rng, &Device::Cpu, DType::F64).unwrap();
        let params: Vec<Tensor> = net.vars().iter().map(|v| v.as_detached_tensor()).collect();
        let s = config.image_size;
        let xs = seeded(&[3, config.in_channels, s, s], &mut rng);
        let route = Route::native();
        let dims = route
            .embeddings(config, &params, &xs)
            .unwrap()
            .dims()
            .to_vec();
        let v = seeded(&dims, &mut rng);
        let f = |x: &Tensor| -> f64 {
            let e = route.embeddings(config, &params, x).unwrap();
            (e * &v)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let dx = route
            .embedding_input_gradient(config, &params, &xs, &v)
            .unwrap();
        for trial in 0..3 {
            let u = seeded(xs.dims(), &mut rng);
            let eps = 1e-7;
            let plus = (&xs + (&u * eps).unwrap()).unwrap();
            let minus = (&xs - (&u * eps).unwrap()).unwrap();
            let numeric = (f(&plus) - f(&minus)) / (2.0 * eps);
            let analytic = (&dx * &u)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(
                (numeric - analytic).abs() <= 1e-5 * analytic.abs().max(1.0),
                "config {k} trial {trial}: finite difference {numeric} vs {analytic}"
            );
        }
    }
}

#[test]
fn route_selection() {
    let config = ConvNetConfig::default();
    let cpu = Route::select(&Device::Cpu, DType::F32, &config).unwrap();
    assert_eq!(cpu, Route::native());
    assert_eq!(cpu.untracked(), Untracked::Native);
    assert_eq!(cpu.conv_path(), ConvPath::Im2col);
    assert!(cpu.native_second_order());
    assert!(Route::select(&Device::Cpu, DType::BF16, &config).is_none());
    let batch = ConvNetConfig {
        norm: Norm::Batch,
        ..config
    };
    assert!(Route::select(&Device::Cpu, DType::F32, &batch).is_none());
    let forced = Route::candle_ops(ConvPath::Candle);
    assert!(!forced.native_second_order());
    assert_eq!(forced.conv_path(), ConvPath::Candle);
}

#[test]
fn wrong_parameters_are_named() {
    let config = ConvNetConfig {
        width: 2,
        depth: 1,
        image_size: 4,
        ..ConvNetConfig::default()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let model = ModelConfig::ConvNet(config.clone());
    let net = Network::new(&model, &mut rng, &Device::Cpu, DType::F32).unwrap();
    let mut params: Vec<Tensor> = net.vars().iter().map(|v| v.as_detached_tensor()).collect();
    params[4] = Tensor::zeros((10, 3), DType::F32, &Device::Cpu).unwrap();
    let xs = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    for route in [Route::native(), Route::candle_ops(ConvPath::Im2col)] {
        let err = route.logits(&config, &params, &xs).unwrap_err().to_string();
        assert!(err.contains("`classifier.weight`"), "{route:?}: {err}");
    }
}
