"""Normalisation statistics that cannot overflow: per-tile moments in a tile's own scale, merged in float64.

An epilogue sees a tile of values of each channel (batch norm: rows of a column; layer norm: columns of
a row). Summing v and v * v there overflows float32 once |v| passes ~1e19, and the sum-of-squares form
loses the spread when the mean is large against it. Each tile stores instead, per channel, the four
fields (``FIELD_COUNT``)::

    count, mean, m2 / scale**2, scale

where ``scale`` is the power of two at or below the tile's largest |v| (clamped to 2**-100 .. 2**100)
and ``m2`` the sum of squared deviations from the tile's mean. The scaled values stay below 2 in
magnitude, so no float32 sum overflows, and scaling by a power of two is exact. :func:`merge_moments`
joins the tiles with Chan's formula in float64, where ``m2`` itself fits for any float32 input.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

FIELD_COUNT = 4
FIELDS = tl.constexpr(FIELD_COUNT)  # the same, for kernels (they read only constexpr globals)


@triton.jit
def _pow2_scale(s, ACC: tl.constexpr):
    """(2**e, 2**-e) with 2**e the power of two at or below s, e clamped to [-100, 100], from the
    float32 exponent bits (no rounding; zero, subnormal and non-finite s land on the clamps)."""
    e = ((s.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.minimum(tl.maximum(e, -100), 100)
    scale = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((127 - e) << 23).to(tl.float32, bitcast=True)
    return scale.to(ACC), inverse.to(ACC)


@triton.jit
def tile_moments(v, valid, AXIS: tl.constexpr, ACC: tl.constexpr):
    """(count, mean, m2 / scale**2, scale) of the ``valid`` entries of the 2-D tile ``v`` along AXIS."""
    v = tl.where(valid, v, 0.0)
    count = tl.sum(valid.to(ACC), axis=AXIS)
    scale, inverse = _pow2_scale(tl.max(tl.abs(v), axis=AXIS), ACC)
    u = v * tl.expand_dims(inverse, AXIS)
    mean_u = tl.sum(u, axis=AXIS) / tl.maximum(count, 1.0)
    d = tl.where(valid, u - tl.expand_dims(mean_u, AXIS), 0.0)
    return count, mean_u * scale, tl.sum(d * d, axis=AXIS), scale


@triton.jit
def store_moments(ptr, field_stride, offs, mask, count, mean, m2_scaled, scale):
    """The four fields of one tile, ``field_stride`` elements apart."""
    tl.store(ptr + offs, count, mask=mask)
    tl.store(ptr + field_stride + offs, mean, mask=mask)
    tl.store(ptr + 2 * field_stride + offs, m2_scaled, mask=mask)
    tl.store(ptr + 3 * field_stride + offs, scale, mask=mask)


@triton.jit
def merge_moments(part_ptr, tiles, tile_stride, field_stride, offs, mask, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr):
    """(count, mean, m2) in float64 of the channels at ``offs`` over ``tiles`` tiles of moments, BLOCK_T
    tiles per step, in tile order (deterministic). A tile with count 0 (unused, zeroed) adds nothing."""
    n = tl.zeros((BLOCK,), dtype=tl.float64)
    mean = tl.zeros((BLOCK,), dtype=tl.float64)
    m2 = tl.zeros((BLOCK,), dtype=tl.float64)
    for t0 in range(0, tiles, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        live = (offs_t < tiles)[:, None] & mask[None, :]
        ptrs = part_ptr + offs_t[:, None].to(tl.int64) * tile_stride + offs[None, :]
        c = tl.load(ptrs, mask=live, other=0.0).to(tl.float64)
        mu = tl.load(ptrs + field_stride, mask=live, other=0.0).to(tl.float64)
        m2_scaled = tl.load(ptrs + 2 * field_stride, mask=live, other=0.0).to(tl.float64)
        scale = tl.load(ptrs + 3 * field_stride, mask=live, other=0.0).to(tl.float64)
        n_b = tl.sum(c, axis=0)
        mean_b = tl.sum(c * mu, axis=0) / tl.maximum(n_b, 1.0)
        dev = mu - mean_b[None, :]
        m2_b = tl.sum(m2_scaled * scale * scale + c * dev * dev, axis=0)
        # Chan et al.: join (n, mean, m2) with this step's (n_b, mean_b, m2_b)
        total = n + n_b
        delta = mean_b - mean
        weight = n_b / tl.maximum(total, 1.0)
        mean += delta * weight
        m2 += m2_b + delta * delta * n * weight
        n = total
    return n, mean, m2


def moments_to_sums(part: Tensor) -> Tensor:
    """[2, C] float64 (sum, sum of squares) of [tiles, FIELD_COUNT, C] moments, with torch ops."""
    count, mean, m2_scaled, scale = part.double().unbind(1)
    n = count.sum(0)
    total = (count * mean).sum(0)
    overall = total / n.clamp_min(1.0)
    m2 = (m2_scaled * scale * scale + count * (mean - overall) ** 2).sum(0)
    return torch.stack([total, m2 + n * overall * overall])
