"""Feature reuse through droppath + freeze iterations (our reading of arXiv 2411.09475; docs/TRAINING.md).

Type-1 iteration: a random set of residual blocks is dropped for the whole batch (stochastic depth as
Huang et al. 2016 define it: the block outputs its shortcut); every parameter that took part learns.
Type-2 iteration, right after it: the full network runs, and only the blocks dropped in the type-1
iteration learn; all other parameters are frozen for that step (they stay in the forward pass and pass
gradients through, but their gradients are discarded so the optimiser leaves them, and their
momentum, untouched). ``every = k`` runs a type-1/type-2 pair after each ``k - 1`` ordinary steps
(``k = 1``: strict alternation).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

NORMAL, TYPE1, TYPE2 = "normal", "type1", "type2"


def droppable_blocks(model: nn.Module) -> list[nn.Module]:
    """Residual blocks that can be dropped whole (they expose ``skip`` and have a shortcut)."""
    return [m for m in model.modules() if hasattr(m, "skip") and getattr(m, "residual", False)]


class FeatureReuse:
    def __init__(self, model: nn.Module, drop_rate: float, every: int = 1, seed: int = 0) -> None:
        if not 0.0 < drop_rate < 1.0:
            raise ValueError(f"feature-reuse drop rate must lie in (0, 1), got {drop_rate}")
        if every < 1:
            raise ValueError(f"feature-reuse interval must be >= 1, got {every}")
        self.blocks = droppable_blocks(model)
        if not self.blocks:
            raise ValueError("feature reuse needs a residual model (blocks with shortcuts to fall back on)")
        self.model, self.drop_rate, self.every = model, drop_rate, every
        self.generator = torch.Generator().manual_seed(seed)
        self.dropped: Optional[list[int]] = None  # indices dropped by the last type-1, awaiting type-2
        self._steps = 0

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def state_dict(self) -> dict:
        """Where the schedule stands (a run stopped mid-epoch continues from it)."""
        return {"generator": self.generator.get_state(), "dropped": self.dropped, "steps": self._steps}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.dropped, self._steps = state["dropped"], state["steps"]

    def _sample(self) -> list[int]:
        mask = torch.rand(len(self.blocks), generator=self.generator) < self.drop_rate
        if not mask.any():  # a type-2 step with nothing to train would be a wasted batch
            mask[torch.randint(len(self.blocks), (1,), generator=self.generator)] = True
        return mask.nonzero().flatten().tolist()

    def begin_step(self) -> str:
        """Decide this step's kind and set the blocks' ``skip`` flags for its forward pass."""
        if self.dropped is not None:
            return TYPE2
        self._steps += 1
        if self._steps % self.every:
            return NORMAL
        self.dropped = self._sample()
        for i in self.dropped:
            self.blocks[i].skip = True
        return TYPE1

    def filter_gradients(self, kind: str) -> None:
        """After backward: in a type-2 step, discard the gradients of everything not dropped before."""
        if kind != TYPE2:
            return
        learning = {id(p) for i in self.dropped for p in self.blocks[i].parameters()}
        for p in self.model.parameters():
            if id(p) not in learning:
                p.grad = None

    def end_step(self, kind: str) -> None:
        if kind == TYPE1:
            for i in self.dropped:
                self.blocks[i].skip = False
        elif kind == TYPE2:
            self.dropped = None
