"""One conv block call's geometry, built once from its :class:`~.contract.BlockArgs`: batch and map size,
the widths and kernel sizes of both layers, whether one convolution computes layer 1's two halves, and the
input's layout. The three conv ops read it instead of the weights' shapes."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .contract import BlockArgs


def is_channels_last(t: Tensor) -> bool:
    """Whether a 4-D map is stored channels_last (and not also plain contiguous, as it is with one
    channel or one pixel, where the two layouts are the same memory)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def memory_format_of(t: Tensor) -> torch.memory_format:
    """channels_last for a channels_last map, contiguous (NCHW) for anything else."""
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


class RowsLayout:
    """An [N, C, H, W] map's pixels as the rows of an [N*H*W, C] matrix (NHWC): the layout of the 'cpu'
    and 'triton' conv ops between their convolutions (no copies when the map is channels_last already)."""

    def __init__(self, x: Tensor) -> None:
        self.n, _, self.h, self.w = x.shape
        self.rows = self.n * self.h * self.w

    def nchw(self, rows: Tensor) -> Tensor:
        """A [N*H*W, C] matrix as an NCHW-shaped channels_last view."""
        return rows.view(self.n, self.h, self.w, rows.shape[1]).permute(0, 3, 1, 2)

    def rows_of(self, t: Tensor) -> Tensor:
        """An NCHW-shaped map as a contiguous [N*H*W, C] matrix (a view when it is channels_last)."""
        return t.permute(0, 2, 3, 1).reshape(self.rows, t.shape[1]).contiguous()


class BlockGeometry(RowsLayout):
    """A conv block call: ``x`` is [n, cin, h, w]; layer 1 makes ``cc`` coder and ``hid`` learner channels
    (``c1`` in all) with kernels ``kc`` and ``k``; layer 2 makes ``out`` channels.

    ``joint``: the coder and learner kernels agree, so one convolution through ``[W_e; W_1]`` computes
    both halves of layer 1 (one tensor holds them, the coder's channels first).
    ``channels_last``: the layout the op works in (the input's, unless the caller read it elsewhere).
    """

    def __init__(self, a: BlockArgs, channels_last: Optional[bool] = None) -> None:
        super().__init__(a.x)
        self.cin = a.x.shape[1]
        self.cc, self.hid, self.out = a.encoder.shape[0], a.learner1.shape[0], a.learner2.shape[0]
        self.c1 = self.cc + self.hid
        self.kc, self.k = a.encoder.shape[-1], a.learner1.shape[-1]
        self.joint = self.kc == self.k
        self.channels_last = is_channels_last(a.x) if channels_last is None else channels_last

    @property
    def kernel(self) -> int:
        """Layer 1's larger kernel: the size of the one kernel that holds both halves' taps."""
        return max(self.kc, self.k)

    @property
    def channels(self) -> int:
        """Every normalised channel of the block: coder, learner, output (the statistics' length)."""
        return self.c1 + self.out
