//! The CUDA halves of [`super::Im2Col`], [`super::Col2Im`] and the fused instance-norm block
//! ops: launches of the kernels in `cuda.cu` (compiled to PTX by the crate's build script).
//!
//! Allocating uninitialised device memory and launching a kernel are `unsafe` in cudarc; the
//! kernels write every element they return, and their arguments are checked here first.
#![allow(unsafe_code)]

use super::Geometry;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, Layout, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "debiasdd_model_kernels";

#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
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

fn launch<T: DeviceRepr>(
    src: &CudaSlice<T>,
    layout: &Layout,
    g: Geometry,
    kind: Kind,
    suffix: &str,
    dev: &CudaDevice,
) -> Result<CudaSlice<T>> {
    let src = match layout.contiguous_offsets() {
        Some((start, end)) => src.slice(start..end),
        None => candle_core::bail!("{kind:?}: input must be contiguous"),
    };
    let (rows, image_total) = (g.n * g.rows(), g.n * g.image_len());
    // Every index the kernels form stays below these counts.
    u32_of(rows * g.cols(), "im2col elements")?;
    u32_of(image_total, "image elements")?;
    let (name, out_len, count, cfg) = match kind {
        Kind::Im2col => {
            let threads = g.cols().next_multiple_of(32).min(256) as u32;
            let blocks = rows.min(1 << 20) as u32;
            let cfg = LaunchConfig {
                grid_dim: (blocks.max(1), 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            ("im2col", rows * g.cols(), rows, cfg)
        }
        Kind::Col2im => {
            let blocks = image_total.div_ceil(256).clamp(1, 1 << 20) as u32;
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            ("col2im", image_total, image_total, cfg)
        }
    };
    let func = dev.get_or_load_custom_func(&format!("{name}_{suffix}"), MODULE, PTX)?;
    // SAFETY: the kernel writes every one of the `out_len` elements.
    let dst = unsafe { dev.alloc::<T>(out_len)? };
    let dims = [count, g.c, g.h, g.w, g.out_h(), g.out_w(), g.k, g.pad].map(|v| v as u32);
    let mut builder = func.builder();
    builder.arg(&src);
    builder.arg(&dst);
    for d in &dims {
        builder.arg(d);
    }
    // SAFETY: the arguments match the kernel's signature in cuda.cu.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(dst)
}

/// Runs `kind` on a contiguous CUDA tensor of the geometry's input (im2col) or column (col2im)
/// shape; f32 and f64.
pub(super) fn run(
    storage: &CudaStorage,
    layout: &Layout,
    g: Geometry,
    kind: Kind,
) -> Result<CudaStorage> {
    let dev = storage.device();
    let slice = match &storage.slice {
        CudaStorageSlice::F32(s) => CudaStorageSlice::F32(launch(s, layout, g, kind, "f32", dev)?),
        CudaStorageSlice::F64(s) => CudaStorageSlice::F64(launch(s, layout, g, kind, "f64", dev)?),
        _ => candle_core::bail!("{kind:?}: only f32 and f64 are supported"),
    };
    Ok(CudaStorage {
        slice,
        device: dev.clone(),
    })
}

/// Settings of the fused instance-norm block kernels (see [`super::NormAct`]).
fn norm_launch_config(rows: usize, elem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.clamp(1, 1 << 20) as u32, 1, 1),
        block_dim: (NORM_THREADS, 1, 1),
        shared_mem_bytes: NORM_THREADS * elem as u32,
    }
}

/// Threads per row of the fused norm kernels (a power of two: their block reduction needs it).
const NORM_THREADS: u32 = 256;

fn slice_of<'a, T: DeviceRepr>(
    s: &'a CudaSlice<T>,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.slice(start..end)),
        None => candle_core::bail!("fused norm: {what} must be contiguous"),
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
    #[allow(clippy::too_many_arguments)]
    fn go<T: DeviceRepr + candle_core::WithDType>(
        z: &CudaSlice<T>,
        zl: &Layout,
        p: &CudaSlice<T>,
        pl: &Layout,
        n: super::NormAct,
        rows: usize,
        out_len: usize,
        suffix: &str,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        let (z, p) = (slice_of(z, zl, "z")?, slice_of(p, pl, "parameters")?);
        u32_of(out_len, "fused norm elements")?;
        let func = dev.get_or_load_custom_func(&format!("norm_act_fwd_{suffix}"), MODULE, PTX)?;
        // SAFETY: the kernel writes every element of the packed output.
        let dst = unsafe { dev.alloc::<T>(out_len)? };
        let dims = [rows, n.channels, n.h, n.w, n.pool as usize].map(|v| v as u32);
        let (slope, eps) = (T::from_f64(n.slope), T::from_f64(n.eps));
        let mut builder = func.builder();
        builder.arg(&z);
        builder.arg(&p);
        builder.arg(&dst);
        for d in &dims {
            builder.arg(d);
        }
        builder.arg(&slope);
        builder.arg(&eps);
        // SAFETY: the arguments match `norm_act_fwd_*` in cuda.cu.
        unsafe { builder.launch(norm_launch_config(rows, std::mem::size_of::<T>())) }.w()?;
        Ok(dst)
    }
    let dev = z.0.device();
    let slice = match (&z.0.slice, &prm.0.slice) {
        (CudaStorageSlice::F32(a), CudaStorageSlice::F32(b)) => {
            CudaStorageSlice::F32(go(a, z.1, b, prm.1, n, rows, out_len, "f32", dev)?)
        }
        (CudaStorageSlice::F64(a), CudaStorageSlice::F64(b)) => {
            CudaStorageSlice::F64(go(a, z.1, b, prm.1, n, rows, out_len, "f64", dev)?)
        }
        _ => candle_core::bail!("fused norm: f32 or f64 inputs of one dtype expected"),
    };
    Ok(CudaStorage {
        slice,
        device: dev.clone(),
    })
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
    fn go<T: DeviceRepr + candle_core::WithDType>(
        [da, fwd, p]: [&CudaSlice<T>; 3],
        [dal, fl, pl]: [&Layout; 3],
        (n, rows, out_len): (super::NormAct, usize, usize),
        suffix: &str,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        let da = slice_of(da, dal, "the activation gradient")?;
        let fwd = slice_of(fwd, fl, "the forward output")?;
        let p = slice_of(p, pl, "parameters")?;
        u32_of(out_len, "fused norm elements")?;
        let func = dev.get_or_load_custom_func(&format!("norm_act_bwd_{suffix}"), MODULE, PTX)?;
        // SAFETY: the kernel writes every element of the packed output.
        let dst = unsafe { dev.alloc::<T>(out_len)? };
        let dims = [rows, n.channels, n.h, n.w, n.pool as usize].map(|v| v as u32);
        let slope = T::from_f64(n.slope);
        let mut builder = func.builder();
        builder.arg(&da);
        builder.arg(&fwd);
        builder.arg(&p);
        builder.arg(&dst);
        for d in &dims {
            builder.arg(d);
        }
        builder.arg(&slope);
        // SAFETY: the arguments match `norm_act_bwd_*` in cuda.cu.
        unsafe { builder.launch(norm_launch_config(rows, std::mem::size_of::<T>())) }.w()?;
        Ok(dst)
    }
    use CudaStorageSlice::{F32, F64};
    let dev = da.0.device();
    let (layouts, job) = ([da.1, fwd.1, prm.1], (n, rows, out_len));
    let slice = match (&da.0.slice, &fwd.0.slice, &prm.0.slice) {
        (F32(a), F32(b), F32(c)) => F32(go([a, b, c], layouts, job, "f32", dev)?),
        (F64(a), F64(b), F64(c)) => F64(go([a, b, c], layouts, job, "f64", dev)?),
        _ => candle_core::bail!("fused norm: f32 or f64 inputs of one dtype expected"),
    };
    Ok(CudaStorage {
        slice,
        device: dev.clone(),
    })
}
