"""The batch norms outside the PNNH blocks: a ``Conv2d`` followed by a ``BatchNorm2d`` in an ``nn.Sequential``
(the stems and plain transition blocks of this package's models, a ResNet's branches) folds into the convolution,
whose order of application is then known. Pairs wired in a ``forward`` (a torchvision stem's ``conv1`` / ``bn1``)
stay layers: their dataflow is not visible from the modules."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from .folding import fold_conv_bn


def foldable_pairs(model: nn.Module) -> Iterator[tuple[str, nn.Sequential, int]]:
    """(the norm's name, its Sequential, the convolution's index) of every Conv2d -> BatchNorm2d pair whose
    norm has running statistics (without them it normalises with the batch's even in eval)."""
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            conv, norm = seq[i], seq[i + 1]
            if type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d and norm.running_var is not None:
                yield f"{name}.{i + 1}" if name else str(i + 1), seq, i


def fold_sequential_batch_norms(model: nn.Module) -> None:
    """Fold every :func:`foldable_pairs` pair in place: the convolution takes the norm's eval-mode affine map
    and the norm becomes ``nn.Identity`` (the Sequential keeps its indices)."""
    for _, seq, i in list(foldable_pairs(model)):
        seq[i] = _folded(seq[i], seq[i + 1])
        seq[i + 1] = nn.Identity()


def _folded(conv: nn.Module, norm: nn.Module) -> nn.Module:
    """A copy of ``conv`` (its stride, padding, groups) computing ``norm(conv(x))``."""
    weight, bias = fold_conv_bn(conv, norm)  # type: ignore[arg-type]
    dtype: torch.dtype = conv.weight.dtype  # type: ignore[assignment]
    folded = copy.deepcopy(conv)
    folded.weight = nn.Parameter(weight.to(dtype))
    folded.bias = nn.Parameter(bias.to(dtype))
    return folded
