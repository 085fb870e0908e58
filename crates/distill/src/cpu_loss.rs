//! What the methods' CPU loss ops share: the synthetic images out of the op's storage, and the
//! scalar loss back into it (DC's `dc/native_loss.rs`, DM's `dm/native_loss.rs`).

use candle_core::{CpuStorage, Device, Layout, Result, Shape, Tensor};

/// The synthetic images a CPU loss op `what` receives, as a CPU tensor (f32 or f64, contiguous).
pub(crate) fn input_images(storage: &CpuStorage, layout: &Layout, what: &str) -> Result<Tensor> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what}: the synthetic images must be contiguous")
    };
    match storage {
        CpuStorage::F32(d) => Tensor::from_slice(&d[start..end], layout.shape(), &Device::Cpu),
        CpuStorage::F64(d) => Tensor::from_slice(&d[start..end], layout.shape(), &Device::Cpu),
        _ => candle_core::bail!("{what}: only f32 and f64 are supported"),
    }
}

/// The scalar `loss` as the op's output, in the dtype of its input `storage`.
pub(crate) fn scalar_output(storage: &CpuStorage, loss: f64) -> (CpuStorage, Shape) {
    let out = match storage {
        CpuStorage::F32(_) => CpuStorage::F32(vec![loss as f32]),
        _ => CpuStorage::F64(vec![loss]),
    };
    (out, Shape::from(()))
}
