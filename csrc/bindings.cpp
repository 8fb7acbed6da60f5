// The one binding file: exposes the CPU kernels (and, when built with CUDA, the CUDA ones) to Python.
#include <torch/extension.h>

#include "cpu/pnnh_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pnnh_kernels compiled kernels";
  m.def("channel_sums", &pnnh::channel_sums, "per-channel sum and sum of squares (float64)");
  m.def("bn_act_apply", &pnnh::bn_act_apply, "fused batch-norm apply + activation");
  m.def("bn_act_backward_sums", &pnnh::bn_act_backward_sums, "fused dReLU + dBN reductions");
  m.def("bn_act_backward_apply", &pnnh::bn_act_backward_apply, "fused dReLU + dBN input gradient");
  m.def("ln_act_forward", &pnnh::ln_act_forward, "fused layer-norm apply + activation over rows");
  m.def("ln_act_backward", &pnnh::ln_act_backward, "fused dActivation + dLayerNorm over rows");
#ifdef PNNH_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
