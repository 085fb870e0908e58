//! The CUDA launcher under `backend/cuda.rs` (a `cuda` build only): the CUDA halves of the
//! im2col / col2im ops (`backend/im2col.rs`) and of the fused instance-norm block ops, launching the
//! kernels of `kernels.cu` (compiled to PTX by the crate's build script).
//!
//! Allocating uninitialised device memory and launching a kernel are `unsafe` in cudarc; the
//! kernels write every element they return, and their arguments are checked here first.
#![allow(unsafe_code)]

use crate::backend::im2col::Geometry;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, WithDType};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "debiasdd_model_kernels";

/// Threads per row of the fused norm kernels (a power of two: their block reduction needs it).
const NORM_THREADS: u32 = 256;

#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Im2col,
    Col2im,
}

fn u32_of(value: usize, what: &str) -> Result<u32> {
    u32::try_from(value).map_err(|_| {
        candle_core::Error::Msg(format!(
            "{what} = {value} is beyond the CUDA kernels' 32-bit indexing; use a smaller batch"
        ))
    })
}

/// The contiguous part of a storage that `layout` covers, as `T`.
fn view<'a, T: CudaDType + DeviceRepr>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(storage.as_cuda_slice::<T>()?.slice(start..end)),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// The kernel `{name}_f32` or `{name}_f64` of kernels.cu for `T`, and its uninitialised output. A
/// macro because candle does not export the type of the loaded function, whose `builder()` the
/// callers then fill.
macro_rules! kernel_and_output {
    ($T:ty, $dev:expr, $name:expr, $out_len:expr) => {{
        let suffix = <$T as WithDType>::DTYPE.as_str();
        let func = $dev.get_or_load_custom_func(&format!("{}_{suffix}", $name), MODULE, PTX)?;
        // SAFETY: every kernel of kernels.cu writes each of its `out_len` output elements.
        let dst = unsafe { $dev.alloc::<$T>($out_len)? };
        (func, dst)
    }};
}

/// Runs `kind` on a contiguous CUDA tensor of the geometry's input (im2col) or column (col2im)
/// shape; f32 and f64.
pub(crate) fn run(
    storage: &CudaStorage,
    layout: &Layout,
    g: Geometry,
    kind: Kind,
) -> Result<CudaStorage> {
    fn go<T: CudaDType + DeviceRepr + WithDType>(
        storage: &CudaStorage,
        layout: &Layout,
        g: Geometry,
        kind: Kind,
    ) -> Result<CudaStorage> {
        let src = view::<T>(storage, layout, &format!("{kind:?}: the input"))?;
        let (rows, image_total) = (g.n * g.rows(), g.n * g.image_len());
        // Every index the kernels form stays below these counts.
        u32_of(rows * g.cols(), "im2col elements")?;
        u32_of(image_total, "image elements")?;
        let (name, out_len, count, cfg) = match kind {
            Kind::Im2col => {
                let threads = g.cols().next_multiple_of(32).min(256) as u32;
                let cfg = LaunchConfig {
                    grid_dim: (rows.clamp(1, 1 << 20) as u32, 1, 1),
                    block_dim: (threads, 1, 1),
                    shared_mem_bytes: 0,
                };
                ("im2col", rows * g.cols(), rows, cfg)
            }
            Kind::Col2im => {
                let cfg = LaunchConfig {
                    grid_dim: (image_total.div_ceil(256).clamp(1, 1 << 20) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                ("col2im", image_total, image_total, cfg)
            }
        };
        let dims = [count, g.c, g.h, g.w, g.out_h(), g.out_w(), g.k, g.pad].map(|v| v as u32);
        let dev = storage.device();
        let (func, dst) = kernel_and_output!(T, dev, name, out_len);
        let mut builder = func.builder();
        builder.arg(&src);
        builder.arg(&dst);
        for d in &dims {
            builder.arg(d);
        }
        // SAFETY: the arguments match `im2col_*` / `col2im_*` in kernels.cu.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }
    match storage.dtype() {
        DType::F32 => go::<f32>(storage, layout, g, kind),
        DType::F64 => go::<f64>(storage, layout, g, kind),
        dtype => candle_core::bail!("{kind:?}: only f32 and f64 are supported, got {dtype:?}"),
    }
}

/// A fused norm kernel (`norm_act_fwd` or `norm_act_bwd`, see kernels.cu) on `inputs` of one dtype,
/// one GPU block per row: the inputs, the packed output, the geometry, the slope and, for the
/// forward kernel, epsilon.
fn norm_kernel(
    name: &str,
    inputs: &[(&CudaStorage, &Layout)],
    n: super::NormAct,
    rows: usize,
    out_len: usize,
    eps: Option<f64>,
) -> Result<CudaStorage> {
    fn go<T: CudaDType + DeviceRepr + WithDType>(
        name: &str,
        inputs: &[(&CudaStorage, &Layout)],
        n: super::NormAct,
        (rows, out_len): (usize, usize),
        eps: Option<f64>,
    ) -> Result<CudaStorage> {
        let views = inputs
            .iter()
            .map(|(s, l)| view::<T>(s, l, &format!("{name}: an input")))
            .collect::<Result<Vec<_>>>()?;
        u32_of(out_len, "fused norm elements")?;
        let dims = [rows, n.channels, n.h, n.w, n.pool as usize].map(|v| v as u32);
        let (slope, eps) = (T::from_f64(n.slope), eps.map(T::from_f64));
        let cfg = LaunchConfig {
            grid_dim: (rows.clamp(1, 1 << 20) as u32, 1, 1),
            block_dim: (NORM_THREADS, 1, 1),
            shared_mem_bytes: NORM_THREADS * std::mem::size_of::<T>() as u32,
        };
        let dev = inputs[0].0.device();
        let (func, dst) = kernel_and_output!(T, dev, name, out_len);
        let mut builder = func.builder();
        for v in &views {
            builder.arg(v);
        }
        builder.arg(&dst);
        for d in &dims {
            builder.arg(d);
        }
        builder.arg(&slope);
        if let Some(eps) = &eps {
            builder.arg(eps);
        }
        // SAFETY: the arguments match `norm_act_fwd_*` / `norm_act_bwd_*` in kernels.cu.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }
    match inputs[0].0.dtype() {
        DType::F32 => go::<f32>(name, inputs, n, (rows, out_len), eps),
        DType::F64 => go::<f64>(name, inputs, n, (rows, out_len), eps),
        dtype => candle_core::bail!("{name}: only f32 and f64 are supported, got {dtype:?}"),
    }
}

/// The forward kernel: z (rows, H*W), prm (3, O) -> packed xhat | inv_std | activation.
pub(super) fn norm_act_fwd(
    z: (&CudaStorage, &Layout),
    prm: (&CudaStorage, &Layout),
    n: super::NormAct,
    rows: usize,
    out_len: usize,
) -> Result<CudaStorage> {
    norm_kernel("norm_act_fwd", &[z, prm], n, rows, out_len, Some(n.eps))
}

/// The backward kernel: da, the forward's packed output, prm -> packed dz | row sums.
pub(super) fn norm_act_bwd(
    da: (&CudaStorage, &Layout),
    fwd: (&CudaStorage, &Layout),
    prm: (&CudaStorage, &Layout),
    n: super::NormAct,
    rows: usize,
    out_len: usize,
) -> Result<CudaStorage> {
    norm_kernel("norm_act_bwd", &[da, fwd, prm], n, rows, out_len, None)
}
