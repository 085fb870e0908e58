//! The networks of debiasdd, in candle: DC's ConvNet family, its MLP and LeNet, PyTorch's default
//! initialisation from a passed RNG, and an SGD with PyTorch's semantics.
//!
//! It sits below the evaluator (`debiasdd-eval`) and the distillation engine, which both build
//! their networks here, and above nothing but candle. It does no I/O except reading and writing
//! the weight files it is asked to.
//!
//! The ConvNet is described once, in [`convnet`] (its layout, shape rules and a typed view of
//! its parameters); [`network`] builds it from candle layers for autograd, and [`backend`] holds
//! the hand-written passes over it (native CPU, candle ops, fused CUDA) behind one
//! [`backend::Backend`] trait, with [`backend::Route::select`] the one place that picks which
//! runs for a device, dtype and network.
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use debiasdd_model::{ConvNetConfig, ModelConfig, Network};
//! use rand::SeedableRng;
//!
//! let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
//! let config = ModelConfig::ConvNet(ConvNetConfig::default()); // 3x28x28 -> 10, width 128
//! let net = Network::new(&config, &mut rng, &Device::Cpu, DType::F32)?;
//! let images = Tensor::zeros((8, 3, 28, 28), DType::F32, &Device::Cpu)?;
//! let logits = net.forward_t(&images, true)?; // (8, 10)
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Parameter order
//!
//! [`Network::parameters`] lists the trainable `Var`s in a fixed order, the order in which the
//! distillation engine matches gradients layer by layer:
//!
//! - ConvNet: block by block, `features.{d}.conv.weight` (width, in, 3, 3),
//!   `features.{d}.conv.bias` (width), then, unless the norm is `none`,
//!   `features.{d}.norm.weight`, `features.{d}.norm.bias` (shape (width) or, for layer norm,
//!   (width, s, s)); last `classifier.weight` (classes, width*s*s), `classifier.bias`.
//!   [`convnet::ConvNetLayout`] holds each one's position and shape
//!   ([`convnet::ConvNetLayout::param_specs`]) and [`convnet::ConvNetParams`] reads a slice in
//!   this order by role.
//! - MLP: `fc_1.weight`, `fc_1.bias`, `fc_2.weight`, `fc_2.bias`, `fc_3.weight`, `fc_3.bias`.
//! - LeNet: `conv_1.*`, `conv_2.*`, `fc_1.*`, `fc_2.*`, `fc_3.*`, weight before bias.
//!
//! Batch norm's running statistics are buffers ([`Network::buffers`]), not parameters. Weights are
//! drawn from the RNG in this same order.
//!
//! # Candle notes (0.11.1)
//!
//! - Batch norm updates its running statistics inside `forward_t(.., train = true)` through
//!   `Var::set`, so forward passes take `&self`.
//! - `Tensor::backward` detaches the gradients it returns: they are first-order only.
//! - Max pooling and odd-sized average pooling avoid candle's own backward passes, which are wrong
//!   there; see [`layers::pool2d`]. Norm layers are written with plain reductions and broadcasts.
//! - On the CPU, candle's conv input gradient (`conv_transpose2d`, no gemm) and its reductions over
//!   non-trailing dimensions are slow; [`ops`] routes around both. Gradients that nothing flows
//!   back into skip candle's ops altogether: [`backend::cpu`] computes them with hand-written
//!   kernels (and the second-order term of gradient matching, forward-over-reverse).
//! - Most of a CPU backward pass at batch 256 can go to page faults: every op allocates a fresh
//!   buffer of up to 134 MB, which glibc serves with `mmap` and returns on free. Binaries should run
//!   with `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>` (or an allocator that keeps freed
//!   memory); the library cannot choose its process's allocator.

pub mod backend;
pub mod config;
pub mod convnet;
pub mod device;
pub mod error;
pub mod layers;
pub mod network;
pub mod ops;
pub mod optim;

pub use config::{Activation, ConvNetConfig, LeNetConfig, MlpConfig, ModelConfig, Norm, Pooling};
pub use error::ModelError;
pub use network::Network;
pub use optim::{Sgd, SgdConfig};
