"""A whole training step, as users train: every way to run PNNH-ResNet against ResNet in the same run.

Per model set (ResNet-56 at batch 256 and 32x32; ResNet-34 at batch 128 and 224x224) and autocast dtype
(bfloat16, float16), channels_last, SGD step included: ResNet eager; PNNH on eager, under torch.compile
(default and reduce-overhead), on auto and on each fused backend, with and without the whole step in one
CUDA graph. Images/s (median of timed steps), peak memory, and the ratios to ResNet eager and PNNH eager
measured in the same run. ``--profile`` adds, per backend, the top kernels of one PNNH step by GPU time and
the launch count. Writes OUT/model_step.json and OUT/model_step.md.

    python3 -P benchmarks/model_step.py OUT                     # the GPU run (benchmarks/gpu_session.sh)
    python3 -P benchmarks/model_step.py OUT --smoke             # tiny shapes, any device: the script works
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script (python -P): its helpers
from bench_utils import synchronize

from pnnh_kernels.backends import available_backends
from pnnh_kernels.backends.cuda.cudnn_layers import set_cudnn_fusion
from pnnh_kernels.backends.measured import auto_benchmark
from pnnh_kernels.models import create_model
from pnnh_kernels.train.cuda_graphs import GraphedStep, graph_ready_optimizer

SETS = {"cifar56": ("resnet56", 256, 32), "imagenet34": ("resnet34", 128, 224)}
SMOKE = {"cifar56": ("resnet20", 4, 16)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Variant:
    name: str
    prefix: str  #: "" (ResNet) or "pnnh_"
    backend: str = "eager"
    compile_mode: Optional[str] = None
    cuda_graph: bool = False
    measured: bool = False  #: auto with measured dispatch (pnnh_kernels.set_auto_benchmark)
    cudnn_fusion: bool = True  #: the cuda backend may use cuDNN's fused graphs (backends/cuda/cudnn_layers.py)


def variants(device: torch.device, with_compile: bool) -> list[Variant]:
    names = ("cuda", "triton") if device.type == "cuda" else ("cpu",)  # triton on a CPU: the interpreter only
    fused = [b for b in names if b in available_backends()]
    out = [
        Variant("resnet eager", ""),
        Variant("pnnh eager", "pnnh_"),
        Variant("pnnh auto", "pnnh_", "auto"),
        Variant("pnnh auto measured", "pnnh_", "auto", measured=True),
    ]
    if with_compile:
        out.append(Variant("pnnh eager compile", "pnnh_", compile_mode="default"))
        if device.type == "cuda":
            out.append(Variant("pnnh eager compile reduce-overhead", "pnnh_", compile_mode="reduce-overhead"))
    out += [Variant(f"pnnh {b}", "pnnh_", b) for b in fused]
    if device.type == "cuda":  # a compiled model is not captured again
        out += [
            Variant(f"{v.name} + cuda graph", v.prefix, v.backend, cuda_graph=True, measured=v.measured)
            for v in out
            if not v.compile_mode
        ]
    if "cuda" in fused:  # what cuDNN's fused graphs change, in the same run
        out.append(Variant("pnnh cuda, no cuDNN fusion", "pnnh_", "cuda", cudnn_fusion=False))
    return out


def _step_fn(model, optimizer, autocast, x, y, graphed: bool) -> Callable[[], Any]:
    loss_fn = lambda out, target: F.cross_entropy(out.float(), target)
    if graphed:
        graph_ready_optimizer(optimizer, x.device)
        runner = GraphedStep(model, optimizer, autocast, loss_fn)
        return lambda: runner.step(x, y)

    def step():
        with autocast:
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def training_step(variant: Variant, arch: str, batch: int, size: int, dtype: torch.dtype, device) -> Callable[[], Any]:
    """One SGD training step of the variant's model on a fixed channels_last batch, under autocast."""
    kwargs = {"backend": variant.backend} if variant.prefix else {}
    model = create_model(variant.prefix + arch, num_classes=10, **kwargs).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step_model = torch.compile(model, mode=variant.compile_mode) if variant.compile_mode else model
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=dtype)
    step = _step_fn(step_model, optimizer, autocast, x, y, variant.cuda_graph)
    if not variant.measured:
        return step

    def measured_step() -> Any:  # the warm-up's first step times the backends of each block signature
        with auto_benchmark():
            return step()

    return measured_step


def measure(variant: Variant, arch: str, batch: int, size: int, dtype: torch.dtype, device, steps: int) -> dict:
    set_cudnn_fusion(None if variant.cudnn_fusion else False)
    try:
        return _measure(variant, arch, batch, size, dtype, device, steps)
    finally:
        set_cudnn_fusion(None)


def _measure(variant: Variant, arch: str, batch: int, size: int, dtype: torch.dtype, device, steps: int) -> dict:
    step = training_step(variant, arch, batch, size, dtype, device)
    start = time.perf_counter()
    for _ in range(3 if not variant.cuda_graph else 5):  # warm-up (compiles, captures)
        step()
    synchronize(device.type)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device.type)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    median = statistics.median(times)
    return {
        "images_per_s": batch / median,
        "median_ms": median * 1e3,
        "peak_mb": peak and peak / 2**20,
        "warmup_s": warmup_s,
    }


def run_set(
    set_name: str, spec, dtype_name: str, device, steps: int, with_compile: bool, on_row: Callable[[list[dict]], None]
) -> list[dict]:
    """Every variant's row; ``on_row`` gets the rows so far after each (a run cut short keeps them)."""
    arch, batch, size = spec
    rows = []
    for variant in variants(device, with_compile):
        row = {
            "set": set_name,
            "dtype": dtype_name,
            "variant": variant.name,
            "model": variant.prefix + arch,
            "batch": batch,
            "size": size,
        }
        try:
            row.update(measure(variant, arch, batch, size, DTYPES[dtype_name], device, steps))
        except Exception as error:  # one failing variant must not cost the GPU session the others
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        _add_ratios(rows)
        on_row(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    base = {r["variant"]: r.get("images_per_s") for r in rows}
    for r in rows:
        if "images_per_s" in r:
            for ref in ("resnet eager", "pnnh eager"):
                if base.get(ref):
                    r[f"vs {ref}"] = r["images_per_s"] / base[ref]


def _profile_one(arch: str, batch: int, size: int, dtype: torch.dtype, device, backend: str, activities) -> list[str]:
    from torch.profiler import profile

    step = training_step(Variant(f"pnnh {backend}", "pnnh_", backend), arch, batch, size, dtype, device)
    step()
    synchronize(device.type)
    with profile(activities=activities) as prof:
        step()
        synchronize(device.type)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    launches = sum(e.count for e in events)
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    lines = [f"### pnnh {backend}: {launches} {'kernels' if device.type == 'cuda' else 'ops'} per step", ""]
    lines += ["| kernel | calls | time us |", "|---|---|---|"]
    lines += [f"| {e.key[:90]} | {e.count} | {getattr(e, key):.0f} |" for e in events[:10]]
    return [*lines, ""]


def profile_step(arch: str, batch: int, size: int, dtype: torch.dtype, device, backends: list[str]) -> list[str]:
    """Top kernels of one PNNH training step per backend, by device time, and the launch count."""
    from torch.profiler import ProfilerActivity

    lines: list[str] = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for backend in backends:
        try:
            lines += _profile_one(arch, batch, size, dtype, device, backend, activities)
        except Exception as error:  # a backend that refuses (or fails) is a line, not the end of the run
            lines += [f"### pnnh {backend}: {type(error).__name__}: {str(error).splitlines()[0][:200]}", ""]
    return lines


def write(out: str, rows: list[dict], profile_lines: list[str], device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = f"Training step, channels_last, autocast; {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    with open(os.path.join(out, "model_step.json"), "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)
    lines = [
        header,
        "",
        "| set | dtype | variant | images/s | vs ResNet eager | vs PNNH eager | peak MB | warm-up s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['set']} | {r['dtype']} | {r['variant']} | {r['error']} | | | | |")
            continue
        peak = f"{r['peak_mb']:.0f}" if r.get("peak_mb") else ""
        lines.append(
            f"| {r['set']} | {r['dtype']} | {r['variant']} | {r['images_per_s']:.0f} | "
            f"{r.get('vs resnet eager', 0):.2f}x | {r.get('vs pnnh eager', 0):.2f}x | {peak} | {r['warmup_s']:.1f} |"
        )
    with open(os.path.join(out, "model_step.md"), "w") as f:
        f.write("\n".join([*lines, "", *profile_lines]) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--sets", default="cifar56,imagenet34")
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave the torch.compile rows out")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, two steps: the script works (any device)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sets = SMOKE if args.smoke else {k: SETS[k] for k in args.sets.split(",")}
    steps = 2 if args.smoke else args.steps
    os.makedirs(args.out, exist_ok=True)
    rows: list[dict] = []
    profile_lines: list[str] = []
    if args.profile:  # first: one step per backend is quick, and it is what optimising starts from
        arch, batch, size = next(iter(sets.values()))
        backends = ["eager"] + [v.backend for v in variants(device, False) if v.backend not in ("eager", "auto")]
        backends = list(dict.fromkeys(backends))
        profile_lines = profile_step(arch, batch, size, DTYPES[args.dtypes.split(",")[0]], device, backends)
        write(args.out, rows, profile_lines, device)
    for set_name, spec in sets.items():
        for dtype_name in args.dtypes.split(","):
            with_compile = args.compile and not args.smoke
            rows += run_set(
                set_name, spec, dtype_name, device, steps, with_compile,
                on_row=lambda done, earlier=tuple(rows): write(args.out, [*earlier, *done], profile_lines, device),
            )  # fmt: skip
    return 1 if all("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
