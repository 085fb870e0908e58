//! Network configs: serde structs with `Default`s that reproduce the DC code's networks, and the
//! one place they are validated ([`ModelConfig::validate`], called by `Network::new`; the
//! ConvNet's checks sit with its shape rules in [`crate::convnet`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// Implements `FromStr` (case-insensitive, with aliases such as the DC code's `instancenorm`) and
/// `Display` (the canonical, serde name) for a fieldless config enum.
macro_rules! named_enum {
    ($ty:ident, $what:literal, [$($variant:ident => $name:literal $(| $alias:literal)*),+ $(,)?]) => {
        impl $ty {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The canonical name, as serde and `Display` write it.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $ty {
            type Err = ModelError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s.to_ascii_lowercase().as_str() {
                    $($name $(| $alias)* => Ok($ty::$variant),)+
                    _ => Err(ModelError::Parse {
                        what: $what,
                        value: s.to_owned(),
                        expected: concat!($($name, " "),+),
                    }),
                }
            }
        }
    };
}

/// The normalisation layer after each convolution, as in the DC code. All use eps = 1e-5 and
/// have an affine weight (initialised to 1) and bias (initialised to 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Norm {
    /// Instance norm as DC writes it: `GroupNorm(groups = channels)`, per-channel affine.
    #[default]
    Instance,
    /// `BatchNorm2d`: batch statistics in training (and running-statistic updates with momentum
    /// 0.1, unbiased variance), running statistics in evaluation.
    Batch,
    /// `LayerNorm` over (C, H, W) with an elementwise affine of shape (C, H, W).
    Layer,
    /// `GroupNorm` with [`GROUP_NORM_GROUPS`] groups, per-channel affine.
    Group,
    /// No normalisation.
    None,
}

named_enum!(Norm, "norm", [
    Instance => "instance" | "instancenorm" | "instance-norm" | "instance_norm",
    Batch => "batch" | "batchnorm" | "batch-norm" | "batch_norm",
    Layer => "layer" | "layernorm" | "layer-norm" | "layer_norm",
    Group => "group" | "groupnorm" | "group-norm" | "group_norm",
    None => "none",
]);

/// The number of groups of [`Norm::Group`] (DC: `nn.GroupNorm(4, C)`).
pub const GROUP_NORM_GROUPS: usize = 4;

/// The activation after each normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Activation {
    #[default]
    Relu,
    /// Leaky ReLU with negative slope [`LEAKY_RELU_SLOPE`].
    LeakyRelu,
    Sigmoid,
    /// Swish = x * sigmoid(x) (SiLU).
    Swish,
}

named_enum!(Activation, "activation", [
    Relu => "relu",
    LeakyRelu => "leaky-relu" | "leakyrelu" | "leaky_relu",
    Sigmoid => "sigmoid",
    Swish => "swish" | "silu",
]);

/// The negative slope of [`Activation::LeakyRelu`] (PyTorch's default).
pub const LEAKY_RELU_SLOPE: f64 = 0.01;

/// The pooling at the end of each block: 2x2 windows, stride 2, rounding sizes down as PyTorch
/// does (an odd last row and column are dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    #[default]
    Avg,
    Max,
    None,
}

named_enum!(Pooling, "pooling", [
    Avg => "avg" | "avgpooling" | "average",
    Max => "max" | "maxpooling",
    None => "none",
]);

/// DC's ConvNet: `depth` blocks of [conv 3x3 -> norm -> activation -> pooling], then flatten and
/// one linear layer. The first conv pads the input up to the next power of two when that takes
/// at most 3 pixels a side (28 -> 32 whatever the channel count, as DC pads MNIST; 30 -> 32;
/// 32 or 64 keep padding 1) and every other conv pads by 1, so the defaults give feature maps of
/// 32/16/8/4 and a 128*4*4 = 2048 -> 10 classifier. The shape rules (`block_padding`,
/// `block_sizes`, `feature_dim`, ...) and `validate` are in [`crate::convnet`], with the layout
/// every pass reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConvNetConfig {
    pub in_channels: usize,
    /// Height = width of the (square) input images.
    pub image_size: usize,
    pub n_classes: usize,
    /// Channels of every conv layer.
    pub width: usize,
    /// Number of blocks.
    pub depth: usize,
    pub norm: Norm,
    pub activation: Activation,
    pub pooling: Pooling,
}

impl Default for ConvNetConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            image_size: 28,
            n_classes: 10,
            width: 128,
            depth: 3,
            norm: Norm::Instance,
            activation: Activation::Relu,
            pooling: Pooling::Avg,
        }
    }
}

/// DC's MLP: flatten, linear in -> hidden, ReLU, hidden -> hidden, ReLU, hidden -> classes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MlpConfig {
    pub in_channels: usize,
    pub image_size: usize,
    pub n_classes: usize,
    pub hidden: usize,
}

impl Default for MlpConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            image_size: 28,
            n_classes: 10,
            hidden: 128,
        }
    }
}

impl MlpConfig {
    /// Checks that no size is zero.
    pub fn validate(&self) -> Result<(), ModelError> {
        for (field, value) in [
            ("in_channels", self.in_channels),
            ("image_size", self.image_size),
            ("n_classes", self.n_classes),
            ("hidden", self.hidden),
        ] {
            if value == 0 {
                return Err(ModelError::Zero {
                    model: "mlp",
                    field,
                });
            }
        }
        Ok(())
    }
}

/// DC's LeNet-5: conv(c, 6, 5, padding 2 where that makes the input a power of two, else 0), ReLU, max-pool 2, conv(6, 16,
/// 5), ReLU, max-pool 2, then fc 16*5*5 -> 120, ReLU, 120 -> 84, ReLU, 84 -> classes. (DC pads
/// only 1-channel input and so breaks on 3-channel 28x28; this pads any 28x28 input.) Sizes
/// other than 28 and 32 get a classifier input of 16*s*s for the resulting side s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeNetConfig {
    pub in_channels: usize,
    pub image_size: usize,
    pub n_classes: usize,
}

impl Default for LeNetConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            image_size: 28,
            n_classes: 10,
        }
    }
}

impl LeNetConfig {
    /// Padding of the first conv: 2 when that makes the input a power of two (28 -> 32, as DC
    /// pads MNIST), else 0 (CIFAR's 32 goes in as it is).
    pub fn first_padding(&self) -> usize {
        if (self.image_size + 4).is_power_of_two() {
            2
        } else {
            0
        }
    }

    /// Side of the feature map entering the classifier, `None` if the image is too small.
    pub fn output_size(&self) -> Option<usize> {
        let conv1 = (self.image_size + 2 * self.first_padding()).checked_sub(4)?;
        let conv2 = (conv1 / 2).checked_sub(4)?;
        Some(conv2 / 2).filter(|&s| s > 0)
    }

    /// Length of the flattened features entering `fc_1` (16*5*5 = 400 for 28x28 and 32x32).
    pub fn feature_dim(&self) -> usize {
        16 * self.output_size().unwrap_or(0).pow(2)
    }

    /// Checks that no size is zero and that the image survives both conv-pool stages.
    pub fn validate(&self) -> Result<(), ModelError> {
        for (field, value) in [
            ("in_channels", self.in_channels),
            ("image_size", self.image_size),
            ("n_classes", self.n_classes),
        ] {
            if value == 0 {
                return Err(ModelError::Zero {
                    model: "lenet",
                    field,
                });
            }
        }
        if self.output_size().is_none() {
            return Err(ModelError::ImageTooSmall {
                model: "lenet",
                image_size: self.image_size,
                min: 16,
            });
        }
        Ok(())
    }
}

/// Which network to build. Serialised with a `kind` tag, e.g.
/// `{"kind": "convnet", "width": 32, "norm": "batch"}`; missing fields take their defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ModelConfig {
    #[serde(rename = "convnet")]
    ConvNet(ConvNetConfig),
    Mlp(MlpConfig),
    #[serde(rename = "lenet")]
    LeNet(LeNetConfig),
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self::ConvNet(ConvNetConfig::default())
    }
}

impl From<ConvNetConfig> for ModelConfig {
    fn from(config: ConvNetConfig) -> Self {
        Self::ConvNet(config)
    }
}

impl From<MlpConfig> for ModelConfig {
    fn from(config: MlpConfig) -> Self {
        Self::Mlp(config)
    }
}

impl From<LeNetConfig> for ModelConfig {
    fn from(config: LeNetConfig) -> Self {
        Self::LeNet(config)
    }
}

impl ModelConfig {
    /// Checks the config; `Network::new` calls this, so a built network is always valid.
    pub fn validate(&self) -> Result<(), ModelError> {
        match self {
            Self::ConvNet(c) => c.validate(),
            Self::Mlp(c) => c.validate(),
            Self::LeNet(c) => c.validate(),
        }
    }

    /// `"convnet"`, `"mlp"` or `"lenet"`, the serde tag.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ConvNet(_) => "convnet",
            Self::Mlp(_) => "mlp",
            Self::LeNet(_) => "lenet",
        }
    }

    pub fn in_channels(&self) -> usize {
        match self {
            Self::ConvNet(c) => c.in_channels,
            Self::Mlp(c) => c.in_channels,
            Self::LeNet(c) => c.in_channels,
        }
    }

    pub fn image_size(&self) -> usize {
        match self {
            Self::ConvNet(c) => c.image_size,
            Self::Mlp(c) => c.image_size,
            Self::LeNet(c) => c.image_size,
        }
    }

    pub fn n_classes(&self) -> usize {
        match self {
            Self::ConvNet(c) => c.n_classes,
            Self::Mlp(c) => c.n_classes,
            Self::LeNet(c) => c.n_classes,
        }
    }

    /// The same network for inputs of `in_channels` x `image_size` x `image_size` and
    /// `n_classes` outputs: the data, not the config, decides the input and output sizes.
    pub fn for_input(&self, in_channels: usize, image_size: usize, n_classes: usize) -> Self {
        let mut config = self.clone();
        match &mut config {
            Self::ConvNet(c) => {
                (c.in_channels, c.image_size, c.n_classes) = (in_channels, image_size, n_classes)
            }
            Self::Mlp(c) => {
                (c.in_channels, c.image_size, c.n_classes) = (in_channels, image_size, n_classes)
            }
            Self::LeNet(c) => {
                (c.in_channels, c.image_size, c.n_classes) = (in_channels, image_size, n_classes)
            }
        }
        config
    }
}
