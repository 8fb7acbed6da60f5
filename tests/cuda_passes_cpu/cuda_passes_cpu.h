// The 'cuda' backend's batch-norm + activation passes on the CPU, over [outer, channels, inner] maps: the 'cuda' backend's op (backends/cuda/conv.py)
// with these in place of its CUDA kernels, so that its Python half is tested without a GPU. Test-only: the
// tests compile them on first use (tests/cuda_passes_cpu.py); nothing installed calls them.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace pnnh {

at::Tensor channel_sums(const at::Tensor& z, int64_t c0, int64_t cn);

// stats [3, total] (mean, invstd, unbiased var) at channels [c0, c0 + cn) from sums [2, cn] over count values.
void bn_finalize(const at::Tensor& sums, double count, double eps, const at::Tensor& stats, int64_t c0);

void bn_act_apply(const at::Tensor& z, int64_t c0, const at::Tensor& out, const at::Tensor& mean,
                  const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta, bool use_act,
                  double slope, double scale);

at::Tensor bn_act_backward_sums(const at::Tensor& dy, const at::Tensor& x, int64_t c0, const at::Tensor& mean,
                                const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                                bool use_act, double slope, double scale);

// Also returns (dgamma, dbeta) in x's dtype, from the sums.
std::tuple<at::Tensor, at::Tensor> bn_act_backward_apply(const at::Tensor& dy, const at::Tensor& x, int64_t c0,
                                                         const at::Tensor& dx, const at::Tensor& mean,
                                                         const at::Tensor& invstd, const at::Tensor& gamma,
                                                         const at::Tensor& beta, const at::Tensor& sums, bool training,
                                                         bool use_act, double slope, double scale);

// dz = coef_dy * d_act + coef_z * z[:, c0:c0+cn] + bias per channel (coefficients in any float dtype).
void bn_input_grad(const at::Tensor& d_act, const at::Tensor& z, int64_t c0, const at::Tensor& dz,
                   const at::Tensor& coef_dy, const at::Tensor& coef_z, const at::Tensor& bias);

}  // namespace pnnh
