//! The im2col and col2im custom ops (under [`crate::backend`]), the building blocks of a
//! stride-1 convolution as `im2col(x) @ W^T` on candle tensors: the candle-op backend's im2col
//! path ([`super::candle_ops`]) and the fused CUDA path ([`super::cuda`]) are both made of them.
//!
//! candle 0.11's CPU conv backward goes through `conv_transpose2d`, a direct loop several times
//! slower than the forward. With im2col, the forward and both gradients are matrix products
//! (candle's `gemm`), plus one `im2col` or `col2im`. Because the two custom ops are each other's
//! backward, gradients of gradients stay inside the same fast building blocks, on the CPU as on
//! CUDA.
//!
//! Layout: `im2col` maps an (N, C, H, W) input to an (N * Ho * Wo, C * k * k) matrix whose row
//! `(n, oy, ox)` holds the `k x k` window of every channel around output pixel `(oy, ox)`, in
//! `(c, ky, kx)` order — the order of a PyTorch weight `(O, C, k, k)` reshaped to `(O, C*k*k)`.
//! Zero padding `pad` on every side; `Ho = H + 2 pad - k + 1`. This is the one im2col of candle
//! tensors (NCHW); the native CPU backend keeps its own over channels-last slices
//! (`backend/cpu/im2col.rs`), a different layout that needs no transposes between blocks.
//!
//! Each op has a CPU half here and, with the `cuda` feature, a CUDA half (gather kernels in
//! `cuda/kernels.cu`, launched by `cuda/launch.rs`; see [`super::cuda::HAS_CUDA_KERNELS`]).
//! Nothing here depends on a backend: the backends depend on these ops.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::convnet::conv_output_side;

/// Geometry of a stride-1 square-kernel convolution on one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) k: usize,
    pub(crate) pad: usize,
}

impl Geometry {
    pub(crate) fn out_h(&self) -> usize {
        self.h + 2 * self.pad + 1 - self.k
    }

    pub(crate) fn out_w(&self) -> usize {
        self.w + 2 * self.pad + 1 - self.k
    }

    /// Rows of one image's column matrix.
    pub(crate) fn rows(&self) -> usize {
        self.out_h() * self.out_w()
    }

    /// Columns of the column matrix.
    pub(crate) fn cols(&self) -> usize {
        self.c * self.k * self.k
    }

    pub(crate) fn image_len(&self) -> usize {
        self.c * self.h * self.w
    }

    fn cols_shape(&self) -> Shape {
        Shape::from((self.n * self.rows(), self.cols()))
    }

    fn image_shape(&self) -> Shape {
        Shape::from((self.n, self.c, self.h, self.w))
    }

    /// Calls `f(col_index, input_index)` for every in-bounds (column, input pixel) pair of
    /// output pixel `(oy, ox)`; out-of-bounds (padding) columns are skipped.
    #[inline]
    fn for_window(&self, oy: usize, ox: usize, mut f: impl FnMut(usize, usize)) {
        let (k, pad) = (self.k, self.pad);
        for c in 0..self.c {
            for ky in 0..k {
                let iy = oy + ky;
                if iy < pad || iy - pad >= self.h {
                    continue;
                }
                let row_base = c * self.h * self.w + (iy - pad) * self.w;
                for kx in 0..k {
                    let ix = ox + kx;
                    if ix < pad || ix - pad >= self.w {
                        continue;
                    }
                    f((c * k + ky) * k + kx, row_base + ix - pad);
                }
            }
        }
    }
}

fn im2col_slice<T: Copy + Default + Send + Sync>(src: &[T], g: Geometry) -> Vec<T> {
    let (rows, cols, ow) = (g.rows(), g.cols(), g.out_w());
    let mut dst = vec![T::default(); g.n * rows * cols];
    dst.par_chunks_mut(rows * cols)
        .zip(src.par_chunks(g.image_len()))
        .for_each(|(dst, img)| {
            for (r, row) in dst.chunks_mut(cols).enumerate() {
                g.for_window(r / ow, r % ow, |col, i| row[col] = img[i]);
            }
        });
    dst
}

fn col2im_slice<T>(src: &[T], g: Geometry) -> Vec<T>
where
    T: Copy + Default + Send + Sync + std::ops::AddAssign,
{
    let (rows, cols, ow) = (g.rows(), g.cols(), g.out_w());
    let mut dst = vec![T::default(); g.n * g.image_len()];
    dst.par_chunks_mut(g.image_len())
        .zip(src.par_chunks(rows * cols))
        .for_each(|(img, src)| {
            for (r, row) in src.chunks(cols).enumerate() {
                g.for_window(r / ow, r % ow, |col, i| img[i] += row[col]);
            }
        });
    dst
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &'static str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// (N, C, H, W) -> (N * Ho * Wo, C * k * k).
#[derive(Debug, Clone, Copy)]
struct Im2Col(Geometry);

/// (N * Ho * Wo, C * k * k) -> (N, C, H, W), summing overlapping windows: the adjoint of
/// [`Im2Col`].
#[derive(Debug, Clone, Copy)]
struct Col2Im(Geometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "debiasdd-im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        if layout.shape() != &g.image_shape() {
            candle_core::bail!(
                "im2col: got {:?}, expected {:?}",
                layout.shape(),
                g.image_shape()
            );
        }
        let out = match storage {
            CpuStorage::F32(d) => {
                CpuStorage::F32(im2col_slice(contiguous(d, layout, "im2col")?, g))
            }
            CpuStorage::F64(d) => {
                CpuStorage::F64(im2col_slice(contiguous(d, layout, "im2col")?, g))
            }
            _ => candle_core::bail!("im2col: only f32 and f64 are supported"),
        };
        Ok((out, g.cols_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = self.0;
        if layout.shape() != &g.image_shape() {
            candle_core::bail!(
                "im2col: got {:?}, expected {:?}",
                layout.shape(),
                g.image_shape()
            );
        }
        Ok((
            super::cuda::launch::run(storage, layout, g, super::cuda::launch::Kind::Im2col)?,
            g.cols_shape(),
        ))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "debiasdd-col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        if layout.shape() != &g.cols_shape() {
            candle_core::bail!(
                "col2im: got {:?}, expected {:?}",
                layout.shape(),
                g.cols_shape()
            );
        }
        let out = match storage {
            CpuStorage::F32(d) => {
                CpuStorage::F32(col2im_slice(contiguous(d, layout, "col2im")?, g))
            }
            CpuStorage::F64(d) => {
                CpuStorage::F64(col2im_slice(contiguous(d, layout, "col2im")?, g))
            }
            _ => candle_core::bail!("col2im: only f32 and f64 are supported"),
        };
        Ok((out, g.image_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = self.0;
        if layout.shape() != &g.cols_shape() {
            candle_core::bail!(
                "col2im: got {:?}, expected {:?}",
                layout.shape(),
                g.cols_shape()
            );
        }
        Ok((
            super::cuda::launch::run(storage, layout, g, super::cuda::launch::Kind::Col2im)?,
            g.image_shape(),
        ))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

fn geometry(xs: &Tensor, k: usize, pad: usize) -> Result<Geometry> {
    let (n, c, h, w) = xs.dims4()?;
    if h + 2 * pad < k || w + 2 * pad < k {
        candle_core::bail!("conv: a {k}x{k} kernel does not fit a {h}x{w} input padded by {pad}");
    }
    Ok(Geometry { n, c, h, w, k, pad })
}

/// The column matrix of `xs` (N, C, H, W) for a `k x k` window with zero padding `pad`.
pub fn im2col(xs: &Tensor, k: usize, pad: usize) -> Result<Tensor> {
    let g = geometry(xs, k, pad)?;
    xs.contiguous()?.apply_op1(Im2Col(g))
}

/// The adjoint of [`im2col`]: folds an (N * Ho * Wo, C * k * k) matrix back to (N, C, H, W).
pub fn col2im(
    cols: &Tensor,
    (n, c, h, w): (usize, usize, usize, usize),
    k: usize,
    pad: usize,
) -> Result<Tensor> {
    let g = Geometry { n, c, h, w, k, pad };
    cols.contiguous()?.apply_op1(Col2Im(g))
}

/// A 3x3 stride-1 convolution without bias as `im2col(a) @ W^T`: the output as (N, O, Ho*Wo) and
/// the column matrix (N*Ho*Wo, C*9) that the weight gradient needs.
pub fn im2col_conv(a: &Tensor, weight: &Tensor, pad: usize) -> Result<(Tensor, Tensor)> {
    let (n, c, h, w) = a.dims4()?;
    let o = weight.dim(0)?;
    let hw = conv_output_side(h, pad) * conv_output_side(w, pad);
    let cols = im2col(a, 3, pad)?;
    let z = cols
        .matmul(&weight.reshape((o, c * 9))?.t()?)?
        .reshape((n, hw, o))?
        .transpose(1, 2)?
        .contiguous()?;
    Ok((z, cols))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic pseudo-random values without a global RNG.
        let n: usize = shape.iter().product();
        let values: Vec<f64> = (0..n)
            .map(|i| {
                let x = (i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
                (x as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Stride-1 convolution of `xs` (N, C, H, W) with `weight` (O, C, k, k) by the two ops.
    fn conv2d(xs: &Tensor, weight: &Tensor, pad: usize) -> Result<Tensor> {
        let (o, c, k, _) = weight.dims4()?;
        let g = geometry(xs, k, pad)?;
        let cols = xs.contiguous()?.apply_op1(Im2Col(g))?;
        let out = cols.matmul(&weight.reshape((o, c * k * k))?.t()?)?;
        out.reshape((g.n, g.rows(), o))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((g.n, o, g.out_h(), g.out_w()))
    }

    #[test]
    fn conv_matches_candle_conv_forward_and_gradients() -> Result<()> {
        for (c, o, h, w, k, pad) in [
            (3, 4, 7, 6, 3, 1),
            (2, 3, 5, 5, 3, 3),
            (1, 2, 6, 4, 5, 2),
            (2, 2, 4, 4, 1, 0),
        ] {
            let x = Var::from_tensor(&rand(&[2, c, h, w], 1))?;
            let wt = Var::from_tensor(&rand(&[o, c, k, k], 2))?;
            let probe = rand(&[2, o, h + 2 * pad + 1 - k, w + 2 * pad + 1 - k], 3);
            let ours = conv2d(&x, &wt, pad)?;
            let theirs = x.conv2d(&wt, pad, 1, 1, 1)?;
            assert!(
                max_abs_diff(&ours, &theirs) < 1e-12,
                "forward {c} {o} {h} {w} {k} {pad}"
            );
            let g_ours = (ours * &probe)?.sum_all()?.backward()?;
            let g_theirs = (theirs * &probe)?.sum_all()?.backward()?;
            for v in [&x, &wt] {
                let d = max_abs_diff(g_ours.get(v).unwrap(), g_theirs.get(v).unwrap());
                assert!(d < 1e-12, "gradient differs by {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn col2im_is_the_adjoint_of_im2col() -> Result<()> {
        // <im2col(x), y> == <x, col2im(y)> for all x, y.
        let (n, c, h, w, k, pad) = (2, 3, 5, 4, 3, 1);
        let x = rand(&[n, c, h, w], 5);
        let y = rand(&[n * h * w, c * k * k], 6);
        let lhs = (im2col(&x, k, pad)? * &y)?.sum_all()?.to_scalar::<f64>()?;
        let rhs = (&x * col2im(&y, (n, c, h, w), k, pad)?)?
            .sum_all()?
            .to_scalar::<f64>()?;
        assert!((lhs - rhs).abs() < 1e-10, "{lhs} vs {rhs}");
        Ok(())
    }

    #[test]
    fn im2col_hand_checked() -> Result<()> {
        // One 1-channel 2x2 image, 3x3 window, padding 1: output pixel (0, 0) sees
        // [0 0 0; 0 a b; 0 c d].
        let x = Tensor::new(&[[[[1f64, 2.], [3., 4.]]]], &Device::Cpu)?;
        let cols = im2col(&x, 3, 1)?;
        assert_eq!(cols.dims(), &[4, 9]);
        let first: Vec<f64> = cols.get(0)?.to_vec1()?;
        assert_eq!(first, vec![0., 0., 0., 0., 1., 2., 0., 3., 4.]);
        let last: Vec<f64> = cols.get(3)?.to_vec1()?;
        assert_eq!(last, vec![1., 2., 0., 3., 4., 0., 0., 0., 0.]);
        Ok(())
    }
}
