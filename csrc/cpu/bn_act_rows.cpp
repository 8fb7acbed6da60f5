// Fused batch-norm + activation passes over channels-last rows, the CPU 'cpu' backend's layout.
//
// A tensor is a contiguous [rows, ld] matrix (NHWC: rows = N*H*W pixels, ld = channels); a pass covers
// the column range [c0, c0 + cn) of every row, so the coder and learner halves of one layer-1 output are
// read in place. Every pass walks memory in order, row after row, with the channels as the vector lanes
// (passes over NCHW maps stride through memory channel by channel, which small feature maps turn into a
// cache miss per row).
//
// When every operand's range is its whole row (the usual case: separate coder and learner matrices), a
// group of consecutive rows is walked as one long vector row, with the per-channel constants repeated
// along it: 16 channels would otherwise leave a loop of one AVX-512 vector per row.
//
// Reductions are split into fixed blocks of kRowBlock rows whatever the thread count: each block sums in
// the data's dtype, the blocks are added in float64 in block order, so results are deterministic.
//
// The activation is the scaled leaky family: act(a) = scale * (a > 0 ? a : slope * a);
// `use_act = false` skips it (the coder half, a last layer without activation).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "finite.h"
#include "norm_checks.h"
#include "pnnh_cpu.h"
#include "vector_clones.h"

namespace pnnh {
namespace {

constexpr int64_t kRowBlock = 128;  // rows per reduction partial (and per parallel work item)
constexpr int64_t kGroupWidth = 256;  // elements in a grouped vector row

template <typename T>
struct Columns {
  T* data;
  int64_t ld, c0;
  T* row(int64_t r) const { return data + r * ld + c0; }
};

template <typename T>
Columns<T> columns(const at::Tensor& t, int64_t c0) {
  return {t.data_ptr<std::remove_const_t<T>>(), t.size(1), c0};
}

void check_rows(const at::Tensor& t, int64_t c0, int64_t cn, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous [rows, channels] matrix");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(c0 >= 0 && cn >= 0 && c0 + cn <= t.size(1), name, ": channel range [", c0, ", ", c0 + cn,
              ") out of bounds for ", t.size(1), " channels");
}

void check_same_rows(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.size(0) == b.size(0), "row counts differ: ", a.size(0), " vs ", b.size(0));
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "dtypes differ: ", a.scalar_type(), " vs ", b.scalar_type());
}

int64_t blocks_of(int64_t rows) { return (rows + kRowBlock - 1) / kRowBlock; }

// Rows walked as one vector row: a power of two dividing kRowBlock, 1 unless every range is a whole row.
int64_t row_group(int64_t cn, std::initializer_list<int64_t> widths) {
  for (int64_t w : widths) {
    if (w != cn) return 1;
  }
  int64_t group = 1;
  while (group < kRowBlock && 2 * group * cn <= kGroupWidth) group *= 2;
  return group;
}

// Calls f(first row, vector rows, rows per vector row, vector width) over rows [r0, r1): whole groups
// first, then the rows left one at a time (the per-channel arrays start with one plain copy).
template <typename F>
void walk_rows(int64_t r0, int64_t r1, int64_t group, int64_t cn, const F& f) {
  const int64_t full = (r1 - r0) / group;
  if (full > 0) f(r0, full, group, cn * group);
  for (int64_t r = r0 + full * group; r < r1; ++r) f(r, int64_t(1), int64_t(1), cn);
}

// Per-channel BN constants, repeated `group` times: y = z * a + shift, a = gamma * invstd,
// shift = beta - mean * a.
template <typename T>
struct Affine {
  std::vector<T> a, shift, mu, inv;
  Affine(const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
         int64_t group) {
    const int64_t cn = mean.numel();
    const T *m = mean.data_ptr<T>(), *is = invstd.data_ptr<T>(), *g = gamma.data_ptr<T>(), *b = beta.data_ptr<T>();
    for (auto* v : {&a, &shift, &mu, &inv}) v->resize(size_t(cn * group));
    for (int64_t j = 0; j < cn * group; ++j) {
      const int64_t c = j % cn;
      mu[j] = m[c];
      inv[j] = is[c];
      a[j] = g[c] * is[c];
      shift[j] = b[c] - m[c] * a[j];
    }
  }
};

template <typename T>
std::vector<T> repeated(const std::vector<T>& per_channel, int64_t group) {
  std::vector<T> out(per_channel.size() * group);
  for (size_t j = 0; j < out.size(); ++j) out[j] = per_channel[j % per_channel.size()];
  return out;
}

// The vector loops: `count` rows of `n` elements, `stride` apart. One call covers many rows, since a
// call per row would cost a dispatch through target_clones' resolver and a reload of the accumulators.
template <typename T>
PNNH_VECTOR_CLONES void accumulate_sums(const T* x, int64_t stride, int64_t count, int64_t n, T* s, T* ss) {
  for (int64_t k = 0; k < count; ++k, x += stride) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      s[i] += x[i];
      ss[i] += x[i] * x[i];
    }
  }
}

template <typename T>
PNNH_VECTOR_CLONES void apply_rows(const T* x, int64_t x_stride, T* o, int64_t o_stride, int64_t count, int64_t n,
                                   const T* a, const T* shift, T pos, T neg) {
  for (int64_t k = 0; k < count; ++k, x += x_stride, o += o_stride) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T y = x[i] * a[i] + shift[i];
      o[i] = y > 0 ? y * pos : y * neg;
    }
  }
}

template <typename T>
PNNH_VECTOR_CLONES void accumulate_backward_sums(const T* x, int64_t x_stride, const T* d, int64_t d_stride,
                                                 int64_t count, int64_t n, const T* a, const T* shift, const T* mu,
                                                 const T* inv, T pos, T neg, T* s, T* sx) {
  for (int64_t k = 0; k < count; ++k, x += x_stride, d += d_stride) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T y = x[i] * a[i] + shift[i];
      const T g = d[i] * (y > 0 ? pos : neg);
      s[i] += g;
      sx[i] += g * (x[i] - mu[i]) * inv[i];
    }
  }
}

template <typename T>
PNNH_VECTOR_CLONES void backward_apply_rows(const T* x, int64_t x_stride, const T* d, int64_t d_stride, T* o,
                                            int64_t o_stride, int64_t count, int64_t n, const T* a, const T* shift,
                                            const T* mu, const T* inv, const T* mean_g, const T* mean_gx, T pos,
                                            T neg) {
  for (int64_t k = 0; k < count; ++k, x += x_stride, d += d_stride, o += o_stride) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T y = x[i] * a[i] + shift[i];
      const T g = d[i] * (y > 0 ? pos : neg);
      o[i] = a[i] * (g - mean_g[i] - (x[i] - mu[i]) * inv[i] * mean_gx[i]);
    }
  }
}

// Runs `accumulate(first row, end row, first, second)` per fixed block of rows into T partials of
// cn * group lanes, folds the lanes per channel and adds the blocks in order in float64: [2, cn].
template <typename T, typename F>
at::Tensor blocked_column_sums(int64_t rows, int64_t cn, int64_t group, const at::TensorOptions& options,
                               const F& accumulate) {
  const int64_t blocks = blocks_of(rows), lanes = cn * group;
  std::vector<double> partial(size_t(std::max<int64_t>(blocks, 1)) * 2 * cn, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> first(lanes), second(lanes);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(first.begin(), first.end(), T(0));
      std::fill(second.begin(), second.end(), T(0));
      accumulate(b * kRowBlock, std::min(rows, (b + 1) * kRowBlock), first.data(), second.data());
      double* out = partial.data() + b * 2 * cn;
      for (int64_t j = 0; j < lanes; j += cn) {  // fold the group's copies of each channel
        for (int64_t c = 0; c < cn; ++c) {
          out[c] += first[j + c];
          out[cn + c] += second[j + c];
        }
      }
    }
  });
  auto result = at::zeros({2, cn}, options.dtype(at::kDouble));
  double* sums = result.data_ptr<double>();
  for (int64_t b = 0; b < blocks; ++b) {
    const double* p = partial.data() + b * 2 * cn;
    for (int64_t i = 0; i < 2 * cn; ++i) sums[i] += p[i];
  }
  return result;
}

// The vectorised sums keep their per-block partials in the data's dtype: squares of float32 values past
// ~1e19 overflow there, where float64 holds them. Then the columns are summed again in float64 (rare;
// eager's CPU batch norm accumulates in float64 too). Non-finite data stays non-finite either way.
at::Tensor finite_or_float64_sums(const at::Tensor& sums, const at::Tensor& z, int64_t c0, int64_t cn) {
  if (z.scalar_type() == at::kDouble || all_finite(sums)) return sums;
  const auto cols = z.narrow(1, c0, cn).to(at::kDouble);
  return at::stack({cols.sum(0), cols.square().sum(0)});
}

}  // namespace

// Per-channel sum and sum of squares (float64) of columns [c0, c0 + cn): [2, cn].
at::Tensor rows_channel_sums(const at::Tensor& z, int64_t c0, int64_t cn) {
  check_rows(z, c0, cn, "z");
  const int64_t group = row_group(cn, {z.size(1)});
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "rows_channel_sums", [&] {
    const auto v = columns<const scalar_t>(z, c0);
    out = blocked_column_sums<scalar_t>(z.size(0), cn, group, z.options(), [&](int64_t r0, int64_t r1, scalar_t* s, scalar_t* ss) {
      walk_rows(r0, r1, group, cn, [&](int64_t r, int64_t count, int64_t step, int64_t n) {
        accumulate_sums(v.row(r), v.ld * step, count, n, s, ss);
      });
    });
  });
  return finite_or_float64_sums(out, z, c0, cn);
}

// out[:, out_c0 + c] = act(gamma_c * (z[:, c0 + c] - mean_c) * invstd_c + beta_c) for c < cn = mean.numel().
void rows_bn_act_apply(const at::Tensor& z, int64_t c0, const at::Tensor& out, int64_t out_c0, const at::Tensor& mean,
                       const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta, bool use_act,
                       double slope, double scale) {
  const int64_t cn = mean.numel();
  check_rows(z, c0, cn, "z");
  check_rows(out, out_c0, cn, "out");
  check_same_rows(z, out);
  check_norm_vectors(mean, invstd, gamma, beta, cn, z.scalar_type());
  const int64_t group = row_group(cn, {z.size(1), out.size(1)});
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "rows_bn_act_apply", [&] {
    const Affine<scalar_t> bn(mean, invstd, gamma, beta, group);
    const auto src = columns<const scalar_t>(z, c0);
    const auto dst = columns<scalar_t>(out, out_c0);
    const scalar_t pos = use_act ? scalar_t(scale) : scalar_t(1), neg = use_act ? scalar_t(scale * slope) : scalar_t(1);
    at::parallel_for(0, blocks_of(z.size(0)), 1, [&](int64_t b0, int64_t b1) {
      walk_rows(b0 * kRowBlock, std::min(z.size(0), b1 * kRowBlock), group, cn, [&](int64_t r, int64_t count, int64_t step, int64_t n) {
        apply_rows(src.row(r), src.ld * step, dst.row(r), dst.ld * step, count, n, bn.a.data(), bn.shift.data(), pos, neg);
      });
    });
  });
}

// Backward of y = act(BN(x[:, c0:c0+cn])) given dy [rows, cn]: [2, cn] float64 of sum(g) and sum(g * xhat),
// g = dy * act'(BN(x)) -- which are also d(beta) and d(gamma).
at::Tensor rows_bn_act_backward_sums(const at::Tensor& dy, const at::Tensor& x, int64_t c0, const at::Tensor& mean,
                                     const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                                     bool use_act, double slope, double scale) {
  const int64_t cn = mean.numel();
  check_rows(dy, 0, cn, "dy");
  TORCH_CHECK(dy.size(1) == cn, "dy must have the range's ", cn, " channels");
  check_rows(x, c0, cn, "x");
  check_same_rows(dy, x);
  check_norm_vectors(mean, invstd, gamma, beta, cn, x.scalar_type());
  const int64_t group = row_group(cn, {x.size(1)});
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rows_bn_act_backward_sums", [&] {
    const Affine<scalar_t> bn(mean, invstd, gamma, beta, group);
    const auto vx = columns<const scalar_t>(x, c0);
    const auto vd = columns<const scalar_t>(dy, 0);
    const scalar_t pos = use_act ? scalar_t(scale) : scalar_t(1), neg = use_act ? scalar_t(scale * slope) : scalar_t(1);
    out = blocked_column_sums<scalar_t>(x.size(0), cn, group, x.options(), [&](int64_t r0, int64_t r1, scalar_t* s, scalar_t* sx) {
      walk_rows(r0, r1, group, cn, [&](int64_t r, int64_t count, int64_t step, int64_t n) {
        accumulate_backward_sums(vx.row(r), vx.ld * step, vd.row(r), vd.ld * step, count, n, bn.a.data(),
                                 bn.shift.data(), bn.mu.data(), bn.inv.data(), pos, neg, s, sx);
      });
    });
  });
  return out;
}

// dx[:, c0:c0+cn] (dx shaped like x) of y = act(BN(x[:, c0:c0+cn])), from dy and the sums above.
// training: dx = gamma * invstd * (g - sum_g / rows - xhat * sum_gx / rows); eval: gamma * invstd * g.
void rows_bn_act_backward_apply(const at::Tensor& dy, const at::Tensor& x, int64_t c0, const at::Tensor& dx,
                                const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& gamma,
                                const at::Tensor& beta, const at::Tensor& sums, bool training, bool use_act,
                                double slope, double scale) {
  const int64_t cn = mean.numel();
  check_rows(dy, 0, cn, "dy");
  TORCH_CHECK(dy.size(1) == cn, "dy must have the range's ", cn, " channels");
  check_rows(x, c0, cn, "x");
  check_rows(dx, c0, cn, "dx");
  TORCH_CHECK(dx.sizes() == x.sizes(), "dx must have x's shape");
  check_same_rows(dy, x);
  check_same_rows(dx, x);
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == 2 && sums.size(1) == cn && sums.scalar_type() == at::kDouble &&
                  sums.is_contiguous(),
              "sums must be a contiguous [2, ", cn, "] float64 tensor");
  check_norm_vectors(mean, invstd, gamma, beta, cn, x.scalar_type());
  const double* sum_g = sums.data_ptr<double>();
  const double count = double(std::max<int64_t>(x.size(0), 1));
  const int64_t group = row_group(cn, {x.size(1)});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rows_bn_act_backward_apply", [&] {
    const Affine<scalar_t> bn(mean, invstd, gamma, beta, group);
    std::vector<scalar_t> mean_g(cn, scalar_t(0)), mean_gx(cn, scalar_t(0));
    if (training) {
      for (int64_t c = 0; c < cn; ++c) {
        mean_g[c] = scalar_t(sum_g[c] / count);
        mean_gx[c] = scalar_t(sum_g[cn + c] / count);
      }
    }
    const auto mg = repeated(mean_g, group), mgx = repeated(mean_gx, group);
    const auto vx = columns<const scalar_t>(x, c0);
    const auto vd = columns<const scalar_t>(dy, 0);
    const auto vdx = columns<scalar_t>(dx, c0);
    const scalar_t pos = use_act ? scalar_t(scale) : scalar_t(1), neg = use_act ? scalar_t(scale * slope) : scalar_t(1);
    at::parallel_for(0, blocks_of(x.size(0)), 1, [&](int64_t b0, int64_t b1) {
      walk_rows(b0 * kRowBlock, std::min(x.size(0), b1 * kRowBlock), group, cn, [&](int64_t r, int64_t n_rows, int64_t step, int64_t n) {
        backward_apply_rows(vx.row(r), vx.ld * step, vd.row(r), vd.ld * step, vdx.row(r), vdx.ld * step, n_rows, n,
                            bn.a.data(), bn.shift.data(), bn.mu.data(), bn.inv.data(), mg.data(), mgx.data(), pos, neg);
      });
    });
  });
}

// (mean, invstd, unbiased var) of columns [c0, c0 + cn) in z's dtype, from rows_channel_sums' float64 sums:
// what batch norm needs, in one call instead of a dozen small tensor operations per layer.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_batch_stats(const at::Tensor& z, int64_t c0, int64_t cn, double eps) {
  const at::Tensor sums = rows_channel_sums(z, c0, cn);
  const double* s = sums.data_ptr<double>();
  const double count = double(z.size(0)), unbias = count / std::max(count - 1.0, 1.0);
  auto mean = at::empty({cn}, z.options()), invstd = at::empty({cn}, z.options()), var = at::empty({cn}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "rows_batch_stats", [&] {
    scalar_t *m = mean.data_ptr<scalar_t>(), *is = invstd.data_ptr<scalar_t>(), *v = var.data_ptr<scalar_t>();
    for (int64_t c = 0; c < cn; ++c) {
      const double mu = s[c] / count, biased = std::max(s[cn + c] / count - mu * mu, 0.0);
      m[c] = scalar_t(mu);
      is[c] = scalar_t(1.0 / std::sqrt(biased + eps));
      v[c] = scalar_t(biased * unbias);
    }
  });
  return {mean, invstd, var};
}

}  // namespace pnnh
