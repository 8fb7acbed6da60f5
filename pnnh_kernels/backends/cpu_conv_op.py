"""The PNNH conv block of the 'cpu' backend, on channels-last rows (``pnnh::conv_block_rows`` and its
backward): the same math, signatures and autograd wiring as :mod:`.fused_conv_op`, whose planar (NCHW)
op the 'cuda' backend runs.

Between the convolutions every tensor is a [pixels, channels] matrix (NHWC), because on the CPU:
- oneDNN's convolutions run faster channels-last than NCHW (2.5x for the backward of a 16-channel 3x3
  convolution on 128x32x32 maps, micro-benchmarked on this project's 2-core Xeon), so the block converts
  an NCHW input once instead of letting oneDNN reorder around every convolution;
- a 1x1 coder's encoder and decoder become single matrix products over all pixels, accumulated in place
  (``addmm_``) into the learner's output and, in backward, into dx (no per-image batches, no sums of them);
- the fused BN passes (csrc/cpu/bn_act_rows.cpp) walk memory in order with the channels as vector lanes.

A 1x1 coder (every model's default) runs whole in C++ (csrc/cpu/conv_block_rows.cpp): its output is never
formed, only its input's moments (csrc/cpu/rows_coder.cpp), and the ~200 small tensor calls this module's
Python made per block (~2.5 ms, measured) are gone. A k x k coder runs the Python below.

Saved for backward: x, the pre-norm layer-1 halves ``zc``/``zl`` (for a 1x1 coder: x's moments and the
learner's rows) and layer 2's pre-norm ``u`` (rows), and the statistics; the normalised tensors are
recomputed.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._extension import extension
from .fused_conv_op import _as, _halves, param_dtype, register_block_autograd, running_stats
from .rows_layout import RowsLayout


def _conv_rows(g: RowsLayout, inp: Tensor, weight: Tensor) -> Tensor:
    """conv(inp, weight, 'same') of a rows matrix, as rows: one matrix product for a 1x1 kernel, else
    oneDNN's channels-last convolution."""
    if weight.shape[-1] == 1:
        return torch.mm(inp, weight.reshape(weight.shape[0], -1).t())
    return g.rows_of(F.conv2d(g.nchw(inp), weight, padding=weight.shape[-1] // 2))


def _conv_rows_backward(g: RowsLayout, grad: Tensor, inp: Tensor, weight: Tensor, need_input: bool, transposed: bool = False):
    """(input gradient as rows or None, weight gradient) of :func:`_conv_rows` (or of its transpose)."""
    if weight.shape[-1] == 1 and not transposed:
        w2d = weight.reshape(weight.shape[0], -1)
        return (torch.mm(grad, w2d) if need_input else None), torch.mm(grad.t(), inp).view(weight.shape)
    pad = weight.shape[-1] // 2
    d_in, d_w, _ = torch.ops.aten.convolution_backward(
        g.nchw(grad), g.nchw(inp), weight, None, [1, 1], [pad, pad], [1, 1], transposed, [0, 0], 1, [need_input, True, False]
    )
    return (g.rows_of(d_in) if need_input else None), d_w.contiguous()


def _bn_act_rows(t: Tensor, c0: int, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor, act: bool, slope: float, scale: float) -> Tensor:
    """act(BN(t[:, c0 : c0 + C])) as a new [pixels, C] matrix, one pass."""
    out = t.new_empty((t.shape[0], gamma.shape[0]))
    extension().rows_bn_act_apply(t, c0, out, 0, mean, invstd, gamma, beta, act, slope, scale)
    return out


def _batch_stats(t: Tensor, c0: int, cn: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return extension().rows_batch_stats(t, c0, cn, eps)


# --------------------------------------------------------------------------- forward op


def _conv_block_rows(
    x: Tensor, enc: Tensor, learn1: Tensor, learn2: Tensor, dec: Optional[Tensor],
    gc: Tensor, bc: Tensor, g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor,
    running_mean: Optional[Tensor], running_var: Optional[Tensor],
    use_batch: bool, eps: float, slope: float, scale: float, gain: float, final_act: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, zc, zl, u, mean, invstd, batch_var): y channels_last; u layer 2's pre-norm rows;
    statistics over [coder, learner, out] channels. ``zc``/``zl`` are what backward needs of layer 1:
    - a 1x1 coder (C++): ``zc`` holds x's moments ([Cin + 1, Cin] float64; empty under running
      statistics), ``zl`` the learner's pre-norm rows;
    - a k x k coder: the pre-norm halves as rows, both in ``zc`` ([pixels, Cc + C], ``zl`` empty) when one
      convolution computed them."""
    if enc.shape[-1] == 1:
        return tuple(extension().conv_block_rows_1x1(
            x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, running_mean, running_var,
            use_batch, eps, slope, scale, gain, final_act,
        ))
    g = RowsLayout(x)
    cc, hid, out_ch = enc.shape[0], learn1.shape[0], learn2.shape[0]
    kc = enc.shape[-1]
    pd = param_dtype(x.dtype)
    xr = g.rows_of(x)
    gcf, bcf, g1f, b1f = _as(pd, gc, bc, g1, b1)
    if running_mean is not None and not use_batch:
        mean_run, inv_run, var_run = running_stats(running_mean, running_var, eps, pd)

    if kc == learn1.shape[-1]:  # one convolution reads x for both halves
        zc_pre, zl_pre = _conv_rows(g, xr, torch.cat([enc, learn1])), x.new_empty((0,))
    else:
        zc_pre, zl_pre = _conv_rows(g, xr, enc), _conv_rows(g, xr, learn1)
    (tc, oc), (tl, ol) = _halves(zc_pre, zl_pre, cc)
    if use_batch:
        mean1, inv1, var1 = (torch.cat(p) for p in zip(_batch_stats(tc, oc, cc, eps), _batch_stats(tl, ol, hid, eps)))
    else:
        mean1, inv1, var1 = mean_run[: cc + hid], inv_run[: cc + hid], var_run[: cc + hid]

    al = _bn_act_rows(tl, ol, mean1[cc:], inv1[cc:], g1f, b1f, True, slope, scale)
    u = _conv_rows(g, al, learn2)
    zc = _bn_act_rows(tc, oc, mean1[:cc], inv1[:cc], gcf, bcf, False, slope, scale)
    decoded = F.conv_transpose2d(g.nchw(zc), enc, padding=kc // 2) if dec is None else F.conv2d(g.nchw(zc), dec, padding=kc // 2)
    u.add_(g.rows_of(decoded), alpha=gain)

    if use_batch:
        mean2, inv2, var2 = _batch_stats(u, 0, out_ch, eps)
    else:
        mean2, inv2, var2 = mean_run[cc + hid :], inv_run[cc + hid :], var_run[cc + hid :]
    g2f, b2f = _as(pd, g2, b2)
    y = torch.empty_like(u)
    extension().rows_bn_act_apply(u, 0, y, 0, mean2, inv2, g2f, b2f, final_act, slope, scale)
    return (
        g.nchw(y), zc_pre, zl_pre, u,
        torch.cat([mean1, mean2]), torch.cat([inv1, inv2]), torch.cat([var1, var2]),
    )


conv_block_rows = torch.library.custom_op("pnnh::conv_block_rows", mutates_args=())(_conv_block_rows)


@conv_block_rows.register_fake
def _(x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, running_mean, running_var, use_batch, eps, slope, scale, gain, final_act):
    n, cin, h, w = x.shape
    cc, hid, out_ch = enc.shape[0], learn1.shape[0], learn2.shape[0]
    rows = n * h * w
    stats = x.new_empty((cc + hid + out_ch,), dtype=param_dtype(x.dtype))
    if enc.shape[-1] == 1:
        zc = x.new_empty((cin + 1, cin) if use_batch else (0,), dtype=torch.float64)
        zl = x.new_empty((rows, hid))
    elif enc.shape[-1] == learn1.shape[-1]:
        zc, zl = x.new_empty((rows, cc + hid)), x.new_empty((0,))
    else:
        zc, zl = x.new_empty((rows, cc)), x.new_empty((rows, hid))
    return (
        x.new_empty((n, h, w, out_ch)).permute(0, 3, 1, 2),
        zc, zl,
        x.new_empty((rows, out_ch)),
        stats, torch.empty_like(stats), torch.empty_like(stats),
    )


# --------------------------------------------------------------------------- backward op


def _conv_block_rows_backward(
    dy: Tensor, x: Tensor, zc_pre: Tensor, zl_pre: Tensor, u: Tensor,
    enc: Tensor, learn1: Tensor, learn2: Tensor, dec: Optional[Tensor],
    gc: Tensor, bc: Tensor, g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor,
    mean: Tensor, invstd: Tensor,
    use_batch: bool, slope: float, scale: float, gain: float, final_act: bool, need_dx: bool,
) -> list[Tensor]:
    """Gradients of (x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2); dx/ddec empty when not needed."""
    if enc.shape[-1] == 1:
        return extension().conv_block_rows_1x1_backward(
            dy, x, zc_pre, zl_pre, u, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, mean, invstd,
            use_batch, slope, scale, gain, final_act, need_dx,
        )
    g = RowsLayout(x)
    cc, hid = enc.shape[0], learn1.shape[0]
    c1 = cc + hid
    pd = param_dtype(x.dtype)
    gcf, bcf, g1f, b1f = _as(pd, gc, bc, g1, b1)
    g2f, b2f = _as(pd, g2, b2)
    C = extension()

    # layer 2: dAct + dBN_2 in two fused passes; the sums are also d(beta_2) and d(gamma_2)
    dy_rows = g.rows_of(dy)
    mean2, inv2 = mean[c1:], invstd[c1:]
    sums2 = C.rows_bn_act_backward_sums(dy_rows, u, 0, mean2, inv2, g2f, b2f, final_act, slope, scale)
    du = torch.empty_like(u)
    C.rows_bn_act_backward_apply(dy_rows, u, 0, du, mean2, inv2, g2f, b2f, sums2, use_batch, final_act, slope, scale)

    # recompute layer 1's activated learner half instead of having stored it
    (tc, oc), (tl, ol) = _halves(zc_pre, zl_pre, cc)
    al = _bn_act_rows(tl, ol, mean[cc:c1], invstd[cc:c1], g1f, b1f, True, slope, scale)
    d_al, d_learn2 = _conv_rows_backward(g, du, al, learn2, True)

    # layer 1's learner half: dAct + dBN_1
    dzl = torch.empty_like(tl)
    sums_1 = C.rows_bn_act_backward_sums(d_al, tl, ol, mean[cc:c1], invstd[cc:c1], g1f, b1f, True, slope, scale)
    C.rows_bn_act_backward_apply(d_al, tl, ol, dzl, mean[cc:c1], invstd[cc:c1], g1f, b1f, sums_1, use_batch, True, slope, scale)
    xr = g.rows_of(x)

    # the coder: its normalised half recomputed, its convolutions' gradients
    zc = _bn_act_rows(tc, oc, mean[:cc], invstd[:cc], gcf, bcf, False, slope, scale)
    d_zc, d_w = _conv_rows_backward(g, du, zc, enc if dec is None else dec, True, transposed=dec is None)
    if gain != 1.0:  # the backward is linear in the gradient: scale the results, not du
        d_zc.mul_(gain)
        d_w.mul_(gain)
    d_enc_decode, d_dec = (d_w, None) if dec is None else (None, d_w)
    dzc = dzl if tl is tc else torch.empty_like(tc)
    sums_c = C.rows_bn_act_backward_sums(d_zc, tc, oc, mean[:cc], invstd[:cc], gcf, bcf, False, slope, scale)
    C.rows_bn_act_backward_apply(d_zc, tc, oc, dzc, mean[:cc], invstd[:cc], gcf, bcf, sums_c, use_batch, False, slope, scale)
    if tl is tc:
        dx, d_cat = _conv_rows_backward(g, dzc, xr, torch.cat([enc, learn1]), need_dx)
        d_enc, d_learn1 = d_cat[:cc].clone(), d_cat[cc:].clone()
    else:
        dx, d_learn1 = _conv_rows_backward(g, dzl, xr, learn1, need_dx)
        dx_c, d_enc = _conv_rows_backward(g, dzc, xr, enc, need_dx)
        if need_dx:
            dx.add_(dx_c)
    if d_enc_decode is not None:
        d_enc = d_enc + d_enc_decode

    def bn_grads(sums, like):  # copies: a custom op's outputs may not alias each other
        return sums[1].to(like.dtype, copy=True), sums[0].to(like.dtype, copy=True)

    empty = x.new_empty((0,))
    return [
        g.nchw(dx) if need_dx else empty,
        d_enc, d_learn1, d_learn2,
        d_dec if d_dec is not None else empty,
        *bn_grads(sums_c, gc), *bn_grads(sums_1, g1), *bn_grads(sums2, g2),
    ]


conv_block_rows_backward = torch.library.custom_op("pnnh::conv_block_rows_backward", mutates_args=())(_conv_block_rows_backward)


@conv_block_rows_backward.register_fake
def _(dy, x, zc_pre, zl_pre, u, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, mean, invstd, use_batch, slope, scale, gain, final_act, need_dx):
    n, cin, h, w = x.shape
    return [
        x.new_empty((n, h, w, cin)).permute(0, 3, 1, 2) if need_dx else x.new_empty((0,)),
        *(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (enc, learn1, learn2)),
        torch.empty_like(dec, memory_format=torch.contiguous_format) if dec is not None else x.new_empty((0,)),
        *(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (gc, bc, g1, b1, g2, b2)),
    ]


ConvBlockRowsFunction = register_block_autograd(
    conv_block_rows, conv_block_rows_backward, _conv_block_rows, _conv_block_rows_backward
)
