// The argument check every fused batch-norm pass makes of its per-channel vectors.
#pragma once

#include <ATen/ATen.h>

namespace pnnh {

// mean, invstd, gamma and beta must each be a contiguous vector of `n` channels in the data's dtype.
inline void check_norm_vectors(const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& gamma,
                               const at::Tensor& beta, int64_t n, at::ScalarType dtype) {
  for (const auto* p : {&mean, &invstd, &gamma, &beta}) {
    TORCH_CHECK(p->dim() == 1 && p->size(0) == n && p->is_contiguous() && p->scalar_type() == dtype,
                "norm parameter must be a contiguous vector of ", n, " channels in the data's dtype");
  }
}

}  // namespace pnnh
