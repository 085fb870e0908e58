fn run(label: &str) -> candle_core::Result<()> {
    use candle_core::{DType, Device, Tensor};
    use std::time::Instant;
    let d = Device::Cpu;
    let n = 256;
    let x0 = Tensor::rand(0f32, 1., (n, 3, 28, 28), &d)?;
    let labels = Tensor::from_vec((0..n as u32).map(|i| i % 10).collect(), n, &d)?;
    for width in [128usize, 32] {
        let cfg = debiasdd_model::ModelConfig::ConvNet(debiasdd_model::ConvNetConfig { width, ..Default::default() });
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        let net = debiasdd_model::Network::new(&cfg, &mut rng, &d, DType::F32).unwrap();
        let (mut fwd, mut both) = (f64::MAX, f64::MAX);
        for _ in 0..4 {
            let s = Instant::now();
            let logits = net.forward_t(&x0, true)?;
            fwd = fwd.min(s.elapsed().as_secs_f64());
            let s = Instant::now();
            let logits2 = net.forward_t(&x0, true)?;
            let g = candle_nn::loss::cross_entropy(&logits2, &labels)?.backward()?;
            both = both.min(s.elapsed().as_secs_f64());
            drop((logits, g));
        }
        println!("{label} w{width}: fwd {:.0} img/s, fwd+bwd {:.0} img/s (best of 4)", n as f64 / fwd, n as f64 / both);
    }
    Ok(())
}
