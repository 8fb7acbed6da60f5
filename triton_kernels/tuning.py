"""Block-size configurations for autotuning: a handful on a GPU (tuned for H100 in benchmarks/), one
under the interpreter, which cannot autotune over several. The interpreter's cost is per program and per
statement, not per element (numpy runs each tile operation whole), so its tile is 64 rows: half the
programs of 32-row tiles, with the tests' maps still spanning two or more tiles.

``PNNH_TRITON_AUTOTUNE=0`` keeps only the first GPU configuration of each kernel: every variant then
compiles once instead of once per configuration, which is what a correctness run on a GPU wants
(compiling costs ~40 s per block configuration there); benchmarks leave it on. On a GPU the tile each
shape chose is kept on disk with Triton's cache (``cache_results``, Triton 3.2 and later), so a training run,
or the next one, tunes each model shape once instead of at every start.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import triton

from .launch import interpreting

_INTERPRETER_ROWS = 64  #: the interpreter's tile height (BLOCK_M)


def autotuning() -> bool:
    return os.environ.get("PNNH_TRITON_AUTOTUNE", "1") not in ("", "0")


def persistent_tuning() -> dict[str, Any]:
    """``triton.autotune`` keywords that keep the chosen configuration on disk, where Triton can and it helps."""
    if interpreting() or "cache_results" not in inspect.signature(triton.autotune).parameters:
        return {}
    return {"cache_results": True}


def _cfg(num_warps: int = 4, num_stages: int = 3, **blocks) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def gemm_configs(m: str, n: str, k: str, gpu: list[tuple]) -> list[triton.Config]:
    """Configs over block names (m, n, k); ``gpu`` rows are (BM, BN, BK, warps, stages)."""
    if interpreting():
        return [_cfg(1, 1, **{m: _INTERPRETER_ROWS, n: 16, k: 16})]
    rows = gpu if autotuning() else gpu[:1]
    return [_cfg(w, s, **{m: bm, n: bn, k: bk}) for bm, bn, bk, w, s in rows]


def prune_by_width(n_arg: str, n_block: str, k_arg: str, k_block: str):
    """Drop configs whose N or K block is wider than the (power-of-two rounded) problem needs."""

    def prune(configs, named_args, **kwargs):
        def limit(arg):
            return max(16, triton.next_power_of_2(int(named_args[arg])))

        kept = [c for c in configs if c.kwargs[n_block] <= limit(n_arg) and c.kwargs[k_block] <= limit(k_arg)]
        if kept:
            return kept
        smallest = min(configs, key=lambda c: (c.kwargs[n_block], c.kwargs[k_block]))
        return [smallest]

    return prune
