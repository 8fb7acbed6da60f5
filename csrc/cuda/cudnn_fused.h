// cuDNN fused convolution graphs (cudnn_fused.cpp): conv with an optional BN-apply + activation prologue
// and a batch-statistics epilogue; its backward as dgrad -> dReLU -> BN backward weight. Built only with
// the cudnn-frontend headers (PNNH_WITH_CUDNN_FRONTEND).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace pnnh {
namespace cudnn_fused {

// One graph's shape and options: x [n, c, h, w], w [k, c, r, r], 'same'-style padding pad, stride 1.
struct Spec {
  int64_t n, c, h, w, k, r, pad;
  bool prologue;  // act(x * scale + bias) before the convolution
  double slope;   // the activation's negative slope (0: ReLU)
  at::ScalarType dtype;
};

// Empty when cuDNN has an engine for the graph, else the step that failed and cuDNN's message.
std::string support(const Spec& spec);

// {y, sum, sum of squares}: y = conv(prologue ? act(x * scale + bias) : x, w) in x's dtype, channels_last;
// the per-output-channel sums of y in float32. scale and bias are ignored without the prologue.
std::vector<at::Tensor> conv_genstats(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                                      const at::Tensor& bias, bool prologue, double slope, int64_t pad);

// The backward graph's support for x [n, c, h, w] (the BN's pre-norm input), w [k, c, r, r] (spec.prologue
// is ignored: the graph always recomputes the BN-apply).
std::string dgrad_support(const Spec& spec);

// {d_act, dscale, dbias, eq_scale_dy, eq_scale_x, eq_bias}: d_act = dgrad(dy, w) * act'(BN(x)), the gradient
// of the BN's output (x's dtype, channels_last), with BN(x) = (x - mean) * inv_std * scale + bias; the
// BN parameters' gradients and the coefficients of x's gradient, dx = eq_scale_dy * d_act + eq_scale_x * x +
// eq_bias (batch statistics), all float32 [c].
std::vector<at::Tensor> dgrad_drelu_dbn(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& x,
                                        const at::Tensor& mean, const at::Tensor& inv_std, const at::Tensor& scale,
                                        const at::Tensor& bias, double slope, int64_t pad);

}  // namespace cudnn_fused
}  // namespace pnnh
