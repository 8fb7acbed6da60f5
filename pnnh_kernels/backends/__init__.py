"""Backends of the PNNH block and the dispatch between them."""

from .base import Backend
from .cpu import CpuBackend
from .cuda import CudaBackend
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

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "available_backends",
    "check_backend_name",
    "choose_backend",
    "refusal_reason",
    "register_backend",
    "registered_backends",
    "select_backend",
]
