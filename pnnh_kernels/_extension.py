"""Finding the compiled kernels: the module built at install time, or a first-use build.

``pip install --no-build-isolation .`` compiles ``pnnh_kernels._C``. An isolated ``pip install .`` cannot
see torch at build time and installs no binary; the C++ sources ship inside the package (``_csrc/``) and
are compiled here on first use with ``torch.utils.cpp_extension.load`` (cached in TORCH_EXTENSIONS_DIR).
``PNNH_NO_JIT=1`` turns that off; ``PNNH_NO_EXTENSION=1`` ignores compiled kernels altogether.
"""

from __future__ import annotations

import glob
import os
import sys
from types import ModuleType
from typing import Any, Optional

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _source_dir() -> Optional[str]:
    for candidate in (os.path.join(_PACKAGE_DIR, "_csrc"), os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc")):
        if os.path.isfile(os.path.join(candidate, "bindings.cpp")):
            return candidate
    return None


def cxx_standard() -> str:
    """The C++ standard torch's headers need: C++20 from torch 2.14 (ATen refuses C++17 there), else C++17."""
    import torch

    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return "c++20" if (major, minor) >= (2, 14) else "c++17"


def _jit_build() -> ModuleType:
    from torch.utils.cpp_extension import load

    src = _source_dir()
    if src is None:
        raise ImportError("the C++ sources are not installed (no pnnh_kernels/_csrc)")
    sources = [os.path.join(src, "bindings.cpp"), *sorted(glob.glob(os.path.join(src, "cpu", "*.cpp")))]
    print(
        "pnnh_kernels: loading the C++ kernels (compiled on first use, about a minute, then cached)",
        file=sys.stderr,
        flush=True,
    )
    return load(
        name="pnnh_kernels_C",
        sources=sources,
        extra_cflags=["-O3", f"-std={cxx_standard()}", "-fopenmp", "-fno-trapping-math"],  # the same flags as setup.py
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


_loaded: Optional[tuple[Optional[ModuleType], Optional[str]]] = None


def _load() -> tuple[Optional[ModuleType], Optional[str]]:
    """Load (or build) once; later calls return the same answer (a plain global: torch.compile traces it)."""
    global _loaded
    if _loaded is None:
        _loaded = _find()
    return _loaded


def _find() -> tuple[Optional[ModuleType], Optional[str]]:
    if os.environ.get("PNNH_NO_EXTENSION") == "1":
        return None, "compiled kernels disabled by PNNH_NO_EXTENSION=1"
    try:
        from . import _C  # type: ignore[attr-defined,unused-ignore]

        return _C, None
    except ImportError as exc:
        built_error = str(exc)
    if os.environ.get("PNNH_NO_JIT") == "1":
        return None, f"the C++ extension was not built at install time ({built_error}) and PNNH_NO_JIT=1"
    try:
        return _jit_build(), None
    except Exception as exc:  # a missing compiler, headers, ...: report, never crash the import
        return None, f"the C++ extension is not built and compiling it failed: {exc}"


def extension() -> Any:
    """The compiled kernels module (untyped: pybind11), or None (see :func:`extension_error`)."""
    return _load()[0]


def extension_error() -> Optional[str]:
    """Why the compiled kernels are unavailable, or None when they load."""
    return _load()[1]
