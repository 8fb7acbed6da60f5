// The 1x1 coder of the 'cpu' rows op, computed from its input's moments: its output is never formed.
//
// With the pixels as rows X [P, Cin] and a 1x1 encoder We [Cc, Cin], the coder's pre-norm output is
// z_c = X We^T, and everything the block needs of it is linear in X or in X's first two moments (column
// sums s and Gram matrix G = X^T X, one [Cin, Cin] product):
// - BN_c's batch statistics: mean = We s / P, var_k = w_k^T Cov(X) w_k with Cov = G / P - mean(X) mean(X)^T
//   (the means subtracted at X's level: sum(z^2) / P - mean^2 lost digits on two-value batches);
// - the decoded share of layer 2's output, g * M BN_c(z_c) = X T^T + offset, with m = g * M diag(a) and
//   T = m We [Cout, Cin] (a = gamma * invstd, shift = beta - mean * a, offset = g * M shift);
// - in backward, from H = dU^T X [Cout, Cin] (dU: layer 2's pre-norm gradient): BN_c's gradients, the
//   encoder's and decoder's, and the coder's share of dX, dU T + X B + r.
// Against forming z_c this drops three [P, Cc] passes and one product a step, and z_c is never saved.
// The statistics come from float64 moments; the rest of the [C, C] algebra runs in the parameters' dtype.
#include "rows_coder.h"

#include <algorithm>

#include "finite.h"
#include "pnnh_cpu.h"

namespace pnnh {

at::Tensor coder_input_moments(const at::Tensor& xr) {
  // the fused sums pass, not sum(dtype=float64), which converts all of xr first
  auto sums = rows_channel_sums(xr, 0, xr.size(1)).narrow(0, 0, 1);
  auto gram = at::mm(xr.t(), xr).to(at::kDouble);
  if (xr.scalar_type() != at::kDouble && !all_finite(gram)) {
    const auto xd = xr.to(at::kDouble);  // products past float32's range (inputs past ~1e18): rare
    gram = at::mm(xd.t(), xd);
  }
  return at::cat({sums, gram});
}

std::tuple<at::Tensor, at::Tensor> coder_batch_stats(const at::Tensor& moments, const at::Tensor& enc, int64_t count) {
  auto w = enc.to(at::kDouble);
  auto mean_x = moments[0] / double(count);
  auto cov = moments.narrow(0, 1, moments.size(0) - 1) / double(count) - at::outer(mean_x, mean_x);
  return {at::mv(w, mean_x), (at::mm(w, cov) * w).sum(1).clamp_min(0.0)};
}

FoldedCoder fold_coder(const at::Tensor& enc, const at::Tensor& dec_matrix, const at::Tensor& mean, const at::Tensor& invstd,
                       const at::Tensor& gamma, const at::Tensor& beta, double gain) {
  auto a = gamma * invstd;
  auto shift = beta - mean * a;
  auto m = dec_matrix * (a * gain);
  return {a, shift, m, at::mm(m, enc), at::mv(dec_matrix, shift) * gain};
}

CoderGrads coder_backward(const at::Tensor& h, const c10::optional<at::Tensor>& du_sums, const at::Tensor& moments,
                          const at::Tensor& enc, const at::Tensor& dec_matrix, const FoldedCoder& fold,
                          const at::Tensor& mean, const at::Tensor& invstd, bool use_batch, int64_t count, double gain) {
  const auto& w = enc;
  // g = gain * dU M is the gradient of BN_c's output; its sums over the rows, alone and times z_c
  auto sum_g_z = (at::mm(dec_matrix.t(), h) * w).sum(1) * gain;
  auto d_mat = at::mm(h, w.t()) * (fold.a * gain);
  at::Tensor sum_g, sum_g_zhat;
  if (!du_sums.has_value()) {  // batch statistics: BN_2's input gradient is centred, its sums are zero
    sum_g = at::zeros_like(fold.a);
    sum_g_zhat = invstd * sum_g_z;
  } else {
    sum_g = at::mv(dec_matrix.t(), *du_sums) * gain;
    sum_g_zhat = invstd * (sum_g_z - mean * sum_g);
    d_mat = d_mat + at::outer(*du_sums, fold.shift * gain);
  }
  auto d_enc = at::mm(fold.m.t(), h);
  if (!use_batch) {  // dz_c = a * g
    return {d_enc, d_mat, sum_g_zhat, sum_g, c10::nullopt, c10::nullopt};
  }
  // dz_c = a * (g - mean(g) - zhat * mean(g zhat)) = dU m - X We^T diag(q) + 1 c^T
  auto q = fold.a * invstd * sum_g_zhat / double(count);
  auto c = q * mean - fold.a * sum_g / double(count);
  auto mom = moments.to(h.scalar_type());
  if (all_finite(mom)) {
    auto gram = mom.narrow(0, 1, mom.size(0) - 1);
    d_enc = d_enc - q.unsqueeze(1) * at::mm(w, gram) + at::outer(c, mom[0]);
  } else {  // inputs past ~1e18: their moments exist in float64 only, and so does this product
    auto gram = moments.narrow(0, 1, moments.size(0) - 1);
    auto qd = q.to(at::kDouble), cd = c.to(at::kDouble);
    auto share = at::outer(cd, moments[0]) - qd.unsqueeze(1) * at::mm(w.to(at::kDouble), gram);
    d_enc = d_enc + share.to(d_enc.scalar_type());
  }
  return {d_enc, d_mat, sum_g_zhat, sum_g, -at::mm(w.t() * q, w), at::mv(w.t(), c)};
}

}  // namespace pnnh
