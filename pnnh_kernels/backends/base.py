"""What a backend is: one implementation of the PNNH block for some devices and dtypes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

from torch import Tensor

from ..block import BlockConfig, BlockNorms, BlockWeights

OPS = ("conv2d", "linear")


class Backend(ABC):
    """A way to compute the PNNH block. Subclasses say when they cannot serve a call, and why."""

    name: str = ""
    #: device types (``"cpu"``, ``"cuda"``) this backend computes on
    device_types: tuple[str, ...] = ()
    #: ``auto`` tries fused backends first, lower ``priority`` first
    fused: bool = False
    priority: int = 100

    def unavailable_reason(self) -> Optional[str]:
        """``None`` when the backend can run in this process, else why not (not built, not installed...)."""
        return None

    def unsupported_reason(self, op: str, x: Tensor, weights: BlockWeights, config: BlockConfig) -> Optional[str]:
        """``None`` when this call is within the backend's reach, else why not (device, dtype, option)."""
        if x.device.type not in self.device_types:
            return f"backend {self.name!r} runs on {'/'.join(self.device_types)} tensors, not {x.device.type}"
        return None

    def benchmarkable(self, x: Tensor) -> bool:
        """Whether measured ``auto`` (:mod:`.measured`) should time this backend on ``x``'s device."""
        return True

    def auto_skip_reason(self, op: str, x: Tensor, weights: BlockWeights, config: BlockConfig) -> Optional[str]:
        """Why ``auto`` should prefer another backend for this call although this one could serve it
        (a measured performance choice, not a limitation: ``auto`` skips it without a warning)."""
        return None

    @abstractmethod
    def conv2d(
        self, x: Tensor, weights: BlockWeights, norms: BlockNorms, config: BlockConfig, training: bool
    ) -> Tensor: ...

    @abstractmethod
    def linear(
        self, x: Tensor, weights: BlockWeights, norms: BlockNorms, config: BlockConfig, training: bool
    ) -> Tensor: ...
