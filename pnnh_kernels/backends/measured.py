"""``auto`` by measurement, like ``torch.backends.cudnn.benchmark``.

With :func:`set_auto_benchmark` on (or ``PNNH_AUTO_BENCHMARK=1`` in the environment), the first
``backend="auto"`` call of each signature (op, device, dtype, autocast dtype, shape bucket, memory format,
weight shapes, block options, training, whether gradients flow) times every backend that can compute it
(forward, and backward where gradients flow) and keeps the fastest for every later call of that
signature. Sizes are bucketed by powers of two (:func:`shape_bucket`: batch, map or token count), and a
block times at most ``MAX_BUCKETS_PER_BLOCK`` buckets; past that, new buckets take the static choice. The static rules of :func:`~.registry.select_backend` ("measured slower on an H100", "too
small to pay for the fused passes") decide when it is off, and inside ``torch.compile`` tracing or CUDA
graph capture, where nothing may be timed (a signature measured before keeps its choice there).

The trials run on copies of the input, weights and running statistics: the caller's tensors, gradients
and running statistics are untouched. A backend that fails its trial (a kernel that does not compile, an
out-of-memory) is left out and the reason kept in :func:`measured_choices`. Like cuDNN's benchmark mode,
choices can differ between runs and processes when two backends time within noise of each other; the
backends agree to rounding, not bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any, Callable, NamedTuple, Optional, cast

import torch
from torch import Tensor

from ..block import BlockConfig, BlockNorms, BlockWeights, NormParams
from ..validation import autocast_enabled
from .base import Backend
from .geometry import is_channels_last

#: timed repetitions per backend, after one untimed warm-up (compilation, autotuning, primitive caches)
REPEATS = 3
#: new shape buckets timed per block (its weights, options and mode); later new buckets take the static choice
MAX_BUCKETS_PER_BLOCK = 16

_enabled = os.environ.get("PNNH_AUTO_BENCHMARK", "0").lower() in ("1", "true", "yes")


class Choice(NamedTuple):
    """The outcome of one signature's trials: the winner, each backend's best seconds, the failures."""

    backend: str
    seconds: dict[str, float]
    failures: dict[str, str]


_choices: dict[tuple, Choice] = {}
_buckets_timed: dict[tuple, int] = {}  # per block signature (the shape left out): buckets timed so far


def set_auto_benchmark(enabled: bool) -> None:
    """Turn measured ``auto`` dispatch on or off (off by default; ``PNNH_AUTO_BENCHMARK=1`` turns it on)."""
    global _enabled
    _enabled = bool(enabled)


def auto_benchmark_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def auto_benchmark(enabled: bool = True) -> Iterator[None]:
    """Measured ``auto`` dispatch on (or off) inside a ``with`` block only."""
    before = _enabled
    set_auto_benchmark(enabled)
    try:
        yield
    finally:
        set_auto_benchmark(before)


def measured_choices() -> dict[tuple, Choice]:
    """Every signature measured so far in this process, with its outcome."""
    return dict(_choices)


def clear_measured_choices() -> None:
    _choices.clear()
    _buckets_timed.clear()


def _needs_grad(x: Tensor, weights: BlockWeights) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in weights))


def _bucket(size: int) -> int:
    """The power of two at or above ``size``: shapes within a factor of two share one measurement."""
    return 1 << max(0, size - 1).bit_length()


def shape_bucket(op: str, x: Tensor) -> tuple:
    """What of the input's shape a measurement is kept for: the channels exactly; the batch and the map
    (conv) or the token count (linear) by power-of-two bucket, so a workload of varying sizes (sequence
    lengths, last batches, image sizes) times each bucket once instead of every size."""
    if op == "conv2d" and x.dim() == 4:
        n, c, h, w = x.shape
        return (_bucket(n), c, _bucket(h), _bucket(w))
    tokens = x.numel() // max(1, x.shape[-1])
    return (_bucket(tokens), x.shape[-1])


def _block_signature(op: str, x: Tensor, weights: BlockWeights, config: BlockConfig, training: bool) -> tuple:
    """Every property of a call that can change which backend wins, but the input's size."""
    device = x.device.type
    autocast = torch.get_autocast_dtype(device) if autocast_enabled(device) else None
    channels_last = is_channels_last(x)
    shapes = tuple(None if t is None else tuple(t.shape) for t in weights)
    return (op, str(x.device), x.dtype, autocast, channels_last, shapes, config, training, _needs_grad(x, weights))


def signature(op: str, x: Tensor, weights: BlockWeights, config: BlockConfig, training: bool) -> tuple:
    """What a measured choice is kept for: the block's signature and the input's shape bucket."""
    return (*_block_signature(op, x, weights, config, training), shape_bucket(op, x))


def may_time(op: str, x: Tensor, weights: BlockWeights, config: BlockConfig, training: bool) -> bool:
    """Whether a new bucket of this block may still be timed (at most MAX_BUCKETS_PER_BLOCK are)."""
    return _buckets_timed.get(_block_signature(op, x, weights, config, training), 0) < MAX_BUCKETS_PER_BLOCK


def can_measure() -> bool:
    """False while torch.compile traces or a CUDA graph is captured: timing would break either."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _trial_tensor(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None:
        return None
    return t.detach().clone().requires_grad_(t.requires_grad)


def _trial_norms(norms: BlockNorms) -> BlockNorms:
    def copy(p: Optional[NormParams]) -> Optional[NormParams]:
        return None if p is None else NormParams(*(_trial_tensor(t) for t in p))

    return BlockNorms(copy(norms.coder), copy(norms.learner), copy(norms.out))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(step: Callable[[], None], device: torch.device) -> float:
    step()  # warm-up
    _synchronize(device)
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        step()
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _trial_step(
    backend: Backend, op: str, x: Tensor, weights: BlockWeights, norms: BlockNorms, config: BlockConfig, training: bool
) -> Callable[[], None]:
    """One forward (+ backward where gradients flow) of ``backend`` on copies of the call's tensors."""
    xs = _trial_tensor(x)
    ws = BlockWeights._make(cast(Iterable[Any], [_trial_tensor(t) for t in weights]))
    ns = _trial_norms(norms)
    run = getattr(backend, op)

    def step() -> None:
        y = run(xs, ws, ns, config, training)
        if y.requires_grad:
            y.backward(torch.ones_like(y))

    return step


def measure(
    candidates: list[Backend],
    op: str,
    x: Tensor,
    weights: BlockWeights,
    norms: BlockNorms,
    config: BlockConfig,
    training: bool,
) -> Choice:
    """Time each candidate on this call and remember the fastest for its signature."""
    seconds: dict[str, float] = {}
    failures: dict[str, str] = {}
    for backend in candidates:
        try:
            seconds[backend.name] = _best_seconds(
                _trial_step(backend, op, x, weights, norms, config, training), x.device
            )
        except Exception as error:  # a failed trial rules the backend out; the call itself still runs
            failures[backend.name] = f"{type(error).__name__}: {error}"
    if not seconds:
        raise RuntimeError(f"pnnh_kernels: no backend completed a trial of this {op} call: {failures}")
    choice = Choice(min(seconds, key=seconds.__getitem__), seconds, failures)
    _choices[signature(op, x, weights, config, training)] = choice
    block = _block_signature(op, x, weights, config, training)
    _buckets_timed[block] = _buckets_timed.get(block, 0) + 1
    return choice


def known_choice(op: str, x: Tensor, weights: BlockWeights, config: BlockConfig, training: bool) -> Optional[str]:
    choice = _choices.get(signature(op, x, weights, config, training))
    return None if choice is None else choice.backend
