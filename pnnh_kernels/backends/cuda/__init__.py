"""The 'cuda' backend: :mod:`.backend` (when it serves a call) and :mod:`.conv` (the op)."""

from .backend import CudaBackend

__all__ = ["CudaBackend"]
