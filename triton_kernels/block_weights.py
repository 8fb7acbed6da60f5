"""The conv block's two layer weights in the implicit-GEMM kernels' packed layout, and their gradients
back in the parameters' shapes: one launch each way. PNNHLinear's weights are the 1x1 case: its
products read ``w1[0]`` ([in, C1]) and ``w2[0]`` ([C1, out]) and their transposes through strides.

Layer 1 reads x through ``[W_e; W_1]`` and layer 2 reads its input through ``[g * W_d, W_2]`` along
input channels, both as ``[k*k, in, out]`` with every kernel zero-padded to the shared size K (see
:mod:`.conv_implicit_gemm`). Built with torch ops this was eight small launches a forward (pads,
concatenations, the tied decoder's flip, the gain, two packing copies) and ten again in backward; on
a GPU the block is bound by launching work (benchmarks/results/NOTES.md), so it is one gather kernel
here. The packed weights are saved for backward, whose input-gradient convolutions read them flipped
and transposed in place (``conv2d_implicit_gemm(..., transposed_weight=True)``).

The tied decoder is the encoder transposed and flipped: ``W_d[o, c, r, s] = W_e[c, o, kc-1-r, kc-1-s]``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import acc_dtype, device_constants, interpreting


class BlockShape(NamedTuple):
    """Widths and kernel sizes: cin -> (cc coder + hid learner) -> cout, coder kc, learner kl, shared K."""

    cin: int
    cc: int
    hid: int
    cout: int
    kc: int
    kl: int

    @property
    def K(self) -> int:
        return max(self.kc, self.kl)

    @property
    def c1(self) -> int:
        return self.cc + self.hid

    def packed_sizes(self) -> tuple[int, int]:
        taps = self.K * self.K
        return taps * self.cin * self.c1, taps * self.c1 * self.cout


def block_shape(enc: Tensor, learn1: Tensor, learn2: Tensor) -> BlockShape:
    """Of conv weights ([out, in, k, k]) or linear ones ([out, in]: the 1x1 case, same memory layout)."""

    def kernel_size(w: Tensor) -> int:
        return w.shape[-1] if w.dim() == 4 else 1

    return BlockShape(
        enc.shape[1], enc.shape[0], learn1.shape[0], learn2.shape[0], kernel_size(enc), kernel_size(learn1)
    )


@triton.jit
def _window(t, K: tl.constexpr, k):
    """(row, column, inside) of shared tap ``t`` in a k x k kernel centred in the K x K one."""
    p = (K - k) // 2
    r = t // K - p
    s = t % K - p
    return r, s, (r >= 0) & (r < k) & (s >= 0) & (s < k)


@triton.jit
def _packed_position(offs, n_in, n_out, K: tl.constexpr, KC, KL):
    """(i, o, then the coder window's and the learner window's row, column, inside) of flat offsets into
    a packed [K*K, n_in, n_out] weight (flat: older Triton compilers take no nested tuples)."""
    o = offs % n_out
    i = (offs // n_out) % n_in
    t = offs // (n_out * n_in)
    rc, sc, in_c = _window(t, K, KC)
    rl, sl, in_l = _window(t, K, KL)
    return i, o, rc, sc, in_c, rl, sl, in_l


@triton.jit
def _pack_kernel(
    enc_ptr,
    l1_ptr,
    l2_ptr,
    dec_ptr,
    out_ptr,
    const_ptr,
    CIN,
    CC,
    HID,
    COUT,
    KC,
    KL,
    size1,
    size2,
    K: tl.constexpr,
    TIED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """BLOCK elements of both layers' packed weights into ``out``: layer 1 [K*K, CIN, CC + HID] (encoder,
    then learner 1) at 0, layer 2 [K*K, CC + HID, COUT] (gain times the decoder, or the tied encoder's
    adjoint, then learner 2) at ``size1``; program axis 1 picks the layer. Kernels smaller than K sit at
    the centre of the K x K taps, zeros around (see :func:`_packed_position`)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    C1 = CC + HID
    if tl.program_id(1) == 0:  # layer 1: [t, i, o], o < CC the encoder, else the learner
        mask = offs < size1
        i, o, rc, sc, in_c, rl, sl, in_l = _packed_position(offs, CIN, C1, K, KC, KL)
        coder = o < CC
        v_c = tl.load(enc_ptr + ((o * CIN + i) * KC + rc) * KC + sc, mask=mask & coder & in_c, other=0.0)
        v_l = tl.load(l1_ptr + (((o - CC) * CIN + i) * KL + rl) * KL + sl, mask=mask & (o >= CC) & in_l, other=0.0)
        tl.store(out_ptr + offs, tl.where(coder, v_c, v_l).to(out_ptr.dtype.element_ty), mask=mask)
    else:  # layer 2: [t, i, o], i < CC the decoder times the gain, else the learner
        mask = offs < size2
        i, o, rc, sc, in_c, rl, sl, in_l = _packed_position(offs, C1, COUT, K, KC, KL)
        coder = i < CC
        if TIED:
            src = ((i * COUT + o) * KC + (KC - 1 - rc)) * KC + (KC - 1 - sc)
            v_c = tl.load(enc_ptr + src, mask=mask & coder & in_c, other=0.0)
        else:
            v_c = tl.load(dec_ptr + ((o * CC + i) * KC + rc) * KC + sc, mask=mask & coder & in_c, other=0.0)
        gain = tl.load(const_ptr)  # in the accumulation dtype (no float64 for narrower data)
        v_c = (v_c.to(gain.dtype) * gain).to(v_c.dtype)
        v_l = tl.load(l2_ptr + ((o * HID + (i - CC)) * KL + rl) * KL + sl, mask=mask & (i >= CC) & in_l, other=0.0)
        tl.store(out_ptr + size1 + offs, tl.where(coder, v_c, v_l).to(out_ptr.dtype.element_ty), mask=mask)


def _block() -> int:
    return 128 if interpreting() else 1024


def pack_block_weights(
    enc: Tensor,
    learn1: Tensor,
    learn2: Tensor,
    dec: Optional[Tensor],
    gain: float,
    dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(flat, w1, w2): one new flat tensor holding layer 1's ``[K*K, Cin, C1]`` and layer 2's
    ``[K*K, C1, Cout]`` packed weights, and the two as views of it. ``dtype`` (default: the weights'):
    the packed copy's, so float32 parameters are packed straight into an autocast dtype, no cast launched."""
    shape = block_shape(enc, learn1, learn2)
    size1, size2 = shape.packed_sizes()
    flat = torch.empty(size1 + size2, device=enc.device, dtype=dtype or enc.dtype)
    block = _block()
    _pack_kernel[(triton.cdiv(max(size1, size2), block), 2)](
        enc.contiguous(),
        learn1.contiguous(),
        learn2.contiguous(),
        (dec if dec is not None else enc).contiguous(),
        flat,
        device_constants((gain,), enc.device, acc_dtype(enc.dtype)),
        shape.cin,
        shape.cc,
        shape.hid,
        shape.cout,
        shape.kc,
        shape.kl,
        size1,
        size2,
        K=shape.K,
        TIED=dec is None,
        BLOCK=block,
    )
    return (flat, *packed_views(flat, shape))


def packed_views(flat: Tensor, shape: BlockShape) -> tuple[Tensor, Tensor]:
    """Layer 1's and layer 2's packed weights inside ``flat`` (from :func:`pack_block_weights`)."""
    size1, size2 = shape.packed_sizes()
    taps = shape.K * shape.K
    return flat[:size1].view(taps, shape.cin, shape.c1), flat[size1 : size1 + size2].view(taps, shape.c1, shape.cout)


@triton.jit
def _unravel(offs, inner, k):
    """(outer, inner, row, column) indices of flat offsets into a contiguous [outer, inner, k, k] tensor."""
    return offs // (k * k * inner), (offs // (k * k)) % inner, (offs // k) % k, offs % k


@triton.jit
def _unpack_grads_kernel(
    dw1_ptr,
    dw2_ptr,
    d_enc_ptr,
    d_l1_ptr,
    d_l2_ptr,
    d_dec_ptr,
    const_ptr,
    CIN,
    CC,
    HID,
    COUT,
    KC,
    KL,
    K: tl.constexpr,
    TIED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """BLOCK elements of one weight's gradient from the packed layer gradients dw1 [K*K, CIN, CC + HID] and
    dw2 [K*K, CC + HID, COUT], in the parameter's own [out, in, k, k] shape: program axis 1 picks the
    encoder (tied: plus the decoder's share), learner 1, learner 2 or the untied decoder (times the gain,
    ``const_ptr[0]``)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    seg = tl.program_id(1)
    C1 = CC + HID
    gain = tl.load(const_ptr)
    pc = (K - KC) // 2
    pl = (K - KL) // 2
    if seg == 0:  # d W_e [CC, CIN, KC, KC]; tied: plus the decoder's share, transposed and flipped
        mask = offs < CC * CIN * KC * KC
        o, i, r, s = _unravel(offs, CIN, KC)
        g = tl.load(dw1_ptr + (((r + pc) * K + s + pc) * CIN + i) * C1 + o, mask=mask, other=0.0)
        if TIED:  # W_d[i, o, KC-1-r, KC-1-s] = W_e[o, i, r, s], read at layer 2's [t, o, i]
            t2 = (KC - 1 - r + pc) * K + (KC - 1 - s + pc)
            g += gain * tl.load(dw2_ptr + (t2 * C1 + o) * COUT + i, mask=mask, other=0.0)
        tl.store(d_enc_ptr + offs, g.to(d_enc_ptr.dtype.element_ty), mask=mask)
    elif seg == 1:  # d W_1 [HID, CIN, KL, KL]
        mask = offs < HID * CIN * KL * KL
        h, i, r, s = _unravel(offs, CIN, KL)
        g = tl.load(dw1_ptr + (((r + pl) * K + s + pl) * CIN + i) * C1 + CC + h, mask=mask, other=0.0)
        tl.store(d_l1_ptr + offs, g.to(d_l1_ptr.dtype.element_ty), mask=mask)
    elif seg == 2:  # d W_2 [COUT, HID, KL, KL]
        mask = offs < COUT * HID * KL * KL
        o, h, r, s = _unravel(offs, HID, KL)
        g = tl.load(dw2_ptr + (((r + pl) * K + s + pl) * C1 + CC + h) * COUT + o, mask=mask, other=0.0)
        tl.store(d_l2_ptr + offs, g.to(d_l2_ptr.dtype.element_ty), mask=mask)
    else:  # d W_d [COUT, CC, KC, KC] (untied only: not launched when tied)
        mask = offs < COUT * CC * KC * KC
        o, i, r, s = _unravel(offs, CC, KC)
        g = tl.load(dw2_ptr + (((r + pc) * K + s + pc) * C1 + i) * COUT + o, mask=mask, other=0.0)
        tl.store(d_dec_ptr + offs, (gain * g).to(d_dec_ptr.dtype.element_ty), mask=mask)


def unpack_block_weight_grads(
    dw1: Tensor, dw2: Tensor, enc: Tensor, learn1: Tensor, learn2: Tensor, dec: Optional[Tensor], gain: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of (enc, learn1, learn2, dec), new contiguous tensors in the parameters' dtypes,
        from the packed weight gradients ``dw1`` [K*K, Cin, C1] and ``dw2`` [K*K, C1, Cout] (contiguous, in
    the accumulation dtype, as :func:`~.conv_weight_grad.conv2d_weight_grad` returns them).
        Tied (``dec`` None): the decoder's share is added to the encoder's and d_dec is empty."""
    shape = block_shape(enc, learn1, learn2)
    taps = shape.K * shape.K
    if dw1.shape != (taps, shape.cin, shape.c1) or dw2.shape != (taps, shape.c1, shape.cout):
        raise ValueError(f"packed gradients {tuple(dw1.shape)}, {tuple(dw2.shape)} do not fit the block {shape}")
    d_enc, d_l1, d_l2 = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (enc, learn1, learn2))
    d_dec = torch.empty(dec.shape, device=dec.device, dtype=dec.dtype) if dec is not None else enc.new_empty((0,))
    largest = max(d_enc.numel(), d_l1.numel(), d_l2.numel(), d_dec.numel())
    block = _block()
    segments = 3 if dec is None else 4  # the fourth writes d_dec
    _unpack_grads_kernel[(triton.cdiv(largest, block), segments)](
        dw1.contiguous(),
        dw2.contiguous(),
        d_enc,
        d_l1,
        d_l2,
        d_dec if dec is not None else d_enc,
        device_constants((gain,), enc.device, dw1.dtype),
        shape.cin,
        shape.cc,
        shape.hid,
        shape.cout,
        shape.kc,
        shape.kl,
        K=shape.K,
        TIED=dec is None,
        BLOCK=block,
    )
    return d_enc, d_l1, d_l2, d_dec
