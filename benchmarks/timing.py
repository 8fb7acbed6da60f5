"""Timing one variant with pytest-benchmark and recording the result with its memory and FLOP rate."""

from __future__ import annotations

import time

import torch
from bench_utils import saved_activation_bytes, synchronize
from conftest import rounds_for


def measure(benchmark, collector, fn, x, pass_name: str, record: dict, flops: float, traffic: dict) -> None:
    """Time ``fn`` and record it. ``traffic`` maps the pass name to the block's compulsory bytes (the
    roofline's denominator: attainable FLOP/s = min(matmul peak, FLOPs / bytes * copy bandwidth))."""
    device = collector.device
    grad = torch.randn_like(fn(x).detach()) if pass_name == "fwd+bwd" else None

    def run():
        if pass_name == "fwd":
            with torch.no_grad():
                fn(x)
        else:
            x.grad = None  # else every round adds its input gradient into the last one's: a pass outside the block
            fn(x).backward(grad)
        synchronize(device)

    start = time.perf_counter()
    run()  # first call: warm-up and (for torch.compile) compilation, kept out of the timing
    first = time.perf_counter() - start
    run()
    start = time.perf_counter()
    run()
    once = time.perf_counter() - start
    rounds = rounds_for(collector.mode, once)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    median_s = benchmark.stats.stats.median
    min_s = benchmark.stats.stats.min

    saved = peak = None
    if pass_name == "fwd+bwd":
        saved = saved_activation_bytes(lambda: fn(x))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            run()
            peak = torch.cuda.max_memory_allocated()
    total_flops = flops * (3.0 if pass_name == "fwd+bwd" else 1.0)  # backward ~ twice the forward GEMMs
    moved = traffic[pass_name]
    attainable = min(collector.peak(x.dtype), total_flops / moved * collector.bandwidth())
    collector.add(
        **record,
        pass_=pass_name,
        median_ms=median_s * 1e3,
        min_ms=min_s * 1e3,
        rounds=rounds,
        first_call_s=first,
        saved_activation_mb=None if saved is None else saved / 2**20,
        peak_memory_mb=None if peak is None else peak / 2**20,
        gflops=total_flops / median_s / 1e9,
        peak_fraction=total_flops / median_s / collector.peak(x.dtype),
        traffic_mb=moved / 2**20,
        flop_per_byte=total_flops / moved,
        attainable_gflops=attainable / 1e9,
        roofline_fraction=total_flops / median_s / attainable,
    )
