"""Turn a residual network from a model zoo into its PNNH counterpart.

``convert_resnet(model)`` replaces every stride-1, shape-preserving residual block of a torchvision,
timm or ``pnnh_kernels.models`` ResNet by a PNNH block (no residual addition):

- a basic block becomes a :class:`~pnnh_kernels.PNNHConv2d` (fused backends apply),
- a bottleneck becomes a :class:`~pnnh_kernels.models.PNNHBottleneck` (PyTorch),

and keeps the blocks that change the shape (stride 2, projection shortcut) as they are, as the PNNH
models of this package do. The learner takes the replaced block's convolutions and batch norms where the
widths agree, so a pretrained ResNet starts from its own weights; the coder starts orthogonal. Blocks the
PNNH block cannot express (grouped or dilated convolutions, squeeze-excitation, anti-aliasing, drop
block or drop path, other norms or activations) are refused with the reason, before anything changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import nn

from pnnh_kernels import PNNHCoder, PNNHConv2d

from . import resnet as own_resnet
from .resnet import SLIM, SLIM_BOTTLENECK

_BOTTLENECK_OPTIONS = {"final_activation", "hidden_channels", "coder_channels"}


@dataclasses.dataclass
class _BlockParts:
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


def _own_block_parts(block: own_resnet.ResidualBlockBase) -> Optional[_BlockParts]:
    if not block.residual:  # a plain block: nothing is added across it, nothing to convert
        return None
    layers = [m for name, m in block.named_children() if name.startswith("layer")]
    return _BlockParts(
        convs=tuple(layer[0] for layer in layers),
        norms=tuple(layer[1] for layer in layers),
        shortcut=block.shortcut,
        activations=(),
        extras={"drop_path": block.drop_path},
    )


def _zoo_block_parts(block: nn.Module) -> Optional[_BlockParts]:
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
    return _BlockParts(
        convs=tuple(getattr(block, f"conv{i}") for i in range(1, depth + 1)),
        norms=tuple(getattr(block, f"bn{i}") for i in range(1, depth + 1)),
        shortcut=block.downsample,
        activations=tuple(activations.values()),
        extras=extras,
    )


def block_parts(block: nn.Module) -> Optional[_BlockParts]:
    """The parts of a residual block this module knows, or None for anything else."""
    if isinstance(block, own_resnet.ResidualBlockBase):
        return _own_block_parts(block)
    if type(block).__name__ in ("BasicBlock", "Bottleneck"):
        return _zoo_block_parts(block)
    return None


def _keep_reason(parts: _BlockParts) -> Optional[str]:
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


def _refusal(parts: _BlockParts) -> Optional[str]:
    """What in a shape-preserving block a PNNH block cannot express, or None."""
    for conv in parts.convs:
        if conv.groups != 1:
            return f"grouped convolution (groups={conv.groups}, ResNeXt)"
        if max(conv.dilation) != 1:
            return f"dilated convolution (dilation={tuple(conv.dilation)})"
        if conv.bias is not None:
            return "convolution with a bias"
    if parts.kind == "basic" and parts.convs[0].kernel_size != parts.convs[1].kernel_size:
        return f"learner kernels differ ({parts.convs[0].kernel_size} and {parts.convs[1].kernel_size})"
    if parts.kind == "basic" and parts.convs[0].kernel_size[0] % 2 == 0:
        return f"even kernel {parts.convs[0].kernel_size}"
    for norm in parts.norms:
        if type(norm) is not nn.BatchNorm2d:
            return f"norm layer {type(norm).__name__} (PNNH blocks use BatchNorm2d)"
    for act in parts.activations:
        if not isinstance(act, nn.ReLU):
            return f"activation {type(act).__name__} (the converter maps ReLU blocks)"
    for name, module in parts.extras.items():
        if not _is_inactive(module):
            return f"{name} ({type(module).__name__}) has no PNNH counterpart"
    return None


def _plain_refusal(parts: _BlockParts) -> Optional[str]:
    """What a shape-changing block runs that its plain form (its layers, ReLU between) would drop, or None."""
    for act in parts.activations:
        if not isinstance(act, nn.ReLU):
            return f"activation {type(act).__name__} (the plain form applies ReLU)"
    for name, module in parts.extras.items():
        if not _is_inactive(module):
            return f"{name} ({type(module).__name__}) would be dropped by the plain form"
    return None


class PlainBlock(nn.Module):
    """A residual block with its shortcut removed: ``relu(norm(conv(x)))`` through each of its layers, the
    block's own convolutions and norms (weights included); what the ``pnnh_*`` families do at a stage change."""

    def __init__(self, parts: _BlockParts) -> None:
        super().__init__()
        self.convs = nn.ModuleList(parts.convs)
        self.norms = nn.ModuleList(parts.norms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = torch.relu(norm(conv(x)))
        return x


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
        return self.model

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


@dataclasses.dataclass
class _Options:
    hidden_ratio: Optional[float]
    coder_ratio: Optional[float]
    share_coder: bool
    slim: bool
    backend: str
    copy_weights: bool
    block_options: dict[str, Any]

    def widths(self, parts: _BlockParts, shared: Optional[PNNHCoder]) -> tuple[int, int]:
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


def _check_options(options: _Options) -> None:
    for name, ratio, absolute in (
        ("hidden_ratio", options.hidden_ratio, "hidden_channels"),
        ("coder_ratio", options.coder_ratio, "coder_channels"),
    ):
        if ratio is not None and not 0 < ratio <= 4:
            raise ValueError(f"{name} must lie in (0, 4], got {ratio}")
        if ratio is not None and absolute in options.block_options:
            raise ValueError(f"give {name} or {absolute}, not both")


def _copy_bn(target: nn.BatchNorm2d, source: nn.Module) -> None:
    target.load_state_dict(source.state_dict())
    target.eps, target.momentum = source.eps, source.momentum  # type: ignore[assignment]


def _build_basic(parts: _BlockParts, hidden: int, coder_width: int, coder, options: _Options) -> nn.Module:
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


def _build_bottleneck(parts: _BlockParts, hidden: int, coder_width: int, coder, options: _Options) -> nn.Module:
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


def _copy_learner(block: nn.Module, parts: _BlockParts) -> bool:
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


def _reset_zero_gamma(block: nn.Module) -> bool:
    """A zero-initialised last norm (timm's ``zero_init_last``) silences a branch that has no shortcut."""
    out_norm = _learner_layers(block)[1][-1]
    if out_norm.weight is None or bool(out_norm.weight.detach().any()):
        return False
    with torch.no_grad():
        out_norm.weight.fill_(1.0)
    return True


def _parameters_after(model: nn.Module, replacements: dict[str, nn.Module]) -> int:
    """Parameters once the replacements are in (shared ones counted once)."""
    replaced = {id(p) for name in replacements for p in model.get_submodule(name).parameters()}
    remaining = {id(p): p.numel() for p in model.parameters() if id(p) not in replaced}
    remaining.update({id(p): p.numel() for block in replacements.values() for p in block.parameters()})
    return sum(remaining.values())


def _widths(block: nn.Module) -> tuple[int, int]:
    """The learner and coder widths of a new PNNH block."""
    hidden = block.hidden_channels if isinstance(block, PNNHConv2d) else block.layer1[0].out_channels
    return hidden, block.coder.coder_channels


def _plan_blocks(
    model: nn.Module, plain_transitions: bool
) -> tuple[dict[str, _BlockParts], dict[str, tuple[_BlockParts, str]]]:
    convertible: dict[str, _BlockParts] = {}
    kept: dict[str, tuple[_BlockParts, str]] = {}
    refused: list[str] = []
    for name, module in model.named_modules():
        parts = block_parts(module)
        if parts is None:
            continue
        reason = _keep_reason(parts)
        if reason is not None:
            kept[name] = (parts, reason)
            refusal = _plain_refusal(parts) if plain_transitions else None
            if refusal is not None:
                refused.append(f"{name}: {refusal}")
            continue
        refusal = _refusal(parts)
        if refusal is not None:
            refused.append(f"{name}: {refusal}")
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


def _replacement(parts: _BlockParts, shared: Optional[PNNHCoder], options: _Options) -> nn.Module:
    hidden, coder_width = options.widths(parts, shared)
    build = _build_bottleneck if parts.kind == "bottleneck" else _build_basic
    return build(parts, hidden, coder_width, shared, options)


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
    options = _Options(hidden_ratio, coder_ratio, share_coder, slim, backend, copy_weights, block_options)
    _check_options(options)
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
    model: nn.Module, convertible: dict[str, _BlockParts], options: _Options
) -> tuple[dict[str, nn.Module], list[ConvertedBlock], list[str]]:
    """The PNNH block for each convertible block, what each is, and notes on the weights they took."""
    replacements: dict[str, nn.Module] = {}
    converted: list[ConvertedBlock] = []
    notes: list[str] = []
    shared: dict[str, PNNHCoder] = {}
    for name, parts in convertible.items():
        stage = name.rpartition(".")[0]
        block = _replacement(parts, shared.get(stage), options)
        if options.share_coder:
            shared.setdefault(stage, block.coder)
        block.train(model.get_submodule(name).training)
        copied = options.copy_weights and _copy_learner(block, parts)
        if copied and _reset_zero_gamma(block):
            notes.append(f"{name}: the last norm's weight was zero (zero-init of a residual branch); set to one")
        replacements[name] = block
        converted.append(ConvertedBlock(name, parts.kind, parts.channels[0], *_widths(block), copied))
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
