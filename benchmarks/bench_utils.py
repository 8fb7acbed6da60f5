"""What the benchmarks measure besides time: FLOPs, bytes, saved-activation memory, the device's matmul peak."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ConvShape:
    label: str
    batch: int
    channels: int
    size: int

    def input(self, dtype: torch.dtype, device: str, requires_grad: bool = True) -> torch.Tensor:
        x = torch.randn(self.batch, self.channels, self.size, self.size, dtype=dtype, device=device)
        return x.requires_grad_(requires_grad)


@dataclass(frozen=True)
class LinearShape:
    label: str
    tokens: int
    dim: int

    def input(self, dtype: torch.dtype, device: str, requires_grad: bool = True) -> torch.Tensor:
        return torch.randn(self.tokens, self.dim, dtype=dtype, device=device).requires_grad_(requires_grad)


def conv_block_flops(shape: ConvShape, kernel: int = 3, coder_kernel: int = 1) -> float:
    """Forward FLOPs of the PNNH block (coder = learner width = C): layer 1 [encoder; learner], layer 2 [decoder; learner]."""
    pixels = shape.batch * shape.size * shape.size
    c = shape.channels
    per_layer = 2 * pixels * c * c * (kernel * kernel + coder_kernel * coder_kernel)
    return 2.0 * per_layer


def linear_block_flops(shape: LinearShape, hidden_ratio: int = 4) -> float:
    d, h = shape.dim, hidden_ratio * shape.dim
    return 2.0 * shape.tokens * (d * (d + h) + (d + h) * d)


def _block_traffic(pixels: int, cin: int, c1: int, cout: int, backward: bool) -> int:
    """Elements the fused dataflow (docs/DESIGN.md) must move (every tensor once per pass that reads or writes
    it; the statistics, the weights and the scalars are small and left out):

    forward   conv1 x -> z | conv2 with the norm prologue z -> u | norm + act u -> y
    backward  dNorm2 sums (dy, u) | dNorm2 apply (dy, u -> du) | dh = conv(du) | dW2 (z, du)
              dNorm1 sums (dh, z) | dNorm1 apply (dh, z -> dz) | dx = conv(dz) | dW1 (x, dz)
    """
    forward = cin + 2 * c1 + 3 * cout
    backward_only = 7 * cout + 9 * c1 + 2 * cin
    return pixels * (forward + (backward_only if backward else 0))


def conv_block_bytes(shape: ConvShape, element_size: int, backward: bool, coder: bool = True) -> float:
    """The PNNH conv block's compulsory memory traffic in bytes (coder = learner = C; without the coder,
    a plain two-layer block of the same width: the ResNet basic block's)."""
    c = shape.channels
    pixels = shape.batch * shape.size * shape.size
    return float(_block_traffic(pixels, c, 2 * c if coder else c, c, backward) * element_size)


def linear_block_bytes(shape: LinearShape, element_size: int, backward: bool, hidden_ratio: int = 4) -> float:
    d = shape.dim
    return float(_block_traffic(shape.tokens, d, d + hidden_ratio * d, d, backward) * element_size)


def copy_bandwidth(device: str, megabytes: int = 256, repeats: int = 5) -> float:
    """The device's practical memory bandwidth in bytes/s: a large tensor copy (read + write), measured now."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * src.numel() * 4 / best


def saved_activation_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps between forward and backward (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak_flops(dtype: torch.dtype, device: str, n: int = 2048, repeats: int = 5) -> float:
    """The device's practical peak for this dtype: FLOP/s of a large square matmul, measured now."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
