"""Where a backend's time goes: torch.profiler over a few forward+backward steps of the PNNH conv block.

    python -P benchmarks/profile_block.py --shape 64,128,28 --dtype bfloat16 --backends eager,cuda,triton

Prints, per backend, the wall time per step, the host (CPU) time spent issuing work, the GPU kernel time
and the number of kernels launched: when host time exceeds kernel time the block is launch-bound.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import pnnh_kernels as pk


def step(block, x, grad):
    block(x).backward(grad)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="64,128,28", help="batch,channels,size")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--backends", default="eager,cuda,triton")
    parser.add_argument("--table", action="store_true", help="also print the top ops of each backend")
    args = parser.parse_args()
    n, c, s = map(int, args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"PNNH block {n}x{c}x{s}x{s} {args.dtype} on {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}")
    print(f"{'backend':10} {'ms/step':>8} {'host ms':>8} {'kernel ms':>9} {'kernels':>8}")
    for name in args.backends.split(","):
        block = pk.PNNHConv2d(c, backend=name).to(device=device, dtype=dtype).train()
        x = torch.randn(n, c, s, s, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn_like(x)
        for _ in range(5):
            step(block, x, grad)
        torch.cuda.synchronize() if device == "cuda" else None
        start = time.perf_counter()
        for _ in range(20):
            step(block, x, grad)
        torch.cuda.synchronize() if device == "cuda" else None
        wall = (time.perf_counter() - start) / 20
        steps = 5
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step(block, x, grad)
            torch.cuda.synchronize() if device == "cuda" else None
        events = prof.key_averages()
        kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        host_us = max((e.cpu_time_total for e in events if e.key.startswith("ProfilerStep")), default=0) or sum(
            e.self_cpu_time_total for e in events
        )
        print(
            f"{name:10} {wall * 1e3:8.2f} {host_us / steps / 1e3:8.2f} {kernel_us / steps / 1e3:9.2f} {kernels / steps:8.0f}"
        )
        if args.table:
            print(events.table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
