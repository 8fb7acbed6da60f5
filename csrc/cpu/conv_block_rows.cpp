// The 'cpu' backend's PNNH conv block with a 1x1 coder, forward and backward, whole in C++: the same math and
// signatures as pnnh_kernels/backends/cpu/conv.py (which keeps the k x k coders), there as Python orchestration
// that cost ~2.5 ms a block (about 200 small tensor calls; a PNNH-56 step makes 27 blocks of them), here a
// few hundred microseconds. The convolutions are ATen's (oneDNN), the passes this extension's rows kernels,
// the coder rows_coder.cpp's moments algebra.
//
// Layout: between the convolutions every map is a [pixels, channels] matrix (NHWC rows). Saved for
// backward: x, x's moments (the coder's only trace), the learner's pre-norm rows and layer 2's pre-norm u.
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "pnnh_cpu.h"
#include "rows_coder.h"

namespace pnnh {
namespace {

struct Rows {
  int64_t n, h, w;
  int64_t count() const { return n * h * w; }
  // an [N, C, H, W] map (any layout) as a contiguous [N*H*W, C] matrix: a view when it is channels_last
  at::Tensor of(const at::Tensor& t) const { return t.permute({0, 2, 3, 1}).reshape({count(), t.size(1)}).contiguous(); }
  // a [N*H*W, C] matrix as an NCHW-shaped channels_last view
  at::Tensor nchw(const at::Tensor& rows) const { return rows.view({n, h, w, rows.size(1)}).permute({0, 3, 1, 2}); }
};

// conv(inp, weight, 'same') of a rows matrix: one product for a 1x1 kernel, else oneDNN's channels-last conv
at::Tensor conv_rows(const Rows& g, const at::Tensor& inp, const at::Tensor& weight) {
  const int64_t k = weight.size(-1);
  if (k == 1) return at::mm(inp, weight.reshape({weight.size(0), -1}).t());
  return g.of(at::conv2d(g.nchw(inp), weight, {}, 1, k / 2));
}

// (input gradient as rows, or undefined; weight gradient) of conv_rows
std::tuple<at::Tensor, at::Tensor> conv_rows_backward(const Rows& g, const at::Tensor& grad, const at::Tensor& inp,
                                                      const at::Tensor& weight, bool need_input) {
  const int64_t k = weight.size(-1);
  if (k == 1) {
    auto w2d = weight.reshape({weight.size(0), -1});
    return {need_input ? at::mm(grad, w2d) : at::Tensor(), at::mm(grad.t(), inp).view(weight.sizes())};
  }
  auto res = at::convolution_backward(g.nchw(grad), g.nchw(inp), weight, c10::nullopt, {1, 1}, {k / 2, k / 2}, {1, 1},
                                      false, {0, 0}, 1, {need_input, true, false});
  return {need_input ? g.of(std::get<0>(res)) : at::Tensor(), std::get<1>(res).contiguous()};
}

// act(BN(t[:, c0 : c0 + C])) as a new [pixels, C] matrix, one pass
at::Tensor bn_act_rows(const at::Tensor& t, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& gamma,
                       const at::Tensor& beta, bool act, double slope, double scale) {
  auto out = at::empty({t.size(0), gamma.size(0)}, t.options());
  rows_bn_act_apply(t, 0, out, 0, mean, invstd, gamma, beta, act, slope, scale);
  return out;
}

at::Tensor as_contiguous(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype && t.is_contiguous() ? t : t.to(dtype).contiguous();
}

// M with decode(z) = M z: [out, Cc]
at::Tensor decoder_matrix(const at::Tensor& enc, const c10::optional<at::Tensor>& dec) {
  return dec.has_value() ? dec->select(3, 0).select(2, 0) : enc.select(3, 0).select(2, 0).t();
}

void check_block(const at::Tensor& x, const at::Tensor& enc) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, "conv_block_rows_1x1: x must be a 4-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "conv_block_rows_1x1: float32 or float64 data");
  TORCH_CHECK(enc.dim() == 4 && enc.size(2) == 1 && enc.size(3) == 1, "conv_block_rows_1x1: the coder must be 1x1");
}

}  // namespace

std::vector<at::Tensor> conv_block_rows_1x1(
    const at::Tensor& x, const at::Tensor& enc, const at::Tensor& learn1, const at::Tensor& learn2,
    const c10::optional<at::Tensor>& dec, const at::Tensor& gc, const at::Tensor& bc, const at::Tensor& g1,
    const at::Tensor& b1, const at::Tensor& g2, const at::Tensor& b2, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool use_batch, double eps, double slope, double scale, double gain,
    bool final_act) {
  check_block(x, enc);
  const Rows g{x.size(0), x.size(2), x.size(3)};
  const int64_t cc = enc.size(0), hid = learn1.size(0), out_ch = learn2.size(0), c1 = cc + hid;
  const auto pd = x.scalar_type();
  auto xr = g.of(x);
  auto gcf = as_contiguous(gc, pd), bcf = as_contiguous(bc, pd), g1f = as_contiguous(g1, pd), b1f = as_contiguous(b1, pd);
  auto g2f = as_contiguous(g2, pd), b2f = as_contiguous(b2, pd);
  at::Tensor mean_run, inv_run, var_run;
  if (!use_batch) {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(), "running statistics are required without batch statistics");
    mean_run = running_mean->to(pd).contiguous();
    inv_run = at::rsqrt(running_var->to(at::kDouble) + eps).to(pd);
    var_run = running_var->to(pd, false, true);
  }

  // layer 1: the learner's convolution; the coder only through x's moments
  auto zl_pre = conv_rows(g, xr, learn1);
  auto moments = use_batch ? coder_input_moments(xr) : at::empty({0}, x.options().dtype(at::kDouble));
  at::Tensor mean1, inv1, var1;
  if (use_batch) {
    auto coder = coder_batch_stats(moments, enc.reshape({cc, -1}), g.count());
    const auto& var_c = std::get<1>(coder);
    auto unbiased_c = var_c * (double(g.count()) / double(std::max<int64_t>(g.count() - 1, 1)));
    auto learner = rows_batch_stats(zl_pre, 0, hid, eps);
    mean1 = at::cat({std::get<0>(coder).to(pd), std::get<0>(learner)});
    inv1 = at::cat({at::rsqrt(var_c + eps).to(pd), std::get<1>(learner)});
    var1 = at::cat({unbiased_c.to(pd), std::get<2>(learner)});
  } else {
    mean1 = mean_run.narrow(0, 0, c1);
    inv1 = inv_run.narrow(0, 0, c1);
    var1 = var_run.narrow(0, 0, c1);
  }

  // layer 2: the learner's convolution, then BN_c folded into one product of x accumulated into it in place
  auto al = bn_act_rows(zl_pre, mean1.narrow(0, cc, hid), inv1.narrow(0, cc, hid), g1f, b1f, true, slope, scale);
  auto u = conv_rows(g, al, learn2);
  auto fold = fold_coder(enc.reshape({cc, -1}), decoder_matrix(enc, dec), mean1.narrow(0, 0, cc), inv1.narrow(0, 0, cc),
                         gcf, bcf, gain);
  u.addmm_(xr, fold.through.t());

  // BN_2 of u + offset (the stored u lacks the fold's per-channel offset): a constant shifts the mean only
  at::Tensor mean2, inv2, var2;
  if (use_batch) {
    std::tie(mean2, inv2, var2) = rows_batch_stats(u, 0, out_ch, eps);
    mean2 = mean2 + fold.offset;
  } else {
    mean2 = mean_run.narrow(0, c1, out_ch);
    inv2 = inv_run.narrow(0, c1, out_ch);
    var2 = var_run.narrow(0, c1, out_ch);
  }
  auto y = at::empty_like(u);
  rows_bn_act_apply(u, 0, y, 0, mean2 - fold.offset, inv2, g2f, b2f, final_act, slope, scale);
  return {g.nchw(y), moments, zl_pre, u, at::cat({mean1, mean2}), at::cat({inv1, inv2}), at::cat({var1, var2})};
}

std::vector<at::Tensor> conv_block_rows_1x1_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& moments, const at::Tensor& zl_pre, const at::Tensor& u,
    const at::Tensor& enc, const at::Tensor& learn1, const at::Tensor& learn2, const c10::optional<at::Tensor>& dec,
    const at::Tensor& gc, const at::Tensor& bc, const at::Tensor& g1, const at::Tensor& b1, const at::Tensor& g2,
    const at::Tensor& b2, const at::Tensor& mean, const at::Tensor& invstd, bool use_batch, double slope, double scale,
    double gain, bool final_act, bool need_dx) {
  check_block(x, enc);
  const Rows g{x.size(0), x.size(2), x.size(3)};
  const int64_t cc = enc.size(0), hid = learn1.size(0), out_ch = learn2.size(0), c1 = cc + hid;
  const auto pd = x.scalar_type();
  auto gcf = as_contiguous(gc, pd), bcf = as_contiguous(bc, pd), g1f = as_contiguous(g1, pd), b1f = as_contiguous(b1, pd);
  auto g2f = as_contiguous(g2, pd), b2f = as_contiguous(b2, pd);
  auto enc2d = enc.reshape({cc, -1});
  auto dec_mat = decoder_matrix(enc, dec);
  auto mean_c = mean.narrow(0, 0, cc), inv_c = invstd.narrow(0, 0, cc);
  auto mean_l = mean.narrow(0, cc, hid), inv_l = invstd.narrow(0, cc, hid);
  auto inv2 = invstd.narrow(0, c1, out_ch);
  auto fold = fold_coder(enc2d, dec_mat, mean_c, inv_c, gcf, bcf, gain);
  auto mean2 = mean.narrow(0, c1, out_ch) - fold.offset;  // u was stored without the fold's offset

  // layer 2: dAct + dBN_2 in two fused passes; the sums are also d(beta_2) and d(gamma_2)
  auto dy_rows = g.of(dy);
  auto sums2 = rows_bn_act_backward_sums(dy_rows, u, 0, mean2, inv2, g2f, b2f, final_act, slope, scale);
  auto du = at::empty_like(u);
  rows_bn_act_backward_apply(dy_rows, u, 0, du, mean2, inv2, g2f, b2f, sums2, use_batch, final_act, slope, scale);

  // the learner: layer 1's activated half recomputed instead of stored, then dAct + dBN_1 and its convolution
  auto al = bn_act_rows(zl_pre, mean_l, inv_l, g1f, b1f, true, slope, scale);
  at::Tensor d_al, d_learn2;
  std::tie(d_al, d_learn2) = conv_rows_backward(g, du, al, learn2, true);
  auto dzl = at::empty_like(zl_pre);
  auto sums1 = rows_bn_act_backward_sums(d_al, zl_pre, 0, mean_l, inv_l, g1f, b1f, true, slope, scale);
  rows_bn_act_backward_apply(d_al, zl_pre, 0, dzl, mean_l, inv_l, g1f, b1f, sums1, use_batch, true, slope, scale);
  auto xr = g.of(x);
  at::Tensor dx, d_learn1;
  std::tie(dx, d_learn1) = conv_rows_backward(g, dzl, xr, learn1, need_dx);

  // the coder from H = dU^T X; dU's column sums are zero under batch statistics (BN's gradient is centred)
  c10::optional<at::Tensor> du_sums;
  if (!use_batch) du_sums = g2f * inv2 * sums2[0].to(pd);
  auto grads = coder_backward(at::mm(du.t(), xr), du_sums, moments, enc2d, dec_mat, fold, mean_c, inv_c, use_batch,
                              g.count(), gain);
  if (need_dx) {
    dx.addmm_(du, fold.through);
    if (grads.input_self.has_value()) dx.addmm_(xr, *grads.input_self).add_(*grads.input_const);
  }
  auto d_enc = grads.encoder.reshape(enc.sizes());
  at::Tensor d_dec = at::empty({0}, x.options());
  if (dec.has_value()) {
    d_dec = grads.decoder_matrix.reshape(dec->sizes());
  } else {
    d_enc = d_enc + grads.decoder_matrix.t().reshape(enc.sizes());
  }
  // copies: a custom op's outputs may not alias each other
  auto param = [](const at::Tensor& t, const at::Tensor& like) { return t.to(like.scalar_type(), false, true); };
  return {need_dx ? g.nchw(dx) : at::empty({0}, x.options()), d_enc.contiguous(), d_learn1, d_learn2, d_dec,
          param(grads.gamma, gc), param(grads.beta, bc), param(sums1[1], g1), param(sums1[0], b1),
          param(sums2[1], g2), param(sums2[0], b2)};
}

}  // namespace pnnh
