// Whether every element of a small contiguous float / double tensor is finite, read in place: no tensor
// op is dispatched, so the rare float64 fallbacks of the statistics cost the common path one loop over
// a few hundred numbers and nothing a graph capture or an op-recording test would see.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace pnnh {

inline bool all_finite(const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "all_finite: a contiguous CPU tensor");
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "all_finite", [&] {
    const scalar_t* p = t.data_ptr<scalar_t>();
    for (int64_t i = 0, n = t.numel(); i < n && finite; ++i) finite = std::isfinite(p[i]);
  });
  return finite;
}

}  // namespace pnnh
