"""Compile every Triton kernel the `triton` backend launches for a CUDA GPU, on a machine without one.

    python tools/compile_triton_kernels.py [--arch 90] [--dtypes float32 bfloat16] [--configs 1] [--quick]

Runs PNNHConv2d and PNNHLinear blocks (training: forward and backward; eval: forward) on the `triton`
backend with CPU tensors, while Triton believes it targets ``sm_<arch>``: each launch compiles its
kernel through Triton's whole pipeline (Python front end, TTIR, TTGIR, LLVM, PTX, ptxas) and is then
skipped, not run, so the tensors hold garbage and only compilation is checked. That catches what the
interpreter (``TRITON_INTERPRET=1``, how the tests run the kernels) does not: globals that are not
constexpr, dtype and layout rules of the GPU compiler, register and shared-memory limits at ptxas.
An autotuned kernel compiles its first ``--configs`` configurations (after pruning).

Prints one JSON line: the compiled kernels with their seconds (all specialisations together), the five
slowest compilations and the failures. Exit code 1 when a kernel failed to compile. Must run without ``TRITON_INTERPRET`` (under it Triton builds no compiler).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_triton_kernels: unset TRITON_INTERPRET (the interpreter builds no compiler)")

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import autotuner, jit
from triton.runtime.driver import driver

import pnnh_kernels as pk
from pnnh_kernels.backends.triton import backend as triton_backend


class _TargetOnlyDriver:
    """What JITFunction.run asks of a driver before it compiles: a device, a stream, the target."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


class _Recorder:
    """Patches Triton so that a launch compiles and returns, and an autotuner compiles its first
    configurations instead of timing them; records (kernel, seconds) and failures."""

    def __init__(self, configs: int) -> None:
        self.configs = configs
        self.launches: list[tuple[str, float]] = []  #: (kernel, seconds) per compiled specialisation
        self.failures: dict[str, str] = {}

    def install(self) -> None:
        compile_only = jit.JITFunction.run
        recorder = self

        def run(fn: jit.JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            name = fn.fn.__name__
            start = time.perf_counter()
            try:
                kernel = compile_only(fn, *args, grid=grid, warmup=True, **kwargs)
            except Exception as error:  # every failure is reported, the other kernels still compile
                recorder.failures[name] = "".join(traceback.format_exception_only(error)).strip()[-2000:]
                return None
            recorder.launches.append((name, time.perf_counter() - start))
            return kernel

        def tuned_run(tuner: autotuner.Autotuner, *args: Any, **kwargs: Any) -> None:
            tuner.nargs = dict(zip(tuner.arg_names, args))
            for config in tuner.prune_configs(kwargs)[: recorder.configs]:
                tuner.fn.run(*args, **{**kwargs, **config.all_kwargs()})

        jit.JITFunction.run = run
        autotuner.Autotuner.run = tuned_run


def _step(block: torch.nn.Module, x: torch.Tensor, training: bool) -> None:
    block.train(training)
    x = x.detach().requires_grad_(training)
    y = block(x)
    if training:
        y.backward(torch.ones_like(y))


def _blocks(dtype: torch.dtype, quick: bool) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """Blocks that together launch every kernel; ``quick``: one conv block and one linear block (every
    kernel once), else also a 3x3 coder with an untied decoder and channels_last input."""
    conv = pk.PNNHConv2d(16, backend="triton")
    linear = pk.PNNHLinear(32, backend="triton")
    x = torch.randn(2, 16, 8, 8, dtype=dtype)
    blocks = [(conv, x), (linear, torch.randn(6, 32, dtype=dtype))]
    if not quick:
        conv_3x3 = pk.PNNHConv2d(16, backend="triton", coder_kernel_size=3, tied=False, out_channels=8)
        blocks += [(conv, x.contiguous(memory_format=torch.channels_last)), (conv_3x3, x)]
    return blocks


def compile_all(arch: int, dtypes: list[torch.dtype], configs: int, quick: bool) -> _Recorder:
    recorder = _Recorder(configs)
    driver.set_active(_TargetOnlyDriver(arch))
    recorder.install()
    triton_backend._interpreting = lambda: True  # let the backend take CPU tensors; the kernels stay GPU code
    pk.set_finite_check(False)  # the skipped launches leave garbage behind
    for dtype in dtypes:
        for block, x in _blocks(dtype, quick):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                _step(block, x.float() if dtype != torch.float32 else x, training=True)
            _step(block, x.float(), training=False)
    return recorder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, as 90 for sm_90")
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"]
    )
    parser.add_argument("--configs", type=int, default=1, help="configurations per autotuned kernel")
    parser.add_argument("--quick", action="store_true", help="one conv and one linear block (every kernel once)")
    args = parser.parse_args()
    recorder = compile_all(args.arch, [getattr(torch, d) for d in args.dtypes], args.configs, args.quick)
    compiled: dict[str, float] = {}
    for name, seconds in recorder.launches:
        compiled[name] = compiled.get(name, 0.0) + seconds
    compiled = {name: round(seconds, 2) for name, seconds in sorted(compiled.items())}
    slowest = [
        (name, round(seconds, 2)) for name, seconds in sorted(recorder.launches, key=lambda launch: -launch[1])[:5]
    ]
    print(json.dumps({"arch": args.arch, "compiled": compiled, "slowest": slowest, "failures": recorder.failures}))
    return 1 if recorder.failures else 0


if __name__ == "__main__":
    sys.exit(main())
