"""Optimisers with the usual weight-decay rule, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and kernels; never biases, norm affine parameters, tokens or position embeddings. A model
    with ``lr_scales()`` (parameter name -> factor, the PNNH-ViT's coders) gets a group per factor, each with its
    ``lr_scale``; decaying groups come first and say ``decay: True``."""
    scales = model.lr_scales() if callable(getattr(model, "lr_scales", None)) else {}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.dim() <= 1 or name.endswith(("cls_token", "pos_embed")))
        groups.setdefault((decays, float(scales.get(name, 1.0))), []).append(p)
    for decays in (True, False):  # the usual pair stays even when empty: checkpoints keep their group count
        groups.setdefault((decays, 1.0), [])
    order = sorted(groups, key=lambda key: (not key[0], key[1] != 1.0, key[1]))
    return [
        {"params": groups[key], "weight_decay": weight_decay if key[0] else 0.0, "decay": key[0], "lr_scale": key[1]}
        for key in order
    ]


def make_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9, nesterov: bool = True
):
    groups = parameter_groups(model, weight_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


class WarmupCosine:
    """Multiplier for LambdaLR: linear warm-up over ``warmup`` steps, then cosine down to ``final``."""

    def __init__(self, total_steps: int, warmup_steps: int, final: float = 0.0) -> None:
        self.total, self.warmup, self.final = max(1, total_steps), max(0, warmup_steps), final

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, total_steps: int, warmup_steps: int, final: float = 0.0):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, final))
