"""Import torchvision / timm for the zoo tests, or skip them cleanly.

Both are optional. CI's zoo stage (``.ci/zoo``) sets ``PNNH_REQUIRE_ZOO=1`` so that a missing or broken
install fails there instead of skipping.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def import_zoo(name: str, module_level: bool = True) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as error:  # torchvision's wheel beside a CPU-only torch fails with RuntimeError
        if os.environ.get("PNNH_REQUIRE_ZOO") == "1":
            raise
        reason = "is not installed" if isinstance(error, ModuleNotFoundError) else f"does not import ({error})"
        pytest.skip(f"{name} {reason}; the zoo tests run in CI's zoo stage (.ci/zoo)", allow_module_level=module_level)
