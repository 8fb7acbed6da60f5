"""Vision Transformers: the pre-norm ViT, the plain ViT (its residual additions removed), PNNH-ViT in which no
block adds its input back, and the slim PNNH-ViT (fewer parameters).

PNNH-ViT block (our reading; docs/MODELS.md): each half is the pre-norm ViT's half with its residual addition
replaced by the tied coder path, ``y = dec(enc(x)) + drop_path(f(LN(x)))`` for ``f`` attention, then the MLP.
Literally, layer 1 carries ``act([z_c, -z_c])`` with ``z_c = W_e x`` beside the learner's hidden output and layer 2
decodes it with ``[W_e^T, -W_e^T]`` beside the learner's output projection; ReLU's and GELU's odd parts are the
identity, so the coder path is the matrix ``W_e^T W_e``, which the blocks compute once per call. No norm sits on
the coder path: a norm there re-normalises the carried input at every block, a post-norm Transformer, which
does not train at depth at the ViT's learning rate (docs/RESULTS.md). The coders learn at 0.03x the learning
rate (:meth:`VisionTransformer.lr_scales`): their maps compound over all blocks, and Adam moves each entry at the
full rate whatever its gradient's size.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pnnh_kernels import PNNHCoder
from pnnh_kernels.coder import guard_shared_parameters
from pnnh_kernels.deploy.folding import check_eval, linear_layer

from .layers import DropPath, drop_path_rates
from .registry import register_model

_LN_EPS = 1e-6


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.num_patches = img_size, (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def hidden(self, x: Tensor) -> Tensor:
        """The heads' outputs before the output projection."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.hidden(x))

    @property
    def out(self) -> nn.Linear:
        return self.proj


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def hidden(self, x: Tensor) -> Tensor:
        return F.gelu(self.fc1(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.hidden(x))

    @property
    def out(self) -> nn.Linear:
        return self.fc2


class ResidualBlock(nn.Module):
    """The pre-norm Transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS), nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn, self.mlp = Attention(dim, heads), Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PlainBlock(ResidualBlock):
    """The pre-norm block with both residual additions removed, nothing else changed: ``mlp(LN(attn(LN(x))))``
    (the failure the PNNH paper explains: the input does not survive depth)."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop_path(self.attn(self.norm1(x)))
        return self.drop_path(self.mlp(self.norm2(x)))


def coder_map(coder: PNNHCoder) -> Tensor:
    """The tied coder path ``dec(enc(.))`` as one matrix, ``W_e^T W_e``: one matrix product per token instead of
    two, and the same gradient."""
    return coder.encoder.t() @ coder.encoder


class PNNHHalf(nn.Module):
    """One half of a PNNH-ViT block: ``dec(enc(x)) + drop_path(learner(LN(x)))``."""

    _pnnh_reparameterizable = True  # pnnh_kernels.reparameterize_model makes it torch.nn layers
    #: the literal layer 1's activation over the signed coder pair (its odd part is the identity)
    signed_activation: type[nn.Module] = nn.ReLU

    def __init__(self, dim: int, learner: nn.Module, drop_path: float, coder: Optional[PNNHCoder]) -> None:
        super().__init__()
        if coder is not None and (coder.kernel_size is not None or not coder.tied or coder.in_channels != dim):
            raise ValueError(f"a PNNH-ViT coder must be a tied linear coder of {dim} channels")
        self.coder = coder if coder is not None else PNNHCoder(dim, dim, None)
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.learner = learner
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, coder_map(self.coder)) + self.drop_path(self.learner(self.norm(x)))

    def reparameterize(self, form: str = "fast") -> nn.Module:
        """This half (in eval mode) as torch.nn layers: ``fast``, the coder path as one ``nn.Linear``
        (``W_e^T W_e``) added to the learner's output; ``plain``, layer 2 as one ``nn.Linear`` over
        ``act([W_e x, -W_e x])`` and the learner's hidden output, no addition. Layer norm does not fold."""
        check_eval(self)
        return (PlainHalf if form == "plain" else FastHalf)(self)


class _Hidden(nn.Module):
    """A learner up to its output projection."""

    def __init__(self, learner: nn.Module) -> None:
        super().__init__()
        self.learner = learner

    def forward(self, x: Tensor) -> Tensor:
        return self.learner.hidden(x)


class FastHalf(nn.Module):
    """A PNNH-ViT half folded: ``coder(x) + learner(norm(x))``, the coder path one ``nn.Linear``."""

    def __init__(self, half: PNNHHalf) -> None:
        super().__init__()
        with torch.no_grad():
            self.coder = linear_layer(coder_map(half.coder), None, half.coder.encoder)
        self.norm, self.learner = copy.deepcopy(half.norm), copy.deepcopy(half.learner)

    def forward(self, x: Tensor) -> Tensor:
        return self.coder(x) + self.learner(self.norm(x))


class PlainHalf(nn.Module):
    """A PNNH-ViT half as two plain layers: ``layer2(cat[act(W_e x), act(-W_e x), hidden(norm x)])``."""

    def __init__(self, half: PNNHHalf) -> None:
        super().__init__()
        learner = copy.deepcopy(half.learner)
        out: nn.Linear = learner.out
        with torch.no_grad():
            enc = half.coder.encoder.detach()
            self.encoder = linear_layer(enc, None, enc)
            self.layer2 = linear_layer(torch.cat([enc.t(), -enc.t(), out.weight], 1), out.bias, enc)
        self.norm, self.hidden, self.activation = copy.deepcopy(half.norm), _Hidden(learner), half.signed_activation()

    def forward(self, x: Tensor) -> Tensor:
        z_c = self.encoder(x)
        return self.layer2(torch.cat([self.activation(z_c), self.activation(-z_c), self.hidden(self.norm(x))], -1))


class PNNHAttention(PNNHHalf):
    """Attention with an internal coder path instead of a residual addition."""

    def __init__(self, dim: int, heads: int, drop_path: float = 0.0, coder: Optional[PNNHCoder] = None) -> None:
        super().__init__(dim, Attention(dim, heads), drop_path, coder)


class PNNHMlp(PNNHHalf):
    """The MLP (GELU) with an internal coder path instead of a residual addition."""

    signed_activation = nn.GELU  # layer 1 is one GELU over the signed pair and the learner's hidden units

    def __init__(self, dim: int, hidden: int, drop_path: float = 0.0, coder: Optional[PNNHCoder] = None) -> None:
        super().__init__(dim, Mlp(dim, hidden), drop_path, coder)


class PNNHBlock(nn.Module):
    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, drop_path: float,
        coders: tuple[Optional[PNNHCoder], Optional[PNNHCoder]] = (None, None),
    ) -> None:  # fmt: skip
        super().__init__()
        self.attn = PNNHAttention(dim, heads, drop_path, coder=coders[0])
        self.mlp = PNNHMlp(dim, int(dim * mlp_ratio), drop_path, coder=coders[1])

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.attn(x))


class VisionTransformer(nn.Module):
    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        variant: str = "residual",
        drop_path_rate: float = 0.0,
        coder_group: int = 0,
        coder_lr_scale: Optional[float] = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.coder_lr_scale = _coder_lr_scale(variant, coder_lr_scale)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
        rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*_blocks(variant, dim, heads, mlp_ratio, rates, coder_group))
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.head = nn.Linear(dim, num_classes)
        self.num_features = dim
        self._init_weights()
        guard_shared_parameters(self)  # the slim net's shared coders: a state dict must agree on them

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):  # the coders keep their orthogonal init (they are no nn.Linear)
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate scales by parameter name, for the optimiser's groups (train/optim.py): the coders'."""
        return {name: self.coder_lr_scale for name, _ in self.named_parameters() if ".coder." in name}

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x)[:, 0])


VARIANTS = ("residual", "plain", "pnnh")
#: the PNNH-ViT's coders learn at this fraction of the learning rate (chosen on tuning seeds, docs/RESULTS.md)
CODER_LR_SCALE = 0.03


def _coder_lr_scale(variant: str, scale: Optional[float]) -> float:
    if scale is None:
        return CODER_LR_SCALE
    if variant != "pnnh":
        raise ValueError(f"coder_lr_scale is an option of the PNNH-ViTs, not of the {variant} ViT")
    if not (isinstance(scale, (int, float)) and 0 <= scale < float("inf")):
        raise ValueError(f"coder_lr_scale must be a finite number >= 0, got {scale!r}")
    return float(scale)


def _blocks(
    variant: str, dim: int, heads: int, mlp_ratio: float, rates: list[float], coder_group: int
) -> list[nn.Module]:
    """The blocks of a variant; ``coder_group > 0``: each run of that many PNNH blocks shares one attention
    coder and one MLP coder (the slim PNNH-ViT)."""
    if variant == "residual":
        return [ResidualBlock(dim, heads, mlp_ratio, r) for r in rates]
    if variant == "plain":
        return [PlainBlock(dim, heads, mlp_ratio, r) for r in rates]
    blocks: list[nn.Module] = []
    for i, rate in enumerate(rates):
        if coder_group and i % coder_group == 0:
            coders: tuple[Optional[PNNHCoder], Optional[PNNHCoder]] = (
                PNNHCoder(dim, dim, None),
                PNNHCoder(dim, dim, None),
            )
        elif not coder_group:
            coders = (None, None)
        blocks.append(PNNHBlock(dim, heads, mlp_ratio, rate, coders))
    return blocks


_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
#: the slim PNNH-ViT: an MLP learner as wide as the block (ratio 1 instead of 4) and one attention and one MLP
#: coder per group of 4 blocks: about 0.54x the ViT's block parameters (docs/MODELS.md)
_SLIM = {"mlp_ratio": 1.0, "coder_group": 4}


def _register(variant: str, prefix: str, defaults: Optional[dict] = None) -> None:
    for size, (dim, heads) in _SIZES.items():

        def build(dim=dim, heads=heads, **kwargs):
            kwargs.setdefault("depth", 12)
            for key, value in (defaults or {}).items():
                kwargs.setdefault(key, value)
            return VisionTransformer(dim=dim, heads=heads, variant=variant, **kwargs)

        build.__name__ = f"{prefix}vit_{size}"
        build.__doc__ = (
            f"ViT-{size[0].upper()} (dim {dim}, {heads} heads), {prefix.rstrip('_') or variant}; "
            "img_size/patch_size/depth/dim/heads adjustable."
        )
        register_model("vit")(build)


_register("residual", "")
_register("plain", "plain_")
_register("pnnh", "pnnh_")
_register("pnnh", "pnnh_slim_", _SLIM)
