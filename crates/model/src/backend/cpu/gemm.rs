//! Matrix products of the native CPU backend (`backend/cpu`): strided views of slices and one
//! call into the `gemm` crate, the only `unsafe` code of the CPU backend.

use super::Real;

/// A strided view of a matrix: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub(super) struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A row-major (rows x cols) matrix.
    pub(super) fn rows(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of this view.
    pub(super) fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `dst (m x n, row-major) = lhs (m x k) @ rhs (k x n)`, through the `gemm` crate on all of
/// rayon's threads.
pub(super) fn matmul<T: Real>(dst: &mut [T], lhs: MatRef<'_, T>, rhs: MatRef<'_, T>) {
    gemm_into(dst, lhs, rhs, false)
}

/// `dst += lhs @ rhs`, as [`matmul`].
pub(super) fn matmul_add<T: Real>(dst: &mut [T], lhs: MatRef<'_, T>, rhs: MatRef<'_, T>) {
    gemm_into(dst, lhs, rhs, true)
}

#[allow(unsafe_code)]
fn gemm_into<T: Real>(dst: &mut [T], lhs: MatRef<'_, T>, rhs: MatRef<'_, T>, accumulate: bool) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "matmul: inner dimensions differ");
    assert_eq!(dst.len(), m * n, "matmul: destination size");
    assert!(
        lhs.in_bounds() && rhs.in_bounds(),
        "matmul: view out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(T::zero());
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every index that gemm reads or writes inside the slices:
    // dst is exactly m x n row-major, and `in_bounds` checks the largest index of each view.
    // Strides fit in isize because they index allocated slices. dst is read only when
    // accumulating (`read_dst`), and then it is initialised memory of the right size.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
}
