"""How much of the input survives each layer ("dissipating inputs").

Per layer (block output) of a network, on a batch of inputs:
- ``surviving``: the fraction of neurons that are positive (alive after the ReLU);
- ``cka``: linear CKA (Kornblith et al. 2019) between the layer's features and the input;
- ``reconstruction_r2``: R^2 of a ridge-regression probe that reconstructs the input from the layer's
  features, fitted on one half of the batch and scored on the other.
The PNNH paper measured DISTS; these are cheaper measures of the same question.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable

import torch
from torch import Tensor, nn


def _layers(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "stages"):
        return [model.stem] + [b for stage in model.stages for b in stage]
    if hasattr(model, "convs"):
        return list(model.convs)
    if hasattr(model, "blocks"):
        return [model.patch_embed, *list(model.blocks)]
    raise ValueError(f"do not know the layers of {type(model).__name__}")


@torch.no_grad()
def layer_features(model: nn.Module, x: Tensor) -> list[Tensor]:
    """The output of every block (vanilla nets: every activation), flattened per sample."""
    outputs: list[Tensor] = []
    layers = _layers(model)
    act = getattr(model, "act", None)
    hooks = [layer.register_forward_hook(lambda m, i, o: outputs.append(o)) for layer in layers]
    try:
        model.eval()
        model(x)
    finally:
        for h in hooks:
            h.remove()
    if act is not None and hasattr(model, "convs"):  # vanilla nets: the activation follows each conv
        outputs = [act(o) for o in outputs]
    return [o.flatten(1).double() for o in outputs]


def _centred_gram(z: Tensor) -> Tensor:
    z = z - z.mean(0, keepdim=True)
    return z @ z.t()


def linear_cka(a: Tensor, b: Tensor) -> float:
    """Linear CKA between two feature matrices with samples as rows (1: same up to rotation and scale)."""
    ka, kb = _centred_gram(a.double()), _centred_gram(b.double())
    return float((ka * kb).sum() / (ka.norm() * kb.norm()).clamp_min(1e-30))


def reconstruction_r2(features: Tensor, target: Tensor, ridge: float = 0.1) -> float:
    """Held-out R^2 of a kernel ridge probe (linear kernel) from ``features`` to ``target``."""
    n = features.shape[0] // 2
    f_mean, t_mean = features[:n].mean(0), target[:n].mean(0)
    f_train, f_test = features[:n] - f_mean, features[n:] - f_mean
    t_train, t_test = target[:n] - t_mean, target[n:] - t_mean
    gram = f_train @ f_train.t()
    scale = gram.diagonal().mean().clamp_min(1e-30)
    alpha = torch.linalg.solve(gram + ridge * scale * torch.eye(n, dtype=gram.dtype), t_train)
    prediction = f_test @ f_train.t() @ alpha
    sst = t_test.pow(2).sum().clamp_min(1e-30)
    return float(1.0 - (prediction - t_test).pow(2).sum() / sst)


def analyse(model: nn.Module, x: Tensor) -> list[dict]:
    """One row per layer: index, relative depth, surviving fraction, CKA and reconstruction R^2 to the input."""
    inputs = x.flatten(1).double()
    feats = layer_features(model, x)
    rows = []
    for i, f in enumerate(feats):
        rows.append(
            {
                "layer": i,
                "relative_depth": i / max(1, len(feats) - 1),
                "surviving": float((f > 0).double().mean()),
                "cka": linear_cka(f, inputs),
                "reconstruction_r2": reconstruction_r2(f, inputs),
            }
        )
    return rows


def write_table(rows: Iterable[dict], path: str) -> None:
    rows = list(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
