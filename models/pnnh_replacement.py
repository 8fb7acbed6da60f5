"""A PNNH block in place of one residual block: its widths, its construction, the weights it takes over."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import nn

from pnnh_kernels import PNNHCoder, PNNHConv2d

from . import resnet as own_resnet
from .resnet import SLIM_BOTTLENECK, check_width_ratios
from .zoo_blocks import BlockParts

_BOTTLENECK_OPTIONS = {"final_activation", "hidden_channels", "coder_channels"}


@dataclasses.dataclass
class ReplacementOptions:
    """What :func:`~pnnh_kernels.models.convert_resnet` was asked for, as every replacement needs it."""

    hidden_ratio: Optional[float]
    coder_ratio: Optional[float]
    share_coder: bool
    slim: bool
    backend: str
    copy_weights: bool
    block_options: dict[str, Any]

    def widths(self, parts: BlockParts, shared: Optional[PNNHCoder]) -> tuple[int, int]:
        """Learner and coder widths for a block: ratios of its own widths, or absolute options."""
        channels, natural = parts.channels[1], parts.convs[0].out_channels
        hidden = self.block_options.get("hidden_channels", natural)
        if self.hidden_ratio is not None:
            hidden = max(1, round(self.hidden_ratio * natural))
        coder = self.block_options.get("coder_channels", channels)
        coder_ratio = self.coder_ratio
        if (
            coder_ratio is None
            and self.slim
            and parts.kind == "bottleneck"
            and "coder_channels" not in self.block_options
        ):
            coder_ratio = SLIM_BOTTLENECK["coder_ratio"]
        if coder_ratio is not None:
            coder = max(1, round(coder_ratio * channels))
        if shared is not None and coder != shared.coder_channels:
            raise ValueError(f"coder width {coder} disagrees with the stage's shared coder ({shared.coder_channels})")
        return hidden, coder


def check_options(options: ReplacementOptions) -> None:
    check_width_ratios(options.hidden_ratio, options.coder_ratio, options.block_options)


def _copy_bn(target: nn.BatchNorm2d, source: nn.Module) -> None:
    target.load_state_dict(source.state_dict())
    target.eps, target.momentum = source.eps, source.momentum  # type: ignore[assignment]


def _build_basic(parts: BlockParts, hidden: int, coder_width: int, coder, options: ReplacementOptions) -> nn.Module:
    conv1 = parts.convs[0]
    bn = parts.norms[-1]
    extra = {k: v for k, v in options.block_options.items() if k not in ("hidden_channels", "coder_channels")}
    return PNNHConv2d(
        parts.channels[0],
        kernel_size=conv1.kernel_size[0],
        hidden_channels=hidden,
        coder_channels=None if coder is not None else coder_width,
        coder=coder,
        eps=bn.eps,  # type: ignore[arg-type]
        momentum=bn.momentum,  # type: ignore[arg-type]
        backend=options.backend,
        device=conv1.weight.device,
        dtype=conv1.weight.dtype,
        **{"final_activation": False, **extra},
    )


def _build_bottleneck(
    parts: BlockParts, hidden: int, coder_width: int, coder, options: ReplacementOptions
) -> nn.Module:
    extra = set(options.block_options) - _BOTTLENECK_OPTIONS
    if extra:
        raise ValueError(f"PNNH bottleneck blocks take {sorted(_BOTTLENECK_OPTIONS)}, not {sorted(extra)}")
    block = own_resnet.PNNHBottleneck(
        parts.channels[0],
        coder,
        final_activation=options.block_options.get("final_activation", False),
        hidden_channels=hidden,
        coder_channels=None if coder is not None else coder_width,
    )
    weight = parts.convs[0].weight
    return block.to(device=weight.device, dtype=weight.dtype)


def _learner_layers(block: nn.Module) -> tuple[list[nn.Parameter], list[nn.Module]]:
    """The new block's learner weights and norms in the order of the old block's convs and norms."""
    if isinstance(block, PNNHConv2d):
        return [block.learner1_weight, block.learner2_weight], [block.learner_norm, block.out_norm]
    assert isinstance(block, own_resnet.PNNHBottleneck)
    return (
        [block.layer1[0].weight, block.layer2[0].weight, block.layer3.weight],
        [block.layer1[1], block.layer2[1], block.out_norm],
    )


def copy_learner(block: nn.Module, parts: BlockParts) -> bool:
    """Copy the convolutions and norms where every shape agrees; False (fresh learner) otherwise."""
    weights, norms = _learner_layers(block)
    if any(w.shape != conv.weight.shape for w, conv in zip(weights, parts.convs)):
        return False
    with torch.no_grad():
        for w, conv in zip(weights, parts.convs):
            w.copy_(conv.weight)
        for target, source in zip(norms, parts.norms):
            _copy_bn(target, source)
    return True


def reset_zero_gamma(block: nn.Module) -> bool:
    """A zero-initialised last norm (timm's ``zero_init_last``) silences a branch that has no shortcut."""
    out_norm = _learner_layers(block)[1][-1]
    if out_norm.weight is None or out_norm.weight.is_meta:  # a meta model holds no values to inspect
        return False
    if bool(out_norm.weight.detach().any()):
        return False
    with torch.no_grad():
        out_norm.weight.fill_(1.0)
    return True


def widths_of(block: nn.Module) -> tuple[int, int]:
    """The learner and coder widths of a new PNNH block."""
    hidden = block.hidden_channels if isinstance(block, PNNHConv2d) else block.layer1[0].out_channels
    return hidden, block.coder.coder_channels


def replacement(parts: BlockParts, shared: Optional[PNNHCoder], options: ReplacementOptions) -> nn.Module:
    hidden, coder_width = options.widths(parts, shared)
    build = _build_bottleneck if parts.kind == "bottleneck" else _build_basic
    return build(parts, hidden, coder_width, shared, options)
