"""A short tour of the PNNH block: backends, agreement with the literal reference, and a timing.

Run: ``python -m pnnh_kernels.demo``. (The full training job lives in ``pnnh_kernels.train``.)
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import pnnh_kernels as pk
from pnnh_kernels.backends import refusal_reason, registered_backends


def _time_step(block: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    def step():
        block(x).sum().backward()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    print(f"pnnh_kernels {pk.__version__}, torch {torch.__version__}")
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    reference = pk.PNNHConv2d(args.channels, backend="reference")
    print(reference)
    for name, backend in sorted(registered_backends().items()):
        reason = refusal_reason(backend, "conv2d", x, reference.block_weights(), reference.config)
        if reason is not None:
            print(f"  {name:>10}: not here ({reason})")
            continue
        block = copy.deepcopy(reference)
        block.backend = name
        y = block(x)
        seconds = _time_step(block, x, args.repeats)
        err = (y - reference(x)).abs().max().item() if name != "reference" else 0.0
        print(f"  {name:>10}: forward+backward {1e3 * seconds:8.2f} ms   max |y - reference| = {err:.2e}")
    print(f"shape (N, C, H, W) = {tuple(x.shape)}, float32, {torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()
