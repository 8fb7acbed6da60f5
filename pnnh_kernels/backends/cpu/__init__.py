"""The 'cpu' backend: :mod:`.backend` (when it serves a call), :mod:`.conv` and :mod:`.linear` (the ops)."""

from .backend import CpuBackend

__all__ = ["CpuBackend"]
