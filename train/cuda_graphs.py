"""A whole training step (forward, loss, backward, optimizer step) captured once as a CUDA graph and
replayed for every full-size batch (``pnnh-train --cuda-graphs``): the step's hundreds of kernel launches
become one, which is what bounds a small network's step on a GPU.

The capture follows PyTorch's whole-network recipe: a few ordinary steps first (cuDNN's algorithm choice,
the optimizer's state, the allocator), gradients set to None, then one step recorded into the graph with
static input and target tensors that every later batch is copied into. The learning rate lives in a tensor
the scheduler fills in place, so the recorded optimizer step follows the schedule. Batches of another size
(an epoch's last) run as ordinary steps on the same parameters.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

#: ordinary steps before the capture
WARMUP_STEPS = 3


def refusal(
    device: torch.device, distributed: bool, feature_reuse: bool, amp: str, compile: bool, clip_grad: bool = False
) -> Optional[str]:
    """Why a run cannot capture its step in a CUDA graph, or None."""
    if device.type != "cuda":
        return f"--cuda-graphs needs a CUDA device, not {device}"
    if distributed:
        return "--cuda-graphs does not capture DDP steps (run one process, or leave it off)"
    if feature_reuse:
        return "--cuda-graphs cannot capture --feature-reuse: its steps change which blocks run"
    if amp == "fp16":
        return "--cuda-graphs cannot capture fp16's gradient scaler (it reads inf checks on the host); use --amp bf16"
    if clip_grad:
        return "--cuda-graphs does not capture --clip-grad (its recorded step has no clipping)"
    if compile:
        return "--cuda-graphs with --compile: use --compile --compile-mode reduce-overhead instead (torch.compile's own graphs)"
    return None


def graph_ready_optimizer(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Learning rates as device tensors (the scheduler fills them in place, the recorded step reads them),
    and the optimizer's capturable / fused implementation, which reads them without a host sync."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
        if "capturable" in group:
            group["capturable"] = True
        elif "fused" in group:
            group["fused"] = True
            group["foreach"] = False


class GraphedStep:
    """``step(x, y) -> (output, loss)``: ordinary steps until warmed up, then the captured graph for every
    batch shaped like the one it was captured with."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        autocast: Any,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
    ) -> None:
        self.model, self.optimizer, self.autocast, self.loss_fn = model, optimizer, autocast, loss_fn
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.shapes: Optional[tuple[torch.Size, torch.Size]] = None
        self.warm = 0
        self.static: dict[str, Tensor] = {}

    def _eager(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with self.autocast:
            out = self.model(x)
            loss = self.loss_fn(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return out, loss

    def _capture(self, x: Tensor, y: Tensor) -> None:
        self.static = {"x": x.clone(), "y": y.clone()}
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            with self.autocast:
                out = self.model(self.static["x"])
                loss = self.loss_fn(out, self.static["y"])
            loss.backward()
            self.optimizer.step()
        self.static.update(out=out, loss=loss)
        self.shapes = (x.shape, y.shape)

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.shapes is not None and (x.shape, y.shape) == self.shapes:
            self.static["x"].copy_(x)
            self.static["y"].copy_(y)
            assert self.graph is not None
            self.graph.replay()
            return self.static["out"], self.static["loss"]
        if self.shapes is not None or self.warm < WARMUP_STEPS:
            self.warm += 1
            return self._eager(x, y)  # warm-up, or a batch of another size
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # capture off the default stream, as the recipe asks
            self._capture(x, y)
        torch.cuda.current_stream().wait_stream(side)
        return self.step(x, y)  # the captured step has not run yet: replay it on this batch
