// CUDA kernels of debiasdd-model, compiled to PTX by build.rs when the `cuda` feature is on and
// loaded by `src/backend/cuda/launch.rs`. Each `extern "C"` entry point has an `_f32` and an `_f64` version.
//
// Layouts are those of `src/backend/cuda.rs`: im2col maps a contiguous (N, C, H, W) input to an
// (N * Ho * Wo, C * k * k) matrix whose row (n, oy, ox) holds the k x k window around output pixel
// (oy, ox) of every channel, in (c, ky, kx) order, with zero padding `pad`; col2im is its adjoint
// (overlapping windows summed). Both are gathers: every output element is written once, by one
// thread, so the results do not depend on scheduling.

#include <stddef.h>

// One block per column-matrix row (grid-stride over rows), its threads over the row's columns:
// consecutive threads write consecutive addresses.
template <typename T>
__device__ void im2col(const T *src, T *dst, unsigned int rows, unsigned int c, unsigned int h,
                       unsigned int w, unsigned int ho, unsigned int wo, unsigned int k,
                       unsigned int pad) {
  const unsigned int kk = k * k;
  const unsigned int cols = c * kk;
  const unsigned int hw = ho * wo;
  for (unsigned int r = blockIdx.x; r < rows; r += gridDim.x) {
    const unsigned int n = r / hw;
    const unsigned int p = r - n * hw;
    const unsigned int oy = p / wo;
    const unsigned int ox = p - oy * wo;
    const T *img = src + (size_t)n * c * h * w;
    T *out = dst + (size_t)r * cols;
    for (unsigned int j = threadIdx.x; j < cols; j += blockDim.x) {
      const unsigned int ch = j / kk;
      const unsigned int q = j - ch * kk;
      const unsigned int ky = q / k;
      const unsigned int kx = q - ky * k;
      const int iy = (int)(oy + ky) - (int)pad;
      const int ix = (int)(ox + kx) - (int)pad;
      T v = 0;
      if (iy >= 0 && iy < (int)h && ix >= 0 && ix < (int)w) {
        v = img[((size_t)ch * h + iy) * w + ix];
      }
      out[j] = v;
    }
  }
}

// One thread per input pixel, channel fastest so that neighbouring threads read neighbouring
// columns of the same row; `total` = N * C * H * W.
template <typename T>
__device__ void col2im(const T *src, T *dst, unsigned int total, unsigned int c, unsigned int h,
                       unsigned int w, unsigned int ho, unsigned int wo, unsigned int k,
                       unsigned int pad) {
  const unsigned int kk = k * k;
  const unsigned int cols = c * kk;
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += blockDim.x * gridDim.x) {
    unsigned int t = i;
    const unsigned int ch = t % c;
    t /= c;
    const unsigned int ix = t % w;
    t /= w;
    const unsigned int iy = t % h;
    const unsigned int n = t / h;
    T acc = 0;
    for (unsigned int ky = 0; ky < k; ++ky) {
      const int oy = (int)(iy + pad) - (int)ky;
      if (oy < 0 || oy >= (int)ho) continue;
      for (unsigned int kx = 0; kx < k; ++kx) {
        const int ox = (int)(ix + pad) - (int)kx;
        if (ox < 0 || ox >= (int)wo) continue;
        const size_t row = (size_t)n * ho * wo + (size_t)oy * wo + ox;
        acc += src[row * cols + ch * kk + ky * k + kx];
      }
    }
    dst[(((size_t)n * c + ch) * h + iy) * w + ix] = acc;
  }
}

// Sum of `v` over the block (blockDim.x a power of two, `red` blockDim.x elements of shared
// memory); every thread gets the total. Ends with a barrier, so `red` can be reused at once.
template <typename T>
__device__ T block_sum(T v, T *red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const T total = red[0];
  __syncthreads();
  return total;
}

// Instance norm + affine + ReLU/leaky ReLU (+ 2x2 average pooling) of the ConvNet block, forward,
// for untracked tensors. z: (rows = N * O, H * W) conv outputs without their bias; prm: (3, O) =
// conv bias, norm weight (gamma), norm bias (beta). One block per row. out, packed:
//   xhat (rows * H * W) | inv_std (rows) | activation (rows * H * W, or rows * H * W / 4 pooled).
template <typename T>
__device__ void norm_act_fwd(const T *z, const T *prm, T *out, unsigned int rows, unsigned int o,
                             unsigned int h, unsigned int w, unsigned int pool, T slope, T eps) {
  extern __shared__ unsigned char shared_raw[];
  T *red = reinterpret_cast<T *>(shared_raw);
  const unsigned int hw = h * w;
  T *xhat_all = out;
  T *inv_all = out + (size_t)rows * hw;
  T *act_all = inv_all + rows;
  const unsigned int hwo = pool ? hw / 4 : hw;
  const unsigned int wo = w / 2;
  for (unsigned int r = blockIdx.x; r < rows; r += gridDim.x) {
    const unsigned int ch = r % o;
    const T b = prm[ch], g = prm[o + ch], be = prm[2 * o + ch];
    const T *zr = z + (size_t)r * hw;
    T s = 0;
    for (unsigned int p = threadIdx.x; p < hw; p += blockDim.x) s += zr[p] + b;
    const T mean = block_sum(s, red) / (T)hw;
    T v = 0;
    for (unsigned int p = threadIdx.x; p < hw; p += blockDim.x) {
      const T d = zr[p] + b - mean;
      v += d * d;
    }
    const T inv = (T)1 / sqrt(block_sum(v, red) / (T)hw + eps);
    if (threadIdx.x == 0) inv_all[r] = inv;
    T *xr = xhat_all + (size_t)r * hw;
    for (unsigned int p = threadIdx.x; p < hw; p += blockDim.x) xr[p] = (zr[p] + b - mean) * inv;
    T *ar = act_all + (size_t)r * hwo;
    for (unsigned int q = threadIdx.x; q < hwo; q += blockDim.x) {
      if (pool) {
        const unsigned int py = q / wo, px = q - py * wo;
        T acc = 0;
        for (unsigned int dy = 0; dy < 2; ++dy) {
          for (unsigned int dx = 0; dx < 2; ++dx) {
            const unsigned int p = (2 * py + dy) * w + 2 * px + dx;
            const T y = (zr[p] + b - mean) * inv * g + be;
            acc += y > (T)0 ? y : y * slope;
          }
        }
        ar[q] = acc * (T)0.25;
      } else {
        const T y = (zr[q] + b - mean) * inv * g + be;
        ar[q] = y > (T)0 ? y : y * slope;
      }
    }
  }
}

// Its backward. da: gradient of the activation output (rows * H * W, or pooled rows * H * W / 4);
// fwd: the forward's packed output (xhat | inv_std | ...); prm as above. One block per row. out,
// packed: dz (rows * H * W, the gradient of the conv output, bias included) | per-row sums of
// dy * xhat (gamma) | of dy (beta) | of dz (conv bias), rows each.
template <typename T>
__device__ void norm_act_bwd(const T *da, const T *fwd, const T *prm, T *out, unsigned int rows,
                             unsigned int o, unsigned int h, unsigned int w, unsigned int pool,
                             T slope) {
  extern __shared__ unsigned char shared_raw[];
  T *red = reinterpret_cast<T *>(shared_raw);
  const unsigned int hw = h * w;
  const T *xhat_all = fwd;
  const T *inv_all = fwd + (size_t)rows * hw;
  T *sums = out + (size_t)rows * hw;
  const unsigned int hwo = pool ? hw / 4 : hw;
  const unsigned int wo = w / 2;
  for (unsigned int r = blockIdx.x; r < rows; r += gridDim.x) {
    const unsigned int ch = r % o;
    const T g = prm[o + ch], be = prm[2 * o + ch];
    const T inv = inv_all[r];
    const T *xr = xhat_all + (size_t)r * hw;
    const T *dar = da + (size_t)r * hwo;
    T s1 = 0, s2 = 0;
    for (unsigned int p = threadIdx.x; p < hw; p += blockDim.x) {
      const T x = xr[p];
      const T y = x * g + be;
      const T dact = pool ? dar[(p / w / 2) * wo + (p % w) / 2] * (T)0.25 : dar[p];
      const T dy = y > (T)0 ? dact : dact * slope;
      s1 += dy * x;
      s2 += dy;
    }
    const T sum_dy_x = block_sum(s1, red);
    const T sum_dy = block_sum(s2, red);
    const T m1 = g * sum_dy / (T)hw;
    const T m2 = g * sum_dy_x / (T)hw;
    T s3 = 0;
    T *dzr = out + (size_t)r * hw;
    for (unsigned int p = threadIdx.x; p < hw; p += blockDim.x) {
      const T x = xr[p];
      const T y = x * g + be;
      const T dact = pool ? dar[(p / w / 2) * wo + (p % w) / 2] * (T)0.25 : dar[p];
      const T dy = y > (T)0 ? dact : dact * slope;
      const T dz = (dy * g - m1 - x * m2) * inv;
      dzr[p] = dz;
      s3 += dz;
    }
    const T sum_dz = block_sum(s3, red);
    if (threadIdx.x == 0) {
      sums[r] = sum_dy_x;
      sums[rows + r] = sum_dy;
      sums[2 * rows + r] = sum_dz;
    }
  }
}

#define ENTRY(NAME, T)                                                                       \
  extern "C" __global__ void NAME##_##T(const T *src, T *dst, unsigned int count,              \
                                        unsigned int c, unsigned int h, unsigned int w,       \
                                        unsigned int ho, unsigned int wo, unsigned int k,     \
                                        unsigned int pad) {                                   \
    NAME<T>(src, dst, count, c, h, w, ho, wo, k, pad);                                        \
  }

typedef float f32;
typedef double f64;
ENTRY(im2col, f32)
ENTRY(im2col, f64)
ENTRY(col2im, f32)
ENTRY(col2im, f64)

#define NORM_ENTRIES(T)                                                                       \
  extern "C" __global__ void norm_act_fwd_##T(const T *z, const T *prm, T *out,                \
                                              unsigned int rows, unsigned int o,              \
                                              unsigned int h, unsigned int w,                 \
                                              unsigned int pool, T slope, T eps) {            \
    norm_act_fwd<T>(z, prm, out, rows, o, h, w, pool, slope, eps);                            \
  }                                                                                           \
  extern "C" __global__ void norm_act_bwd_##T(const T *da, const T *fwd, const T *prm, T *out, \
                                              unsigned int rows, unsigned int o,              \
                                              unsigned int h, unsigned int w,                 \
                                              unsigned int pool, T slope) {                   \
    norm_act_bwd<T>(da, fwd, prm, out, rows, o, h, w, pool, slope);                           \
  }

NORM_ENTRIES(f32)
NORM_ENTRIES(f64)
