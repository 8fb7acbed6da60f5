"""Batch augmentations on tensors (N, C, H, W), driven by an explicit generator for exact resumes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _random_crops(x: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def random_translate(x: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Shift each image by up to ``pad`` pixels (zero fill): for digits, where a flip changes the class."""
    return _random_crops(x, pad, generator)


def random_crop_flip(x: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """CIFAR's standard augmentation: random crop from a ``pad``-padded image, random horizontal flip."""
    x = _random_crops(x, pad, generator)
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
