// Torch glue of the CUDA kernels: the six batch-norm + activation passes the 'cuda' backend's op calls (channel
// sums, finalize, apply, backward sums, backward apply, input gradient), on CUDA tensors in NCHW or channels_last.
// Compiled only against a CUDA build of torch (setup.py adds csrc/cuda/*.cpp then); csrc/bindings.cpp binds them.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace pnnh {
namespace cuda {

// [splits, 2, cn] float64: partial (sum, sum of squares) of each slice of the map, for bn_finalize_torch.
at::Tensor channel_sums_torch(const at::Tensor& z, int64_t c0, int64_t cn);

// stats [3, total] float32 (mean, invstd, unbiased var) at channels [c0, c0 + cn) from sums [2, cn] or
// [splits, 2, cn] (float64 or float32) over count values.
void bn_finalize_torch(const at::Tensor& sums, double count, double eps, const at::Tensor& stats, int64_t c0);

void bn_act_apply_torch(const at::Tensor& z, int64_t c0, const at::Tensor& out, const at::Tensor& mean,
                        const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta, bool use_act,
                        double slope, double scale);

at::Tensor bn_act_backward_sums_torch(const at::Tensor& dy, const at::Tensor& x, int64_t c0, const at::Tensor& mean,
                                      const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                                      bool use_act, double slope, double scale);

// Also returns the BN parameters' gradients (dgamma, dbeta), float32 [cn], written from the sums by the same launch.
std::tuple<at::Tensor, at::Tensor> bn_act_backward_apply_torch(const at::Tensor& dy, const at::Tensor& x, int64_t c0,
                                                               const at::Tensor& dx, const at::Tensor& mean,
                                                               const at::Tensor& invstd, const at::Tensor& gamma,
                                                               const at::Tensor& beta, const at::Tensor& sums,
                                                               bool training, bool use_act, double slope,
                                                               double scale);

// dz = coef_dy * d_act + coef_z * z[:, c0:c0+cn] + bias per channel (coefficients float32 [cn]).
void bn_input_grad_torch(const at::Tensor& d_act, const at::Tensor& z, int64_t c0, const at::Tensor& dz,
                         const at::Tensor& coef_dy, const at::Tensor& coef_z, const at::Tensor& bias);

}  // namespace cuda
}  // namespace pnnh
