"""The deploy benchmark's nets: built once here for the timed rows, the interleaved targets and the peak-memory
child process alike."""

from __future__ import annotations

from typing import Callable

import torch

from pnnh_kernels import reparameterize_model
from pnnh_kernels.models import create_model


def deployed_model(name: str, how: str) -> torch.nn.Module:
    """``name`` (seeded, eval mode) as trained (``how="trained"``) or reparameterized into the form ``how``."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    return model if how == "trained" else reparameterize_model(model, form=how)


def eager_call(model: torch.nn.Module, x: torch.Tensor, compiled: bool = False) -> Callable[[], torch.Tensor]:
    """A no-grad inference call of ``model`` on ``x``, both channels_last (eager's fastest CPU layout); with
    ``compiled``, of ``torch.compile(model)``."""
    model = model.to(memory_format=torch.channels_last)
    run_model = torch.compile(model) if compiled else model
    x = x.contiguous(memory_format=torch.channels_last)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return run_model(x)

    return run
