// The 1x1 coder from its input's moments (rows_coder.cpp says how); used by the rows conv block.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace pnnh {

// BN_c folded into the decoder, in the parameters' dtype.
struct FoldedCoder {
  at::Tensor a;        // [Cc] gamma * invstd
  at::Tensor shift;    // [Cc] beta - mean * a
  at::Tensor m;        // [Cout, Cc] gain * M diag(a)
  at::Tensor through;  // [Cout, Cin] m We: the rows of X to their decoded share of layer 2's output
  at::Tensor offset;   // [Cout] gain * M shift: what that share adds per channel besides
};

struct CoderGrads {
  at::Tensor encoder;         // [Cc, Cin] through the encoder (a tied decoder's share is the caller's to add)
  at::Tensor decoder_matrix;  // [Cout, Cc] of M
  at::Tensor gamma, beta;     // [Cc]
  c10::optional<at::Tensor> input_self;   // [Cin, Cin] B: dX's coder share is dU T + X B + r (batch statistics)
  c10::optional<at::Tensor> input_const;  // [Cin] r
};

// [Cin + 1, Cin] float64: the column sums of the rows xr (row 0), then their Gram matrix.
at::Tensor coder_input_moments(const at::Tensor& xr);

// (mean, biased var), float64, of z_c = X We^T over the `count` rows the moments summarise.
std::tuple<at::Tensor, at::Tensor> coder_batch_stats(const at::Tensor& moments, const at::Tensor& enc, int64_t count);

// All arguments in one dtype: enc [Cc, Cin], dec_matrix M [Cout, Cc] (decode(z) = M z).
FoldedCoder fold_coder(const at::Tensor& enc, const at::Tensor& dec_matrix, const at::Tensor& mean, const at::Tensor& invstd,
                       const at::Tensor& gamma, const at::Tensor& beta, double gain);

// The coder's gradients from H = dU^T X [Cout, Cin] and dU's column sums (none: zero, as under batch
// statistics, where BN_2's input gradient is centred). All in H's dtype but the moments.
CoderGrads coder_backward(const at::Tensor& h, const c10::optional<at::Tensor>& du_sums, const at::Tensor& moments,
                          const at::Tensor& enc, const at::Tensor& dec_matrix, const FoldedCoder& fold,
                          const at::Tensor& mean, const at::Tensor& invstd, bool use_batch, int64_t count, double gain);

}  // namespace pnnh
