"""ResNets, their plain counterparts (shortcuts removed) and their PNNH counterparts.

Three variants share one skeleton:
- ``residual``: the ResNet as everyone knows it (CIFAR: option-A identity shortcuts, He et al. 2016;
  ImageNet: projection shortcuts where the shape changes, torchvision's v1.5 layout).
- ``plain``: the same layers with every shortcut removed.
- ``pnnh``: every stride-1 block whose input and output shapes agree becomes a PNNH block
  (``pnnh_kernels.PNNHConv2d`` for basic blocks, :class:`PNNHBottleneck` for bottlenecks); the block
  that changes the shape (stride 2 or a channel change) stays as the *plain* block, so that nothing is
  ever added across a block (the PNNH paper's figure 2; our reading in docs/MODELS.md).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pnnh_kernels import PNNHCoder, PNNHConv2d
from pnnh_kernels.coder import guard_shared_parameters
from pnnh_kernels.deploy.conv import FastBlock
from pnnh_kernels.deploy.folding import (
    affine_of,
    batch_norm_params,
    check_eval,
    conv_layer,
    fold_conv_bn,
    scaled_rows,
)

from .layers import DropPath, conv_bn, drop_path_rates, global_pool
from .registry import register_model

VARIANTS = ("residual", "plain", "pnnh")


class OptionAShortcut(nn.Module):
    """CIFAR ResNet's parameter-free shortcut: subsample, then zero-pad the new channels."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, out_ch - in_ch

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


def _shortcut(kind: str, in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    if kind == "A":
        return OptionAShortcut(in_ch, out_ch, stride)
    return conv_bn(in_ch, out_ch, 1, stride)


class ResidualBlockBase(nn.Module):
    """``relu(shortcut(x) + branch(x))`` or, without a shortcut, ``relu(branch(x))``.

    ``skip = True`` drops the whole branch for the batch (stochastic depth as Huang et al. define it,
    used by the feature-reuse trainer); ``drop_path`` is timm's per-sample version.
    """

    def __init__(self, shortcut: Optional[nn.Module], drop_path: float) -> None:
        super().__init__()
        self.shortcut = shortcut
        self.drop_path = DropPath(drop_path) if shortcut is not None else nn.Identity()
        self.skip = False

    @property
    def residual(self) -> bool:
        return self.shortcut is not None

    def branch(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        # The addition and activations run in place on the branch's fresh tensors, as torchvision's blocks do:
        # the block's fastest plain-PyTorch form (the baseline the PNNH nets are measured against).
        if self.shortcut is None:
            return F.relu(self.branch(x), inplace=True)
        identity = self.shortcut(x)  # may be x itself: never written
        if self.skip:
            return F.relu(identity)
        out = self.drop_path(self.branch(x))
        out += identity  # in the branch's dtype (under autocast the convolutions' dtype), as torchvision's
        return F.relu(out, inplace=True)


class BasicBlock(ResidualBlockBase):
    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, shortcut: Optional[str] = "A", drop_path: float = 0.0):
        super().__init__(None if shortcut is None else _shortcut(shortcut, in_ch, out_ch, stride), drop_path)
        self.layer1 = conv_bn(in_ch, out_ch, 3, stride)
        self.layer2 = conv_bn(out_ch, out_ch, 3)

    def branch(self, x: Tensor) -> Tensor:
        return self.layer2(F.relu(self.layer1(x), inplace=True))


class Bottleneck(ResidualBlockBase):
    expansion = 4

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, shortcut: Optional[str] = "B", drop_path: float = 0.0):
        super().__init__(None if shortcut is None else _shortcut(shortcut, in_ch, out_ch, stride), drop_path)
        width = out_ch // self.expansion
        self.layer1 = conv_bn(in_ch, width, 1)
        self.layer2 = conv_bn(width, width, 3, stride)
        self.layer3 = conv_bn(width, out_ch, 1)

    def branch(self, x: Tensor) -> Tensor:
        return self.layer3(F.relu(self.layer2(F.relu(self.layer1(x), inplace=True)), inplace=True))


class PNNHBottleneck(nn.Module):
    """A stride-1 bottleneck as a PNNH block: the coder rides beside a three-layer learner.

    Literal form: every plain layer carries ``[z_c, -z_c]`` next to the learner's channels (layer 2
    passes the coder through unchanged), and layer 3 decodes with ``[W_d, -W_d]``. Algebraically
    (``ReLU(a) - ReLU(-a) = a``) that is

        y = [ReLU](BN_3(dec(BN_c(enc(x))) + conv1x1(ReLU(BN_2(conv3x3(ReLU(BN_1(conv1x1(x)))))))))

    which is what runs here (pure PyTorch; the fused kernels cover the two-layer block). The final ReLU
    is off by default, as in the PNNH models' basic blocks (docs/MODELS.md says why).
    """

    def __init__(
        self,
        channels: int,
        coder: Optional[PNNHCoder] = None,
        final_activation: bool = False,
        hidden_channels: Optional[int] = None,
        coder_channels: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.final_activation = final_activation
        width = hidden_channels or channels // Bottleneck.expansion
        if coder is not None and coder_channels not in (None, coder.coder_channels):
            raise ValueError(
                f"coder_channels={coder_channels} disagrees with the shared coder's {coder.coder_channels}"
            )
        self.coder = coder if coder is not None else PNNHCoder(channels, coder_channels or channels, 1)
        self.coder_norm = nn.BatchNorm2d(self.coder.coder_channels)
        self.layer1 = conv_bn(channels, width, 1)
        self.layer2 = conv_bn(width, width, 3)
        self.layer3 = nn.Conv2d(width, channels, 1, bias=False)
        nn.init.kaiming_normal_(self.layer3.weight, mode="fan_out", nonlinearity="relu")
        self.out_norm = nn.BatchNorm2d(channels)

    _pnnh_reparameterizable = True  # pnnh_kernels.reparameterize_model folds it

    def forward(self, x: Tensor) -> Tensor:
        z_c = self.coder_norm(F.conv2d(x, self.coder.encoder))
        decoded = F.conv_transpose2d(z_c, self.coder.encoder)
        learned = self.layer3(F.relu(self.layer2(F.relu(self.layer1(x)))))
        y = self.out_norm(decoded + learned)
        return F.relu(y) if self.final_activation else y

    def reparameterize(self, form: str = "fast") -> nn.Module:
        """This block (in eval mode) as plain torch.nn layers, every batch norm folded: ``fast`` is the
        learner's three convolutions plus the coder path as one 1x1 convolution of x; ``plain`` is its
        literal form, three convolutions with the signed coder copies ``[z_c, -z_c]`` carried through layer
        2 (an identity centre tap) and decoded by ``[W_d, -W_d]``, ReLU between, no addition."""
        check_eval(self)
        return reparameterize_bottleneck(self, form)


def reparameterize_bottleneck(block: PNNHBottleneck, form: str) -> nn.Module:
    """:meth:`PNNHBottleneck.reparameterize`: y = A_3(D A_c W_e x + W_3 relu(A_2 W_2 relu(A_1 W_1 x)))."""
    like = block.layer3.weight
    w1, b1 = fold_conv_bn(*block.layer1)
    w2, b2 = fold_conv_bn(*block.layer2)
    w3, b3 = fold_conv_bn(block.layer3, block.out_norm)
    encoder = block.coder.encoder.detach()  # [Cc, C, 1, 1], no bias
    coder = affine_of(batch_norm_params(block.coder_norm), encoder.shape[0], block.coder_norm.eps, like)
    enc_w, enc_b = scaled_rows(encoder, coder.scale), coder.shift
    s3 = affine_of(batch_norm_params(block.out_norm), w3.shape[0], block.out_norm.eps, like).scale
    dec = scaled_rows(encoder[:, :, 0, 0].t(), s3)  # the tied decoder (the encoder's adjoint), A_3 folded
    final = nn.ReLU() if block.final_activation else nn.Identity()
    if form == "fast":
        learner = nn.Sequential(conv_layer(w1, b1, like), nn.ReLU(), conv_layer(w2, b2, like))
        coder = conv_layer((dec @ enc_w[:, :, 0, 0])[:, :, None, None], None, like)
        return FastBlock(learner, nn.ReLU(), conv_layer(w3, b3 + dec @ enc_b, like), final, coder_map=coder)
    width, cc, k = w1.shape[0], enc_w.shape[0], w2.shape[-1]
    layer1 = conv_layer(torch.cat([w1, enc_w, -enc_w]), torch.cat([b1, enc_b, -enc_b]), like)
    middle = w2.new_zeros(width + 2 * cc, width + 2 * cc, k, k)
    middle[:width, :width] = w2
    middle[width:, width:, k // 2, k // 2] = torch.eye(2 * cc, dtype=w2.dtype, device=w2.device)  # copies pass
    layer2 = conv_layer(middle, torch.cat([b2, b2.new_zeros(2 * cc)]), like)
    layer3 = conv_layer(torch.cat([w3, dec[:, :, None, None], -dec[:, :, None, None]], dim=1), b3, like)
    last = [] if isinstance(final, nn.Identity) else [final]
    return nn.Sequential(layer1, nn.ReLU(), layer2, nn.ReLU(), layer3, *last)


def check_width_ratios(
    hidden_ratio: Optional[float], coder_ratio: Optional[float], options: dict, spelled: str = "{}"
) -> None:
    """Width ratios lie in (0, 4] and are not given beside the absolute width they set (``options`` holds the
    absolute ones, named in the message as ``spelled`` formats them)."""
    for name, ratio, absolute in (
        ("hidden_ratio", hidden_ratio, "hidden_channels"),
        ("coder_ratio", coder_ratio, "coder_channels"),
    ):
        if ratio is not None and not 0 < ratio <= 4:
            raise ValueError(f"{name} must lie in (0, 4], got {ratio}")
        if ratio is not None and absolute in options:
            raise ValueError(f"give {name} or {spelled.format(absolute)}, not both")


class _Slimming:
    """Per-stage learner and coder widths of PNNH blocks: ``hidden_ratio`` of the learner's natural width
    (a basic block's width, a bottleneck's inner width) and ``coder_ratio`` of the block width, or the
    absolute ``hidden_channels`` / ``coder_channels`` of ``pnnh_options`` (the same in every stage)."""

    def __init__(self, expansion: int, hidden_ratio: Optional[float], coder_ratio: Optional[float], options: dict):
        check_width_ratios(hidden_ratio, coder_ratio, options, spelled="pnnh_options[{!r}]")
        self.expansion, self.hidden_ratio, self.coder_ratio, self.base = expansion, hidden_ratio, coder_ratio, options

    def options(self, channels: int) -> dict:
        options = dict(self.base)
        if self.hidden_ratio is not None:
            options["hidden_channels"] = max(1, round(self.hidden_ratio * channels / self.expansion))
        if self.coder_ratio is not None:
            options["coder_channels"] = max(1, round(self.coder_ratio * channels))
        return options


class ResNet(nn.Module):
    """A ResNet skeleton: stem, stages of blocks, global pooling, classifier."""

    def __init__(
        self,
        block: str,
        layers: list[int],
        widths: list[int],
        *,
        stem: str,
        variant: str = "residual",
        num_classes: int = 10,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        share_coder: bool = False,
        hidden_ratio: Optional[float] = None,
        coder_ratio: Optional[float] = None,
        pnnh_options: Optional[dict] = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if drop_path_rate and variant != "residual":
            raise ValueError("drop_path_rate applies to residual models only (nothing to fall back on otherwise)")
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        self.variant, self.num_classes = variant, num_classes
        if stem == "cifar":
            self.stem = nn.Sequential(conv_bn(in_chans, widths[0], 3), nn.ReLU(inplace=True))
            in_ch, shortcut = widths[0], "A"
        else:
            self.stem = nn.Sequential(conv_bn(in_chans, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
            in_ch, shortcut = 64, "B"

        slimming = _Slimming(block_cls.expansion, hidden_ratio, coder_ratio, pnnh_options or {})
        rates = iter(drop_path_rates(drop_path_rate, sum(layers)))
        stages = []
        for stage_index, (count, width) in enumerate(zip(layers, widths)):
            out_ch = width * block_cls.expansion
            coder = None
            blocks = []
            for i in range(count):
                stride = 2 if (i == 0 and stage_index > 0) else 1
                rate = next(rates)
                if variant == "pnnh" and stride == 1 and in_ch == out_ch:
                    options = slimming.options(out_ch)
                    if share_coder and coder is None:
                        coder = PNNHCoder(out_ch, options.get("coder_channels", out_ch), 1)
                    blocks.append(self._pnnh_block(block, out_ch, coder if share_coder else None, options, backend))
                else:
                    sc = shortcut if variant == "residual" else None
                    blocks.append(block_cls(in_ch, out_ch, stride, shortcut=sc, drop_path=rate))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = in_ch
        self.head = nn.Linear(in_ch, num_classes)
        guard_shared_parameters(self)  # a state dict must not load several coders into one shared one

    @staticmethod
    def _pnnh_block(block: str, channels: int, coder, options, backend) -> nn.Module:
        # No ReLU after the block's last norm by default: batch norm centres the coder path, and a ReLU
        # there would drop half of what it carries at every block (docs/MODELS.md, docs/RESULTS.md).
        options = {"final_activation": False, **(options or {})}
        if coder is not None:  # a shared coder brings its own width (checked against an explicit one)
            width = options.pop("coder_channels", coder.coder_channels)
            if width != coder.coder_channels:
                raise ValueError(f"coder_channels={width} disagrees with the shared coder's {coder.coder_channels}")
        if block == "bottleneck":
            extra = set(options) - {"final_activation", "hidden_channels", "coder_channels"}
            if extra:
                raise ValueError(
                    f"PNNH bottleneck blocks take final_activation, hidden_channels and coder_channels, not {sorted(extra)}"
                )
            return PNNHBottleneck(channels, coder, **options)
        return PNNHConv2d(channels, coder=coder, backend=backend, **options)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(global_pool(self.forward_features(x)))


def _cifar(depth: int, variant: str, **kwargs) -> ResNet:
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
    n = (depth - 2) // 6
    kwargs.setdefault("num_classes", 10)
    return ResNet("basic", [n, n, n], [16, 32, 64], stem="cifar", variant=variant, **kwargs)


_IMAGENET = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3])}


def _imagenet(depth: int, variant: str, **kwargs) -> ResNet:
    block, layers = _IMAGENET[depth]
    kwargs.setdefault("num_classes", 1000)
    return ResNet(block, layers, [64, 128, 256, 512], stem="imagenet", variant=variant, **kwargs)


def _register_family(variant: str, prefix: str, defaults: Optional[dict] = None, what: str = "") -> None:
    family = {"residual": "resnet", "plain": "plain", "pnnh": "pnnh"}[variant]
    what = what or variant
    for depth in (8, 20, 32, 44, 56, 110):

        def build(depth=depth, **kwargs):
            return _cifar(depth, variant, **{**(defaults or {}), **kwargs})

        build.__name__ = f"{prefix}resnet{depth}"
        build.__doc__ = f"CIFAR-style {what} ResNet-{depth} (3 stages of 16/32/64 channels)."
        register_model(family)(build)
    for depth in _IMAGENET:
        imagenet_defaults = dict(defaults or {})
        if defaults and _IMAGENET[depth][0] == "bottleneck":
            imagenet_defaults.update(SLIM_BOTTLENECK)

        def build(depth=depth, imagenet_defaults=imagenet_defaults, **kwargs):
            return _imagenet(depth, variant, **{**imagenet_defaults, **kwargs})

        build.__name__ = f"{prefix}resnet{depth}"
        build.__doc__ = f"ImageNet-style {what} ResNet-{depth}."
        register_model(family)(build)


#: the slim PNNH nets: learners of half the stage width, one coder per stage; about half a ResNet's
#: parameters (docs/MODELS.md)
SLIM = {"hidden_ratio": 0.5, "share_coder": True}
#: and for bottlenecks a coder of the inner width: a coder as wide as the block (2048 channels in the last
#: stage) costs as much as the bottleneck's three convolutions together
SLIM_BOTTLENECK = {"coder_ratio": 0.25}

_register_family("residual", "")
_register_family("plain", "plain_")
_register_family("pnnh", "pnnh_")
_register_family("pnnh", "pnnh_slim_", SLIM, "slim PNNH")

__all__ = ["VARIANTS", "BasicBlock", "Bottleneck", "OptionAShortcut", "PNNHBottleneck", "ResNet"]
