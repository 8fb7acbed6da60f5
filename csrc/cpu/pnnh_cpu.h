// CPU kernels of the PNNH block: fused batch-norm statistics, BN-apply + activation, and their backward.
// The GEMM-heavy convolutions stay in ATen (oneDNN); these kernels replace the memory-bound passes around them.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace pnnh {

// The passes over channels-last rows: [rows, channels] matrices, a column range [c0, c0 + cn) each.
at::Tensor rows_channel_sums(const at::Tensor& z, int64_t c0, int64_t cn);

std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_batch_stats(const at::Tensor& z, int64_t c0, int64_t cn, double eps);

void rows_bn_act_apply(const at::Tensor& z, int64_t c0, const at::Tensor& out, int64_t out_c0, const at::Tensor& mean,
                       const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta, bool use_act,
                       double slope, double scale);

at::Tensor rows_bn_act_backward_sums(const at::Tensor& dy, const at::Tensor& x, int64_t c0, const at::Tensor& mean,
                                     const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                                     bool use_act, double slope, double scale);

void rows_bn_act_backward_apply(const at::Tensor& dy, const at::Tensor& x, int64_t c0, const at::Tensor& dx,
                                const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& gamma,
                                const at::Tensor& beta, const at::Tensor& sums, bool training, bool use_act,
                                double slope, double scale);

// PNNHLinear: layer norm + activation over a column range of each row (kind 0: scaled leaky, 1: GELU).
at::Tensor ln_act_forward(const at::Tensor& z, int64_t c0, int64_t cn, const at::Tensor& out, int64_t out_c0,
                          const at::Tensor& gamma, const at::Tensor& beta, double eps, bool use_act, int64_t kind,
                          double slope, double scale);

at::Tensor ln_act_backward(const at::Tensor& dy, int64_t dy_c0, const at::Tensor& z, int64_t c0, int64_t cn,
                           const at::Tensor& stats, const at::Tensor& gamma, const at::Tensor& beta,
                           const at::Tensor& dz, bool use_act, int64_t kind, double slope, double scale);

// The rows conv block with a 1x1 coder, whole (conv_block_rows.cpp): the signatures of pnnh_kernels/backends/cpu/conv.py's
// op; forward returns (y, x's moments, learner pre-norm rows, u, mean, invstd, batch var), backward the 11
// gradients (dx and ddec empty when not needed).
std::vector<at::Tensor> conv_block_rows_1x1(
    const at::Tensor& x, const at::Tensor& enc, const at::Tensor& learn1, const at::Tensor& learn2,
    const c10::optional<at::Tensor>& dec, const at::Tensor& gc, const at::Tensor& bc, const at::Tensor& g1,
    const at::Tensor& b1, const at::Tensor& g2, const at::Tensor& b2, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool use_batch, double eps, double slope, double scale, double gain,
    bool final_act);

std::vector<at::Tensor> conv_block_rows_1x1_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& moments, const at::Tensor& zl_pre, const at::Tensor& u,
    const at::Tensor& enc, const at::Tensor& learn1, const at::Tensor& learn2, const c10::optional<at::Tensor>& dec,
    const at::Tensor& gc, const at::Tensor& bc, const at::Tensor& g1, const at::Tensor& b1, const at::Tensor& g2,
    const at::Tensor& b2, const at::Tensor& mean, const at::Tensor& invstd, bool use_batch, double slope, double scale,
    double gain, bool final_act, bool need_dx);

}  // namespace pnnh
