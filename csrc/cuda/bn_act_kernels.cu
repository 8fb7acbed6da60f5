// CUDA implementations of the fused batch-norm + activation passes (see bn_act_kernels.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bn_act_kernels.h"

namespace pnnh {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Acc {
  using type = float;  // half, bfloat16 and float accumulate in float
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename T>
__device__ __forceinline__ typename Acc<T>::type load(const T* p) {
  return static_cast<typename Acc<T>::type>(*p);
}
template <>
__device__ __forceinline__ float load<__half>(const __half* p) {
  return __half2float(*p);
}
template <>
__device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

template <typename T, typename A>
__device__ __forceinline__ T store(A v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half store<__half, float>(float v) {
  return __float2half(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16, float>(float v) {
  return __float2bfloat16(v);
}

template <typename A>
__device__ __forceinline__ A act_slope(A y, ActParams act) {
  if (!act.use_act) return A(1);
  return y > A(0) ? A(act.scale) : A(act.scale * act.slope);
}

// Block-wide sum of two values; the result is valid in thread 0.
template <typename A>
__device__ void block_sum2(A& a, A& b) {
  __shared__ A sa[kThreads / 32], sb[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    a += __shfl_down_sync(0xffffffff, a, offset);
    b += __shfl_down_sync(0xffffffff, b, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kThreads / 32 ? sa[lane] : A(0);
    b = lane < kThreads / 32 ? sb[lane] : A(0);
    for (int offset = 16; offset > 0; offset /= 2) {
      a += __shfl_down_sync(0xffffffff, a, offset);
      b += __shfl_down_sync(0xffffffff, b, offset);
    }
  }
}

// grid: (cn, splits). Each block reduces a slice of one channel's outer x inner elements into its split's
// partial sums. The sums are taken in double: float squares overflow once |v| passes ~1e19, and the pass
// is bound by memory, not by the arithmetic.
template <typename T>
__global__ void channel_sums_kernel(const T* z, MapDims d, double* partials) {
  const int64_t c = blockIdx.x;
  const int64_t per_channel = d.outer * d.inner;
  double s = 0, ss = 0;
  for (int64_t i = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; i < per_channel; i += int64_t(gridDim.y) * blockDim.x) {
    const int64_t o = i / d.inner, k = i % d.inner;
    const double v = load(z + (o * d.channels + d.c0 + c) * d.inner + k);
    s += v;
    ss += v * v;
  }
  block_sum2(s, ss);
  if (threadIdx.x == 0) {
    partials[(blockIdx.y * 2) * d.cn + c] = s;
    partials[(blockIdx.y * 2 + 1) * d.cn + c] = ss;
  }
}

// Channels-last maps ([rows, channels, 1]): the per-channel kernels above would read one element per
// row, a stride of the channel count apart. Here a block covers kLanes consecutive channels (one per
// lane, so a warp's loads are contiguous) and kRowLanes rows at a time; grid: (channel blocks, splits).
constexpr int kLanes = 32, kRowLanes = 8;

// Sums two values over threadIdx.y; the result is valid in the threads with threadIdx.y == 0.
template <typename A>
__device__ void column_sum2(A& a, A& b) {
  __shared__ A sa[kRowLanes][kLanes + 1], sb[kRowLanes][kLanes + 1];
  sa[threadIdx.y][threadIdx.x] = a;
  sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0) {
    for (int r = 1; r < kRowLanes; ++r) {
      a += sa[r][threadIdx.x];
      b += sb[r][threadIdx.x];
    }
  }
}

template <typename T>
__global__ void channel_sums_rows_kernel(const T* z, MapDims d, double* partials) {
  const int64_t c = int64_t(blockIdx.x) * kLanes + threadIdx.x;
  double s = 0, ss = 0;
  if (c < d.cn) {
    for (int64_t o = int64_t(blockIdx.y) * kRowLanes + threadIdx.y; o < d.outer; o += int64_t(gridDim.y) * kRowLanes) {
      const double v = load(z + o * d.channels + d.c0 + c);
      s += v;
      ss += v * v;
    }
  }
  column_sum2(s, ss);
  if (threadIdx.y == 0 && c < d.cn) {
    partials[(blockIdx.y * 2) * d.cn + c] = s;
    partials[(blockIdx.y * 2 + 1) * d.cn + c] = ss;
  }
}

template <typename S>
__global__ void bn_finalize_kernel(const S* sums, int64_t splits, int64_t cn, double count, double eps, float* stats,
                                   int64_t total, int64_t c0) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cn) return;
  double s = 0, ss = 0;
  for (int64_t k = 0; k < splits; ++k) {
    s += double(sums[2 * k * cn + c]);
    ss += double(sums[(2 * k + 1) * cn + c]);
  }
  const double mean = s / count;
  const double var = fmax(ss / count - mean * mean, 0.0);
  stats[c0 + c] = float(mean);
  stats[total + c0 + c] = float(rsqrt(var + eps));  // in double: a variance past float's range keeps its scale
  stats[2 * total + c0 + c] = float(count > 1 ? var * (count / (count - 1)) : var);
}

template <typename T>
__global__ void bn_act_apply_kernel(const T* z, MapDims d, T* out, const float* mean, const float* invstd,
                                    const float* gamma, const float* beta, ActParams act) {
  using A = typename Acc<T>::type;
  const int64_t n = d.outer * d.cn * d.inner;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = i % d.inner, c = (i / d.inner) % d.cn, o = i / (d.inner * d.cn);
    const A a = A(gamma[c]) * A(invstd[c]);
    const A y = (load(z + (o * d.channels + d.c0 + c) * d.inner + k) - A(mean[c])) * a + A(beta[c]);
    out[i] = store<T, A>(y * act_slope(y, act));
  }
}

template <typename T>
__global__ void bn_act_backward_sums_kernel(const T* dy, const T* x, MapDims d, const float* mean,
                                            const float* invstd, const float* gamma, const float* beta,
                                            ActParams act, double* sums) {
  using A = typename Acc<T>::type;
  const int64_t c = blockIdx.x;
  const int64_t per_channel = d.outer * d.inner;
  const A mu = mean[c], inv = invstd[c], b = A(beta[c]);
  A s = 0, sx = 0;
  for (int64_t i = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; i < per_channel; i += int64_t(gridDim.y) * blockDim.x) {
    const int64_t o = i / d.inner, k = i % d.inner;
    const A xv = load(x + (o * d.channels + d.c0 + c) * d.inner + k);
    const A xhat = (xv - mu) * inv;
    const A g = load(dy + (o * d.cn + c) * d.inner + k) * act_slope(xhat * A(gamma[c]) + b, act);
    s += g;
    sx += g * xhat;
  }
  block_sum2(s, sx);
  if (threadIdx.x == 0) {
    atomicAdd(sums + c, double(s));
    atomicAdd(sums + d.cn + c, double(sx));
  }
}

template <typename T>
__global__ void bn_act_backward_sums_rows_kernel(const T* dy, const T* x, MapDims d, const float* mean,
                                                 const float* invstd, const float* gamma, const float* beta,
                                                 ActParams act, double* sums) {
  using A = typename Acc<T>::type;
  const int64_t c = int64_t(blockIdx.x) * kLanes + threadIdx.x;
  A s = 0, sx = 0;
  if (c < d.cn) {
    const A mu = mean[c], inv = invstd[c], g = gamma[c], b = beta[c];
    for (int64_t o = int64_t(blockIdx.y) * kRowLanes + threadIdx.y; o < d.outer; o += int64_t(gridDim.y) * kRowLanes) {
      const A xhat = (load(x + o * d.channels + d.c0 + c) - mu) * inv;
      const A grad = load(dy + o * d.cn + c) * act_slope(xhat * g + b, act);
      s += grad;
      sx += grad * xhat;
    }
  }
  column_sum2(s, sx);
  if (threadIdx.y == 0 && c < d.cn) {
    atomicAdd(sums + c, double(s));
    atomicAdd(sums + d.cn + c, double(sx));
  }
}

template <typename T>
__global__ void bn_act_backward_apply_kernel(const T* dy, const T* x, T* dx, MapDims d, const float* mean,
                                             const float* invstd, const float* gamma, const float* beta,
                                             const double* sums, bool training, ActParams act, float* dgamma,
                                             float* dbeta) {
  using A = typename Acc<T>::type;
  if (blockIdx.x == 0) {
    for (int64_t c = threadIdx.x; c < d.cn; c += blockDim.x) {
      dgamma[c] = float(sums[d.cn + c]);
      dbeta[c] = float(sums[c]);
    }
  }
  const int64_t n = d.outer * d.cn * d.inner;
  const double count = double(d.outer * d.inner);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = i % d.inner, c = (i / d.inner) % d.cn, o = i / (d.inner * d.cn);
    const int64_t xi = (o * d.channels + d.c0 + c) * d.inner + k;
    const A inv = invstd[c], a = A(gamma[c]) * inv;
    const A xhat = (load(x + xi) - A(mean[c])) * inv;
    const A g = load(dy + i) * act_slope(xhat * A(gamma[c]) + A(beta[c]), act);
    const A mean_g = training ? A(sums[c] / count) : A(0);
    const A mean_gx = training ? A(sums[d.cn + c] / count) : A(0);
    dx[xi] = store<T, A>(a * (g - mean_g - xhat * mean_gx));
  }
}

template <typename T>
__global__ void bn_input_grad_kernel(const T* d_act, const T* z, T* dz, MapDims d, const float* coef_dy,
                                     const float* coef_z, const float* bias) {
  using A = typename Acc<T>::type;
  const int64_t n = d.outer * d.cn * d.inner;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = i % d.inner, c = (i / d.inner) % d.cn, o = i / (d.inner * d.cn);
    const A zv = load(z + (o * d.channels + d.c0 + c) * d.inner + k);
    dz[i] = store<T, A>(A(coef_dy[c]) * load(d_act + i) + A(coef_z[c]) * zv + A(bias[c]));
  }
}

int elementwise_blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return int(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

// Channels-last reductions: about 16 rows per thread, at most 1024 splits per channel block (forward:
// that many partial sums for bn_finalize; backward: that many atomic adds into each channel's sums).
dim3 rows_reduction_grid(const MapDims& d) {
  const int64_t channel_blocks = (d.cn + kLanes - 1) / kLanes;
  const int64_t splits = (d.outer + 16 * kRowLanes - 1) / (16 * kRowLanes);
  return dim3(unsigned(channel_blocks), unsigned(splits < 1 ? 1 : (splits > 1024 ? 1024 : splits)));
}

int reduction_splits(const MapDims& d) {
  const int64_t per_channel = d.outer * d.inner;
  const int64_t splits = (per_channel + 8 * kThreads - 1) / (8 * kThreads);  // ~8 elements per thread
  return int(splits < 1 ? 1 : (splits > 65535 ? 65535 : splits));
}

}  // namespace

int channel_sums_splits(MapDims dims) {
  return dims.inner == 1 ? int(rows_reduction_grid(dims).y) : reduction_splits(dims);
}

template <typename T>
cudaError_t channel_sums(const T* z, MapDims dims, double* partials, cudaStream_t stream) {
  if (dims.cn == 0) return cudaSuccess;
  if (dims.inner == 1) {
    channel_sums_rows_kernel<T><<<rows_reduction_grid(dims), dim3(kLanes, kRowLanes), 0, stream>>>(z, dims, partials);
    return cudaGetLastError();
  }
  dim3 grid(unsigned(dims.cn), unsigned(reduction_splits(dims)));
  channel_sums_kernel<T><<<grid, kThreads, 0, stream>>>(z, dims, partials);
  return cudaGetLastError();
}

template <typename S>
cudaError_t bn_finalize(const S* sums, int64_t splits, int64_t cn, double count, double eps, float* stats,
                        int64_t total, int64_t c0, cudaStream_t stream) {
  if (cn == 0) return cudaSuccess;
  const int threads = 128;
  bn_finalize_kernel<S><<<unsigned((cn + threads - 1) / threads), threads, 0, stream>>>(sums, splits, cn, count, eps,
                                                                                       stats, total, c0);
  return cudaGetLastError();
}

template cudaError_t bn_finalize<double>(const double*, int64_t, int64_t, double, double, float*, int64_t, int64_t,
                                         cudaStream_t);
template cudaError_t bn_finalize<float>(const float*, int64_t, int64_t, double, double, float*, int64_t, int64_t,
                                        cudaStream_t);

template <typename T>
cudaError_t bn_act_apply(const T* z, MapDims dims, T* out, const float* mean, const float* invstd,
                         const float* gamma, const float* beta, ActParams act, cudaStream_t stream) {
  const int64_t n = dims.outer * dims.cn * dims.inner;
  if (n == 0) return cudaSuccess;
  bn_act_apply_kernel<T><<<elementwise_blocks(n), kThreads, 0, stream>>>(z, dims, out, mean, invstd, gamma, beta, act);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bn_act_backward_sums(const T* dy, const T* x, MapDims dims, const float* mean,
                                 const float* invstd, const float* gamma, const float* beta, ActParams act,
                                 double* sums, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(sums, 0, sizeof(double) * 2 * dims.cn, stream);
  if (err != cudaSuccess || dims.cn == 0) return err;
  if (dims.inner == 1) {
    bn_act_backward_sums_rows_kernel<T><<<rows_reduction_grid(dims), dim3(kLanes, kRowLanes), 0, stream>>>(
        dy, x, dims, mean, invstd, gamma, beta, act, sums);
    return cudaGetLastError();
  }
  dim3 grid(unsigned(dims.cn), unsigned(reduction_splits(dims)));
  bn_act_backward_sums_kernel<T><<<grid, kThreads, 0, stream>>>(dy, x, dims, mean, invstd, gamma, beta, act, sums);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bn_act_backward_apply(const T* dy, const T* x, T* dx, MapDims dims, const float* mean,
                                  const float* invstd, const float* gamma, const float* beta, const double* sums,
                                  bool training, ActParams act, float* dgamma, float* dbeta, cudaStream_t stream) {
  const int64_t n = dims.outer * dims.cn * dims.inner;
  if (dims.cn == 0) return cudaSuccess;
  const int blocks = elementwise_blocks(n > 0 ? n : 1);  // one block at least: it writes dgamma and dbeta
  bn_act_backward_apply_kernel<T><<<blocks, kThreads, 0, stream>>>(dy, x, dx, dims, mean, invstd, gamma, beta, sums,
                                                                   training, act, dgamma, dbeta);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bn_input_grad(const T* d_act, const T* z, T* dz, MapDims dims, const float* coef_dy,
                          const float* coef_z, const float* bias, cudaStream_t stream) {
  const int64_t n = dims.outer * dims.cn * dims.inner;
  if (n == 0) return cudaSuccess;
  bn_input_grad_kernel<T><<<elementwise_blocks(n), kThreads, 0, stream>>>(d_act, z, dz, dims, coef_dy, coef_z, bias);
  return cudaGetLastError();
}

#define PNNH_INSTANTIATE(T)                                                                                         \
  template cudaError_t channel_sums<T>(const T*, MapDims, double*, cudaStream_t);                                \
  template cudaError_t bn_act_apply<T>(const T*, MapDims, T*, const float*, const float*, const float*,         \
                                       const float*, ActParams, cudaStream_t);                                      \
  template cudaError_t bn_act_backward_sums<T>(const T*, const T*, MapDims, const float*, const float*,        \
                                               const float*, const float*, ActParams, double*, cudaStream_t);       \
  template cudaError_t bn_act_backward_apply<T>(const T*, const T*, T*, MapDims, const float*, const float*,   \
                                                const float*, const float*, const double*, bool, ActParams, float*, \
                                                float*, cudaStream_t);                                              \
  template cudaError_t bn_input_grad<T>(const T*, const T*, T*, MapDims, const float*, const float*, const float*, \
                                        cudaStream_t);

PNNH_INSTANTIATE(float)
PNNH_INSTANTIATE(double)
PNNH_INSTANTIATE(__half)
PNNH_INSTANTIATE(__nv_bfloat16)

}  // namespace cuda
}  // namespace pnnh
