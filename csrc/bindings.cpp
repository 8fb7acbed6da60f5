// The one binding file: exposes the CPU kernels (channels-last rows, the coder algebra) and, when built with
// CUDA, the 'cuda' backend's passes over [outer, channels, inner] maps (NCHW or channels_last).
#include <torch/extension.h>

#include "cpu/pnnh_cpu.h"
#include "cpu/rows_coder.h"
#ifdef PNNH_WITH_CUDA
#include "cuda/pnnh_cuda.h"
#endif
#ifdef PNNH_WITH_CUDNN_FRONTEND
#include "cuda/cudnn_fused.h"
#endif

namespace {

// the coder algebra's parts as tuples, for their unit tests (tests/backends/test_cpu_coder.py)
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

#ifdef PNNH_WITH_CUDNN_FRONTEND
std::string cudnn_fused_support(int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int64_t r, int64_t pad,
                                bool prologue, double slope, at::ScalarType dtype) {
  return pnnh::cudnn_fused::support({n, c, h, w, k, r, pad, prologue, slope, dtype});
}

std::string cudnn_dgrad_support(int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int64_t r, int64_t pad,
                                double slope, at::ScalarType dtype) {
  return pnnh::cudnn_fused::dgrad_support({n, c, h, w, k, r, pad, true, slope, dtype});
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pnnh_kernels compiled kernels";
#ifdef PNNH_WITH_CUDA
  // the 'cuda' backend's passes over [outer, channels, inner] maps (backends/cuda/maps.py), CUDA tensors only
  m.def("channel_sums", &pnnh::cuda::channel_sums_torch, "per-channel sum and sum of squares (float64)");
  m.def("bn_finalize", &pnnh::cuda::bn_finalize_torch, "(mean, invstd, unbiased var) rows from channel sums");
  m.def("bn_act_apply", &pnnh::cuda::bn_act_apply_torch, "fused batch-norm apply + activation");
  m.def("bn_act_backward_sums", &pnnh::cuda::bn_act_backward_sums_torch, "fused dAct + dBN reductions");
  m.def("bn_act_backward_apply", &pnnh::cuda::bn_act_backward_apply_torch, "fused dAct + dBN input gradient");
  m.def("bn_input_grad", &pnnh::cuda::bn_input_grad_torch, "dz = coef_dy * d_act + coef_z * z + bias per channel");
#endif
#ifdef PNNH_WITH_CUDNN_FRONTEND
  // cuDNN fused graphs (csrc/cuda/cudnn_fused.cpp): conv with a BN-apply + activation prologue and a
  // statistics epilogue; support() says whether cuDNN has an engine for a shape
  m.def("cudnn_fused_support", &cudnn_fused_support, "'' when cuDNN can run the fused conv graph, else why not");
  m.def("cudnn_conv_genstats", &pnnh::cudnn_fused::conv_genstats, "[act(x*scale+bias) ->] conv -> (y, sum, sq_sum)");
  m.def("cudnn_dgrad_support", &cudnn_dgrad_support, "'' when cuDNN can run dgrad -> dReLU -> dBN weight, else why not");
  m.def("cudnn_dgrad_drelu_dbn", &pnnh::cudnn_fused::dgrad_drelu_dbn,
        "dgrad -> dReLU -> BN backward weight: (d_act, dscale, dbias, eq_scale_dy, eq_scale_x, eq_bias)");
  m.attr("with_cudnn_frontend") = true;
#else
  m.attr("with_cudnn_frontend") = false;
#endif
  // channels-last rows: the CPU backend's layout (CPU tensors only)
  m.def("rows_channel_sums", &pnnh::rows_channel_sums, "per-channel sum and sum of squares over rows (float64)");
  m.def("rows_batch_stats", &pnnh::rows_batch_stats, "batch-norm (mean, invstd, unbiased var) over rows");
  m.def("rows_bn_act_apply", &pnnh::rows_bn_act_apply, "fused batch-norm apply + activation over rows");
  m.def("rows_bn_act_backward_sums", &pnnh::rows_bn_act_backward_sums, "fused dAct + dBN reductions over rows");
  m.def("rows_bn_act_backward_apply", &pnnh::rows_bn_act_backward_apply, "fused dAct + dBN input gradient over rows");
  m.def("ln_act_forward", &pnnh::ln_act_forward, "fused layer-norm apply + activation over rows");
  m.def("ln_act_backward", &pnnh::ln_act_backward, "fused dActivation + dLayerNorm over rows");
  // the block functions take the op contract's fields (backends/contract.py BlockArgs) by name
  m.def("conv_block_rows_1x1", &pnnh::conv_block_rows_1x1, "the rows conv block with a 1x1 coder, forward",
        py::arg("x"), py::arg("encoder"), py::arg("learner1"), py::arg("learner2"), py::arg("decoder"),
        py::arg("coder_gamma"), py::arg("coder_beta"), py::arg("learner_gamma"), py::arg("learner_beta"),
        py::arg("out_gamma"), py::arg("out_beta"), py::arg("running_mean"), py::arg("running_var"),
        py::arg("use_batch"), py::arg("eps"), py::arg("slope"), py::arg("act_scale"), py::arg("gain"),
        py::arg("final_act"));
  m.def("conv_block_rows_1x1_backward", &pnnh::conv_block_rows_1x1_backward,
        "the rows conv block with a 1x1 coder, backward", py::arg("dy"), py::arg("x"), py::arg("zc"), py::arg("zl"),
        py::arg("u"), py::arg("encoder"), py::arg("learner1"), py::arg("learner2"), py::arg("decoder"),
        py::arg("coder_gamma"), py::arg("coder_beta"), py::arg("learner_gamma"), py::arg("learner_beta"),
        py::arg("out_gamma"), py::arg("out_beta"), py::arg("mean"), py::arg("invstd"), py::arg("use_batch"),
        py::arg("slope"), py::arg("act_scale"), py::arg("gain"), py::arg("final_act"), py::arg("need_dx"));
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
