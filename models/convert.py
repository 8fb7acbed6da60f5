"""Turn a residual network from a model zoo into its PNNH counterpart.

``convert_resnet(model)`` replaces every stride-1, shape-preserving residual block of a torchvision,
timm or ``pnnh_kernels.models`` ResNet by a PNNH block (no residual addition):

- a basic block becomes a :class:`~pnnh_kernels.PNNHConv2d` (fused backends apply),
- a bottleneck becomes a :class:`~pnnh_kernels.models.PNNHBottleneck` (PyTorch),

and keeps the blocks that change the shape (stride 2, projection shortcut) as they are, or with
``plain_transitions=True`` removes their shortcuts too, as the ``pnnh_*`` families do. The learner takes the
replaced block's convolutions and batch norms where the widths agree, so a pretrained ResNet starts from its
own weights; the coder starts orthogonal. Blocks the PNNH block cannot express (grouped or dilated
convolutions, squeeze-excitation, anti-aliasing, drop block or drop path, other norms or activations) are
refused with the reason, before anything changes. Reading the blocks: :mod:`.zoo_blocks`; building their
replacements: :mod:`.pnnh_replacement`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from torch import nn

from pnnh_kernels import PNNHCoder
from pnnh_kernels.coder import guard_shared_parameters

from .pnnh_replacement import (
    ReplacementOptions,
    check_options,
    copy_learner,
    replacement,
    reset_zero_gamma,
    widths_of,
)
from .resnet import SLIM
from .zoo_blocks import BlockParts, PlainBlock, block_parts, keep_reason, plain_refusal, refusal


@dataclasses.dataclass
class ConvertedBlock:
    name: str
    kind: str
    channels: int
    hidden_channels: int
    coder_channels: int
    copied_weights: bool


@dataclasses.dataclass
class ResNetConversion:
    """The plan of :func:`convert_resnet`: what becomes PNNH, what stays and why; ``apply()`` does it."""

    model: nn.Module
    converted: list[ConvertedBlock]
    kept: dict[str, str]
    plain: list[str]
    notes: list[str]
    parameters_before: int
    parameters_after: int
    replacements: dict[str, nn.Module] = dataclasses.field(repr=False)

    def apply(self) -> nn.Module:
        for name, block in self.replacements.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, block)
        self.replacements = {}
        return guard_shared_parameters(self.model)  # shared coders: see pnnh_kernels.coder

    def summary(self) -> str:
        ratio = self.parameters_after / max(1, self.parameters_before)
        lines = [
            f"{len(self.converted)} blocks become PNNH, {len(self.kept) - len(self.plain)} stay residual, "
            f"{len(self.plain)} become plain; parameters "
            f"{self.parameters_before:,} -> {self.parameters_after:,} ({ratio:.2f}x)"
        ]
        for c in self.converted:
            weights = "learner from the block's weights" if c.copied_weights else "fresh learner"
            lines.append(
                f"  PNNH  {c.name}: {c.kind}, {c.channels} channels, learner {c.hidden_channels}, "
                f"coder {c.coder_channels}, {weights}"
            )
        for name, reason in self.kept.items():
            shortcut = "shortcut removed (plain)" if name in self.plain else "residual"
            lines.append(f"  kept  {name}: {reason}; {shortcut}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _parameters_after(model: nn.Module, replacements: dict[str, nn.Module]) -> int:
    """Parameters once the replacements are in (shared ones counted once)."""
    replaced = {id(p) for name in replacements for p in model.get_submodule(name).parameters()}
    remaining = {id(p): p.numel() for p in model.parameters() if id(p) not in replaced}
    remaining.update({id(p): p.numel() for block in replacements.values() for p in block.parameters()})
    return sum(remaining.values())


def _plan_blocks(
    model: nn.Module, plain_transitions: bool
) -> tuple[dict[str, BlockParts], dict[str, tuple[BlockParts, str]]]:
    convertible: dict[str, BlockParts] = {}
    kept: dict[str, tuple[BlockParts, str]] = {}
    refused: list[str] = []
    first_name: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        parts = block_parts(module)
        if parts is None:
            continue
        if id(module) in first_name:  # one block called at two places: two PNNH blocks would not share it
            refused.append(f"{name}: the same module as {first_name[id(module)]} (a block used twice)")
            continue
        first_name[id(module)] = name
        reason = keep_reason(parts)
        if reason is not None:
            kept[name] = (parts, reason)
            why_not = plain_refusal(parts) if plain_transitions else None
            if why_not is not None:
                refused.append(f"{name}: {why_not}")
            continue
        why_not = refusal(parts)
        if why_not is not None:
            refused.append(f"{name}: {why_not}")
        convertible[name] = parts
    if refused:
        raise ValueError(f"convert_resnet cannot convert {len(refused)} blocks; " + "; ".join(refused[:4]))
    if not convertible:
        what = f"its {len(kept)} residual blocks all change the shape" if kept else "no residual blocks were found"
        raise ValueError(
            f"convert_resnet: nothing to convert in {type(model).__name__} ({what}); it converts torchvision, "
            "timm and pnnh_kernels.models ResNets (BasicBlock / Bottleneck)"
        )
    return convertible, kept


def plan_resnet_conversion(
    model: nn.Module,
    *,
    hidden_ratio: Optional[float] = None,
    coder_ratio: Optional[float] = None,
    share_coder: Optional[bool] = None,
    slim: bool = False,
    backend: str = "auto",
    copy_weights: bool = True,
    plain_transitions: bool = False,
    **block_options: Any,
) -> ResNetConversion:
    """Everything :func:`convert_resnet` would do, without changing ``model`` (see there)."""
    if slim:  # the registered slim nets' widths, unless given
        if hidden_ratio is None and "hidden_channels" not in block_options:
            hidden_ratio = SLIM["hidden_ratio"]
        share_coder = SLIM["share_coder"] if share_coder is None else share_coder
    share_coder = bool(share_coder)
    options = ReplacementOptions(hidden_ratio, coder_ratio, share_coder, slim, backend, copy_weights, block_options)
    check_options(options)
    convertible, kept = _plan_blocks(model, plain_transitions)
    replacements, converted, notes = _pnnh_replacements(model, convertible, options)
    plain = list(kept) if plain_transitions else []
    for name in plain:
        replacements[name] = PlainBlock(kept[name][0]).train(model.get_submodule(name).training)
    before = sum(p.numel() for p in model.parameters())
    reasons = {name: reason for name, (_, reason) in kept.items()}
    after = _parameters_after(model, replacements)
    return ResNetConversion(model, converted, reasons, plain, notes, before, after, replacements)


def _pnnh_replacements(
    model: nn.Module, convertible: dict[str, BlockParts], options: ReplacementOptions
) -> tuple[dict[str, nn.Module], list[ConvertedBlock], list[str]]:
    """The PNNH block for each convertible block, what each is, and notes on the weights they took."""
    replacements: dict[str, nn.Module] = {}
    converted: list[ConvertedBlock] = []
    notes: list[str] = []
    shared: dict[str, PNNHCoder] = {}
    for name, parts in convertible.items():
        stage = name.rpartition(".")[0]
        block = replacement(parts, shared.get(stage), options)
        if options.share_coder:
            shared.setdefault(stage, block.coder)
        block.train(model.get_submodule(name).training)
        copied = options.copy_weights and copy_learner(block, parts)
        if copied and reset_zero_gamma(block):
            notes.append(f"{name}: the last norm's weight was zero (zero-init of a residual branch); set to one")
        replacements[name] = block
        converted.append(ConvertedBlock(name, parts.kind, parts.channels[0], *widths_of(block), copied))
    return replacements, converted, notes


def convert_resnet(model: nn.Module, **options: Any) -> nn.Module:
    """Replace every stride-1, shape-preserving residual block of ``model`` by a PNNH block, in place.

    Works on torchvision ResNets (``resnet18`` ... ``resnet152``, ``wide_resnet*``), timm ResNets
    (``resnet18``, ``resnet50``, ``resnet50d``, ...) and this package's ResNets. Returns ``model``.

    Keyword options:
        hidden_ratio: learner width as a fraction of the replaced block's (``0.5`` for the slim nets).
        coder_ratio: coder width as a fraction of the block's channels (default: as wide as the block).
        share_coder: one coder per stage (per parent module), shared by its PNNH blocks.
        slim: the widths of the registered ``pnnh_slim_*`` nets where not given: ``hidden_ratio=0.5``,
            ``share_coder=True`` and, for bottlenecks, ``coder_ratio=0.25`` (about half the parameters).
        backend: the PNNH basic blocks' backend (``"auto"``, ``"cpu"``, ``"triton"``, ...).
        copy_weights: start the learner from the replaced block's weights where the widths agree (default).
        plain_transitions: also remove the shortcuts of the shape-changing blocks (they become
            :class:`PlainBlock`, their layers and weights kept; a projection shortcut's weights go), so that
            nothing is added across any block, as in the ``pnnh_*`` families. Off by default: kept as they are.
        other keywords: passed to each block (``final_activation``, ``activation``, ``coder_kernel_size``,
            ``hidden_channels``, ``coder_channels``, ...; bottlenecks take the first and the last two).

    Raises ``ValueError``, before changing anything, for blocks it cannot express. ``plan_resnet_conversion``
    returns the plan instead (``.summary()`` lists the blocks it converts, those it keeps and why, and the
    parameter counts).
    """
    return plan_resnet_conversion(model, **options).apply()


__all__ = [
    "ConvertedBlock",
    "PlainBlock",
    "ResNetConversion",
    "block_parts",
    "convert_resnet",
    "plan_resnet_conversion",
]
