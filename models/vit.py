"""Vision Transformers: the pre-norm ViT, the plain ViT (its residual additions removed), PNNH-ViT in which no
block adds its input back, and the slim PNNH-ViT (fewer parameters).

PNNH-ViT block (our reading; docs/MODELS.md):
- attention: the input rides an internal coder path beside the attention learner,
  ``y = LN_out(g * dec(LN_c(enc(x))) + drop_path(attn(LN_in(x))))``; literally, layer 1 carries
  ``ReLU([z_c, -z_c])`` next to the attention output and the projection decodes it with
  ``[W_d, -W_d]``; ReLU's odd part is the identity, so ``g = 1``.
- MLP: ``pnnh_kernels.PNNHLinear`` (GELU learner, layer norms, no final activation).
Stochastic depth still applies to the attention learner, which the coder path can stand in for.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pnnh_kernels import PNNHCoder, PNNHLinear
from pnnh_kernels.coder import guard_shared_parameters

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

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


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


class PNNHAttention(nn.Module):
    """Attention with an internal coder path instead of a residual addition."""

    def __init__(self, dim: int, heads: int, drop_path: float = 0.0, coder: Optional[PNNHCoder] = None) -> None:
        super().__init__()
        self.coder = coder if coder is not None else PNNHCoder(dim, dim, None)
        self.coder_norm = nn.LayerNorm(self.coder.coder_channels, eps=_LN_EPS)
        self.in_norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = Attention(dim, heads)
        self.out_norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        z_c = self.coder_norm(F.linear(x, self.coder.encoder))
        decoded = F.linear(z_c, self.coder.encoder.t())  # tied: the encoder's adjoint
        return self.out_norm(decoded + self.drop_path(self.attn(self.in_norm(x))))


class PNNHBlock(nn.Module):
    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, drop_path: float, backend: str,
        coders: tuple[Optional[PNNHCoder], Optional[PNNHCoder]] = (None, None),
    ) -> None:  # fmt: skip
        super().__init__()
        self.attn = PNNHAttention(dim, heads, drop_path, coder=coders[0])
        self.mlp = PNNHLinear(
            dim,
            hidden_features=int(dim * mlp_ratio),
            activation="gelu",
            final_activation=False,
            eps=_LN_EPS,
            backend=backend,
            coder=coders[1],
        )

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
        backend: str = "auto",
        coder_group: int = 0,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
        rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*_blocks(variant, dim, heads, mlp_ratio, rates, backend, coder_group))
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

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x)[:, 0])


VARIANTS = ("residual", "plain", "pnnh")


def _blocks(
    variant: str, dim: int, heads: int, mlp_ratio: float, rates: list[float], backend: str, coder_group: int
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
        blocks.append(PNNHBlock(dim, heads, mlp_ratio, rate, backend, coders))
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
