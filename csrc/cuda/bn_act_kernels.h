// CUDA kernels of the PNNH block's fused passes, callable with raw pointers and a stream.
// They need only the CUDA toolkit (no torch headers), so `nvcc -c` checks them on any machine with nvcc;
// the torch glue that calls them is built only against a CUDA torch.
//
// Layout: [outer, channels, inner] contiguous (NCHW: outer = N, inner = H*W; channels_last: outer = N*H*W,
// inner = 1, which the reductions read a warp of consecutive channels at a time); a pass covers the channel
// range [c0, c0 + cn) of a tensor with `channels` channels. Activation: scale * leaky_relu(slope),
// or none (use_act = false). Accumulation is in float (half/bf16/float data) or double (double data);
// per-channel sums are float64 and reduced with atomics.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pnnh {
namespace cuda {

// A feature map as the passes see it: [outer, channels, inner], NCHW as [N, C, H*W] and channels_last as
// [N*H*W, C, 1]; a pass covers the channels [c0, c0 + cn).
struct MapDims {
  int64_t outer, channels, inner, c0, cn;
};

struct ActParams {
  bool use_act;
  float slope, scale;
};

// partials: [channel_sums_splits(dims), 2, cn] float64, every entry written (no atomics, no zeroing launch):
// each split's sum and sum of squares; bn_finalize adds the splits, in a fixed order (deterministic).
int channel_sums_splits(MapDims dims);
template <typename T>
cudaError_t channel_sums(const T* z, MapDims dims, double* partials, cudaStream_t stream);

// stats: [3, total] float32 rows (mean, invstd, unbiased variance); writes channels [c0, c0 + cn) from sums
// [splits, 2, cn] (each split's sum and sum of squares; S = double or float) over `count` values, in double:
// one launch instead of the ~10 elementwise ops of the same arithmetic on tensors.
template <typename S>
cudaError_t bn_finalize(const S* sums, int64_t splits, int64_t cn, double count, double eps, float* stats,
                        int64_t total, int64_t c0, cudaStream_t stream);

// out: [outer, cn, inner]; params: per-channel mean, invstd, gamma, beta (float, cn each).
template <typename T>
cudaError_t bn_act_apply(const T* z, MapDims dims, T* out, const float* mean, const float* invstd,
                         const float* gamma, const float* beta, ActParams act, cudaStream_t stream);

// dy: [outer, cn, inner]; sums: [2, cn] float64 (sum g, sum g * xhat), zeroed by the launcher.
template <typename T>
cudaError_t bn_act_backward_sums(const T* dy, const T* x, MapDims dims, const float* mean,
                                 const float* invstd, const float* gamma, const float* beta, ActParams act,
                                 double* sums, cudaStream_t stream);

// dx: x's layout, written at x's channels [c0, c0 + cn). The same launch writes the BN parameters'
// gradients, dgamma = sums[1] and dbeta = sums[0], as float [cn] (sparing two conversion launches).
template <typename T>
cudaError_t bn_act_backward_apply(const T* dy, const T* x, T* dx, MapDims dims, const float* mean,
                                  const float* invstd, const float* gamma, const float* beta, const double* sums,
                                  bool training, ActParams act, float* dgamma, float* dbeta, cudaStream_t stream);

// dz = coef_dy * d_act + coef_z * z + bias per channel: the pre-norm input's gradient from a BN-backward's
// coefficients (cuDNN's dgrad -> dReLU -> dBN graph). d_act, dz: [outer, cn, inner]; z at channels [c0, c0 + cn).
template <typename T>
cudaError_t bn_input_grad(const T* d_act, const T* z, T* dz, MapDims dims, const float* coef_dy,
                          const float* coef_z, const float* bias, cudaStream_t stream);

}  // namespace cuda
}  // namespace pnnh
