"""Depth sweep: train plain, ResNet, PNNH (and TAT) nets at several depths; accuracy vs depth and parameters."""

from __future__ import annotations

import dataclasses
import json
import os

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
#: vanilla nets have no batch norm: the step size a BN net takes would blow them up
FAMILY_LR_SCALE = {"tat": 0.2}


def run_sweep(base: TrainConfig, families: list[str], depths: list[int], out_dir: str) -> list[dict]:
    unknown = set(families) - set(FAMILY_MODELS)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; choose from {sorted(FAMILY_MODELS)}")
    rows = []
    for depth in depths:
        for family in families:
            name = FAMILY_MODELS[family].format(depth)
            config = dataclasses.replace(
                base,
                model=name,
                out_dir=os.path.join(out_dir, name),
                lr=base.lr * FAMILY_LR_SCALE.get(family, 1.0),
                resume=None,
            )
            result = train(config)
            final = result["final"]
            rows.append(
                {
                    "family": family,
                    "depth": depth,
                    "model": name,
                    "parameters": result["parameters"],
                    "test_acc": final["test_acc"],
                    "best_test_acc": result["best_test_acc"],
                    "train_loss": final["train_loss"],
                    "images_per_s": final["images_per_s"],
                    "lr": config.lr,
                }
            )
            write_table(rows, os.path.join(out_dir, "sweep.csv"))  # partial results survive an interruption
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(base), "rows": rows}, f, indent=2)
    plot_sweep(rows, os.path.join(out_dir, "sweep.png"))
    return rows
