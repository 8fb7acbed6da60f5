// Branch-free float erf and exp that vectorise inside `#pragma omp simd` loops (libm's scalar erff / expf
// calls do not), for GELU fused into the layer-norm passes. Double keeps libm: float64 is the exactness
// dtype (gradcheck, reference agreement), not a speed one.
//
// erf: x * P(x^2) / Q(x^2) on |x| < 3.92 (beyond it erf rounds to +-1 in float), a rational fit of this
// project's own (a reweighted least-squares fit of the relative error, run with numpy/scipy): 5e-9 in
// exact arithmetic, about 3e-7 relative once evaluated in float.
// exp: 2^n * e^r with n = round(x / ln 2), |r| <= ln 2 / 2, e^r by its degree-7 Taylor polynomial
// (relative error < 1e-8), 2^n built in the exponent bits. Arguments are clamped to [-87, 88] (below,
// the result is ~1e-38 instead of a denormal or 0; callers multiply it by bounded values).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace pnnh {
namespace simd_math {

inline float erf_fast(float x) {
  const float c = x < -3.92f ? -3.92f : (x > 3.92f ? 3.92f : x);
  const float t = c * c;
  float p = -1.31735091e-08f;
  p = p * t + 4.68059383e-06f;
  p = p * t + 3.79422197e-04f;
  p = p * t + 3.84688979e-03f;
  p = p * t + 5.43059657e-02f;
  p = p * t + 1.85145152e-01f;
  p = p * t + 1.12837917e+00f;
  float q = 6.30731791e-05f;
  q = q * t + 1.30678024e-03f;
  q = q * t + 1.54558870e-02f;
  q = q * t + 1.13931553e-01f;
  q = q * t + 4.97414034e-01f;
  q = q * t + 1.00000000e+00f;
  return c * p / q;
}

inline float exp_fast(float x) {
  const float c = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const float n = (c * 1.44269504f + kRound) - kRound;
  const float r = (c - n * 0.693145752f) - n * 1.42860677e-06f;  // ln 2 in two parts: r stays exact
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline double erf_fast(double x) { return std::erf(x); }
inline double exp_fast(double x) { return std::exp(x); }

}  // namespace simd_math
}  // namespace pnnh
