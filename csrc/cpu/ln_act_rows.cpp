// Fused layer-norm + activation passes for PNNHLinear on the CPU.
//
// Rows: a [rows, channels] contiguous matrix; a pass covers the column range [c0, c0 + cn) of each row
// (layer norm normalises over that range: the coder and learner halves of layer 1 each have their own norm).
// Outputs may also be written at a column offset, so layer 1 writes [z_c, act(z_l)] side by side into the
// one buffer layer 2's GEMM reads. Work is split over rows with at::parallel_for (torch's thread pool).
//
// Activations: kind 0 = scaled leaky family (scale * leaky_relu(slope)); kind 1 = scale * GELU (erf form).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "pnnh_cpu.h"

namespace pnnh {
namespace {

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.device().is_cpu(), name, " must be a contiguous 2-D CPU tensor");
}

template <typename T>
inline T act_value(T y, int64_t kind, T slope, T scale) {
  if (kind == 1) return scale * y * T(0.5) * (T(1) + std::erf(y * T(M_SQRT1_2)));
  return y > 0 ? scale * y : scale * slope * y;
}

template <typename T>
inline T act_grad(T y, int64_t kind, T slope, T scale) {
  if (kind == 1) {
    const T cdf = T(0.5) * (T(1) + std::erf(y * T(M_SQRT1_2)));
    const T pdf = std::exp(T(-0.5) * y * y) * T(0.3989422804014327);
    return scale * (cdf + y * pdf);
  }
  return y > 0 ? scale : scale * slope;
}

constexpr int64_t kRowGrain = 16;

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
  const int64_t rows = z.size(0);
  auto stats = at::empty({2, rows}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ln_act_forward", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t *g = gamma.data_ptr<scalar_t>(), *b = beta.data_ptr<scalar_t>();
    scalar_t *mean = stats.data_ptr<scalar_t>(), *rstd = mean + rows;
    const int64_t zs = z.size(1), os = out.size(1);
    const scalar_t sl = slope, sc = scale;
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = zp + r * zs + c0;
        double s = 0, ss = 0;
        for (int64_t j = 0; j < cn; ++j) s += row[j];
        const double mu = s / cn;
        for (int64_t j = 0; j < cn; ++j) ss += (row[j] - mu) * (row[j] - mu);
        const scalar_t m = scalar_t(mu), rs = scalar_t(1.0 / std::sqrt(ss / cn + eps));
        mean[r] = m;
        rstd[r] = rs;
        scalar_t* o = op + r * os + out_c0;
        for (int64_t j = 0; j < cn; ++j) {
          const scalar_t y = (row[j] - m) * rs * g[j] + b[j];
          o[j] = use_act ? act_value(y, kind, sl, sc) : y;
        }
      }
    });
  });
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
  const int64_t rows = z.size(0);
  const int64_t chunk = 64;
  const int64_t chunks = (rows + chunk - 1) / chunk;
  auto partial = at::zeros({chunks, 2, cn}, z.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ln_act_backward", [&] {
    const scalar_t *dyp = dy.data_ptr<scalar_t>(), *zp = z.data_ptr<scalar_t>();
    scalar_t* dzp = dz.data_ptr<scalar_t>();
    const scalar_t *g = gamma.data_ptr<scalar_t>(), *b = beta.data_ptr<scalar_t>();
    const scalar_t *mean = stats.data_ptr<scalar_t>(), *rstd = mean + rows;
    double* part = partial.data_ptr<double>();
    const int64_t ds = dy.size(1), zs = z.size(1);
    const scalar_t sl = slope, sc = scale;
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      std::vector<scalar_t> gx(cn);
      for (int64_t ci = cb; ci < ce; ++ci) {
        double* p_gx = part + ci * 2 * cn;
        double* p_g = p_gx + cn;
        for (int64_t r = ci * chunk; r < std::min(rows, (ci + 1) * chunk); ++r) {
          const scalar_t* row = zp + r * zs + c0;
          const scalar_t* d = dyp + r * ds + dy_c0;
          const scalar_t m = mean[r], rs = rstd[r];
          double sum_dxhat = 0, sum_dxhat_xhat = 0;
          for (int64_t j = 0; j < cn; ++j) {
            const scalar_t xhat = (row[j] - m) * rs;
            const scalar_t y = xhat * g[j] + b[j];
            const scalar_t gi = use_act ? d[j] * act_grad(y, kind, sl, sc) : d[j];
            p_gx[j] += double(gi * xhat);
            p_g[j] += double(gi);
            gx[j] = gi * g[j];  // d xhat
            sum_dxhat += gx[j];
            sum_dxhat_xhat += gx[j] * xhat;
          }
          const scalar_t mean_d = scalar_t(sum_dxhat / cn), mean_dx = scalar_t(sum_dxhat_xhat / cn);
          scalar_t* o = dzp + r * zs + c0;
          for (int64_t j = 0; j < cn; ++j) {
            const scalar_t xhat = (row[j] - m) * rs;
            o[j] = rs * (gx[j] - mean_d - xhat * mean_dx);
          }
        }
      }
    });
  });
  return partial;
}

}  // namespace pnnh
