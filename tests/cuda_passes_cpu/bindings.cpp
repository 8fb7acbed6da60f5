// Python bindings of the test-only CPU passes of the 'cuda' op, under the names the 'cuda' backend's op calls.
// torch/csrc/utils/pybind.h (the Tensor casters) instead of torch/extension.h, which also pulls in the whole
// C++ frontend: the module compiles in about half the time
#include <torch/csrc/utils/pybind.h>

#include "cuda_passes_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("channel_sums", &pnnh::channel_sums, "per-channel sum and sum of squares (float64)");
  m.def("bn_finalize", &pnnh::bn_finalize, "(mean, invstd, unbiased var) rows from channel sums");
  m.def("bn_act_apply", &pnnh::bn_act_apply, "fused batch-norm apply + activation");
  m.def("bn_act_backward_sums", &pnnh::bn_act_backward_sums, "fused dAct + dBN reductions");
  m.def("bn_act_backward_apply", &pnnh::bn_act_backward_apply, "fused dAct + dBN input gradient");
  m.def("bn_input_grad", &pnnh::bn_input_grad, "dz = coef_dy * d_act + coef_z * z + bias per channel");
}
