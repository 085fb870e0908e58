//! The ConvNet's one typed description, below the network (`network.rs`) and every backend
//! (`backend/`): its shape rules (the padding of each block, feature-map sizes, what the
//! hand-written passes support), its layout ([`ConvNetLayout`], block by block) and a validated
//! view of its parameters in the documented order ([`ConvNetParams`]).
//!
//! Every pass over the ConvNet — candle's autograd through [`crate::Network`], the candle-op
//! backward pass, the native CPU kernels, the fused CUDA path — reads its sizes and parameter
//! positions from here, so a rule such as "the first conv pads a 28x28 input to 32x32" is
//! written once ([`ConvNetConfig::block_padding`]).

use candle_core::{Result, Tensor};

use crate::config::{Activation, ConvNetConfig, GROUP_NORM_GROUPS, Norm, Pooling};
use crate::error::ModelError;

/// Side of a 3x3 stride-1 convolution's output for an input of side `input` padded by `padding`.
pub fn conv_output_side(input: usize, padding: usize) -> usize {
    input + 2 * padding - 2
}

/// Side after a block's pooling (2x2 windows, stride 2, rounding down), or `side` without it.
pub fn pooled_side(side: usize, pooling: Pooling) -> usize {
    match pooling {
        Pooling::None => side,
        _ => side / 2,
    }
}

/// The shape rules of DC's ConvNet, defined here beside the layout that uses them.
impl ConvNetConfig {
    /// Padding of block `d`'s conv. Block 0 pads its input up to the next power of two when
    /// that takes at most 3 pixels a side (a 3x3 conv loses 2, so padding `p` maps side `s` to
    /// `s + 2p - 2`): 28 -> 32 as DC pads MNIST, 30 -> 32, 14 -> 16; every other block, and a
    /// first block whose input is a power of two (CIFAR's 32, 64) or too far from one, pads by
    /// 1 and keeps the side. The only place this rule is written.
    pub fn block_padding(&self, d: usize) -> usize {
        if d > 0 {
            return 1;
        }
        let grow = self.image_size.next_power_of_two() - self.image_size;
        if grow % 2 == 0 && grow <= 4 {
            grow / 2 + 1
        } else {
            1
        }
    }

    /// Padding of the first conv: [`Self::block_padding`] of block 0.
    pub fn first_padding(&self) -> usize {
        self.block_padding(0)
    }

    /// Side of the feature map each block's conv produces (what its norm sees), block by block.
    /// Defaults: `[32, 16, 8]`.
    pub fn block_sizes(&self) -> Vec<usize> {
        ConvNetLayout::new(self)
            .blocks
            .iter()
            .map(|b| b.conv_side)
            .collect()
    }

    /// Side of the feature map entering the classifier (defaults: 4).
    pub fn output_size(&self) -> usize {
        let mut side = self.image_size;
        for d in 0..self.depth {
            side = pooled_side(conv_output_side(side, self.block_padding(d)), self.pooling);
            if side == 0 || (d > 0 && self.pooling == Pooling::None) {
                // Nothing changes any more (a padding-1 conv keeps the side).
                break;
            }
        }
        side
    }

    /// Length of the flattened features entering the classifier (defaults: 2048).
    pub fn feature_dim(&self) -> usize {
        self.width * self.output_size() * self.output_size()
    }

    /// Checks sizes, depth against image size, and group norm's divisibility.
    pub fn validate(&self) -> std::result::Result<(), ModelError> {
        let model = "convnet";
        for (field, value) in [
            ("in_channels", self.in_channels),
            ("image_size", self.image_size),
            ("n_classes", self.n_classes),
            ("width", self.width),
            ("depth", self.depth),
        ] {
            if value == 0 {
                return Err(ModelError::Zero { model, field });
            }
        }
        if self.pooling != Pooling::None {
            let first = conv_output_side(self.image_size, self.first_padding());
            let max_depth = first.checked_ilog2().unwrap_or(0) as usize;
            if self.depth > max_depth {
                let block = max_depth;
                return Err(ModelError::TooDeep {
                    depth: self.depth,
                    image_size: self.image_size,
                    block,
                    size: first >> block,
                    max_depth,
                });
            }
        }
        if self.norm == Norm::Group && self.width % GROUP_NORM_GROUPS != 0 {
            return Err(ModelError::GroupsDoNotDivide {
                width: self.width,
                groups: GROUP_NORM_GROUPS,
            });
        }
        Ok(())
    }
}

/// Why a ConvNet configuration cannot run through the hand-written passes of
/// [`crate::backend`] (candle ops, native CPU, fused CUDA), if it cannot; such networks train
/// with candle's autograd through [`crate::Network::forward_t`] and cannot be distilled.
pub fn unsupported_reason(config: &ConvNetConfig) -> Option<String> {
    if !matches!(config.norm, Norm::Instance | Norm::None) {
        return Some(format!(
            "norm `{}` is not supported by the distillation engine; use `instance` (the protocol's) or `none`",
            config.norm
        ));
    }
    if !matches!(config.activation, Activation::Relu | Activation::LeakyRelu) {
        return Some(format!(
            "activation `{}` is not supported by the distillation engine; use `relu` (the protocol's) or `leakyrelu`",
            config.activation
        ));
    }
    if !matches!(config.pooling, Pooling::Avg | Pooling::None) {
        return Some(format!(
            "pooling `{}` is not supported by the distillation engine; use `avg` (the protocol's) or `none`",
            config.pooling
        ));
    }
    if config.pooling == Pooling::Avg && config.block_sizes().iter().any(|s| s % 2 != 0) {
        return Some(format!(
            "feature-map sizes {:?} must all be even for average pooling",
            config.block_sizes()
        ));
    }
    None
}

/// Where one block's parameters sit in the parameter order of [`crate::Network::parameters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockIndices {
    /// `features.{d}.conv.weight`.
    pub conv_weight: usize,
    /// `features.{d}.conv.bias`.
    pub conv_bias: usize,
    /// `features.{d}.norm.weight` and `features.{d}.norm.bias`, absent with norm `none`.
    pub norm: Option<(usize, usize)>,
}

/// One conv block: conv 3x3 -> norm -> activation -> pooling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockLayout {
    /// The block's number `d` (`features.{d}`).
    pub index: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Side of the (square) input feature map.
    pub input_side: usize,
    /// Zero padding of the conv ([`ConvNetConfig::block_padding`]).
    pub padding: usize,
    /// Side of the conv's output (what the norm sees).
    pub conv_side: usize,
    /// Side of the block's output, after pooling.
    pub output_side: usize,
    /// Whether the block has a norm layer (with its two parameters).
    pub has_norm: bool,
    /// Whether the block pools.
    pub has_pool: bool,
    /// Shape of each norm parameter: (width) or, for layer norm, (width, s, s).
    pub norm_shape: Vec<usize>,
    /// Positions of the block's parameters.
    pub params: BlockIndices,
}

/// The ConvNet's layout: every block's geometry and parameter positions, then the classifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvNetLayout {
    pub blocks: Vec<BlockLayout>,
    pub norm: Norm,
    pub activation: Activation,
    pub pooling: Pooling,
    pub n_classes: usize,
    /// Channels and side of the feature map entering the classifier.
    pub feature_channels: usize,
    pub feature_side: usize,
    /// Position of `classifier.weight` (classes, feature_dim) and of `classifier.bias`.
    pub classifier_weight: usize,
    pub classifier_bias: usize,
}

impl ConvNetLayout {
    /// The layout of `config` (which need not be supported by the backends; it should be valid).
    pub fn new(config: &ConvNetConfig) -> Self {
        let mut blocks = Vec::with_capacity(config.depth);
        let (mut channels, mut side, mut next) = (config.in_channels, config.image_size, 0);
        let has_norm = config.norm != Norm::None;
        for d in 0..config.depth {
            let padding = config.block_padding(d);
            let conv_side = conv_output_side(side, padding);
            let output_side = pooled_side(conv_side, config.pooling);
            let norm_shape = match config.norm {
                Norm::Layer => vec![config.width, conv_side, conv_side],
                _ => vec![config.width],
            };
            let params = BlockIndices {
                conv_weight: next,
                conv_bias: next + 1,
                norm: has_norm.then_some((next + 2, next + 3)),
            };
            next += if has_norm { 4 } else { 2 };
            blocks.push(BlockLayout {
                index: d,
                in_channels: channels,
                out_channels: config.width,
                input_side: side,
                padding,
                conv_side,
                output_side,
                has_norm,
                has_pool: config.pooling != Pooling::None,
                norm_shape,
                params,
            });
            channels = config.width;
            side = output_side;
        }
        Self {
            blocks,
            norm: config.norm,
            activation: config.activation,
            pooling: config.pooling,
            n_classes: config.n_classes,
            feature_channels: channels,
            feature_side: side,
            classifier_weight: next,
            classifier_bias: next + 1,
        }
    }

    /// Length of the flattened features entering the classifier.
    pub fn feature_dim(&self) -> usize {
        self.feature_channels * self.feature_side * self.feature_side
    }

    /// Number of parameter tensors (the length of [`crate::Network::parameters`]).
    pub fn n_params(&self) -> usize {
        self.classifier_bias + 1
    }

    /// Name and shape of every parameter, in parameter order.
    pub fn param_specs(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::with_capacity(self.n_params());
        for b in &self.blocks {
            let d = b.index;
            out.push((
                format!("features.{d}.conv.weight"),
                vec![b.out_channels, b.in_channels, 3, 3],
            ));
            out.push((format!("features.{d}.conv.bias"), vec![b.out_channels]));
            if b.has_norm {
                out.push((format!("features.{d}.norm.weight"), b.norm_shape.clone()));
                out.push((format!("features.{d}.norm.bias"), b.norm_shape.clone()));
            }
        }
        out.push((
            "classifier.weight".into(),
            vec![self.n_classes, self.feature_dim()],
        ));
        out.push(("classifier.bias".into(), vec![self.n_classes]));
        out
    }
}

/// One block's parameters.
#[derive(Debug, Clone, Copy)]
pub struct BlockParams<'a, T> {
    pub conv_weight: &'a T,
    pub conv_bias: &'a T,
    /// Norm scale (weight) and shift (bias), absent with norm `none`.
    pub norm: Option<(&'a T, &'a T)>,
}

/// A view of a ConvNet's parameters (or of anything laid out like them: gradients, directions)
/// by role instead of by position.
#[derive(Debug, Clone)]
pub struct ConvNetParams<'a, T> {
    pub blocks: Vec<BlockParams<'a, T>>,
    pub classifier_weight: &'a T,
    pub classifier_bias: &'a T,
}

impl<'a, T> ConvNetParams<'a, T> {
    /// Splits `items` (one per parameter, in parameter order) by role; checks their count only.
    pub fn split(layout: &ConvNetLayout, items: &'a [T]) -> Result<Self> {
        if items.len() != layout.n_params() {
            return Err(candle_core::Error::wrap(ModelError::ParamCount {
                expected: layout.n_params(),
                found: items.len(),
            }));
        }
        let blocks = layout
            .blocks
            .iter()
            .map(|b| BlockParams {
                conv_weight: &items[b.params.conv_weight],
                conv_bias: &items[b.params.conv_bias],
                norm: b.params.norm.map(|(w, s)| (&items[w], &items[s])),
            })
            .collect();
        Ok(Self {
            blocks,
            classifier_weight: &items[layout.classifier_weight],
            classifier_bias: &items[layout.classifier_bias],
        })
    }
}

impl<'a> ConvNetParams<'a, Tensor> {
    /// The parameters `params` of a network of layout `layout`, in [`crate::Network::parameters`]
    /// order; checks their count and every shape, and names the first parameter at fault.
    pub fn new(layout: &ConvNetLayout, params: &'a [Tensor]) -> Result<Self> {
        Self::with_leading(layout, params, &[])
    }

    /// As [`Self::new`] for tensors of shape `(*leading, *parameter shape)`, such as per-segment
    /// gradients or directions `(segments, *shape)`.
    pub fn with_leading(
        layout: &ConvNetLayout,
        params: &'a [Tensor],
        leading: &[usize],
    ) -> Result<Self> {
        let view = Self::split(layout, params)?;
        for ((name, shape), p) in layout.param_specs().into_iter().zip(params) {
            let expected: Vec<usize> = leading.iter().copied().chain(shape).collect();
            if p.dims() != expected.as_slice() {
                return Err(candle_core::Error::wrap(ModelError::ParamShape {
                    name,
                    expected,
                    found: p.dims().to_vec(),
                }));
            }
        }
        Ok(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_block_pads_up_to_the_next_power_of_two_when_close() {
        for (side, padding, first) in [
            (28, 3, 32),
            (30, 2, 32),
            (32, 1, 32),
            (14, 2, 16),
            (64, 1, 64),
            (24, 1, 24),
            (96, 1, 96),
        ] {
            let config = ConvNetConfig {
                image_size: side,
                ..ConvNetConfig::default()
            };
            assert_eq!(config.first_padding(), padding, "side {side}");
            assert_eq!(conv_output_side(side, padding), first, "side {side}");
            assert_eq!(config.block_padding(1), 1);
        }
    }

    #[test]
    fn layout_of_the_default_convnet() {
        let config = ConvNetConfig::default();
        let layout = ConvNetLayout::new(&config);
        let sides: Vec<_> = layout
            .blocks
            .iter()
            .map(|b| (b.input_side, b.padding, b.conv_side, b.output_side))
            .collect();
        assert_eq!(sides, [(28, 3, 32, 16), (16, 1, 16, 8), (8, 1, 8, 4)]);
        assert_eq!(layout.feature_dim(), config.feature_dim());
        assert_eq!(layout.n_params(), 14);
        assert_eq!(layout.blocks[2].params.norm, Some((10, 11)));
        assert_eq!((layout.classifier_weight, layout.classifier_bias), (12, 13));
        let flat = ConvNetConfig {
            norm: Norm::None,
            pooling: Pooling::None,
            image_size: 12,
            ..config
        };
        let layout = ConvNetLayout::new(&flat);
        assert_eq!(layout.n_params(), 8);
        assert_eq!(layout.blocks[1].params.conv_bias, 3);
        assert_eq!(layout.feature_side, flat.output_size());
        assert_eq!(flat.block_sizes(), [16, 16, 16], "12 is padded up to 16");
    }

    #[test]
    fn params_are_checked_by_name() {
        let config = ConvNetConfig {
            width: 2,
            depth: 1,
            image_size: 4,
            ..ConvNetConfig::default()
        };
        let layout = ConvNetLayout::new(&config);
        let dev = &candle_core::Device::Cpu;
        let mut params: Vec<Tensor> = layout
            .param_specs()
            .iter()
            .map(|(_, s)| Tensor::zeros(s.as_slice(), candle_core::DType::F32, dev).unwrap())
            .collect();
        let view = ConvNetParams::new(&layout, &params).unwrap();
        assert_eq!(view.blocks[0].conv_weight.dims(), [2, 3, 3, 3]);
        assert!(view.blocks[0].norm.is_some());
        params[3] = Tensor::zeros(3, candle_core::DType::F32, dev).unwrap();
        let err = ConvNetParams::new(&layout, &params)
            .unwrap_err()
            .to_string();
        assert!(err.contains("features.0.norm.bias"), "{err}");
        let err = ConvNetParams::new(&layout, &params[..2])
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected 6 parameter tensors, got 2"), "{err}");
    }
}
