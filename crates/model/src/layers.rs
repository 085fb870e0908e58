//! The building blocks: conv, linear and normalisation layers holding `Var`s, activations and
//! pooling, PyTorch's default initialisation from a passed RNG.
//!
//! Everything here is composed of candle ops, and of the fast-backward conv and per-channel ops of
//! [`crate::ops`], whose backward passes are right for the shapes used (checked against finite
//! differences in `tests/gradcheck.rs`). Two candle 0.11.1 backward
//! passes are avoided on purpose: `max_pool2d`'s (it scales the gradient by the fraction of
//! maxima in the window, so a unique maximum gets a quarter of its gradient), and `avg_pool2d`'s
//! on odd sizes (nearest upsampling of the gradient misplaces it); see [`pool2d`].

use candle_core::{DType, Device, Module, Result, Shape, Tensor, Var};
use rand::Rng;

use crate::config::{Activation, LEAKY_RELU_SLOPE, Pooling};
use crate::ops;

/// The eps of every normalisation layer (PyTorch's default).
pub const NORM_EPS: f64 = 1e-5;
/// The running-statistics momentum of batch norm (PyTorch's default).
pub const BATCH_NORM_MOMENTUM: f64 = 0.1;

/// A variable of the given shape drawn from U(-bound, bound). Values are drawn in f64 from `rng`
/// in row-major order and then cast, so f32 and f64 networks built from the same seed hold the
/// same weights up to rounding.
pub fn uniform_var(
    rng: &mut impl Rng,
    shape: impl Into<Shape>,
    bound: f64,
    device: &Device,
    dtype: DType,
) -> Result<Var> {
    let shape = shape.into();
    let data: Vec<f64> = (0..shape.elem_count())
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    let tensor = Tensor::from_vec(data, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?;
    Var::from_tensor(&tensor)
}

/// A conv or linear layer's weight and bias with PyTorch's default initialisation:
/// kaiming-uniform with a = sqrt(5) for the weight, which is U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
/// and the same bound for the bias. The weight is drawn before the bias, as PyTorch does.
fn weight_and_bias(
    rng: &mut impl Rng,
    weight_shape: Shape,
    device: &Device,
    dtype: DType,
) -> Result<(Var, Var)> {
    let dims = weight_shape.dims();
    let fan_in: usize = dims[1..].iter().product();
    let bound = 1.0 / (fan_in as f64).sqrt();
    let out = dims[0];
    let weight = uniform_var(rng, weight_shape, bound, device, dtype)?;
    let bias = uniform_var(rng, out, bound, device, dtype)?;
    Ok((weight, bias))
}

/// Appends `(prefix.name, var)` to `out`.
fn push(out: &mut Vec<(String, Var)>, prefix: &str, name: &str, var: &Var) {
    out.push((format!("{prefix}.{name}"), var.clone()));
}

/// 2-D convolution, stride 1, square kernel, zero padding, with bias.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Var,
    bias: Var,
    padding: usize,
}

impl Conv2d {
    /// A PyTorch-initialised `in_channels -> out_channels` conv with a `kernel x kernel` window.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        padding: usize,
        rng: &mut impl Rng,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let shape = Shape::from((out_channels, in_channels, kernel, kernel));
        let (weight, bias) = weight_and_bias(rng, shape, device, dtype)?;
        Ok(Self {
            weight,
            bias,
            padding,
        })
    }

    pub fn weight(&self) -> &Var {
        &self.weight
    }

    pub fn bias(&self) -> &Var {
        &self.bias
    }

    /// Appends `prefix.weight`, `prefix.bias`.
    pub fn push_parameters(&self, prefix: &str, out: &mut Vec<(String, Var)>) {
        push(out, prefix, "weight", &self.weight);
        push(out, prefix, "bias", &self.bias);
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = ops::conv2d(xs, &self.weight, self.padding)?;
        ops::channel_affine(&ys, None, &self.bias)
    }
}

/// Fully connected layer `y = x W^T + b` on (N, in) input.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Var,
    bias: Var,
}

impl Linear {
    /// A PyTorch-initialised `in_features -> out_features` layer.
    pub fn new(
        in_features: usize,
        out_features: usize,
        rng: &mut impl Rng,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let shape = Shape::from((out_features, in_features));
        let (weight, bias) = weight_and_bias(rng, shape, device, dtype)?;
        Ok(Self { weight, bias })
    }

    pub fn weight(&self) -> &Var {
        &self.weight
    }

    pub fn bias(&self) -> &Var {
        &self.bias
    }

    /// Appends `prefix.weight`, `prefix.bias`.
    pub fn push_parameters(&self, prefix: &str, out: &mut Vec<(String, Var)>) {
        push(out, prefix, "weight", &self.weight);
        push(out, prefix, "bias", &self.bias);
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// `GroupNorm(groups, C)` with per-channel affine; `groups = C` is DC's instance norm.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    groups: usize,
    weight: Var,
    bias: Var,
}

impl GroupNorm {
    /// Weight 1, bias 0. `channels` must be a multiple of `groups` (configs check this).
    pub fn new(groups: usize, channels: usize, device: &Device, dtype: DType) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            candle_core::bail!("group norm: {channels} channels do not split into {groups} groups")
        }
        Ok(Self {
            groups,
            weight: Var::ones(channels, dtype, device)?,
            bias: Var::zeros(channels, dtype, device)?,
        })
    }

    pub fn weight(&self) -> &Var {
        &self.weight
    }

    pub fn bias(&self) -> &Var {
        &self.bias
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = xs.dims4()?;
        let normalized = xs
            .reshape((n, self.groups, (c / self.groups) * h * w))
            .and_then(|x| ops::normalize_last(&x, NORM_EPS))?
            .reshape((n, c, h, w))?;
        ops::channel_affine(&normalized, Some(&self.weight), &self.bias)
    }
}

/// `LayerNorm((C, H, W))` with elementwise affine of shape (C, H, W).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Var,
    bias: Var,
}

impl LayerNorm {
    /// Weight 1, bias 0, both of shape `(channels, size, size)`.
    pub fn new(channels: usize, size: usize, device: &Device, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: Var::ones((channels, size, size), dtype, device)?,
            bias: Var::zeros((channels, size, size), dtype, device)?,
        })
    }

    pub fn weight(&self) -> &Var {
        &self.weight
    }

    pub fn bias(&self) -> &Var {
        &self.bias
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = xs.dims4()?;
        xs.reshape((n, 1, c * h * w))
            .and_then(|x| ops::normalize_last(&x, NORM_EPS))?
            .reshape((n, c, h, w))?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// `BatchNorm2d(C)`: affine weight 1 / bias 0, running mean 0 / variance 1.
///
/// In training the batch statistics normalise (biased variance) and the running statistics are
/// updated in place, `r = (1 - 0.1) r + 0.1 s` with the unbiased variance, as PyTorch does; the
/// update goes through `Var::set` (candle's interior mutability), so the forward pass keeps
/// `&self`. In evaluation the running statistics normalise.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Var,
    bias: Var,
    running_mean: Var,
    running_var: Var,
}

impl BatchNorm2d {
    pub fn new(channels: usize, device: &Device, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: Var::ones(channels, dtype, device)?,
            bias: Var::zeros(channels, dtype, device)?,
            running_mean: Var::zeros(channels, dtype, device)?,
            running_var: Var::ones(channels, dtype, device)?,
        })
    }

    pub fn weight(&self) -> &Var {
        &self.weight
    }

    pub fn bias(&self) -> &Var {
        &self.bias
    }

    pub fn running_mean(&self) -> &Var {
        &self.running_mean
    }

    pub fn running_var(&self) -> &Var {
        &self.running_var
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let (n, _, h, w) = xs.dims4()?;
        let normalized = if train {
            let count = n * h * w;
            if count < 2 {
                candle_core::bail!(
                    "batch norm in training needs more than one value per channel, got input {:?}",
                    xs.dims()
                )
            }
            let mean = ops::channel_mean(xs)?;
            let centred =
                ops::channels_rows(xs)?.broadcast_sub(&ops::expand_channels(&mean, n)?)?;
            let var = centred
                .sqr()?
                .mean_keepdim(2)?
                .mean_keepdim(0)?
                .flatten_all()?;
            let inv_std = (&var + NORM_EPS)?.sqrt()?.recip()?;
            let m = BATCH_NORM_MOMENTUM;
            let unbiased = (var.detach() * (count as f64 / (count - 1) as f64))?;
            let new_mean =
                ((self.running_mean.as_detached_tensor() * (1.0 - m))? + (mean.detach() * m)?)?;
            let new_var = ((self.running_var.as_detached_tensor() * (1.0 - m))? + (unbiased * m)?)?;
            self.running_mean.set(&new_mean)?;
            self.running_var.set(&new_var)?;
            centred
                .broadcast_mul(&ops::expand_channels(&inv_std, n)?)?
                .reshape(xs.shape())?
        } else {
            let mean = self.running_mean.as_detached_tensor();
            let inv_std = (self.running_var.as_detached_tensor() + NORM_EPS)?
                .sqrt()?
                .recip()?;
            ops::channel_normalize(xs, &mean, &inv_std)?
        };
        ops::channel_affine(&normalized, Some(&self.weight), &self.bias)
    }
}

/// One of the normalisation layers of a ConvNet block.
#[derive(Debug, Clone)]
pub enum Norm2d {
    /// Group norm; instance norm is the case groups = channels.
    Group(GroupNorm),
    Layer(LayerNorm),
    Batch(BatchNorm2d),
}

impl Norm2d {
    /// `train` only matters for batch norm.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Group(norm) => norm.forward(xs),
            Self::Layer(norm) => norm.forward(xs),
            Self::Batch(norm) => norm.forward_t(xs, train),
        }
    }

    /// Appends `prefix.weight`, `prefix.bias`.
    pub fn push_parameters(&self, prefix: &str, out: &mut Vec<(String, Var)>) {
        let (weight, bias) = match self {
            Self::Group(norm) => (&norm.weight, &norm.bias),
            Self::Layer(norm) => (&norm.weight, &norm.bias),
            Self::Batch(norm) => (&norm.weight, &norm.bias),
        };
        push(out, prefix, "weight", weight);
        push(out, prefix, "bias", bias);
    }

    /// Appends `prefix.running_mean`, `prefix.running_var` (batch norm only).
    pub fn push_buffers(&self, prefix: &str, out: &mut Vec<(String, Var)>) {
        if let Self::Batch(norm) = self {
            push(out, prefix, "running_mean", &norm.running_mean);
            push(out, prefix, "running_var", &norm.running_var);
        }
    }
}

/// Applies an activation function.
pub fn activate(xs: &Tensor, activation: Activation) -> Result<Tensor> {
    match activation {
        Activation::Relu => xs.relu(),
        // relu(x) (1 - s) + s x: x for x > 0, s x below; plain ops, plain gradients.
        Activation::LeakyRelu => {
            (xs.relu()? * (1.0 - LEAKY_RELU_SLOPE))? + (xs * LEAKY_RELU_SLOPE)?
        }
        Activation::Sigmoid => candle_nn::ops::sigmoid(xs),
        Activation::Swish => xs.silu(),
    }
}

/// 2x2 pooling with stride 2 that rounds sizes down like PyTorch (an odd last row or column is
/// dropped), with correct gradients.
///
/// The input is cropped to even sizes first, because candle 0.11.1's `avg_pool2d` backward
/// upsamples the gradient to the input size and misplaces it when that size is not a multiple of
/// the window. Max pooling does not use candle's `max_pool2d`, whose backward multiplies the
/// gradient by the *fraction* of maxima in the window (a quarter for a unique maximum): it takes
/// the argmax of each window and multiplies the window by its one-hot mask, so the whole gradient
/// goes to one element, the first maximum in row-major window order, as in PyTorch. (A mask
/// rather than `gather`, because candle's `scatter_add` backward, which second-order gradients
/// through `gather` need, fails with a shape error.) Exact ties are common in the ConvNet: with
/// 28x28 input the first conv's padding of 3 makes its border rows and columns equal to the bias,
/// and a rule that gave every tied element the gradient would double it there.
pub fn pool2d(xs: &Tensor, pooling: Pooling) -> Result<Tensor> {
    if pooling == Pooling::None {
        return Ok(xs.clone());
    }
    let (n, c, h, w) = xs.dims4()?;
    let (ho, wo) = (h / 2, w / 2);
    let xs = if (2 * ho, 2 * wo) != (h, w) {
        xs.narrow(2, 0, 2 * ho)?.narrow(3, 0, 2 * wo)?
    } else {
        xs.clone()
    };
    match pooling {
        Pooling::Avg => xs.avg_pool2d(2),
        Pooling::Max => {
            let windows = xs
                .reshape((n, c, ho, 2, wo, 2))?
                .permute((0, 1, 2, 4, 3, 5))?
                .reshape((n, c, ho, wo, 4))?;
            let first_max = windows.argmax_keepdim(4)?;
            let positions = Tensor::arange(0u32, 4, xs.device())?.reshape((1, 1, 1, 1, 4))?;
            let one_hot = first_max
                .broadcast_eq(&positions)?
                .to_dtype(windows.dtype())?;
            (windows * one_hot)?.sum(4)
        }
        Pooling::None => unreachable!("handled above"),
    }
}
