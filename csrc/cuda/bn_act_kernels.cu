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

// grid: (cn, splits). Each block reduces a slice of one channel's outer x inner elements. The sums are
// taken in double: float squares overflow once |v| passes ~1e19, and the pass is bound by memory, not
// by the arithmetic.
template <typename T>
__global__ void channel_sums_kernel(const T* z, PlanarDims d, double* sums) {
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
    atomicAdd(sums + c, s);
    atomicAdd(sums + d.cn + c, ss);
  }
}

template <typename T>
__global__ void bn_act_apply_kernel(const T* z, PlanarDims d, T* out, const float* mean, const float* invstd,
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
__global__ void bn_act_backward_sums_kernel(const T* dy, const T* x, PlanarDims d, const float* mean,
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
__global__ void bn_act_backward_apply_kernel(const T* dy, const T* x, T* dx, PlanarDims d, const float* mean,
                                             const float* invstd, const float* gamma, const float* beta,
                                             const double* sums, bool training, ActParams act) {
  using A = typename Acc<T>::type;
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

int elementwise_blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return int(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

int reduction_splits(const PlanarDims& d) {
  const int64_t per_channel = d.outer * d.inner;
  const int64_t splits = (per_channel + 8 * kThreads - 1) / (8 * kThreads);  // ~8 elements per thread
  return int(splits < 1 ? 1 : (splits > 65535 ? 65535 : splits));
}

}  // namespace

template <typename T>
cudaError_t channel_sums(const T* z, PlanarDims dims, double* sums, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(sums, 0, sizeof(double) * 2 * dims.cn, stream);
  if (err != cudaSuccess || dims.cn == 0) return err;
  dim3 grid(unsigned(dims.cn), unsigned(reduction_splits(dims)));
  channel_sums_kernel<T><<<grid, kThreads, 0, stream>>>(z, dims, sums);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bn_act_apply(const T* z, PlanarDims dims, T* out, const float* mean, const float* invstd,
                         const float* gamma, const float* beta, ActParams act, cudaStream_t stream) {
  const int64_t n = dims.outer * dims.cn * dims.inner;
  if (n == 0) return cudaSuccess;
  bn_act_apply_kernel<T><<<elementwise_blocks(n), kThreads, 0, stream>>>(z, dims, out, mean, invstd, gamma, beta, act);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bn_act_backward_sums(const T* dy, const T* x, PlanarDims dims, const float* mean,
                                 const float* invstd, const float* gamma, const float* beta, ActParams act,
                                 double* sums, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(sums, 0, sizeof(double) * 2 * dims.cn, stream);
  if (err != cudaSuccess || dims.cn == 0) return err;
  dim3 grid(unsigned(dims.cn), unsigned(reduction_splits(dims)));
  bn_act_backward_sums_kernel<T><<<grid, kThreads, 0, stream>>>(dy, x, dims, mean, invstd, gamma, beta, act, sums);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bn_act_backward_apply(const T* dy, const T* x, T* dx, PlanarDims dims, const float* mean,
                                  const float* invstd, const float* gamma, const float* beta, const double* sums,
                                  bool training, ActParams act, cudaStream_t stream) {
  const int64_t n = dims.outer * dims.cn * dims.inner;
  if (n == 0) return cudaSuccess;
  bn_act_backward_apply_kernel<T><<<elementwise_blocks(n), kThreads, 0, stream>>>(dy, x, dx, dims, mean, invstd, gamma,
                                                                                   beta, sums, training, act);
  return cudaGetLastError();
}

#define PNNH_INSTANTIATE(T)                                                                                         \
  template cudaError_t channel_sums<T>(const T*, PlanarDims, double*, cudaStream_t);                                \
  template cudaError_t bn_act_apply<T>(const T*, PlanarDims, T*, const float*, const float*, const float*,         \
                                       const float*, ActParams, cudaStream_t);                                      \
  template cudaError_t bn_act_backward_sums<T>(const T*, const T*, PlanarDims, const float*, const float*,        \
                                               const float*, const float*, ActParams, double*, cudaStream_t);       \
  template cudaError_t bn_act_backward_apply<T>(const T*, const T*, T*, PlanarDims, const float*, const float*,   \
                                                const float*, const float*, const double*, bool, ActParams,         \
                                                cudaStream_t);

PNNH_INSTANTIATE(float)
PNNH_INSTANTIATE(double)
PNNH_INSTANTIATE(__half)
PNNH_INSTANTIATE(__nv_bfloat16)

}  // namespace cuda
}  // namespace pnnh
