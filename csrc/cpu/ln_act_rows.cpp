// Fused layer-norm + activation passes for PNNHLinear on the CPU.
//
// Rows: a [rows, channels] contiguous matrix; a pass covers the column range [c0, c0 + cn) of each row
// (layer norm normalises over that range: the coder and learner halves of layer 1 each have their own norm).
// Outputs may also be written at a column offset, so layer 1 writes [z_c, act(z_l)] side by side into the
// one buffer layer 2's GEMM reads. Work is split over rows with at::parallel_for (torch's thread pool);
// within a row the channels are the vector lanes (row statistics are reductions in the data's dtype).
//
// Activations: kind 0 = scaled leaky family (scale * leaky_relu(slope)), fused into the loops; kind 1 =
// scale * GELU (erf form), which goes through ATen's gelu / gelu_backward: they evaluate erf with
// vectorised (Sleef) code, where a per-element std::erf here cost more than the whole layer norm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "pnnh_cpu.h"
#include "vector_clones.h"

namespace pnnh {
namespace {

constexpr int64_t kRowGrain = 16;
constexpr int64_t kChunk = 64;  // rows per partial of the affine gradients: fixed, so results are deterministic
constexpr int64_t kGelu = 1;

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.device().is_cpu(), name, " must be a contiguous 2-D CPU tensor");
}

template <typename T>
PNNH_VECTOR_CLONES void row_moments(const T* x, int64_t n, T& mean, T& var) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += x[j];
  const T m = s / T(n);
  T ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < n; ++j) ss += (x[j] - m) * (x[j] - m);
  mean = m;
  var = ss / T(n);
}

template <typename T>
PNNH_VECTOR_CLONES void ln_apply_row(const T* x, T* o, int64_t n, T m, T rs, const T* g, const T* b, T pos, T neg) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T y = (x[j] - m) * rs * g[j] + b[j];
    o[j] = y > 0 ? y * pos : y * neg;
  }
}

// Row sums of dxhat and dxhat * xhat, and the column partials of g * xhat and g (g = dy * act'(y)).
template <typename T>
PNNH_VECTOR_CLONES void ln_backward_sums_row(const T* x, const T* d, int64_t n, T m, T rs, const T* g, const T* b,
                                             T pos, T neg, T* p_gx, T* p_g, T& s1, T& s2) {
  T a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
  for (int64_t j = 0; j < n; ++j) {
    const T xhat = (x[j] - m) * rs;
    const T y = xhat * g[j] + b[j];
    const T gi = d[j] * (y > 0 ? pos : neg);
    p_gx[j] += gi * xhat;
    p_g[j] += gi;
    a1 += gi * g[j];
    a2 += gi * g[j] * xhat;
  }
  s1 = a1;
  s2 = a2;
}

template <typename T>
PNNH_VECTOR_CLONES void ln_backward_apply_row(const T* x, const T* d, T* o, int64_t n, T m, T rs, const T* g,
                                              const T* b, T pos, T neg, T mean1, T mean2) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T xhat = (x[j] - m) * rs;
    const T y = xhat * g[j] + b[j];
    const T gi = d[j] * (y > 0 ? pos : neg);
    o[j] = rs * (gi * g[j] - mean1 - xhat * mean2);
  }
}

// The layer norm (+ leaky activation) of every row's range; returns [2, rows] (mean, rstd).
at::Tensor ln_leaky_forward(const at::Tensor& z, int64_t c0, int64_t cn, const at::Tensor& out, int64_t out_c0,
                            const at::Tensor& gamma, const at::Tensor& beta, double eps, bool use_act, double slope,
                            double scale) {
  const int64_t rows = z.size(0);
  auto stats = at::empty({2, rows}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ln_act_forward", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t *g = gamma.data_ptr<scalar_t>(), *b = beta.data_ptr<scalar_t>();
    scalar_t *mean = stats.data_ptr<scalar_t>(), *rstd = mean + rows;
    const int64_t zs = z.size(1), os = out.size(1);
    const scalar_t pos = use_act ? scalar_t(scale) : scalar_t(1), neg = use_act ? scalar_t(scale * slope) : scalar_t(1);
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t m, var;
        row_moments(zp + r * zs + c0, cn, m, var);
        const scalar_t rs = scalar_t(1) / std::sqrt(var + scalar_t(eps));
        mean[r] = m;
        rstd[r] = rs;
        ln_apply_row(zp + r * zs + c0, op + r * os + out_c0, cn, m, rs, g, b, pos, neg);
      }
    });
  });
  return stats;
}

// gamma * LN(z[:, c0:c0+cn]) + beta as a new [rows, cn] matrix, from the forward's row statistics: the same
// vector loop as the forward with the identity activation.
at::Tensor ln_affine(const at::Tensor& z, int64_t c0, int64_t cn, const at::Tensor& stats, const at::Tensor& gamma,
                     const at::Tensor& beta) {
  const int64_t rows = z.size(0);
  auto y = at::empty({rows, cn}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ln_affine", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t *g = gamma.data_ptr<scalar_t>(), *b = beta.data_ptr<scalar_t>();
    const scalar_t *mean = stats.data_ptr<scalar_t>(), *rstd = mean + rows;
    const int64_t zs = z.size(1);
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        ln_apply_row(zp + r * zs + c0, yp + r * cn, cn, mean[r], rstd[r], g, b, scalar_t(1), scalar_t(1));
      }
    });
  });
  return y;
}

// dz of out = act(LN(z[:, c0:c0+cn])) with act leaky (or none); returns [chunks, 2, cn] float64 partials.
at::Tensor ln_leaky_backward(const at::Tensor& dy, int64_t dy_c0, const at::Tensor& z, int64_t c0, int64_t cn,
                             const at::Tensor& stats, const at::Tensor& gamma, const at::Tensor& beta,
                             const at::Tensor& dz, bool use_act, double slope, double scale) {
  const int64_t rows = z.size(0);
  const int64_t chunks = (rows + kChunk - 1) / kChunk;
  auto partial = at::zeros({std::max<int64_t>(chunks, 1), 2, cn}, z.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ln_act_backward", [&] {
    const scalar_t *dyp = dy.data_ptr<scalar_t>(), *zp = z.data_ptr<scalar_t>();
    scalar_t* dzp = dz.data_ptr<scalar_t>();
    const scalar_t *g = gamma.data_ptr<scalar_t>(), *b = beta.data_ptr<scalar_t>();
    const scalar_t *mean = stats.data_ptr<scalar_t>(), *rstd = mean + rows;
    double* part = partial.data_ptr<double>();
    const int64_t ds = dy.size(1), zs = z.size(1);
    const scalar_t pos = use_act ? scalar_t(scale) : scalar_t(1), neg = use_act ? scalar_t(scale * slope) : scalar_t(1);
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      std::vector<scalar_t> p_gx(cn), p_g(cn);
      for (int64_t ci = cb; ci < ce; ++ci) {
        std::fill(p_gx.begin(), p_gx.end(), scalar_t(0));
        std::fill(p_g.begin(), p_g.end(), scalar_t(0));
        for (int64_t r = ci * kChunk; r < std::min(rows, (ci + 1) * kChunk); ++r) {
          const scalar_t* x = zp + r * zs + c0;
          const scalar_t* d = dyp + r * ds + dy_c0;
          scalar_t s1, s2;
          ln_backward_sums_row(x, d, cn, mean[r], rstd[r], g, b, pos, neg, p_gx.data(), p_g.data(), s1, s2);
          ln_backward_apply_row(x, d, dzp + r * zs + c0, cn, mean[r], rstd[r], g, b, pos, neg, s1 / scalar_t(cn),
                                s2 / scalar_t(cn));
        }
        double* out = part + ci * 2 * cn;
        for (int64_t j = 0; j < cn; ++j) {
          out[j] = p_gx[j];
          out[cn + j] = p_g[j];
        }
      }
    });
  });
  return partial;
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
  const bool gelu = use_act && kind == kGelu;
  auto stats = ln_leaky_forward(z, c0, cn, out, out_c0, gamma, beta, eps, use_act && !gelu, slope, scale);
  if (gelu) {
    auto range = out.narrow(1, out_c0, cn);
    at::gelu_(range);
    if (scale != 1.0) range.mul_(scale);
  }
  return stats;
}

// Backward of out = act(LN(z[:, c0:c0+cn])): writes dz[:, c0 + j] and returns per-chunk partial column sums
// [chunks, 2, cn] (float64) of g * xhat and g, whose sum over chunks is (d gamma, d beta).
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
  if (!(use_act && kind == kGelu)) {
    return ln_leaky_backward(dy, dy_c0, z, c0, cn, stats, gamma, beta, dz, use_act, slope, scale);
  }
  // GELU: recompute y = LN(z) (affine, no activation), take g = dy * scale * GELU'(y) from ATen, then the
  // plain layer-norm backward of g
  auto y = ln_affine(z, c0, cn, stats, gamma, beta);
  auto g = at::gelu_backward(dy.narrow(1, dy_c0, cn), y);
  if (scale != 1.0) g.mul_(scale);
  return ln_leaky_backward(g.contiguous(), 0, z, c0, cn, stats, gamma, beta, dz, false, 0.0, 1.0);
}

}  // namespace pnnh
