"""Backends of the PNNH block and the dispatch between them."""

from .base import Backend
from .cpu import CpuBackend
from .cuda import CudaBackend
from .fused import FusedBackend
from .registry import (
    BackendUnavailableError,
    available_backends,
    check_backend_name,
    choose_backend,
    refusal_reason,
    register_backend,
    registered_backends,
    select_backend,
)
from .triton import TritonBackend
from .unfused import EagerBackend, ReferenceBackend

register_backend(ReferenceBackend())
register_backend(EagerBackend())
register_backend(CpuBackend())
register_backend(CudaBackend())
register_backend(TritonBackend())


def register_ops() -> None:
    """Define every fused backend's custom ops (what ``torch.export.load`` of a saved program needs)."""
    for backend in registered_backends().values():
        if isinstance(backend, FusedBackend):
            backend.register_ops()


__all__ = [
    "Backend",
    "BackendUnavailableError",
    "available_backends",
    "check_backend_name",
    "choose_backend",
    "refusal_reason",
    "register_backend",
    "register_ops",
    "registered_backends",
    "select_backend",
]
