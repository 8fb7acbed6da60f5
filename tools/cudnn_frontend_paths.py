"""Where the cudnn-frontend and cuDNN headers are, for setup.py and the compile check (no torch import).

PyPI's nvidia-cudnn-frontend installs its headers as ``<site-packages>/include/cudnn_frontend.h``; PyPI's
nvidia-cudnn-cu* (torch's CUDA wheels depend on it) as ``<site-packages>/nvidia/cudnn/include/cudnn.h``.
``CUDNN_FRONTEND_INCLUDE`` and ``CUDNN_INCLUDE`` name other folders.
"""

from __future__ import annotations

import contextlib
import os
import site
import sysconfig
from typing import Optional


def _site_dirs() -> list[str]:
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    with contextlib.suppress(AttributeError):  # a virtualenv's old site module has no getsitepackages
        dirs += site.getsitepackages()
    return list(dict.fromkeys(dirs))


def _first_with(header: str, candidates: list[str]) -> Optional[str]:
    return next((d for d in candidates if d and os.path.isfile(os.path.join(d, header))), None)


def frontend_include() -> Optional[str]:
    candidates = [os.environ.get("CUDNN_FRONTEND_INCLUDE", "")] + [os.path.join(d, "include") for d in _site_dirs()]
    return _first_with("cudnn_frontend.h", candidates)


def cudnn_include(cuda_home: Optional[str] = None) -> Optional[str]:
    candidates = [os.environ.get("CUDNN_INCLUDE", "")]
    candidates += [os.path.join(d, "nvidia", "cudnn", "include") for d in _site_dirs()]
    candidates += [os.path.join(cuda_home, "include")] if cuda_home else []
    return _first_with("cudnn.h", candidates)
