"""PNNHLinear's layer norm + activation on a loaded tile, forward and backward: what its products apply to
an operand while loading it, and what its row passes share.

A token's channels form two segments with their own row statistics: ``[0, split)`` (the coder: no
activation) and ``[split, width)`` (the learner: activation). A layer with one norm over all channels
uses ``split = 0`` (activation) or ``split = width`` (none) and the same statistics for both segments.

Per-token vectors are [4, tokens]: the statistics (mean, rstd of segment 0, then of segment 1) and the
backward's coefficients (c1, c2 of segment 0, then of segment 1; see :class:`LnGradPrologue`).

The tile functions take the token and channel indices as broadcastable 2-D blocks (``[M, 1]`` and
``[1, K]``, or the other way round), so one function serves an operand whose rows are tokens (a
forward or input-gradient product) and one whose columns are (the weight gradient's ``dY^T``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import Pair, as_acc, load_split


class LnPrologue(NamedTuple):
    """Layer norm + activation of a token-major operand: ``stats`` is [4, tokens]; ``gamma`` / ``beta``
    cover the whole width, given whole or as the two segments' halves (lo, hi); columns >= ``split``
    use segment 1 and the activation (``gelu``, or the scaled leaky family of ``slope``/``scale``)."""

    stats: Tensor
    gamma: Pair
    beta: Pair
    split: int
    gelu: bool
    slope: float
    scale: float


class LnGradPrologue(NamedTuple):
    """The backward of ``y = act(LN(u))`` applied to the gradient ``dy`` as it is loaded, so the
    gradient of the pre-norm ``u`` never exists in memory (``norm``: the forward's)::

        du = rstd * (g * gamma - c1 - xhat * c2),  xhat = (u - mean) * rstd,  g = dy * act'(xhat * gamma + beta)

    per token and segment; ``c1`` / ``c2`` are the row means of ``g * gamma`` and ``g * gamma * xhat``
    over the segment (:func:`~.ln_act_rows.ln_grad_sums`). ``saved`` is ``u`` laid out like the operand
    the prologue rides on (``u.t()`` for a transposed gradient: then ``tokens_axis`` is 1)."""

    norm: LnPrologue
    saved: Tensor
    coef: Tensor
    tokens_axis: int = 0

    def t(self) -> LnGradPrologue:
        """The same prologue for the transposed gradient (``dy.t()``)."""
        return self._replace(saved=self.saved.t(), tokens_axis=1 - self.tokens_axis)


def _halves(t: Pair, split: int) -> tuple[Tensor, Tensor]:
    """(low, high) pointers of a per-channel vector given whole or as halves: the kernels read channel c
    from ``low[c]`` below ``split`` and from ``high[c - split]`` above."""
    if isinstance(t, Tensor):
        return t, (t[split:] if split < t.shape[0] else t)
    return t


def affine_pointers(gamma: Pair, beta: Pair, split: int, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(gamma lo, gamma hi, beta lo, beta hi) kernel arguments in the accumulation dtype."""
    g_lo, g_hi = _halves(gamma, split)
    b_lo, b_hi = _halves(beta, split)
    return as_acc(g_lo, acc), as_acc(g_hi, acc), as_acc(b_lo, acc), as_acc(b_hi, acc)


@triton.jit
def activation(y, pos, neg, GELU: tl.constexpr):
    """scale * GELU(y) (pos = scale) or the scaled leaky family (pos, neg slopes)."""
    if GELU:
        return pos * y * 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476))
    return tl.where(y > 0, y * pos, y * neg)


@triton.jit
def activation_derivative(y, pos, neg, GELU: tl.constexpr):
    """d act / d y: GELU's (times ``pos``, its scale), or the scaled leaky family's ``pos`` / ``neg``."""
    if GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476))
        pdf = tl.exp(-0.5 * y * y) * 0.3989422804014327
        return pos * (cdf + y * pdf)
    return tl.where(y > 0, pos, neg)


@triton.jit
def segment_value(ptr, field, T, tok, tok_mask, second):
    """Per-token ``field`` (0 or 1) of each element's segment from a [4, T] vector."""
    v0 = tl.load(ptr + field * T + tok, mask=tok_mask, other=0.0)
    v1 = tl.load(ptr + (2 + field) * T + tok, mask=tok_mask, other=0.0)
    return tl.where(second, v1, v0)


@triton.jit
def ln_act_tile(
    v,
    tok,
    tok_mask,
    ch,
    ch_mask,
    stats_ptr,
    T,
    g_lo,
    g_hi,
    b_lo,
    b_hi,
    split,
    pos,
    neg,
    GELU: tl.constexpr,
    ACC: tl.constexpr,
):
    """Layer norm (+ activation on the second segment) of a tile; zero outside the masks."""
    second = ch >= split
    mean = segment_value(stats_ptr, 0, T, tok, tok_mask, second)
    rstd = segment_value(stats_ptr, 1, T, tok, tok_mask, second)
    g = load_split(g_lo, g_hi, ch, split, ch_mask)
    b = load_split(b_lo, b_hi, ch, split, ch_mask)
    y = (v.to(ACC) - mean) * rstd * g + b
    y = tl.where(second, activation(y, pos, neg, GELU), y)
    return tl.where(tok_mask & ch_mask, y, 0.0)


@triton.jit
def ln_grad_parts(dy, u, mean, rstd, gam, bet, second, mask, pos, neg, GELU: tl.constexpr, ACC: tl.constexpr):
    """(xhat, g = dy * act'(y)) of a tile (act' on the second segment only), zero outside ``mask``."""
    xhat = tl.where(mask, (u.to(ACC) - mean) * rstd, 0.0)
    d = activation_derivative(xhat * gam + bet, pos, neg, GELU)
    g = tl.where(second, dy.to(ACC) * d, dy.to(ACC))
    return xhat, tl.where(mask, g, 0.0)


@triton.jit
def ln_grad_tile(
    dy,
    u,
    tok,
    tok_mask,
    ch,
    ch_mask,
    stats_ptr,
    coef_ptr,
    T,
    g_lo,
    g_hi,
    b_lo,
    b_hi,
    split,
    pos,
    neg,
    GELU: tl.constexpr,
    ACC: tl.constexpr,
):
    """:class:`LnGradPrologue` on a loaded gradient tile and the saved pre-norm tile at the same place."""
    second = ch >= split
    mask = tok_mask & ch_mask
    mean = segment_value(stats_ptr, 0, T, tok, tok_mask, second)
    rstd = segment_value(stats_ptr, 1, T, tok, tok_mask, second)
    c1 = segment_value(coef_ptr, 0, T, tok, tok_mask, second)
    c2 = segment_value(coef_ptr, 1, T, tok, tok_mask, second)
    gam = load_split(g_lo, g_hi, ch, split, ch_mask)
    bet = load_split(b_lo, b_hi, ch, split, ch_mask)
    xhat, g = ln_grad_parts(dy, u, mean, rstd, gam, bet, second, mask, pos, neg, GELU, ACC)
    return tl.where(mask, rstd * (g * gam - c1 - xhat * c2), 0.0)
