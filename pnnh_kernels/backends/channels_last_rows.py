"""Channels-last feature maps as [pixels, channels] matrices and back: the layout of the 'cpu' and
'triton' conv ops between their convolutions (no copies when the map is channels_last already)."""

from __future__ import annotations

from torch import Tensor


class RowsLayout:
    """An [N, C, H, W] map's pixels as the rows of an [N*H*W, C] matrix."""

    def __init__(self, x: Tensor) -> None:
        self.n, _, self.h, self.w = x.shape
        self.rows = self.n * self.h * self.w

    def nchw(self, rows: Tensor) -> Tensor:
        """A [N*H*W, C] matrix as an NCHW-shaped channels_last view."""
        return rows.view(self.n, self.h, self.w, rows.shape[1]).permute(0, 3, 1, 2)

    def rows_of(self, t: Tensor) -> Tensor:
        """An NCHW-shaped map as a contiguous [N*H*W, C] matrix (a view when it is channels_last)."""
        return t.permute(0, 2, 3, 1).reshape(self.rows, t.shape[1]).contiguous()
