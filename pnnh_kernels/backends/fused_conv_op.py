"""The PNNH conv block as fused passes around library convolutions, on planar (NCHW) tensors, for any
device the compiled extension serves: the 'cuda' backend runs it with the CUDA kernels; on the CPU its
planar C++ kernels are tested, while the 'cpu' backend runs the channels-last :mod:`.cpu_conv_op`.

Forward: one convolution reads x through ``[W_e; W_1]``; one pass reduces the batch statistics of
both halves; one pass writes the normalised coder half and the activated learner half (never the
signed copies); layer 2 is one convolution for the learner whose output the decoder GEMM accumulates
into in place; then one statistics pass and one BN + activation pass. Only the pre-norm outputs
``z`` (layer 1) and ``u`` (layer 2) are saved; backward recomputes the normalised tensors and fuses
dReLU into dBN (one reduction pass and one apply pass per layer, whose sums are also the BN
parameter gradients).

Both directions are ``torch.library`` custom ops (``pnnh::conv_block_fused`` and its backward), so
``torch.compile`` treats them as opaque nodes instead of breaking the graph. The convolutions are
oneDNN's on the CPU and cuDNN's / cuBLAS's on CUDA; the passes between them are the extension's.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._extension import extension

# --------------------------------------------------------------------------- helpers


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norm statistics and affine parameters stay float32 for half/bf16 data (as cuDNN's batch norm keeps them)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def stats_from_sums(sums: Tensor, count: int, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, invstd, unbiased var) from per-channel [sum, sum of squares] (float64) over ``count`` values."""
    mean = sums[0] / count
    var = (sums[1] / count - mean * mean).clamp_min(0.0)
    invstd = torch.rsqrt(var + eps)
    unbiased = var * (count / max(count - 1, 1))
    return mean.to(dtype), invstd.to(dtype), unbiased.to(dtype)


def running_stats(mean: Tensor, var: Tensor, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, invstd, var) from running statistics (eval mode), in ``dtype``."""
    return mean.to(dtype).contiguous(), torch.rsqrt(var.double() + eps).to(dtype), var.to(dtype, copy=True)


def _stats(z3: Tensor, c0: int, cn: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, invstd, unbiased var) of channels [c0, c0 + cn) from one fused reduction pass (float64 sums)."""
    count = z3.shape[0] * z3.shape[2]
    return stats_from_sums(extension().channel_sums(z3, c0, cn), count, eps, param_dtype(z3.dtype))


def _layer1_conv(x: Tensor, enc: Tensor, learn1: Tensor) -> tuple[Tensor, Tensor]:
    """Layer 1's pre-norm outputs as [N, C, H*W]: one convolution when the kernels agree (both halves in
    the first tensor), else the 1x1 coder as a GEMM over x beside the learner's convolution (no concatenation)."""
    n, cin, h, w = x.shape
    kc, k = enc.shape[-1], learn1.shape[-1]
    if kc == k:
        z = F.conv2d(x, torch.cat([enc, learn1]), padding=k // 2)
        return z.contiguous().view(n, -1, h * w), x.new_empty((0,))
    if kc == 1:
        zc = torch.matmul(enc.view(enc.shape[0], cin), x.view(n, cin, h * w))
    else:
        zc = F.conv2d(x, enc, padding=kc // 2).contiguous().view(n, -1, h * w)
    zl = F.conv2d(x, learn1, padding=k // 2).contiguous().view(n, -1, h * w)
    return zc, zl


def _halves(zc: Tensor, zl: Tensor, cc: int) -> tuple[tuple[Tensor, int], tuple[Tensor, int]]:
    """(tensor, channel offset) of the coder and learner halves of layer 1: one tensor holds both when
    ``zl`` is empty (coder and learner kernels agreed, one convolution computed them)."""
    return ((zc, 0), (zc, cc)) if zl.numel() == 0 else ((zc, 0), (zl, 0))


def _layer1_apply(halves, widths, mean: Tensor, invstd: Tensor, gammas: tuple, slope: float, scale: float):
    """Normalised coder half and activated learner half of layer 1, one pass each."""
    (tc, oc), (tl, ol) = halves
    cc, hid = widths
    n, hw = tc.shape[0], tc.shape[2]
    zc = tc.new_empty((n, cc, hw))
    al = tc.new_empty((n, hid, hw))
    gc, bc, g1, b1 = gammas
    extension().bn_act_apply(tc, oc, zc, mean[:cc], invstd[:cc], gc, bc, False, slope, scale)
    extension().bn_act_apply(tl, ol, al, mean[cc:], invstd[cc:], g1, b1, True, slope, scale)
    return zc, al


def _decoder_matrix(enc: Tensor, dec: Optional[Tensor]) -> Tensor:
    """M with ``decode(z) = M @ z`` for 1x1 coders: [out, Cc]."""
    return enc[:, :, 0, 0].t() if dec is None else dec[:, :, 0, 0]


def _conv_bwd(grad: Tensor, inp: Tensor, weight: Tensor, padding: int, transposed: bool, need_input: bool):
    d_in, d_w, _ = torch.ops.aten.convolution_backward(
        grad, inp, weight, None, [1, 1], [padding, padding], [1, 1], transposed, [0, 0], 1, [need_input, True, False]
    )
    return d_in, d_w


def _as(dtype: torch.dtype, *tensors: Tensor) -> list[Tensor]:
    # the checks first: a no-op .to()/.contiguous() still costs a dispatch, and blocks are called often
    return [t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous() for t in tensors]


# --------------------------------------------------------------------------- forward op


def _conv_block_fused(
    x: Tensor,
    enc: Tensor,
    learn1: Tensor,
    learn2: Tensor,
    dec: Optional[Tensor],
    gc: Tensor,
    bc: Tensor,
    g1: Tensor,
    b1: Tensor,
    g2: Tensor,
    b2: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    use_batch: bool,
    eps: float,
    slope: float,
    scale: float,
    gain: float,
    final_act: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, zc, zl, u, mean, invstd, batch_var); the last three cover [coder, learner, out] channels.

    ``zc``/``zl`` are layer 1's pre-norm halves; when coder and learner kernels agree they come from one
    convolution and ``zc`` holds both (``zl`` is empty).
    """
    n, _, h, w = x.shape
    cc, hid, out_ch = enc.shape[0], learn1.shape[0], learn2.shape[0]
    kc, k = enc.shape[-1], learn1.shape[-1]
    x = x.contiguous()
    zc_pre, zl_pre = _layer1_conv(x, enc, learn1)
    halves = _halves(zc_pre, zl_pre, cc)
    gammas = _as(param_dtype(x.dtype), gc, bc, g1, b1)
    if use_batch:
        stats = [_stats(t, c0, cn, eps) for (t, c0), cn in zip(halves, (cc, hid))]
        mean1, inv1, var1 = (torch.cat(parts) for parts in zip(*stats))
    else:
        mean1, inv1, var1 = running_stats(running_mean[: cc + hid], running_var[: cc + hid], eps, param_dtype(x.dtype))
    zc, al = _layer1_apply(halves, (cc, hid), mean1, inv1, gammas, slope, scale)

    u = F.conv2d(al.view(n, hid, h, w), learn2, padding=k // 2).contiguous()
    u3 = u.view(n, out_ch, h * w)
    if kc == 1:  # the decoder GEMM accumulates into the learner's output tile: no separate add pass
        m = _decoder_matrix(enc, dec)
        u3.baddbmm_(m.unsqueeze(0).expand(n, -1, -1), zc, alpha=gain)
    elif dec is None:
        u.add_(F.conv_transpose2d(zc.view(n, cc, h, w), enc, padding=kc // 2), alpha=gain)
    else:
        u.add_(F.conv2d(zc.view(n, cc, h, w), dec, padding=kc // 2), alpha=gain)

    if use_batch:
        mean2, inv2, var2 = _stats(u3, 0, out_ch, eps)
    else:
        mean2, inv2, var2 = running_stats(running_mean[cc + hid :], running_var[cc + hid :], eps, param_dtype(x.dtype))
    y = torch.empty_like(u3)
    g2f, b2f = _as(param_dtype(x.dtype), g2, b2)
    extension().bn_act_apply(u3, 0, y, mean2, inv2, g2f, b2f, final_act, slope, scale)
    return (
        y.view(n, out_ch, h, w),
        zc_pre,
        zl_pre,
        u3,
        torch.cat([mean1, mean2]),
        torch.cat([inv1, inv2]),
        torch.cat([var1, var2]),
    )


conv_block_fused = torch.library.custom_op("pnnh::conv_block_fused", mutates_args=())(_conv_block_fused)


@conv_block_fused.register_fake
def _(x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, running_mean, running_var, use_batch, eps, slope, scale, gain, final_act):
    n, _, h, w = x.shape
    cc, hid, out_ch = enc.shape[0], learn1.shape[0], learn2.shape[0]
    stats = x.new_empty((cc + hid + out_ch,), dtype=param_dtype(x.dtype))
    joint = enc.shape[-1] == learn1.shape[-1]
    return (
        x.new_empty((n, out_ch, h, w)),
        x.new_empty((n, cc + hid if joint else cc, h * w)),
        x.new_empty((0,)) if joint else x.new_empty((n, hid, h * w)),
        x.new_empty((n, out_ch, h * w)),
        stats,
        torch.empty_like(stats),
        torch.empty_like(stats),
    )


# --------------------------------------------------------------------------- backward op


def _conv_block_fused_backward(
    dy: Tensor,
    x: Tensor,
    zc_pre: Tensor,
    zl_pre: Tensor,
    u3: Tensor,
    enc: Tensor,
    learn1: Tensor,
    learn2: Tensor,
    dec: Optional[Tensor],
    gc: Tensor,
    bc: Tensor,
    g1: Tensor,
    b1: Tensor,
    g2: Tensor,
    b2: Tensor,
    mean: Tensor,
    invstd: Tensor,
    use_batch: bool,
    slope: float,
    scale: float,
    gain: float,
    final_act: bool,
    need_dx: bool,
) -> list[Tensor]:
    """Gradients of (x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2); dx/ddec empty when not needed."""
    n, _, h, w = x.shape
    cc, hid, out_ch = enc.shape[0], learn1.shape[0], learn2.shape[0]
    kc, k = enc.shape[-1], learn1.shape[-1]
    c1 = cc + hid
    gammas = _as(param_dtype(x.dtype), gc, bc, g1, b1)
    g2f, b2f = _as(param_dtype(x.dtype), g2, b2)
    C = extension()

    # layer 2: dReLU + dBN_2 in two fused passes; the sums are also d(beta_2) and d(gamma_2)
    dy3 = dy.contiguous().view(n, out_ch, h * w)
    sums2 = C.bn_act_backward_sums(dy3, u3, 0, mean[c1:], invstd[c1:], g2f, b2f, final_act, slope, scale)
    du3 = torch.empty_like(u3)
    C.bn_act_backward_apply(dy3, u3, 0, du3, mean[c1:], invstd[c1:], g2f, b2f, sums2, use_batch, final_act, slope, scale)

    # recompute layer 1's normalised / activated halves instead of having stored them
    halves = _halves(zc_pre, zl_pre, cc)
    zc, al = _layer1_apply(halves, (cc, hid), mean[:c1], invstd[:c1], gammas, slope, scale)
    d_al, d_learn2 = _conv_bwd(du3.view(n, out_ch, h, w), al.view(n, hid, h, w), learn2, k // 2, False, True)
    d_dec = None
    if kc == 1:
        m = _decoder_matrix(enc, dec)
        d_zc = torch.matmul(m.t() * gain, du3)
        d_m = torch.bmm(du3, zc.transpose(1, 2)).sum(0).mul_(gain)  # [out, Cc]
        d_enc_decode = d_m.t().reshape(enc.shape) if dec is None else None
        if dec is not None:
            d_dec = d_m.reshape(dec.shape)
    else:
        weight = enc if dec is None else dec
        d_zc, d_w = _conv_bwd(du3.view(n, out_ch, h, w) * gain, zc.view(n, cc, h, w), weight, kc // 2, dec is None, True)
        d_zc = d_zc.reshape(n, cc, h * w)
        d_enc_decode, d_dec = (d_w, None) if dec is None else (None, d_w)

    # layer 1: dBN_c on the coder half, dReLU + dBN_1 on the learner half, written beside each other
    (tc, oc), (tl, ol) = halves
    dzc = torch.empty_like(tc)
    dzl = dzc if tl is tc else torch.empty_like(tl)
    d_zc = d_zc.contiguous()
    d_al3 = d_al.contiguous().view(n, hid, h * w)
    sums_c = C.bn_act_backward_sums(d_zc, tc, oc, mean[:cc], invstd[:cc], gammas[0], gammas[1], False, slope, scale)
    C.bn_act_backward_apply(d_zc, tc, oc, dzc, mean[:cc], invstd[:cc], gammas[0], gammas[1], sums_c, use_batch, False, slope, scale)
    sums_1 = C.bn_act_backward_sums(d_al3, tl, ol, mean[cc:c1], invstd[cc:c1], gammas[2], gammas[3], True, slope, scale)
    C.bn_act_backward_apply(d_al3, tl, ol, dzl, mean[cc:c1], invstd[cc:c1], gammas[2], gammas[3], sums_1, use_batch, True, slope, scale)

    x = x.contiguous()
    if kc == k:
        dx, d_cat = _conv_bwd(dzc.view(n, c1, h, w), x, torch.cat([enc, learn1]), k // 2, False, need_dx)
        d_enc, d_learn1 = d_cat[:cc].clone(), d_cat[cc:].clone()
    else:
        dx, d_learn1 = _conv_bwd(dzl.view(n, hid, h, w), x, learn1, k // 2, False, need_dx)
        if kc == 1:  # the coder's GEMM: its input gradient accumulates into dx in place
            cin = x.shape[1]
            x3 = x.view(n, cin, h * w)
            enc2d = enc.view(cc, cin)
            if need_dx:
                dx.view(n, cin, h * w).baddbmm_(enc2d.t().unsqueeze(0).expand(n, -1, -1), dzc)
            d_enc = torch.bmm(dzc, x3.transpose(1, 2)).sum(0).view(enc.shape)
        else:
            dx_c, d_enc = _conv_bwd(dzc.view(n, cc, h, w), x, enc, kc // 2, False, need_dx)
            dx = dx + dx_c if need_dx else None
    if d_enc_decode is not None:
        d_enc = d_enc + d_enc_decode

    def bn_grads(sums, like):  # copies: a custom op's outputs may not alias each other
        return sums[1].to(like.dtype, copy=True), sums[0].to(like.dtype, copy=True)

    dgc, dbc = bn_grads(sums_c, gc)
    dg1, db1 = bn_grads(sums_1, g1)
    dg2, db2 = bn_grads(sums2, g2)
    empty = x.new_empty((0,))
    return [
        dx if dx is not None else empty,
        d_enc,
        d_learn1,
        d_learn2,
        d_dec if d_dec is not None else empty,
        dgc, dbc, dg1, db1, dg2, db2,
    ]


conv_block_fused_backward = torch.library.custom_op("pnnh::conv_block_fused_backward", mutates_args=())(_conv_block_fused_backward)


@conv_block_fused_backward.register_fake
def _(dy, x, zc_pre, zl_pre, u3, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, mean, invstd, use_batch, slope, scale, gain, final_act, need_dx):
    return [
        torch.empty_like(x) if need_dx else x.new_empty((0,)),
        torch.empty_like(enc),
        torch.empty_like(learn1),
        torch.empty_like(learn2),
        torch.empty_like(dec) if dec is not None else x.new_empty((0,)),
        *(torch.empty_like(t) for t in (gc, bc, g1, b1, g2, b2)),
    ]


# --------------------------------------------------------------------------- autograd


_NUM_INPUTS = 19  # the forward op's arguments


def _context_saver(ctx, inputs, output):
    x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, _rm, _rv, use_batch, _eps, slope, scale, gain, final_act = inputs
    _y, zc_pre, zl_pre, u3, mean, invstd, _var = output
    ctx.save_for_backward(x, zc_pre, zl_pre, u3, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, mean, invstd)
    ctx.flags = (use_batch, slope, scale, gain, final_act)
    ctx.set_materialize_grads(False)  # only y's gradient is used: no zero tensors for the others


def _backward_calling(backward_fn):
    def backward(ctx, dy, *_unused):
        x, zc_pre, zl_pre, u3, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, mean, invstd = ctx.saved_tensors
        use_batch, slope, scale, gain, final_act = ctx.flags
        if dy is None:
            dy = torch.zeros((x.shape[0], learn2.shape[0], *x.shape[2:]), device=x.device, dtype=x.dtype)
        grads = backward_fn(
            dy, x, zc_pre, zl_pre, u3, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, mean, invstd,
            use_batch, slope, scale, gain, final_act, ctx.needs_input_grad[0],
        )
        dx, d_enc, d_l1, d_l2, d_dec, dgc, dbc, dg1, db1, dg2, db2 = grads
        return (
            dx if ctx.needs_input_grad[0] else None,
            d_enc, d_l1, d_l2,
            d_dec if dec is not None else None,
            dgc, dbc, dg1, db1, dg2, db2,
            *([None] * (_NUM_INPUTS - 11)),
        )

    return backward


def register_block_autograd(forward_op, backward_op, forward_fn, backward_fn) -> type:
    """Wire ``backward_op`` as the gradient of ``forward_op`` (both with this module's signatures: the
    forward's 7 outputs, the backward's 11 gradients, which the 'triton' op shares), and return an
    ``autograd.Function`` that runs the same two functions without the custom-op dispatch.

    The custom op is what torch.compile traces; eager calls take the Function, because the custom-op
    autograd wrapper costs hundreds of microseconds of Python per call (measured), more than a GPU
    spends on a small block."""
    forward_op.register_autograd(_backward_calling(backward_op), setup_context=_context_saver)

    class EagerBlockFunction(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return forward_fn(*args)

        setup_context = staticmethod(_context_saver)
        backward = staticmethod(_backward_calling(backward_fn))

    return EagerBlockFunction


ConvBlockFusedFunction = register_block_autograd(
    conv_block_fused, conv_block_fused_backward, _conv_block_fused, _conv_block_fused_backward
)
