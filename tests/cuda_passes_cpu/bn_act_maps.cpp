// Fused batch-norm + activation passes over [outer, channels, inner] maps, on the CPU (test-only: see cuda_passes_cpu.h).
//
// Tensors are viewed as [outer, channels, inner], contiguous (NCHW: outer = N, inner = H*W; channels_last:
// outer = N*H*W, inner = 1).
// Channel ranges [c0, c0 + cn) of a wider tensor let one pass read or write the coder and the learner
// halves of the concatenated layer-1 output in place. Work is split over channels with
// at::parallel_for; each channel's plane is walked row by row, contiguously.
//
// The activation is the scaled leaky family: act(a) = scale * (a > 0 ? a : slope * a)
// (relu: slope 0; identity: slope 1). `use_act = false` skips it (the coder half, the last layer
// without a final activation).
#include "cuda_passes_cpu.h"
#include "norm_checks.h"
#include "vector_clones.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace pnnh {
namespace {

template <typename T>
struct MapView {
  T* data;
  int64_t outer, channels, inner, c0;
  T* row(int64_t o, int64_t c) const { return data + (o * channels + c0 + c) * inner; }
};

template <typename T>
MapView<T> map_view(const at::Tensor& t, int64_t c0) {
  return {t.data_ptr<T>(), t.size(0), t.size(1), t.size(2), c0};
}

void check_map(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must be viewed as [outer, channels, inner], got ", t.dim(), " dims");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

constexpr int64_t kGrain = 1;  // channels are coarse units of work already

template <typename T>
PNNH_VECTOR_CLONES void row_sums(const T* r, int64_t n, T& s, T& ss) {
  T rs = 0, rss = 0;  // a row (one image plane) is short enough for T partials
#pragma omp simd reduction(+ : rs, rss)
  for (int64_t i = 0; i < n; ++i) {
    rs += r[i];
    rss += r[i] * r[i];
  }
  s = rs;
  ss = rss;
}

template <typename T>
PNNH_VECTOR_CLONES void row_apply(const T* r, T* w, int64_t n, T a, T shift, T pos, T neg) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T y = r[i] * a + shift;
    w[i] = y > 0 ? y * pos : y * neg;
  }
}

template <typename T>
PNNH_VECTOR_CLONES void row_backward_sums(const T* r, const T* d, int64_t n, T a, T shift, T pos, T neg, T mu, T inv, T& s,
                              T& sx) {
  T rs = 0, rsx = 0;
#pragma omp simd reduction(+ : rs, rsx)
  for (int64_t i = 0; i < n; ++i) {
    const T y = r[i] * a + shift;
    const T gi = d[i] * (y > 0 ? pos : neg);
    rs += gi;
    rsx += gi * (r[i] - mu) * inv;
  }
  s = rs;
  sx = rsx;
}

template <typename T>
PNNH_VECTOR_CLONES void row_backward_apply(const T* r, const T* d, T* w, int64_t n, T a, T shift, T pos, T neg, T mu, T inv,
                               T mean_g, T mean_gx) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T y = r[i] * a + shift;
    const T gi = d[i] * (y > 0 ? pos : neg);
    w[i] = a * (gi - mean_g - (r[i] - mu) * inv * mean_gx);
  }
}

}  // namespace

void bn_finalize(const at::Tensor& sums, double count, double eps, const at::Tensor& stats, int64_t c0) {
  TORCH_CHECK((sums.dim() == 2 || sums.dim() == 3) && sums.size(-2) == 2 && stats.dim() == 2 && stats.size(0) == 3 &&
                  stats.is_contiguous(),
              "sums must be [2, cn] or [splits, 2, cn], stats a contiguous [3, total]");
  const int64_t cn = sums.size(-1), total = stats.size(1);
  TORCH_CHECK(c0 >= 0 && c0 + cn <= total, "channel range out of bounds");
  auto s = (sums.dim() == 3 ? sums.sum(0) : sums).to(at::kDouble).contiguous();
  const double* sum = s.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "bn_finalize", [&] {
    scalar_t* out = stats.data_ptr<scalar_t>();
    for (int64_t c = 0; c < cn; ++c) {
      const double mean = sum[c] / count;
      const double var = std::max(sum[cn + c] / count - mean * mean, 0.0);
      out[c0 + c] = scalar_t(mean);
      out[total + c0 + c] = scalar_t(1.0 / std::sqrt(var + eps));
      out[2 * total + c0 + c] = scalar_t(count > 1 ? var * (count / (count - 1)) : var);
    }
  });
}

// Per-channel sum and sum of squares (float64 accumulation) of channels [c0, c0 + cn).
at::Tensor channel_sums(const at::Tensor& z, int64_t c0, int64_t cn) {
  check_map(z, "z");
  TORCH_CHECK(c0 >= 0 && cn >= 0 && c0 + cn <= z.size(1), "channel range out of bounds");
  auto out = at::zeros({2, cn}, z.options().dtype(at::kDouble));
  double* sum = out.data_ptr<double>();
  double* sumsq = sum + cn;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "channel_sums", [&] {
    auto v = map_view<scalar_t>(z, c0);
    at::parallel_for(0, cn, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double s = 0.0, ss = 0.0;
        for (int64_t o = 0; o < v.outer; ++o) {
          scalar_t rs, rss;
          row_sums(v.row(o, c), v.inner, rs, rss);
          s += rs;
          ss += rss;
        }
        sum[c] = s;
        sumsq[c] = ss;
      }
    });
  });
  return out;
}

// y[:, c] = act(gamma * (z[:, c0 + c] - mean) * invstd + beta), written to out (its own [outer, cn, inner]).
void bn_act_apply(const at::Tensor& z, int64_t c0, const at::Tensor& out, const at::Tensor& mean,
                  const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta, bool use_act,
                  double slope, double scale) {
  check_map(z, "z");
  check_map(out, "out");
  const int64_t cn = out.size(1);
  const auto z_dtype = z.scalar_type();
  TORCH_CHECK(out.scalar_type() == z_dtype, "out must have z's dtype");
  TORCH_CHECK(out.size(0) == z.size(0) && out.size(2) == z.size(2) && c0 + cn <= z.size(1), "shape mismatch");
  check_norm_vectors(mean, invstd, gamma, beta, cn, z_dtype);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn_act_apply", [&] {
    const scalar_t *m = mean.data_ptr<scalar_t>(), *is = invstd.data_ptr<scalar_t>();
    const scalar_t *g = gamma.data_ptr<scalar_t>(), *b = beta.data_ptr<scalar_t>();
    auto src = map_view<scalar_t>(z, c0);
    auto dst = map_view<scalar_t>(out, 0);
    const scalar_t pos = use_act ? scalar_t(scale) : scalar_t(1), neg = use_act ? scalar_t(scale * slope) : scalar_t(1);
    at::parallel_for(0, cn, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const scalar_t a = scalar_t(g[c]) * scalar_t(is[c]);
        const scalar_t shift = scalar_t(b[c]) - scalar_t(m[c]) * a;
        for (int64_t o = 0; o < src.outer; ++o) {
          row_apply(src.row(o, c), dst.row(o, c), src.inner, a, shift, pos, neg);
        }
      }
    });
  });
}

// Backward of y = act(BN(x)) for channels [c0, c0 + cn) of x, given dy ([outer, cn, inner]).
// Returns [2, cn] float64: sum(g) and sum(g * xhat), g = dy * act'(BN(x)) -- which are also
// d(beta) and d(gamma).
at::Tensor bn_act_backward_sums(const at::Tensor& dy, const at::Tensor& x, int64_t c0, const at::Tensor& mean,
                                const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                                bool use_act, double slope, double scale) {
  check_map(dy, "dy");
  check_map(x, "x");
  const int64_t cn = dy.size(1);
  const auto z_dtype = x.scalar_type();
  TORCH_CHECK(dy.scalar_type() == z_dtype, "dy must have x's dtype");
  TORCH_CHECK(dy.size(0) == x.size(0) && dy.size(2) == x.size(2) && c0 + cn <= x.size(1), "shape mismatch");
  check_norm_vectors(mean, invstd, gamma, beta, cn, z_dtype);
  auto out = at::zeros({2, cn}, x.options().dtype(at::kDouble));
  double* sum_g = out.data_ptr<double>();
  double* sum_gx = sum_g + cn;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_backward_sums", [&] {
    const scalar_t *m = mean.data_ptr<scalar_t>(), *is = invstd.data_ptr<scalar_t>();
    const scalar_t *gm = gamma.data_ptr<scalar_t>(), *bt = beta.data_ptr<scalar_t>();
    auto vx = map_view<scalar_t>(x, c0);
    auto vdy = map_view<scalar_t>(dy, 0);
    const scalar_t pos = use_act ? scalar_t(scale) : scalar_t(1), neg = use_act ? scalar_t(scale * slope) : scalar_t(1);
    at::parallel_for(0, cn, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const scalar_t mu = m[c], inv = is[c], a = scalar_t(gm[c]) * inv, shift = scalar_t(bt[c]) - mu * a;
        double s = 0.0, sx = 0.0;
        for (int64_t o = 0; o < vx.outer; ++o) {
          scalar_t rs, rsx;
          row_backward_sums(vx.row(o, c), vdy.row(o, c), vx.inner, a, shift, pos, neg, mu, inv, rs, rsx);
          s += rs;
          sx += rsx;
        }
        sum_g[c] = s;
        sum_gx[c] = sx;
      }
    });
  });
  return out;
}

// dx for channels [c0, c0 + cn) of x, written into dx (same layout as x) at the same channels.
// training: dx = gamma * invstd * (g - sum_g / count - xhat * sum_gx / count); eval: gamma * invstd * g.
std::tuple<at::Tensor, at::Tensor> bn_act_backward_apply(const at::Tensor& dy, const at::Tensor& x, int64_t c0,
                                                         const at::Tensor& dx, const at::Tensor& mean,
                                                         const at::Tensor& invstd, const at::Tensor& gamma,
                                                         const at::Tensor& beta, const at::Tensor& sums, bool training,
                                                         bool use_act, double slope, double scale) {
  check_map(dy, "dy");
  check_map(x, "x");
  check_map(dx, "dx");
  const int64_t cn = dy.size(1);
  const auto z_dtype = x.scalar_type();
  TORCH_CHECK(dy.scalar_type() == z_dtype && dx.scalar_type() == z_dtype, "dy and dx must have x's dtype");
  TORCH_CHECK(dx.sizes() == x.sizes(), "dx must have x's shape");
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == 2 && sums.size(1) == cn && sums.scalar_type() == at::kDouble,
              "sums must be [2, cn] float64");
  check_norm_vectors(mean, invstd, gamma, beta, cn, z_dtype);
  const double* sum_g = sums.data_ptr<double>();
  const double* sum_gx = sum_g + cn;
  const double count = double(x.size(0) * x.size(2));
  auto dgamma = at::empty({cn}, x.options()), dbeta = at::empty({cn}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_backward_apply", [&] {
    for (int64_t c = 0; c < cn; ++c) {
      dgamma.data_ptr<scalar_t>()[c] = scalar_t(sum_gx[c]);
      dbeta.data_ptr<scalar_t>()[c] = scalar_t(sum_g[c]);
    }
    const scalar_t *m = mean.data_ptr<scalar_t>(), *is = invstd.data_ptr<scalar_t>();
    const scalar_t *gm = gamma.data_ptr<scalar_t>(), *bt = beta.data_ptr<scalar_t>();
    auto vx = map_view<scalar_t>(x, c0);
    auto vdx = map_view<scalar_t>(dx, c0);
    auto vdy = map_view<scalar_t>(dy, 0);
    const scalar_t pos = use_act ? scalar_t(scale) : scalar_t(1), neg = use_act ? scalar_t(scale * slope) : scalar_t(1);
    at::parallel_for(0, cn, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const scalar_t mu = m[c], inv = is[c], a = scalar_t(gm[c]) * inv, shift = scalar_t(bt[c]) - mu * a;
        const scalar_t mean_g = training ? scalar_t(sum_g[c] / count) : scalar_t(0);
        const scalar_t mean_gx = training ? scalar_t(sum_gx[c] / count) : scalar_t(0);
        for (int64_t o = 0; o < vx.outer; ++o) {
          row_backward_apply(vx.row(o, c), vdy.row(o, c), vdx.row(o, c), vx.inner, a, shift, pos, neg, mu, inv,
                             mean_g, mean_gx);
        }
      }
    });
  });
  return {dgamma, dbeta};
}

void bn_input_grad(const at::Tensor& d_act, const at::Tensor& z, int64_t c0, const at::Tensor& dz,
                   const at::Tensor& coef_dy, const at::Tensor& coef_z, const at::Tensor& bias) {
  check_map(d_act, "d_act");
  check_map(z, "z");
  check_map(dz, "dz");
  const int64_t cn = d_act.size(1);
  TORCH_CHECK(dz.sizes() == d_act.sizes() && c0 >= 0 && c0 + cn <= z.size(1), "shape mismatch");
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn_input_grad", [&] {
    auto a = coef_dy.to(z.scalar_type()).contiguous(), b = coef_z.to(z.scalar_type()).contiguous();
    auto e = bias.to(z.scalar_type()).contiguous();
    auto vz = map_view<scalar_t>(z, c0);
    auto vd = map_view<scalar_t>(d_act, 0);
    auto vo = map_view<scalar_t>(dz, 0);
    for (int64_t o = 0; o < vz.outer; ++o) {
      for (int64_t c = 0; c < cn; ++c) {
        const scalar_t ac = a.data_ptr<scalar_t>()[c], bc = b.data_ptr<scalar_t>()[c], ec = e.data_ptr<scalar_t>()[c];
        const scalar_t *zr = vz.row(o, c), *dr = vd.row(o, c);
        scalar_t* out = vo.row(o, c);
        for (int64_t k = 0; k < vz.inner; ++k) out[k] = ac * dr[k] + bc * zr[k] + ec;
      }
    }
  });
}

}  // namespace pnnh
