//! The native CPU backend's forward pass (`backend/cpu`): the conv blocks and the classifier,
//! channels-last, keeping what the backward pass needs when asked.

use candle_core::{Result, Tensor};

use super::gemm::{MatRef, matmul};
use super::im2col::{BlockShape, im2col, permute_channels, swap_last_two, weight_to_cols};
use super::norm::{bias_act_forward, instance_norm_act_forward, negative_slope, pool_forward};
use super::{Real, tensor_vec};
use crate::ConvNetConfig;
use crate::convnet::{ConvNetLayout, ConvNetParams};
use crate::layers::NORM_EPS;

/// What one block's backward pass needs.
pub(super) struct BlockCache<T> {
    pub shape: BlockShape,
    /// im2col of the block input (N*hw, 9C); reused for the input gradient.
    pub cols: Vec<T>,
    /// Normalised conv output with instance norm, else the conv output (N*hw, O).
    pub pre: Vec<T>,
    /// 1/std per (image, channel) with instance norm (N*O).
    pub inv_std: Vec<T>,
    /// Weight in column order (O, 9C).
    pub weight: Vec<T>,
}

/// The forward pass, channels-last, and what the backward pass needs of it.
pub(super) struct ForwardPass<T> {
    /// One cache per block when asked for, else none.
    pub blocks: Vec<BlockCache<T>>,
    /// The classifier's input, (N, h*w*c) channels-last.
    pub features: Vec<T>,
    /// The last block's output size: height, width, channels.
    pub feature_shape: (usize, usize, usize),
    /// The classifier weight permuted to channels-last features, (K, h*w*c).
    pub w_fc: Vec<T>,
    /// (N, K).
    pub logits: Vec<T>,
    pub n_classes: usize,
}

/// Runs the conv blocks and the classifier on `xs`; `keep` keeps each block's column matrix,
/// pre-activation and 1/std for a backward pass (without it, each block's buffers are freed as
/// soon as the next block has its input).
pub(super) fn forward_pass<T: Real>(
    config: &ConvNetConfig,
    params: &[Tensor],
    xs: &Tensor,
    keep: bool,
) -> Result<ForwardPass<T>> {
    let layout = ConvNetLayout::new(config);
    let net = ConvNetParams::new(&layout, params)?;
    let (n, c0, h0, w0) = xs.dims4()?;
    let eps = T::from(NORM_EPS).expect("eps fits the float type");
    let negative = negative_slope::<T>(config.activation);

    // Channels-last input.
    let mut a = permute_channels(&tensor_vec::<T>(xs)?, c0, h0 * w0, true);

    // Forward.
    let mut blocks: Vec<BlockCache<T>> =
        Vec::with_capacity(if keep { layout.blocks.len() } else { 0 });
    for (b, p) in layout.blocks.iter().zip(&net.blocks) {
        let s = BlockShape::new(n, b);
        let (o, c) = (s.o, s.c);
        let (hw, k) = (s.hw(), s.k());
        let weight = weight_to_cols(&tensor_vec::<T>(p.conv_weight)?, o, c);
        let bias: Vec<T> = tensor_vec(p.conv_bias)?;
        let cols = im2col(&a, s);
        let mut z = vec![T::zero(); n * hw * o];
        matmul(
            &mut z,
            MatRef::rows(&cols, n * hw, k),
            MatRef::rows(&weight, o, k).t(),
        );
        let mut inv_std = Vec::new();
        let mut act = vec![T::zero(); z.len()];
        if let Some((scale, shift)) = p.norm {
            let gamma: Vec<T> = tensor_vec(scale)?;
            let beta: Vec<T> = tensor_vec(shift)?;
            inv_std = vec![T::zero(); n * o];
            instance_norm_act_forward(
                &mut z,
                &mut inv_std,
                &mut act,
                (&bias, &gamma, &beta),
                (hw, o),
                eps,
                negative,
            );
        } else {
            bias_act_forward(&mut z, &mut act, &bias, o, negative);
        }
        let (ho, wo) = (s.ho(), s.wo());
        a = if b.has_pool {
            pool_forward(&act, n, ho, wo, o)
        } else {
            act
        };
        if keep {
            blocks.push(BlockCache {
                shape: s,
                cols,
                pre: z,
                inv_std,
                weight,
            });
        }
    }

    // Classifier: features are channels-last (N, h*w*c); the weight is permuted to match.
    let (h, w, c) = (
        layout.feature_side,
        layout.feature_side,
        layout.feature_channels,
    );
    let n_classes = layout.n_classes;
    let feat_dim = h * w * c;
    let mut w_fc = vec![T::zero(); n_classes * feat_dim];
    swap_last_two(
        &tensor_vec::<T>(net.classifier_weight)?,
        n_classes,
        c,
        h * w,
        &mut w_fc,
    );
    let b_fc: Vec<T> = tensor_vec(net.classifier_bias)?;
    let mut logits = vec![T::zero(); n * n_classes];
    matmul(
        &mut logits,
        MatRef::rows(&a, n, feat_dim),
        MatRef::rows(&w_fc, n_classes, feat_dim).t(),
    );
    for row in logits.chunks_mut(n_classes) {
        row.iter_mut().zip(&b_fc).for_each(|(l, b)| *l += *b);
    }
    Ok(ForwardPass {
        blocks,
        features: a,
        feature_shape: (h, w, c),
        w_fc,
        logits,
        n_classes,
    })
}
