"""How the 'cuda' op holds a block's feature maps: in the input's own layout, never copied between layers.

A channels_last input keeps every map channels_last (cuDNN's NHWC convolutions; the fused graphs take
nothing else); any other input is worked on as NCHW. The passes see either as ``[outer, channels, inner]``:
NCHW is ``[N, C, H*W]``, channels_last ``[N*H*W, C, 1]`` (views, no copies). The per-pixel products of the
1x1 coder and decoder are GEMMs in either layout: batched over N for NCHW, one [N*H*W, C] GEMM for rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..geometry import BlockGeometry


class FeatureMaps(BlockGeometry):
    """A block call's geometry with its maps' operations in the layout the op works in: [N, C, H, W] maps
    as ``[outer, C, inner]``, channels_last ones as :class:`~..geometry.RowsLayout`'s [pixels, channels]
    rows with a unit inner axis."""

    def flat(self, t: Tensor) -> Tensor:
        """A 4-D map (input, gradient) as the passes' ``[outer, C, inner]``: a copy only when it arrives in
        the other layout."""
        if self.channels_last:
            return self.rows_of(t).unsqueeze(-1)
        return t.contiguous().view(self.n, t.shape[1], self.h * self.w)

    def image(self, t: Tensor) -> Tensor:
        """An ``[outer, C, inner]`` map as [N, C, H, W] (a view, strided in this layout)."""
        if self.channels_last:
            return self.nchw(self._matrix(t))
        return t.view(self.n, t.shape[1], self.h, self.w)

    def new(self, like: Tensor, channels: int) -> Tensor:
        """An uninitialised ``[outer, channels, inner]`` map with ``like``'s dtype and device."""
        shape = (self.rows, channels, 1) if self.channels_last else (self.n, channels, self.h * self.w)
        return like.new_empty(shape)

    # -- per-pixel products (1x1 convolutions as GEMMs)

    def _matrix(self, t: Tensor) -> Tensor:
        return t.view(self.rows, t.shape[1])

    def linear(self, weight: Tensor, t: Tensor, alpha: float = 1.0) -> Tensor:
        """``alpha * weight @ t`` at every pixel: [out, C] x [outer, C, inner] -> [outer, out, inner], one GEMM
        (beta=0: the uninitialised output is not read)."""
        if self.channels_last:
            out = t.new_empty((self.rows, weight.shape[0], 1))
            torch.addmm(self._matrix(out), self._matrix(t), weight.t(), beta=0, alpha=alpha, out=self._matrix(out))
            return out
        out = t.new_empty((self.n, weight.shape[0], self.h * self.w))
        # (matmul would copy t transposed)
        return torch.baddbmm(out, weight.unsqueeze(0).expand(self.n, -1, -1), t, beta=0, alpha=alpha, out=out)

    def linear_add_(self, out: Tensor, weight: Tensor, t: Tensor, alpha: float = 1.0) -> None:
        """``out += alpha * weight @ t`` at every pixel, accumulated into ``out``'s storage by the GEMM."""
        if self.channels_last:
            self._matrix(out).addmm_(self._matrix(t), weight.t(), alpha=alpha)
        else:
            out.baddbmm_(weight.unsqueeze(0).expand(self.n, -1, -1), t, alpha=alpha)

    def outer_sum(self, g: Tensor, t: Tensor, alpha: float = 1.0) -> Tensor:
        """``alpha * sum over pixels of g t^T``: the weight gradient of a per-pixel product, [Cg, Ct]."""
        if self.channels_last:
            out = g.new_empty((g.shape[1], t.shape[1]))
            return torch.addmm(out, self._matrix(g).t(), self._matrix(t), beta=0, alpha=alpha, out=out)
        total = torch.bmm(g, t.transpose(1, 2)).sum(0)
        return total if alpha == 1.0 else total.mul_(alpha)

    def outer_sum_add_(self, out: Tensor, g: Tensor, t: Tensor) -> None:
        """``out += sum over pixels of g t^T``, accumulated by the GEMM where the layout allows."""
        if self.channels_last:
            out.addmm_(self._matrix(g).t(), self._matrix(t))
        else:
            out.add_(torch.bmm(g, t.transpose(1, 2)).sum(0))
