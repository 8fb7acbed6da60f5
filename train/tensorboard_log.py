"""``--tensorboard``: the run's metrics as TensorBoard scalars, beside metrics.jsonl.

Epoch metrics go under ``train/``, ``test/`` and ``speed/`` at the epoch number; the step loss and learning
rate under ``step/`` at the global step. A resumed run appends to the same folder, continuing the steps.
"""

from __future__ import annotations

import importlib.util
import os

MISSING = "--tensorboard needs the tensorboard package (pip install tensorboard)"

_EPOCH_TAGS = {
    "train_loss": "train/loss",
    "train_acc": "train/acc",
    "test_loss": "test/loss",
    "test_acc": "test/acc",
    "lr": "train/lr",
    "images_per_s": "speed/images_per_s",
    "epoch_time_s": "speed/epoch_time_s",
}


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """One SummaryWriter in ``<out_dir>/tensorboard``."""

    def __init__(self, out_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def step(self, global_step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("step/loss", loss, global_step)
        self.writer.add_scalar("step/lr", lr, global_step)

    def epoch(self, record: dict) -> None:
        for key, tag in _EPOCH_TAGS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
