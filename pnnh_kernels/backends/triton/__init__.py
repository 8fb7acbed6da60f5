"""The 'triton' backend: :mod:`.backend` (when it serves a call), :mod:`.conv` and :mod:`.linear` (the
ops; they import triton, so they load only when used)."""

from .backend import TritonBackend

__all__ = ["TritonBackend"]
