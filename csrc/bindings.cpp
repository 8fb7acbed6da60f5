// The one binding file: exposes the CPU kernels and, when built with CUDA, sends CUDA tensors to the CUDA
// ones, so Python calls one function per pass whatever the device.
#include <torch/extension.h>

#include "cpu/pnnh_cpu.h"
#include "cpu/rows_coder.h"
#ifdef PNNH_WITH_CUDA
#include "cuda/pnnh_cuda.h"
#define PNNH_ON_CUDA(tensor, call) \
  if ((tensor).is_cuda()) return call
#else
#define PNNH_ON_CUDA(tensor, call)
#endif

namespace {

at::Tensor channel_sums(const at::Tensor& z, int64_t c0, int64_t cn) {
  PNNH_ON_CUDA(z, pnnh::cuda::channel_sums_torch(z, c0, cn));
  return pnnh::channel_sums(z, c0, cn);
}

void bn_act_apply(const at::Tensor& z, int64_t c0, const at::Tensor& out, const at::Tensor& mean,
                  const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta, bool use_act,
                  double slope, double scale) {
  PNNH_ON_CUDA(z, pnnh::cuda::bn_act_apply_torch(z, c0, out, mean, invstd, gamma, beta, use_act, slope, scale));
  pnnh::bn_act_apply(z, c0, out, mean, invstd, gamma, beta, use_act, slope, scale);
}

at::Tensor bn_act_backward_sums(const at::Tensor& dy, const at::Tensor& x, int64_t c0, const at::Tensor& mean,
                                const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                                bool use_act, double slope, double scale) {
  PNNH_ON_CUDA(x, pnnh::cuda::bn_act_backward_sums_torch(dy, x, c0, mean, invstd, gamma, beta, use_act, slope, scale));
  return pnnh::bn_act_backward_sums(dy, x, c0, mean, invstd, gamma, beta, use_act, slope, scale);
}

void bn_act_backward_apply(const at::Tensor& dy, const at::Tensor& x, int64_t c0, const at::Tensor& dx,
                           const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& gamma,
                           const at::Tensor& beta, const at::Tensor& sums, bool training, bool use_act,
                           double slope, double scale) {
  PNNH_ON_CUDA(x, pnnh::cuda::bn_act_backward_apply_torch(dy, x, c0, dx, mean, invstd, gamma, beta, sums, training,
                                                          use_act, slope, scale));
  pnnh::bn_act_backward_apply(dy, x, c0, dx, mean, invstd, gamma, beta, sums, training, use_act, slope, scale);
}

// the coder algebra's parts as tuples, for their unit tests (tests/test_rows_coder.py)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> coder_fold(
    const at::Tensor& enc, const at::Tensor& dec_matrix, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& gamma, const at::Tensor& beta, double gain) {
  auto f = pnnh::fold_coder(enc, dec_matrix, mean, invstd, gamma, beta, gain);
  return {f.a, f.shift, f.m, f.through, f.offset};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>> coder_backward(
    const at::Tensor& h, const c10::optional<at::Tensor>& du_sums, const at::Tensor& moments, const at::Tensor& enc,
    const at::Tensor& dec_matrix, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& gamma,
    const at::Tensor& beta, bool use_batch, int64_t count, double gain) {
  auto fold = pnnh::fold_coder(enc, dec_matrix, mean, invstd, gamma, beta, gain);
  auto g = pnnh::coder_backward(h, du_sums, moments, enc, dec_matrix, fold, mean, invstd, use_batch, count, gain);
  return {g.encoder, g.decoder_matrix, g.gamma, g.beta, g.input_self, g.input_const};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pnnh_kernels compiled kernels";
  m.def("channel_sums", &channel_sums, "per-channel sum and sum of squares (float64)");
  m.def("bn_act_apply", &bn_act_apply, "fused batch-norm apply + activation");
  m.def("bn_act_backward_sums", &bn_act_backward_sums, "fused dReLU + dBN reductions");
  m.def("bn_act_backward_apply", &bn_act_backward_apply, "fused dReLU + dBN input gradient");
  // channels-last rows: the CPU backend's layout (CPU tensors only)
  m.def("rows_channel_sums", &pnnh::rows_channel_sums, "per-channel sum and sum of squares over rows (float64)");
  m.def("rows_batch_stats", &pnnh::rows_batch_stats, "batch-norm (mean, invstd, unbiased var) over rows");
  m.def("rows_bn_act_apply", &pnnh::rows_bn_act_apply, "fused batch-norm apply + activation over rows");
  m.def("rows_bn_act_backward_sums", &pnnh::rows_bn_act_backward_sums, "fused dAct + dBN reductions over rows");
  m.def("rows_bn_act_backward_apply", &pnnh::rows_bn_act_backward_apply, "fused dAct + dBN input gradient over rows");
  m.def("ln_act_forward", &pnnh::ln_act_forward, "fused layer-norm apply + activation over rows");
  m.def("ln_act_backward", &pnnh::ln_act_backward, "fused dActivation + dLayerNorm over rows");
  m.def("conv_block_rows_1x1", &pnnh::conv_block_rows_1x1, "the rows conv block with a 1x1 coder, forward");
  m.def("conv_block_rows_1x1_backward", &pnnh::conv_block_rows_1x1_backward, "the rows conv block with a 1x1 coder, backward");
  m.def("coder_input_moments", &pnnh::coder_input_moments, "column sums and Gram matrix of rows (float64)");
  m.def("coder_batch_stats", &pnnh::coder_batch_stats, "a 1x1 coder's batch (mean, biased var) from its input's moments");
  m.def("coder_fold", &coder_fold, "BN_c folded into the decoder: (a, shift, m, through, offset)");
  m.def("coder_backward", &coder_backward, "the coder's gradients from H = dU^T X");
#ifdef _OPENMP
  m.attr("with_openmp") = true;  // without it at::parallel_for runs every pass on one thread
#else
  m.attr("with_openmp") = false;
#endif
#ifdef PNNH_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
