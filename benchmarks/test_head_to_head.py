"""Head to head: each fused backend against eager with their forward+backward steps interleaved.

Every round times one step of eager and one of the backend back to back (benchmarks/interleave.py); the
CPU target rows of RESULTS.md use it.
"""

import time

import pytest
import torch
from bench_shapes import LAYOUTS, chosen, parametrize_shapes
from bench_utils import synchronize
from interleave import interleave
from variants import conv_variant, fused_backends, interpreted, linear_variant

from pnnh_kernels.backends import refusal_reason, registered_backends
from pnnh_kernels.models import create_model


def _pairs(mode: str) -> int:
    return {"smoke": 3, "quick": 25, "full": 40}[mode]


def pytest_generate_tests(metafunc):
    parametrize_shapes(metafunc, "h2h_shape", "h2h_linear_shape")
    if "h2h_layout" in metafunc.fixturenames:
        metafunc.parametrize("h2h_layout", chosen(metafunc.config, "--bench-layout", list(LAYOUTS)))
    if "h2h_backend" in metafunc.fixturenames:
        metafunc.parametrize("h2h_backend", fused_backends())


def _timed_step(fn, x, grad, device) -> float:
    x.grad = None  # else every step adds its input gradient into the last one's: a pass outside the block
    start = time.perf_counter()
    fn(x).backward(grad)
    synchronize(device)
    return time.perf_counter() - start


def _skip_interpreter(backend: str, device: str) -> None:
    if interpreted(backend, device):
        pytest.skip("the Triton interpreter (TRITON_INTERPRET=1) is a correctness tool: not timed")


def _interleave_blocks(collector, base, mine, x, record: dict) -> None:
    device = collector.device
    grad = torch.randn_like(base(x).detach())
    interleave(
        collector,
        lambda: _timed_step(base, x, grad, device),
        lambda: _timed_step(mine, x, grad, device),
        _pairs(collector.mode),
        dict(pass_="fwd+bwd", **record),
    )


def _dtype(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


def test_conv_head_to_head(collector, h2h_shape, h2h_layout, h2h_backend):
    s, dtype = h2h_shape, _dtype(collector.device)
    _skip_interpreter(h2h_backend, collector.device)
    torch.manual_seed(0)
    x = s.input(dtype, collector.device).detach().contiguous(memory_format=LAYOUTS[h2h_layout]).requires_grad_()
    mine, reason = conv_variant(h2h_backend, s.channels, x)
    if mine is None:
        pytest.skip(reason)
    base, _ = conv_variant("eager", s.channels, x)
    record = dict(
        block="conv",
        shape=s.label,
        dims=[s.batch, s.channels, s.size, s.size],
        dtype=str(dtype).replace("torch.", ""),
        variant=h2h_backend,
        layout=h2h_layout,
    )
    _interleave_blocks(collector, base, mine, x, record)


def test_linear_head_to_head(collector, h2h_linear_shape, h2h_backend):
    s, dtype = h2h_linear_shape, _dtype(collector.device)
    _skip_interpreter(h2h_backend, collector.device)
    torch.manual_seed(0)
    x = s.input(dtype, collector.device)
    mine, reason = linear_variant(h2h_backend, s.dim, x)
    if mine is None:
        pytest.skip(reason)
    base, _ = linear_variant("eager", s.dim, x)
    record = dict(
        block="linear",
        shape=s.label,
        dims=[s.tokens, s.dim],
        dtype=str(dtype).replace("torch.", ""),
        variant=h2h_backend,
        layout="rows",
    )
    _interleave_blocks(collector, base, mine, x, record)


def _training_step(model, opt, x, y, device) -> float:
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    synchronize(device)
    return time.perf_counter() - start


def _interleave_models(collector, base, mine, batch: int, fmt, pairs: int, record: dict) -> None:
    """Interleaved SGD training steps of two models on one CIFAR-sized batch in ``fmt``."""
    device = collector.device
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (base, mine)]
    record = dict(pass_="train step", block="model", dims=[batch, 3, 32, 32], dtype="float32", **record)
    interleave(
        collector,
        lambda: _training_step(base, optimizers[0], x, y, device),
        lambda: _training_step(mine, optimizers[1], x, y, device),
        pairs,
        record,
    )


@pytest.mark.parametrize("depth", [56, 110])
def test_model_head_to_head(collector, h2h_backend, h2h_layout, depth):
    """A PNNH-ResNet training step (CIFAR-sized input) on the backend against the same model on eager, both
    in the same memory format (channels_last is eager's fastest on CPUs and GPUs: the baseline to beat)."""
    device = collector.device
    _skip_interpreter(h2h_backend, device)
    smoke = collector.mode == "smoke"
    if smoke and depth != 56:
        pytest.skip("the smoke set times one model")
    name, batch = ("pnnh_resnet8", 8) if smoke else (f"pnnh_resnet{depth}", 256 if device == "cuda" else 64)
    fmt = LAYOUTS[h2h_layout]
    torch.manual_seed(0)
    base = create_model(name, num_classes=10, backend="eager").to(device, memory_format=fmt).train()
    mine = create_model(name, num_classes=10, backend=h2h_backend).to(device, memory_format=fmt).train()
    mine.load_state_dict(base.state_dict())
    block = next(m for m in mine.modules() if hasattr(m, "backend"))
    reason = refusal_reason(
        registered_backends()[h2h_backend],
        "conv2d",
        torch.randn(2, block.in_channels, 4, 4, device=device),
        block.block_weights(),
        block.config,
    )
    if reason:
        pytest.skip(reason)
    pairs = _pairs("smoke") if smoke else 8  # a step of PNNH-56 takes about a second here
    _interleave_models(
        collector, base, mine, batch, fmt, pairs, dict(shape=name, variant=h2h_backend, layout=h2h_layout)
    )


@pytest.mark.parametrize("depth", [56, 110])
def test_slim_against_resnet_head_to_head(collector, depth):
    """The paper's throughput claim at model level: a slim PNNH net (about half the parameters) on `auto`
    against the ResNet of its depth on eager, both channels_last (eager's fastest form), one training step
    each in turn."""
    device = collector.device
    smoke = collector.mode == "smoke"
    if smoke and depth != 56:
        pytest.skip("the smoke set times one model")
    depth_used, batch = (8, 8) if smoke else (depth, 256 if device == "cuda" else 64)
    torch.manual_seed(0)
    fmt = torch.channels_last
    base = create_model(f"resnet{depth_used}", num_classes=10).to(device, memory_format=fmt).train()
    mine = create_model(f"pnnh_slim_resnet{depth_used}", num_classes=10).to(device, memory_format=fmt).train()
    shape = f"pnnh_slim_resnet{depth_used} vs resnet{depth_used} (eager column)"
    pairs = _pairs("smoke") if smoke else 8
    _interleave_models(
        collector, base, mine, batch, fmt, pairs, dict(shape=shape, variant="auto", layout="channels_last")
    )


@pytest.mark.parametrize("family", ["pnnh_vit", "pnnh_slim_vit"])
def test_vit_head_to_head(collector, family):
    """The Transformer half of the throughput claim at model level: PNNH-ViT and the slim PNNH-ViT (plain
    PyTorch blocks, docs/MODELS.md) against the ViT (ViT-Tiny's width, 12 blocks, 32x32 images in 4x4 patches:
    64 tokens), one training step each in turn."""
    device = collector.device
    smoke = collector.mode == "smoke"
    if smoke and family != "pnnh_slim_vit":
        pytest.skip("the smoke set times one model")
    options = dict(img_size=32, patch_size=4, depth=2 if smoke else 12, num_classes=10)
    batch = 4 if smoke else (256 if device == "cuda" else 64)
    torch.manual_seed(0)
    base = create_model("vit_tiny", **options).to(device).train()
    mine = create_model(f"{family}_tiny", **options).to(device).train()
    shape = f"{family}_tiny vs vit_tiny (eager column), depth {options['depth']}"
    pairs = _pairs("smoke") if smoke else 8
    fmt = torch.contiguous_format
    _interleave_models(collector, base, mine, batch, fmt, pairs, dict(shape=shape, variant="auto", layout="rows"))


class _AttentionWithoutCoder(torch.nn.Module):
    """A PNNH attention half with its coder path removed (``attn(LN(x))``): the time left when the coder path
    costs nothing, the bound on what fusing that path can win."""

    def __init__(self, half: torch.nn.Module) -> None:
        super().__init__()
        self.inner = half

    def forward(self, x):
        return self.inner.learner(self.inner.norm(x))


class _ResidualAttention(torch.nn.Module):
    """The ViT's attention half, ``x + attn(LN(x))``."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block.attn(self.block.norm1(x))


@pytest.mark.parametrize("compared", ["without_coder", "vit_attention"])
def test_vit_attention_side(collector, compared):
    """Issue #29 item 2: what the coder path around attention costs. A PNNH-ViT block's attention half on eager
    against the same half without its coder path (what a fusion of that path could at best reach), and against
    the ViT's residual attention half; ViT-Tiny's width, 64 tokens and the class token, forward and backward."""
    from pnnh_kernels.models.vit import PNNHAttention, ResidualBlock

    device = collector.device
    smoke = collector.mode == "smoke"
    batch, tokens, dim, heads = (4, 17, 32, 2) if smoke else (64, 65, 192, 3)
    torch.manual_seed(0)
    pnnh = PNNHAttention(dim, heads).to(device)
    other = (
        _AttentionWithoutCoder(pnnh)
        if compared == "without_coder"
        else _ResidualAttention(ResidualBlock(dim, heads, 4.0, 0.0).to(device))
    )
    x = torch.randn(batch, tokens, dim, device=device, requires_grad=True)
    record = dict(
        block="attention",
        shape=f"{compared.replace('_', ' ')} vs pnnh attention half (eager column)",
        dims=[batch, tokens, dim],
        dtype="float32",
        variant=compared,
        layout="rows",
    )
    _interleave_blocks(collector, pnnh, other, x, record)
