//! The networks (ConvNet, MLP, LeNet) behind one [`Network`] type: construction from a config
//! and an RNG, forward passes, named parameters and buffers, safetensors I/O.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use rand::Rng;

use crate::backend::Route;
use crate::config::{
    Activation, ConvNetConfig, GROUP_NORM_GROUPS, LeNetConfig, MlpConfig, ModelConfig, Norm,
    Pooling,
};
use crate::convnet::ConvNetLayout;
use crate::error::ModelError;
use crate::layers::{BatchNorm2d, Conv2d, GroupNorm, LayerNorm, Linear, Norm2d, activate, pool2d};

/// One ConvNet block: conv 3x3 -> norm -> activation -> pooling.
#[derive(Debug, Clone)]
struct ConvBlock {
    conv: Conv2d,
    norm: Option<Norm2d>,
    activation: Activation,
    pooling: Pooling,
}

impl ConvBlock {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let xs = xs.apply(&self.conv)?;
        let xs = match &self.norm {
            Some(norm) => norm.forward_t(&xs, train)?,
            None => xs,
        };
        pool2d(&activate(&xs, self.activation)?, self.pooling)
    }
}

#[derive(Debug, Clone)]
struct ConvNet {
    blocks: Vec<ConvBlock>,
    classifier: Linear,
}

impl ConvNet {
    fn new(
        config: &ConvNetConfig,
        rng: &mut impl Rng,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Self> {
        let layout = ConvNetLayout::new(config);
        let mut blocks = Vec::with_capacity(layout.blocks.len());
        for b in &layout.blocks {
            let conv = Conv2d::new(
                b.in_channels,
                b.out_channels,
                3,
                b.padding,
                rng,
                device,
                dtype,
            )?;
            let (c, size) = (b.out_channels, b.conv_side);
            let norm = match config.norm {
                Norm::Instance => Some(Norm2d::Group(GroupNorm::new(c, c, device, dtype)?)),
                Norm::Group => Some(Norm2d::Group(GroupNorm::new(
                    GROUP_NORM_GROUPS,
                    c,
                    device,
                    dtype,
                )?)),
                Norm::Layer => Some(Norm2d::Layer(LayerNorm::new(c, size, device, dtype)?)),
                Norm::Batch => Some(Norm2d::Batch(BatchNorm2d::new(c, device, dtype)?)),
                Norm::None => None,
            };
            blocks.push(ConvBlock {
                conv,
                norm,
                activation: config.activation,
                pooling: config.pooling,
            });
        }
        let classifier = Linear::new(layout.feature_dim(), layout.n_classes, rng, device, dtype)?;
        Ok(Self { blocks, classifier })
    }

    fn embed(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut xs = xs.clone();
        for block in &self.blocks {
            xs = block.forward_t(&xs, train)?;
        }
        xs.flatten_from(1)
    }

    fn parameters(&self, out: &mut Vec<(String, Var)>) {
        for (d, block) in self.blocks.iter().enumerate() {
            block
                .conv
                .push_parameters(&format!("features.{d}.conv"), out);
            if let Some(norm) = &block.norm {
                norm.push_parameters(&format!("features.{d}.norm"), out);
            }
        }
        self.classifier.push_parameters("classifier", out);
    }

    fn buffers(&self, out: &mut Vec<(String, Var)>) {
        for (d, block) in self.blocks.iter().enumerate() {
            if let Some(norm) = &block.norm {
                norm.push_buffers(&format!("features.{d}.norm"), out);
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    fc_1: Linear,
    fc_2: Linear,
    fc_3: Linear,
}

impl Mlp {
    fn new(
        config: &MlpConfig,
        rng: &mut impl Rng,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Self> {
        let input = config.in_channels * config.image_size * config.image_size;
        Ok(Self {
            fc_1: Linear::new(input, config.hidden, rng, device, dtype)?,
            fc_2: Linear::new(config.hidden, config.hidden, rng, device, dtype)?,
            fc_3: Linear::new(config.hidden, config.n_classes, rng, device, dtype)?,
        })
    }

    fn embed(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        xs.flatten_from(1)?
            .apply(&self.fc_1)?
            .relu()?
            .apply(&self.fc_2)?
            .relu()
    }

    fn parameters(&self, out: &mut Vec<(String, Var)>) {
        self.fc_1.push_parameters("fc_1", out);
        self.fc_2.push_parameters("fc_2", out);
        self.fc_3.push_parameters("fc_3", out);
    }
}

#[derive(Debug, Clone)]
struct LeNet {
    conv_1: Conv2d,
    conv_2: Conv2d,
    fc_1: Linear,
    fc_2: Linear,
    fc_3: Linear,
}

impl LeNet {
    fn new(
        config: &LeNetConfig,
        rng: &mut impl Rng,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Self> {
        let padding = config.first_padding();
        Ok(Self {
            conv_1: Conv2d::new(config.in_channels, 6, 5, padding, rng, device, dtype)?,
            conv_2: Conv2d::new(6, 16, 5, 0, rng, device, dtype)?,
            fc_1: Linear::new(config.feature_dim(), 120, rng, device, dtype)?,
            fc_2: Linear::new(120, 84, rng, device, dtype)?,
            fc_3: Linear::new(84, config.n_classes, rng, device, dtype)?,
        })
    }

    fn embed(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs = pool2d(&xs.apply(&self.conv_1)?.relu()?, Pooling::Max)?;
        let xs = pool2d(&xs.apply(&self.conv_2)?.relu()?, Pooling::Max)?;
        xs.flatten_from(1)?
            .apply(&self.fc_1)?
            .relu()?
            .apply(&self.fc_2)?
            .relu()
    }

    fn parameters(&self, out: &mut Vec<(String, Var)>) {
        self.conv_1.push_parameters("conv_1", out);
        self.conv_2.push_parameters("conv_2", out);
        self.fc_1.push_parameters("fc_1", out);
        self.fc_2.push_parameters("fc_2", out);
        self.fc_3.push_parameters("fc_3", out);
    }
}

#[derive(Debug, Clone)]
enum Arch {
    ConvNet(ConvNet),
    Mlp(Mlp),
    LeNet(LeNet),
}

/// A network built from a [`ModelConfig`]: DC's ConvNet family, MLP or LeNet.
///
/// Parameters are `Var`s, listed by [`Network::parameters`] in the order documented at the crate
/// root. Cloning a `Network` shares its variables (like cloning a `Tensor`); build a new one and
/// copy the weights to get an independent copy.
#[derive(Debug, Clone)]
pub struct Network {
    config: ModelConfig,
    arch: Arch,
    device: Device,
    dtype: DType,
}

impl Network {
    /// Validates `config` and builds the network with PyTorch's default initialisation, every
    /// value drawn from `rng` (same seed, same weights; candle's global RNG is never used).
    /// Parameters are drawn layer by layer in [`Network::parameters`] order.
    pub fn new(
        config: &ModelConfig,
        rng: &mut impl Rng,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        if !dtype.is_float() {
            return Err(ModelError::UnsupportedDType(dtype));
        }
        let arch = match config {
            ModelConfig::ConvNet(c) => Arch::ConvNet(ConvNet::new(c, rng, device, dtype)?),
            ModelConfig::Mlp(c) => Arch::Mlp(Mlp::new(c, rng, device, dtype)?),
            ModelConfig::LeNet(c) => Arch::LeNet(LeNet::new(c, rng, device, dtype)?),
        };
        Ok(Self {
            config: config.clone(),
            arch,
            device: device.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Logits, `(N, n_classes)`, of a batch of images `(N, C, H, W)`. `train` selects batch
    /// statistics (and updates the running statistics, in place) for batch norm; every other
    /// layer ignores it.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let features = self.embed(xs, train)?;
        match &self.arch {
            Arch::ConvNet(net) => features.apply(&net.classifier),
            Arch::Mlp(net) => features.apply(&net.fc_3),
            Arch::LeNet(net) => features.apply(&net.fc_3),
        }
    }

    /// Logits for inference, `(N, n_classes)`, tracked by no gradient: `forward_t(xs, false)`
    /// (batch norm on its running statistics). A ConvNet for which
    /// [`crate::backend::Route::select`] picks a route (on the CPU in f32 or f64: the native
    /// kernels) runs that route's logits, the same mathematics without candle's per-op buffers;
    /// every other network goes through `forward_t`.
    pub fn predict_logits(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.check_input(xs)?;
        let xs = xs.detach();
        if let ModelConfig::ConvNet(config) = &self.config {
            if let Some(route) = Route::select(&self.device, self.dtype, config) {
                let params: Vec<Tensor> =
                    self.vars().iter().map(|v| v.as_detached_tensor()).collect();
                return route.logits(config, &params, &xs);
            }
        }
        Ok(self.forward_t(&xs, false)?.detach())
    }

    /// The features the last linear layer sees, `(N, D)`: the flattened output of the conv
    /// blocks for ConvNet (D = width * s * s, DM's embedding), the last hidden activations for
    /// MLP and LeNet.
    pub fn embed(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.check_input(xs)?;
        match &self.arch {
            Arch::ConvNet(net) => net.embed(xs, train),
            Arch::Mlp(net) => net.embed(xs),
            Arch::LeNet(net) => net.embed(xs),
        }
    }

    fn check_input(&self, xs: &Tensor) -> candle_core::Result<()> {
        let (c, s) = (self.config.in_channels(), self.config.image_size());
        match xs.dims() {
            &[_, xc, xh, xw] if (xc, xh, xw) == (c, s, s) => Ok(()),
            dims => candle_core::bail!(
                "{} expects images of shape (N, {c}, {s}, {s}), got {dims:?}",
                self.config.kind()
            ),
        }
    }

    /// The trainable parameters, in a fixed order:
    ///
    /// - ConvNet: for each block `d` in order, `features.{d}.conv.weight`,
    ///   `features.{d}.conv.bias`, then (unless norm = none) `features.{d}.norm.weight`,
    ///   `features.{d}.norm.bias`; finally `classifier.weight`, `classifier.bias`.
    /// - MLP: `fc_1.weight`, `fc_1.bias`, `fc_2.*`, `fc_3.*`.
    /// - LeNet: `conv_1.weight`, `conv_1.bias`, `conv_2.*`, `fc_1.*`, `fc_2.*`, `fc_3.*`.
    pub fn parameters(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        match &self.arch {
            Arch::ConvNet(net) => net.parameters(&mut out),
            Arch::Mlp(net) => net.parameters(&mut out),
            Arch::LeNet(net) => net.parameters(&mut out),
        }
        out
    }

    /// The parameters without names, in [`Network::parameters`] order (for an optimiser).
    pub fn vars(&self) -> Vec<Var> {
        self.parameters().into_iter().map(|(_, var)| var).collect()
    }

    /// Non-trainable state: batch norm's `features.{d}.norm.running_mean` and
    /// `features.{d}.norm.running_var`, block by block; empty for every other network.
    pub fn buffers(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        if let Arch::ConvNet(net) = &self.arch {
            net.buffers(&mut out);
        }
        out
    }

    /// Number of trainable scalars.
    pub fn n_parameters(&self) -> usize {
        self.parameters().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Writes parameters and buffers, under their names, to a safetensors file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), ModelError> {
        let path = path.as_ref();
        let tensors: HashMap<String, Tensor> = self
            .parameters()
            .into_iter()
            .chain(self.buffers())
            .map(|(name, var)| (name, var.as_detached_tensor()))
            .collect();
        candle_core::safetensors::save(&tensors, path).map_err(|source| ModelError::File {
            path: path.to_owned(),
            source,
        })
    }

    /// Overwrites parameters and buffers, in place, with those of a safetensors file written by
    /// [`Network::save`] for the same architecture. Every tensor must be present with the right
    /// shape and nothing else may be in the file; values are cast to this network's dtype.
    pub fn load_weights(&mut self, path: impl AsRef<Path>) -> Result<(), ModelError> {
        let path = path.as_ref();
        let mut tensors = candle_core::safetensors::load(path, &self.device).map_err(|source| {
            ModelError::File {
                path: path.to_owned(),
                source,
            }
        })?;
        let slots: Vec<(String, Var)> = self
            .parameters()
            .into_iter()
            .chain(self.buffers())
            .collect();
        // Check everything before changing anything.
        for (name, var) in &slots {
            let tensor = tensors.get(name).ok_or_else(|| ModelError::MissingTensor {
                path: path.to_owned(),
                name: name.clone(),
            })?;
            if tensor.dims() != var.dims() {
                return Err(ModelError::ShapeMismatch {
                    path: path.to_owned(),
                    name: name.clone(),
                    expected: var.dims().to_vec(),
                    found: tensor.dims().to_vec(),
                });
            }
        }
        if tensors.len() > slots.len() {
            let mut extra: Vec<&String> = tensors
                .keys()
                .filter(|k| !slots.iter().any(|(name, _)| name == *k))
                .collect();
            extra.sort();
            return Err(ModelError::UnexpectedTensor {
                path: path.to_owned(),
                name: extra[0].clone(),
            });
        }
        for (name, var) in &slots {
            let tensor = tensors.remove(name).expect("checked above");
            var.set(&tensor.to_dtype(self.dtype)?)?;
        }
        Ok(())
    }
}

impl ModuleT for Network {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Network::forward_t(self, xs, train)
    }
}
