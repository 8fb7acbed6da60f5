"""Recording what a block's forward + backward issues: aten ops (through a TorchDispatchMode) and Triton
launches (counted at the interpreter's grid executor, whose own host copies are not the block's)."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: aten ops that launch no kernel: views, metadata, allocations
NO_KERNEL = frozenset(
    [
        "view",
        "_unsafe_view",
        "permute",
        "as_strided",
        "t",
        "transpose",
        "expand",
        "slice",
        "select",
        "unsqueeze",
        "squeeze",
        "reshape",
        "detach",
        "alias",
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "split",
        "split_with_sizes",
        "unbind",
        "narrow",
        "view_as",
        "lift_fresh",
        "_reshape_alias",
        "diagonal",
        "expand_as",
        "movedim",
        "sym_size",
        "sym_stride",
        "sym_numel",
    ]
)
#: aten ops that wait for the device (a value read back to the host) or allocate by value
HOST_SYNCS = frozenset(["_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "unique", "masked_select"])
#: aten ops that copy a tensor within its dtype (a layout change, when the tensor is a feature map)
COPIES = frozenset(["clone", "copy_", "_to_copy", "contiguous"])


class Recording:
    def __init__(self) -> None:
        self.ops: collections.Counter[str] = collections.Counter()
        self.triton_launches = 0
        self.copies: list[tuple[str, int]] = []  #: (op, elements) of every same-dtype copy

    def copies_of_at_least(self, elements: int) -> list[tuple[str, int]]:
        return [c for c in self.copies if c[1] >= elements]

    @property
    def aten_kernels(self) -> int:
        return sum(n for op, n in self.ops.items() if op not in NO_KERNEL)

    @property
    def launches(self) -> int:
        return self.aten_kernels + self.triton_launches

    @property
    def syncs(self) -> dict[str, int]:
        return {op: n for op, n in self.ops.items() if op in HOST_SYNCS}


class _Mode(TorchDispatchMode):
    def __init__(self, rec: Recording, paused: list[bool]) -> None:
        super().__init__()
        self.rec, self.paused = rec, paused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused[0]:
            name = func.overloadpacket.__name__
            self.rec.ops[name] += 1
            if name in COPIES and isinstance(out, torch.Tensor) and _same_dtype(args, out):
                self.rec.copies.append((name, out.numel()))
        return out


def _same_dtype(args: tuple, out: torch.Tensor) -> bool:
    first = args[0] if args else None
    return isinstance(first, torch.Tensor) and first.dtype == out.dtype


@contextlib.contextmanager
def recording() -> Iterator[Recording]:
    rec, paused = Recording(), [False]
    patched = None
    try:
        import triton.runtime.interpreter as interpreter

        patched = interpreter.GridExecutor.__call__

        def counted(self, *args, **kwargs):
            rec.triton_launches += 1
            paused[0] = True
            try:
                return patched(self, *args, **kwargs)
            finally:
                paused[0] = False

        interpreter.GridExecutor.__call__ = counted
    except ImportError:
        pass
    try:
        with _Mode(rec, paused):
            yield rec
    finally:
        if patched is not None:
            interpreter.GridExecutor.__call__ = patched


def training_step(block: torch.nn.Module, x: torch.Tensor, dy: Optional[torch.Tensor] = None) -> Recording:
    """Record one forward + backward (after a warm-up step, so caches and gradients exist) of
    ``block(x).sum()``, or of ``(block(x) * dy).sum()`` (a dense output gradient ``dy``: the sum's is an
    expanded scalar, which a fused backward copies into a dense map)."""
    x = x.detach().requires_grad_()

    def step() -> None:
        y = block(x)
        (y.sum() if dy is None else (y * dy).sum()).backward()

    step()
    with recording() as rec:
        step()
    return rec
