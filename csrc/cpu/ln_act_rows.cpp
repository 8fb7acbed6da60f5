// Fused layer-norm + activation passes for PNNHLinear on the CPU.
//
// Rows: a [rows, channels] contiguous matrix; a pass covers the column range [c0, c0 + cn) of each row
// (layer norm normalises over that range: the coder and learner halves of layer 1 each have their own norm).
// Outputs may also be written at a column offset, so layer 1 writes [z_c, act(z_l)] side by side into the
// one buffer layer 2's GEMM reads. Work is split over rows with at::parallel_for (torch's thread pool);
// within a row the channels are the vector lanes (row statistics are reductions in the data's dtype).
//
// Activations (the loops are templates over them, so each is fused into the same vector loop): kind 0 =
// scale * leaky_relu(slope) (the identity when the activation is off), kind 1 = scale * GELU, erf form,
// through simd_math's vectorisable erf / exp in float.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "pnnh_cpu.h"
#include "simd_math.h"
#include "vector_clones.h"

namespace pnnh {
namespace {

constexpr int64_t kRowGrain = 16;
constexpr int64_t kChunk = 64;  // rows per partial of the affine gradients: fixed, so results are deterministic
constexpr int64_t kGelu = 1;

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.device().is_cpu(), name, " must be a contiguous 2-D CPU tensor");
}

// scale * leaky_relu(y, slope): pos = scale, neg = scale * slope (both 1 for the identity).
template <typename T>
struct Leaky {
  static constexpr bool kStoresSlope = false;
  T pos, neg;
  T value(T y) const { return y > 0 ? y * pos : y * neg; }
  T slope(T y) const { return y > 0 ? pos : neg; }
};

// scale * y * Phi(y), Phi the standard normal CDF; its derivative scale * (Phi(y) + y * phi(y)).
template <typename T>
struct Gelu {
  static constexpr bool kStoresSlope = true;
  T scale;
  static T cdf(T y) { return T(0.5) + T(0.5) * simd_math::erf_fast(y * T(0.70710678118654752)); }
  T value(T y) const { return scale * y * cdf(y); }
  T slope(T y) const {
    return scale * (cdf(y) + y * T(0.39894228040143268) * simd_math::exp_fast(T(-0.5) * y * y));
  }
};

// The squared deviations are summed in double: their float squares overflow once |x| passes ~1e19.
template <typename T>
PNNH_VECTOR_CLONES void row_moments(const T* x, int64_t n, T& mean, double& var) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += x[j];
  const T m = s / T(n);
  double ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < n; ++j) ss += double(x[j] - m) * double(x[j] - m);
  mean = m;
  var = ss / double(n);
}

template <typename T, typename Act>
PNNH_VECTOR_CLONES void ln_apply_row(const T* x, T* o, int64_t n, T m, T rs, const T* g, const T* b, Act act) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) o[j] = act.value((x[j] - m) * rs * g[j] + b[j]);
}

// A row's backward, first loop: the row sums of g * gamma and g * gamma * xhat (g = dy * act'(y)), and g * xhat
// and g added to the column partials. An activation whose slope is costly (GELU) also stores g into o for the
// second loop; a cheap one (leaky) has it recomputed there: a third store stream per element made that pass
// store-bound (measured 2x slower).
template <typename T, typename Act>
PNNH_VECTOR_CLONES void ln_backward_sums_row(const T* x, const T* d, T* o, int64_t n, T m, T rs, const T* g,
                                             const T* b, Act act, T* p_gx, T* p_g, T& s1, T& s2) {
  T a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
  for (int64_t j = 0; j < n; ++j) {
    const T xhat = (x[j] - m) * rs;
    const T gi = d[j] * act.slope(xhat * g[j] + b[j]);
    if constexpr (Act::kStoresSlope) o[j] = gi;
    p_gx[j] += gi * xhat;
    p_g[j] += gi;
    a1 += gi * g[j];
    a2 += gi * g[j] * xhat;
  }
  s1 = a1;
  s2 = a2;
}

// Second loop: dz = rstd * (g * gamma - mean(g * gamma) - xhat * mean(g * gamma * xhat)) into o.
template <typename T, typename Act>
PNNH_VECTOR_CLONES void ln_backward_apply_row(const T* x, const T* d, T* o, int64_t n, T m, T rs, const T* g,
                                              const T* b, Act act, T mean1, T mean2) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T xhat = (x[j] - m) * rs;
    T gi;
    if constexpr (Act::kStoresSlope) {
      gi = o[j];
    } else {
      gi = d[j] * act.slope(xhat * g[j] + b[j]);
    }
    o[j] = rs * (gi * g[j] - mean1 - xhat * mean2);
  }
}

// The layer norm + activation of every row's range; returns [2, rows] (mean, rstd).
template <typename T, typename Act>
void ln_act_forward_rows(const at::Tensor& z, int64_t c0, int64_t cn, const at::Tensor& out, int64_t out_c0,
                         const at::Tensor& gamma, const at::Tensor& beta, double eps, Act act, const at::Tensor& stats) {
  const int64_t rows = z.size(0), zs = z.size(1), os = out.size(1);
  const T* zp = z.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T *g = gamma.data_ptr<T>(), *b = beta.data_ptr<T>();
  T *mean = stats.data_ptr<T>(), *rstd = mean + rows;
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T m;
      double var;
      row_moments(zp + r * zs + c0, cn, m, var);
      const T rs = T(1.0 / std::sqrt(var + eps));
      mean[r] = m;
      rstd[r] = rs;
      ln_apply_row(zp + r * zs + c0, op + r * os + out_c0, cn, m, rs, g, b, act);
    }
  });
}

// dz of out = act(LN(z[:, c0:c0+cn])); fills partial [chunks, 2, cn] (float64) with column sums.
template <typename T, typename Act>
void ln_act_backward_rows(const at::Tensor& dy, int64_t dy_c0, const at::Tensor& z, int64_t c0, int64_t cn,
                          const at::Tensor& stats, const at::Tensor& gamma, const at::Tensor& beta,
                          const at::Tensor& dz, Act act, const at::Tensor& partial) {
  const int64_t rows = z.size(0), ds = dy.size(1), zs = z.size(1);
  const int64_t chunks = (rows + kChunk - 1) / kChunk;
  const T *dyp = dy.data_ptr<T>(), *zp = z.data_ptr<T>();
  T* dzp = dz.data_ptr<T>();
  const T *g = gamma.data_ptr<T>(), *b = beta.data_ptr<T>();
  const T *mean = stats.data_ptr<T>(), *rstd = mean + rows;
  double* part = partial.data_ptr<double>();
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<T> p_gx(cn), p_g(cn);
    for (int64_t ci = cb; ci < ce; ++ci) {
      std::fill(p_gx.begin(), p_gx.end(), T(0));
      std::fill(p_g.begin(), p_g.end(), T(0));
      for (int64_t r = ci * kChunk; r < std::min(rows, (ci + 1) * kChunk); ++r) {
        const T *x = zp + r * zs + c0, *d = dyp + r * ds + dy_c0;
        T* o = dzp + r * zs + c0;
        T s1, s2;
        ln_backward_sums_row(x, d, o, cn, mean[r], rstd[r], g, b, act, p_gx.data(), p_g.data(), s1, s2);
        ln_backward_apply_row(x, d, o, cn, mean[r], rstd[r], g, b, act, s1 / T(cn), s2 / T(cn));
      }
      double* out = part + ci * 2 * cn;
      for (int64_t j = 0; j < cn; ++j) {
        out[j] = p_gx[j];
        out[cn + j] = p_g[j];
      }
    }
  });
}

// Calls fn(Act) with the pass's activation functor in scalar_t.
template <typename T, typename Fn>
void with_activation(bool use_act, int64_t kind, double slope, double scale, Fn&& fn) {
  if (use_act && kind == kGelu) {
    fn(Gelu<T>{T(scale)});
  } else if (use_act) {
    fn(Leaky<T>{T(scale), T(scale * slope)});
  } else {
    fn(Leaky<T>{T(1), T(1)});
  }
}

}  // namespace

// out[:, out_c0 + j] = act(gamma_j * (z[:, c0 + j] - mean_r) * rstd_r + beta_j); returns [2, rows] (mean, rstd).
at::Tensor ln_act_forward(const at::Tensor& z, int64_t c0, int64_t cn, const at::Tensor& out, int64_t out_c0,
                          const at::Tensor& gamma, const at::Tensor& beta, double eps, bool use_act, int64_t kind,
                          double slope, double scale) {
  check_rows(z, "z");
  check_rows(out, "out");
  TORCH_CHECK(c0 >= 0 && cn > 0 && c0 + cn <= z.size(1) && out_c0 >= 0 && out_c0 + cn <= out.size(1), "column range out of bounds");
  TORCH_CHECK(out.size(0) == z.size(0) && out.scalar_type() == z.scalar_type(), "out must match z's rows and dtype");
  TORCH_CHECK(gamma.numel() == cn && beta.numel() == cn && gamma.scalar_type() == z.scalar_type() &&
                  beta.scalar_type() == z.scalar_type() && gamma.is_contiguous() && beta.is_contiguous(),
              "gamma and beta must be contiguous vectors of the range's width in z's dtype");
  auto stats = at::empty({2, z.size(0)}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ln_act_forward", [&] {
    with_activation<scalar_t>(use_act, kind, slope, scale, [&](auto act) {
      ln_act_forward_rows<scalar_t>(z, c0, cn, out, out_c0, gamma, beta, eps, act, stats);
    });
  });
  return stats;
}

// Backward of out = act(LN(z[:, c0:c0+cn])): writes dz[:, c0 + j] and returns per-chunk partial column sums
// [chunks, 2, cn] (float64) of g * xhat and g, whose sum over chunks is (d gamma, d beta). dz may be dy itself
// when dy_c0 == c0: every element of dy is read before the same element of dz is written.
at::Tensor ln_act_backward(const at::Tensor& dy, int64_t dy_c0, const at::Tensor& z, int64_t c0, int64_t cn,
                           const at::Tensor& stats, const at::Tensor& gamma, const at::Tensor& beta,
                           const at::Tensor& dz, bool use_act, int64_t kind, double slope, double scale) {
  check_rows(dy, "dy");
  check_rows(z, "z");
  check_rows(dz, "dz");
  TORCH_CHECK(dz.sizes() == z.sizes() && dy.size(0) == z.size(0) && dy_c0 + cn <= dy.size(1) && c0 + cn <= z.size(1),
              "shape mismatch");
  TORCH_CHECK(dy.scalar_type() == z.scalar_type() && dz.scalar_type() == z.scalar_type() &&
                  stats.scalar_type() == z.scalar_type() && gamma.scalar_type() == z.scalar_type(),
              "dy, dz, stats and gamma must have z's dtype");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.size(1) == z.size(0) && stats.is_contiguous(), "stats must be [2, rows]");
  const int64_t chunks = std::max<int64_t>((z.size(0) + kChunk - 1) / kChunk, 1);
  auto partial = at::zeros({chunks, 2, cn}, z.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ln_act_backward", [&] {
    with_activation<scalar_t>(use_act, kind, slope, scale, [&](auto act) {
      ln_act_backward_rows<scalar_t>(dy, dy_c0, z, c0, cn, stats, gamma, beta, dz, act, partial);
    });
  });
  return partial;
}

}  // namespace pnnh
