"""Reading the residual blocks of the model zoos: their layers, whether a PNNH block can replace them, and
their plain form.

torchvision's and timm's ``BasicBlock`` / ``Bottleneck`` are read by their parts (``conv1``, ``bn1``, ...,
``downsample``), this package's by its ``layer1``... and ``shortcut``. :func:`keep_reason` says why a block
must stay (it changes the shape), :func:`refusal` what in a shape-preserving block a PNNH block cannot
express, :class:`PlainBlock` is a block without its shortcut.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from . import resnet as own_resnet


@dataclasses.dataclass
class BlockParts:
    """A residual block's layers in order, its shortcut, and the other children it holds."""

    convs: tuple[nn.Conv2d, ...]
    norms: tuple[nn.Module, ...]
    shortcut: Optional[nn.Module]
    activations: tuple[nn.Module, ...]
    extras: dict[str, Optional[nn.Module]]

    @property
    def kind(self) -> str:
        return "bottleneck" if len(self.convs) == 3 else "basic"

    @property
    def channels(self) -> tuple[int, int]:
        return self.convs[0].in_channels, self.convs[-1].out_channels


def _own_block_parts(block: own_resnet.ResidualBlockBase) -> Optional[BlockParts]:
    if not block.residual:  # a plain block: nothing is added across it, nothing to convert
        return None
    layers = [m for name, m in block.named_children() if name.startswith("layer")]
    return BlockParts(
        convs=tuple(layer[0] for layer in layers),
        norms=tuple(layer[1] for layer in layers),
        shortcut=block.shortcut,
        activations=(),
        extras={"drop_path": block.drop_path},
    )


def _zoo_block_parts(block: nn.Module) -> Optional[BlockParts]:
    """torchvision's and timm's ``BasicBlock`` / ``Bottleneck``: conv1, bn1, ..., downsample."""
    names = ("conv1", "bn1", "conv2", "bn2")
    if not all(isinstance(getattr(block, n, None), nn.Module) for n in names) or not hasattr(block, "downsample"):
        return None
    depth = 3 if isinstance(getattr(block, "conv3", None), nn.Module) else 2
    known = {f"conv{i}" for i in (1, 2, 3)} | {f"bn{i}" for i in (1, 2, 3)} | {"downsample"}
    activations = {n: m for n, m in block.named_children() if n == "relu" or n.startswith("act")}
    extras: dict[str, Optional[nn.Module]] = {
        n: m for n, m in block.named_children() if n not in known and n not in activations
    }
    return BlockParts(
        convs=tuple(getattr(block, f"conv{i}") for i in range(1, depth + 1)),
        norms=tuple(getattr(block, f"bn{i}") for i in range(1, depth + 1)),
        shortcut=block.downsample,
        activations=tuple(activations.values()),
        extras=extras,
    )


def block_parts(block: nn.Module) -> Optional[BlockParts]:
    """The parts of a residual block this module knows, or None for anything else."""
    if isinstance(block, own_resnet.ResidualBlockBase):
        return _own_block_parts(block)
    if type(block).__name__ in ("BasicBlock", "Bottleneck"):
        return _zoo_block_parts(block)
    return None


def keep_reason(parts: BlockParts) -> Optional[str]:
    """Why a block stays a residual block (it changes the shape), or None if it can become PNNH."""
    stride = max(s for conv in parts.convs for s in conv.stride)
    if stride != 1:
        return f"stride {stride} (changes the resolution)"
    if parts.shortcut is not None and not isinstance(parts.shortcut, nn.Identity):
        c_in, c_out = parts.channels
        return f"projection shortcut ({c_in} -> {c_out} channels)"
    c_in, c_out = parts.channels
    if c_in != c_out:
        return f"changes the channels ({c_in} -> {c_out})"
    return None


def _is_inactive(module: Optional[nn.Module]) -> bool:
    if module is None or isinstance(module, nn.Identity):
        return True
    return float(getattr(module, "drop_prob", -1.0)) == 0.0  # a drop path or drop block at rate 0


def refusal(parts: BlockParts) -> Optional[str]:
    """What in a shape-preserving block a PNNH block cannot express, or None."""
    for conv in parts.convs:
        if conv.groups != 1:
            return f"grouped convolution (groups={conv.groups}, ResNeXt)"
        if max(conv.dilation) != 1:
            return f"dilated convolution (dilation={tuple(conv.dilation)})"
        if conv.bias is not None:
            return "convolution with a bias"
        if conv.padding_mode != "zeros":
            return f"padding_mode {conv.padding_mode!r} (PNNH blocks pad with zeros)"
    if parts.kind == "basic" and parts.convs[0].kernel_size != parts.convs[1].kernel_size:
        return f"learner kernels differ ({parts.convs[0].kernel_size} and {parts.convs[1].kernel_size})"
    if parts.kind == "basic" and parts.convs[0].kernel_size[0] % 2 == 0:
        return f"even kernel {parts.convs[0].kernel_size}"
    for norm in parts.norms:
        if type(norm) is not nn.BatchNorm2d:
            return f"norm layer {type(norm).__name__} (PNNH blocks use BatchNorm2d)"
        if not norm.affine:
            return "batch norm without affine parameters (affine=False; PNNH blocks' norms have them)"
        if not norm.track_running_stats:
            return "batch norm without running statistics (track_running_stats=False; PNNH blocks keep them)"
    return _beyond_conv_norm_relu(parts, "the converter maps ReLU blocks", "has no PNNH counterpart")


def plain_refusal(parts: BlockParts) -> Optional[str]:
    """What a shape-changing block runs that its plain form (its layers, ReLU between) would drop, or None."""
    return _beyond_conv_norm_relu(parts, "the plain form applies ReLU", "would be dropped by the plain form")


def _beyond_conv_norm_relu(parts: BlockParts, why_relu: str, why_extra: str) -> Optional[str]:
    """A non-ReLU activation or an active extra layer (SE, anti-aliasing, drop path), named, or None."""
    for act in parts.activations:
        if not isinstance(act, nn.ReLU):
            return f"activation {type(act).__name__} ({why_relu})"
    for name, module in parts.extras.items():
        if not _is_inactive(module):
            return f"{name} ({type(module).__name__}) {why_extra}"
    return None


class PlainBlock(nn.Module):
    """A residual block with its shortcut removed: ``relu(norm(conv(x)))`` through each of its layers, the
    block's own convolutions and norms (weights included); what the ``pnnh_*`` families do at a stage change."""

    def __init__(self, parts: BlockParts) -> None:
        super().__init__()
        self.convs = nn.ModuleList(parts.convs)
        self.norms = nn.ModuleList(parts.norms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = torch.relu(norm(conv(x)))
        return x


__all__ = ["BlockParts", "PlainBlock", "block_parts", "keep_reason", "plain_refusal", "refusal"]
