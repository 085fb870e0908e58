//! DSA on candle tensors: a `CustomOp1` whose backward is the exact transpose (another
//! `CustomOp1`, whose own backward is the forward again, so second order is exact too).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

use crate::error::DsaError;
use crate::transform::{ImageShape, Transform, augment_slice, augment_transpose_slice};

/// Augments an `(N, C, H, W)` batch (f32 or f64): image `i` gets `transforms[i]`, or every image
/// `transforms[0]` when there is one (Siamese). Differentiable with respect to `xs` through
/// candle's autograd, the backward being the exact transpose of the (affine) augmentation.
///
/// There is no GPU kernel yet: on a device other than the CPU the batch is copied to the CPU,
/// augmented there and copied back (both copies are part of the autograd graph).
///
/// # Errors
/// A tensor that is not rank 4, not f32/f64, or a `transforms` count that is neither N nor 1.
pub fn augment(xs: &Tensor, transforms: &[Transform]) -> Result<Tensor> {
    let dims = xs.dims().to_vec();
    let [n, channels, height, width] = dims[..] else {
        return Err(candle_core::Error::wrap(DsaError::BadRank { dims }));
    };
    if !matches!(xs.dtype(), DType::F32 | DType::F64) {
        return Err(candle_core::Error::wrap(DsaError::BadDtype {
            dtype: format!("{:?}", xs.dtype()),
        }));
    }
    if transforms.len() != n && transforms.len() != 1 {
        return Err(candle_core::Error::wrap(DsaError::CountMismatch {
            transforms: transforms.len(),
            images: n,
        }));
    }
    let op = DsaOp {
        transforms: transforms.to_vec().into(),
        shape: ImageShape {
            channels,
            height,
            width,
        },
        transpose: false,
    };
    if xs.device().is_cpu() {
        xs.contiguous()?.apply_op1(op)
    } else {
        let device = xs.device().clone();
        xs.to_device(&Device::Cpu)?
            .contiguous()?
            .apply_op1(op)?
            .to_device(&device)
    }
}

/// The augmentation (or, with `transpose`, its transpose) of a CPU batch.
#[derive(Debug, Clone)]
struct DsaOp {
    transforms: Arc<[Transform]>,
    shape: ImageShape,
    transpose: bool,
}

impl DsaOp {
    fn run<T: num_traits::Float + Send + Sync + Copy>(
        &self,
        data: &[T],
        layout: &Layout,
    ) -> Result<Vec<T>> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: the input must be contiguous", self.name());
        };
        let mut out = data[start..end].to_vec();
        if self.transpose {
            augment_transpose_slice(&mut out, self.shape, &self.transforms);
        } else {
            augment_slice(&mut out, self.shape, &self.transforms);
        }
        Ok(out)
    }
}

impl CustomOp1 for DsaOp {
    fn name(&self) -> &'static str {
        if self.transpose {
            "debiasdd-dsa-transpose"
        } else {
            "debiasdd-dsa"
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let ImageShape {
            channels,
            height,
            width,
        } = self.shape;
        let dims = layout.shape().dims();
        if dims.len() != 4 || dims[1..] != [channels, height, width] {
            candle_core::bail!(
                "{}: got shape {dims:?}, expected (N, {channels}, {height}, {width})",
                self.name()
            );
        }
        let out = match storage {
            CpuStorage::F32(d) => CpuStorage::F32(self.run(d, layout)?),
            CpuStorage::F64(d) => CpuStorage::F64(self.run(d, layout)?),
            other => {
                return Err(candle_core::Error::wrap(DsaError::BadDtype {
                    dtype: format!("{:?}", other.dtype()),
                }));
            }
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let transposed = DsaOp {
            transpose: !self.transpose,
            ..self.clone()
        };
        Ok(Some(grad_res.contiguous()?.apply_op1(transposed)?))
    }
}
