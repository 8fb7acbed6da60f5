"""The 1x1 coder of the 'cpu' rows op, computed from its input's moments: its output is never formed.

With the pixels as rows X [P, Cin] and a 1x1 encoder We [Cc, Cin], the coder's pre-norm output is
z_c = X We^T, and everything the block needs of it is linear in X or in X's first two moments
(column sums s and Gram matrix G = X^T X, one [Cin, Cin] product):

- BN_c's batch statistics: mean = We s / P, var_k = w_k^T Cov(X) w_k with Cov = G / P - mean(X) mean(X)^T;
- the decoded contribution to layer 2, g * M BN_c(z_c) = X T^T + offset, with m = g * M diag(a) and
  T = m We [Cout, Cin] (a = gamma * invstd, shift = beta - mean * a, offset = g * M shift);
- in backward, from H = dU^T X [Cout, Cin] (dU: layer 2's pre-norm gradient): BN_c's gradients, the
  encoder's and decoder's, and the coder's share of dX, dU T + X B + r.

Against forming z_c (and its gradient) this drops three [P, Cc] passes in forward and backward and six
[P, Cc]-sized reads and writes in backward; the block no longer saves z_c at all.
The coder's statistics come from float64 moments; the rest of the [C, C] algebra runs in the
parameters' dtype.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._extension import extension

_F64 = torch.float64


def input_moments(xr: Tensor) -> Tensor:
    """[Cin + 1, Cin] float64: the column sums of the rows ``xr`` (row 0), then their Gram matrix.
    (The fused sums pass, not ``sum(dtype=float64)``, which converts all of ``xr`` first.)"""
    sums = extension().rows_channel_sums(xr, 0, xr.shape[1])[:1]
    return torch.cat([sums, torch.mm(xr.t(), xr).to(_F64)])


def coder_batch_stats(moments: Tensor, enc: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """(mean, biased var) of z_c = X We^T over the ``count`` rows the moments summarise, float64."""
    w = enc.to(_F64)
    mean_x = moments[0] / count
    cov = moments[1:] / count - torch.outer(mean_x, mean_x)
    return w @ mean_x, ((w @ cov) * w).sum(1).clamp_min(0.0)


class FoldedCoder(NamedTuple):
    """BN_c folded into the decoder (see the module's docstring), in the parameters' dtype."""

    a: Tensor  # [Cc] gamma * invstd
    shift: Tensor  # [Cc] beta - mean * a
    m: Tensor  # [Cout, Cc] gain * M diag(a)
    through: Tensor  # [Cout, Cin] m We: the rows of X to their decoded share of layer 2's output
    offset: Tensor  # [Cout] gain * M shift: what that share adds per channel besides


def fold_coder(enc: Tensor, dec_matrix: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor, gain: float) -> FoldedCoder:
    """All arguments in one dtype (the [C, C] algebra adds no conversions to a block's fixed cost)."""
    a = gamma * invstd
    shift = beta - mean * a
    m = dec_matrix * (a * gain)
    return FoldedCoder(a, shift, m, m @ enc, (dec_matrix @ shift) * gain)


class CoderGrads(NamedTuple):
    encoder: Tensor  # [Cc, Cin] through the encoder (the tied decoder's share is added by the caller)
    decoder_matrix: Tensor  # [Cout, Cc] of M
    gamma: Tensor  # [Cc]
    beta: Tensor  # [Cc]
    input_self: Optional[Tensor]  # [Cin, Cin] B: dX's coder share is dU T + X B + r (batch statistics only)
    input_const: Optional[Tensor]  # [Cin] r


def coder_backward(
    h: Tensor, du_sums: Optional[Tensor], moments: Tensor, enc: Tensor, dec_matrix: Tensor, fold: FoldedCoder,
    mean: Tensor, invstd: Tensor, use_batch: bool, count: int, gain: float,
) -> CoderGrads:
    """Gradients of the coder from H = dU^T X ([Cout, Cin]) and dU's column sums (None: zero, as under
    batch statistics, where BN_2's input gradient is centred). All in H's dtype but the moments."""
    a, shift, m, w = fold.a, fold.shift, fold.m, enc
    # g = gain * dU M is the gradient of BN_c's output; its sums over the rows, alone and times z_c
    sum_g_z = ((dec_matrix.t() @ h) * w).sum(1) * gain
    d_mat = (h @ w.t()) * (a * gain)
    if du_sums is None:
        sum_g = torch.zeros_like(a)
        sum_g_zhat = invstd * sum_g_z
    else:
        sum_g = (du_sums @ dec_matrix) * gain
        sum_g_zhat = invstd * (sum_g_z - mean * sum_g)
        d_mat = d_mat + torch.outer(du_sums, shift * gain)
    d_enc = m.t() @ h
    if not use_batch:  # dz_c = a * g
        return CoderGrads(d_enc, d_mat, sum_g_zhat, sum_g, None, None)
    # dz_c = a * (g - mean(g) - zhat * mean(g zhat)) = dU m - X We^T diag(q) + 1 c^T
    q = a * invstd * sum_g_zhat / count
    c = q * mean - a * sum_g / count
    moments = moments.to(h.dtype)
    d_enc = d_enc - q[:, None] * (w @ moments[1:]) + torch.outer(c, moments[0])
    return CoderGrads(d_enc, d_mat, sum_g_zhat, sum_g, -(w.t() * q) @ w, w.t() @ c)
