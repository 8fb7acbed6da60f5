"""Backend dispatch, in one place.

``backend="auto"`` tries the fused backends that serve the tensor's device in their static ``priority``
order (lowest first; a backend measured slower for a call skips itself, ``auto_skip_reason``), and falls
back to the pure-PyTorch ``eager`` backend (the algebraic reference) with a warning given once per
reason. With measured dispatch on (:mod:`.measured`), :func:`choose_backend` times the candidates on the
first call of each signature instead. Naming a backend explicitly never falls back: it runs that backend
or raises :class:`BackendUnavailableError` saying why.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType
from typing import Optional

import torch
from torch import Tensor

from ..block import BlockConfig, BlockNorms, BlockWeights
from . import measured
from .base import OPS, Backend

FALLBACK = "eager"

_registry: dict[str, Backend] = {}
_warned: set[str] = set()


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot compute this call (not built, not installed, or not applicable)."""


def register_backend(backend: Backend) -> Backend:
    """Add a backend under ``backend.name`` (replacing one of that name)."""
    if not backend.name:
        raise ValueError("a backend needs a name")
    _registry[backend.name] = backend
    return backend


def registered_backends() -> dict[str, Backend]:
    return dict(_registry)


def available_backends() -> list[str]:
    """Names of the backends that can run in this process (whatever the device)."""
    return [name for name, b in _registry.items() if b.unavailable_reason() is None]


def refusal_reason(backend: Backend, op: str, x: Tensor, weights: BlockWeights, config: BlockConfig) -> Optional[str]:
    """Why ``backend`` cannot compute this call (not available here, or not applicable), or None."""
    return backend.unavailable_reason() or backend.unsupported_reason(op, x, weights, config)


_INTERNAL_DIRS = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    os.path.dirname(os.path.abspath(torch.__file__)),
)


def _user_stacklevel() -> int:
    """The stack level of the first caller outside pnnh_kernels and torch (where the warning belongs)."""
    frame: Optional[FrameType] = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=_user_stacklevel())


def check_backend_name(requested: str) -> str:
    """``requested`` if it names ``auto`` or a registered backend, else a ValueError listing the choices."""
    if requested != "auto" and requested not in _registry:
        known = ", ".join(["auto", *sorted(_registry)])
        raise ValueError(f"unknown backend {requested!r}; choose one of: {known}")
    return requested


def select_backend(requested: str, op: str, x: Tensor, weights: BlockWeights, config: BlockConfig) -> Backend:
    """The backend that computes ``op`` for this call."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    if check_backend_name(requested) != "auto":
        backend = _registry[requested]
        reason = refusal_reason(backend, op, x, weights, config)
        if reason is not None:
            raise BackendUnavailableError(f"backend {requested!r} cannot compute this {op} call: {reason}")
        return backend

    candidates = sorted(
        (b for b in _registry.values() if b.fused and x.device.type in b.device_types),
        key=lambda b: b.priority,
    )
    reasons, chose_eager = [], False
    for backend in candidates:
        reason = refusal_reason(backend, op, x, weights, config)
        if reason is None:
            if backend.auto_skip_reason(op, x, weights, config) is None:
                return backend
            chose_eager = True  # it could serve, but measured slower here: eager is a choice, not a fallback
            continue
        reasons.append(f"{backend.name}: {reason}")
    if candidates and (chose_eager or not reasons):
        return _registry[FALLBACK]
    why = "; ".join(reasons) if reasons else f"no fused backend serves {x.device.type} tensors"
    _warn_once(f"pnnh_kernels: falling back to the pure-PyTorch '{FALLBACK}' backend for {op} ({why})")
    return _registry[FALLBACK]


def choose_backend(
    requested: str, op: str, x: Tensor, weights: BlockWeights, norms: BlockNorms, config: BlockConfig, training: bool
) -> Backend:
    """:func:`select_backend`, or for ``auto`` with measured dispatch on the fastest backend timed on
    this call's signature (timed now if it is new and timing is possible)."""
    if requested != "auto" or not measured.auto_benchmark_enabled():
        return select_backend(requested, op, x, weights, config)
    known = measured.known_choice(op, x, weights, config, training)
    if known is not None:
        return _registry[known]  # a measured signature: the static rules are not consulted again
    static = select_backend(requested, op, x, weights, config)
    if not measured.can_measure() or not measured.may_time(op, x, weights, config, training):
        return static
    fused = [
        b
        for b in sorted(_registry.values(), key=lambda b: b.priority)
        if b.fused and x.device.type in b.device_types and b.benchmarkable(x)
        and refusal_reason(b, op, x, weights, config) is None
    ]  # fmt: skip
    if not fused:
        return static
    choice = measured.measure([*fused, _registry[FALLBACK]], op, x, weights, norms, config, training)
    return _registry[choice.backend]
