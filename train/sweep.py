"""Depth sweep: train plain, ResNet, PNNH (and TAT) nets at several depths; accuracy vs depth and parameters."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from collections.abc import Sequence

from .analysis import write_table
from .plots import plot_sweep
from .trainer import TrainConfig, train

FAMILY_MODELS = {
    "plain": "plain_resnet{}",
    "resnet": "resnet{}",
    "pnnh": "pnnh_resnet{}",
    "pnnh_slim": "pnnh_slim_resnet{}",
    "tat": "tat_vanilla{}",
}
#: vanilla nets have no batch norm: the step size a BN net takes blows them up. TAT-110 on digits, SGD,
#: 15 epochs, seed 0 (docs/RESULTS.md): 92.8% at lr 0.004 (0.08x the default 0.05), 76.0% at 0.01
FAMILY_LR_SCALE = {"tat": 0.08}


def _run_one(base: TrainConfig, family: str, depth: int, seed: int, out_dir: str) -> dict:
    name = FAMILY_MODELS[family].format(depth)
    config = dataclasses.replace(
        base,
        model=name,
        seed=seed,
        out_dir=os.path.join(out_dir, f"{name}-seed{seed}"),
        lr=base.lr * FAMILY_LR_SCALE.get(family, 1.0),
        resume=None,
    )
    result = train(config)
    final = result["final"]
    return {
        "family": family,
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


def run_sweep(
    base: TrainConfig, families: list[str], depths: list[int], out_dir: str, seeds: Sequence[int] = (0,)
) -> list[dict]:
    """Train every family at every depth with every seed; writes sweep.csv (one row a run),
    sweep_summary.csv (mean and spread over the seeds), sweep.json and sweep.png. Returns the summary."""
    unknown = set(families) - set(FAMILY_MODELS)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; choose from {sorted(FAMILY_MODELS)}")
    rows: list[dict] = []
    for depth in depths:
        for family in families:
            for seed in seeds:
                rows.append(_run_one(base, family, depth, seed, out_dir))
                write_table(rows, os.path.join(out_dir, "sweep.csv"))  # partial results survive an interruption
    summary = summarize(rows)
    write_table(summary, os.path.join(out_dir, "sweep_summary.csv"))
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(
            {"config": dataclasses.asdict(base), "seeds": list(seeds), "runs": rows, "summary": summary}, f, indent=2
        )
    plot_sweep(summary, os.path.join(out_dir, "sweep.png"))
    return summary
