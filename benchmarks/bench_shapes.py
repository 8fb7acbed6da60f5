"""The shapes and input layouts the benchmarks time, and the command-line filter over them."""

import torch
from bench_utils import ConvShape, LinearShape

CIFAR = [
    ConvShape("cifar-stage1", 128, 16, 32),
    ConvShape("cifar-stage2", 128, 32, 16),
    ConvShape("cifar-stage3", 128, 64, 8),
]
RESNET34 = [
    ConvShape("r34-stage1", 64, 64, 56),
    ConvShape("r34-stage2", 64, 128, 28),
    ConvShape("r34-stage3", 64, 256, 14),
    ConvShape("r34-stage4", 64, 512, 7),
]
VIT_CPU = [LinearShape("vit-s-mlp", 8 * 197, 384)]
VIT_FULL = [LinearShape("vit-s-mlp", 64 * 197, 384), LinearShape("vit-b-mlp", 64 * 197, 768)]
# channels_last is measured beside NCHW because it is the faster layout for plain PyTorch on some devices
# (oneDNN on this project's CPU: up to 1.7x for the eager block), so "the fastest plain-PyTorch form"
# of the baseline is the faster of the two rows
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def run_mode(config) -> str:
    """The command line's set: "smoke" (--bench-smoke), "full" (--bench-full) or "quick"."""
    return "smoke" if config.getoption("--bench-smoke") else "full" if config.getoption("--bench-full") else "quick"


def run_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def chosen(config, option, names):
    """The names the command line's ``option`` (a repeatable prefix filter) lets through; all without it."""
    wanted = config.getoption(option)
    return [n for n in names if not wanted or any(n.startswith(w) for w in wanted)]


def conv_shapes(config, mode: str, device: str) -> list[ConvShape]:
    """The conv shapes a run times: a tiny one (smoke), the CIFAR stages (quick CPU), plus ResNet-34's."""
    if mode == "smoke":
        shapes = [ConvShape("smoke", 4, 8, 8)]
    else:
        shapes = CIFAR + RESNET34 if (mode == "full" or device == "cuda") else CIFAR
    return [s for s in shapes if s.label in chosen(config, "--bench-shape", [s.label for s in shapes])]


def linear_shapes(config, mode: str, device: str) -> list[LinearShape]:
    if mode == "smoke":
        shapes = [LinearShape("smoke", 16, 32)]
    else:
        shapes = VIT_FULL if (mode == "full" or device == "cuda") else VIT_CPU
    return [s for s in shapes if s.label in chosen(config, "--bench-shape", [s.label for s in shapes])]


def parametrize_shapes(metafunc, conv_fixture: str, linear_fixture: str) -> None:
    """Parametrise whichever of the two fixtures the test uses with the run's conv / linear shapes."""
    config = metafunc.config
    mode, device = run_mode(config), run_device()
    for fixture, select in ((conv_fixture, conv_shapes), (linear_fixture, linear_shapes)):
        if fixture in metafunc.fixturenames:
            shapes = select(config, mode, device)
            metafunc.parametrize(fixture, shapes, ids=[s.label for s in shapes])
