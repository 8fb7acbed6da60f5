"""Depth sweep: train plain, ResNet, PNNH (and TAT) nets at several depths; accuracy vs depth and parameters."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from collections.abc import Sequence
from typing import Optional

from .analysis import write_table
from .plots import plot_sweep
from .trainer import RunFolderTaken, TrainConfig, train


@dataclasses.dataclass(frozen=True)
class Family:
    """A sweep row's model (``{}`` takes the depth) and its recipe: a learning-rate scale on ``--lr`` and
    training options on top of the sweep's own (drop path, feature reuse)."""

    model: str
    lr_scale: float = 1.0
    options: tuple[tuple[str, object], ...] = ()
    #: the model's own options; a model name without ``{}`` takes the depth as its ``depth`` option (the ViTs)
    model_options: tuple[tuple[str, object], ...] = ()

    def model_name_and_options(self, depth: int) -> tuple[str, dict]:
        if "{}" in self.model:
            return self.model.format(depth), dict(self.model_options)
        return self.model, {**dict(self.model_options), "depth": depth}


#: Each family's learning-rate scale on --lr (0.05 by default) is the best mean test accuracy over depths 56
#: and 110 in a grid of 0.1-2.0x on the 300-image digits setting, tuning seeds 0 and 1 (docs/RESULTS.md): a
#: ResNet takes 0.2x (0.01; 0.4x and up diverge at depth 110), the PNNH nets 1.0x, plain nets 0.4x (nothing
#: trains them), vanilla TAT nets, with no batch norm, 0.08x (0.004). The feature-reuse rows are ResNets
#: trained three more ways: timm-style drop path, and droppath + freeze iterations at two settings
#: (docs/TRAINING.md), with the ResNet's recipe.
RESNET_LR = 0.2
FAMILIES = {
    "plain": Family("plain_resnet{}", lr_scale=0.4),
    "resnet": Family("resnet{}", lr_scale=RESNET_LR),
    "resnet_droppath": Family("resnet{}", RESNET_LR, options=(("drop_path_rate", 0.1),)),
    "resnet_reuse": Family("resnet{}", RESNET_LR, options=(("feature_reuse", True), ("reuse_drop_rate", 0.2))),
    "resnet_reuse_every4": Family(
        "resnet{}", RESNET_LR, options=(("feature_reuse", True), ("reuse_drop_rate", 0.2), ("reuse_every", 4))
    ),
    "pnnh": Family("pnnh_resnet{}"),
    "pnnh_slim": Family("pnnh_slim_resnet{}"),
    "tat": Family("tat_vanilla{}", lr_scale=0.08),
}
#: The Transformer rows (issue #29): small ViTs for the 8x8 digits (dim 64, 4 heads, 2x2 patches: 16 tokens and
#: the class token), trained as ViTs are, AdamW with a 2-epoch warm-up and weight decay 0.05, and without the
#: digits' random 1-pixel shifts: a shift moves every pixel across a 2x2 patch boundary, and with it a ViT of
#: depth 6 reached 43% in 400 steps where it reaches 92% without (docs/RESULTS.md). Their sweep runs 30 epochs
#: (``--epochs 30``: in 15, depth 24 was a coin toss for the ViT itself). Each family's learning rate is the best
#: mean test accuracy over depths 12 and 24 on seeds 0 and 1 in a grid of 5e-4 to 4e-3 at 30 epochs
#: (docs/RESULTS.md): 1e-3 for the ViT and the PNNH-ViT, 2e-3 for the slim PNNH-ViT; the PNNH-ViTs' coders at
#: 0.03x (chosen from 0.01, 0.03 and 0.1); the plain ViT stays at chance at every rate and takes the ViT's.
_VIT = (("dim", 64), ("heads", 4), ("patch_size", 2))
_VIT_RECIPE = (("optimizer", "adamw"), ("warmup_epochs", 2.0), ("weight_decay", 0.05), ("augment", False))
_VIT_LR = {"vit": 0.02, "plain_vit": 0.02, "pnnh_vit": 0.02, "pnnh_slim_vit": 0.04}  # x 0.05: 1e-3 and 2e-3
for _name, _scale in _VIT_LR.items():
    FAMILIES[_name] = Family(f"{_name}_tiny", lr_scale=_scale, options=_VIT_RECIPE, model_options=_VIT)


def _run_one(base: TrainConfig, family_name: str, depth: int, seed: int, out_dir: str, lr_scale: float) -> dict:
    family = FAMILIES[family_name]
    name, model_options = family.model_name_and_options(depth)
    config = dataclasses.replace(
        base,
        model=name,
        model_options={**base.model_options, **model_options},
        seed=seed,
        out_dir=os.path.join(out_dir, f"{family_name}{depth}-seed{seed}"),
        lr=base.lr * lr_scale,
        resume=None,
        **dict(family.options),
    )
    try:
        result = train(config)
    except RunFolderTaken as taken:  # a sweep has no --resume: its advice is sweep's own
        raise ValueError(
            f"{taken.folder} already holds a run of an earlier sweep ({', '.join(taken.existing)}); replace the "
            "sweep's runs with --overwrite, or choose another --out-dir"
        ) from taken
    final = result["final"]
    return {
        "family": family_name,
        "depth": depth,
        "seed": seed,
        "model": name,
        "parameters": result["parameters"],
        "test_acc": final["test_acc"],
        "best_test_acc": result["best_test_acc"],
        "train_loss": final["train_loss"],
        "images_per_s": final["images_per_s"],
        "lr": config.lr,
    }


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (family, depth): mean and standard deviation over the seeds."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["depth"]), []).append(r)
    out = []
    for (family, depth), runs in groups.items():
        row = {"family": family, "depth": depth, "model": runs[0]["model"], "seeds": len(runs)}
        row["parameters"] = runs[0]["parameters"]
        for key in ("test_acc", "best_test_acc", "images_per_s"):
            values = [r[key] for r in runs]
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(row)
    return out


def parse_lr_scales(items: Sequence[str]) -> dict[str, float]:
    """``["resnet=0.4", "tat=0.1"]`` -> learning-rate scales that replace the families' own."""
    scales = {}
    for item in items:
        family, sep, value = item.partition("=")
        try:
            scale = float(value) if sep else float("nan")
        except ValueError:
            scale = float("nan")
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"--lr-scales takes FAMILY=POSITIVE_NUMBER, got {item!r}")
        scales[family] = scale
    return scales


def run_sweep(
    base: TrainConfig,
    families: list[str],
    depths: list[int],
    out_dir: str,
    seeds: Sequence[int] = (0,),
    lr_scales: Optional[dict[str, float]] = None,
) -> list[dict]:
    """Train every family at every depth with every seed; writes sweep.csv (one row a run),
    sweep_summary.csv (mean and spread over the seeds), sweep.json and sweep.png. Returns the summary.
    ``lr_scales`` replaces the families' own learning-rate scales."""
    lr_scales = lr_scales or {}
    unknown = (set(families) | set(lr_scales)) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; choose from {sorted(FAMILIES)}")
    rows: list[dict] = []
    for depth in depths:
        for family in families:
            for seed in seeds:
                scale = lr_scales.get(family, FAMILIES[family].lr_scale)
                rows.append(_run_one(base, family, depth, seed, out_dir, scale))
                write_table(rows, os.path.join(out_dir, "sweep.csv"))  # partial results survive an interruption
    summary = summarize(rows)
    write_table(summary, os.path.join(out_dir, "sweep_summary.csv"))
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(
            {"config": dataclasses.asdict(base), "seeds": list(seeds), "runs": rows, "summary": summary}, f, indent=2
        )
    plot_sweep(summary, os.path.join(out_dir, "sweep.png"))
    return summary
