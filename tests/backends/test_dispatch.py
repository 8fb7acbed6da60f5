"""Backend dispatch: explicit names, auto selection, fallbacks with one warning, clear errors."""

import warnings

import pytest
import torch

import pnnh_kernels as pk
from pnnh_kernels.backends import registry
from pnnh_kernels.backends.base import Backend
from pnnh_kernels.eager import conv_block_eager, linear_block_eager


class FakeFused(Backend):
    """A fused backend that records its calls, and may refuse some."""

    device_types = ("cpu",)
    fused = True

    def __init__(self, name, refuse=None, priority=10, unavailable=None, slower=None):
        self.name, self.refuse, self.priority, self._unavailable = name, refuse, priority, unavailable
        self.slower = slower
        self.calls = 0

    def auto_skip_reason(self, op, x, weights, config):
        return self.slower

    def unavailable_reason(self):
        return self._unavailable

    def unsupported_reason(self, op, x, weights, config):
        return super().unsupported_reason(op, x, weights, config) or (self.refuse if x.dtype == torch.float32 else None)

    def conv2d(self, x, weights, norms, config, training):
        self.calls += 1
        return conv_block_eager(x, weights, norms, config, training)

    def linear(self, x, weights, norms, config, training):
        self.calls += 1
        return linear_block_eager(x, weights, norms, config, training)


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    monkeypatch.setattr(registry, "_warned", set())
    return registry


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown backend 'nope'.*auto.*eager.*reference"):
        pk.PNNHConv2d(4, backend="nope")
    block = pk.PNNHConv2d(4)
    block.backend = "nope"
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        block(torch.randn(2, 4, 3, 3))


def test_auto_prefers_an_available_fused_backend(clean_registry):
    fast = clean_registry.register_backend(FakeFused("fast"))
    block = pk.PNNHConv2d(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning may be raised
        block(torch.randn(2, 4, 3, 3))
    assert fast.calls == 1


def test_auto_falls_back_with_one_warning_naming_the_reason(clean_registry):
    for name in [n for n, b in clean_registry._registry.items() if b.fused]:  # only picky may serve
        del clean_registry._registry[name]
    picky = clean_registry.register_backend(FakeFused("picky", refuse="float32 not supported by picky"))
    block = pk.PNNHConv2d(4)
    x = torch.randn(2, 4, 3, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = block(x)
        y2 = block(x)
    messages = [str(w.message) for w in caught if "falling back" in str(w.message)]
    assert len(messages) == 1 and "float32 not supported by picky" in messages[0]
    assert picky.calls == 0 and y1.shape == y2.shape == x.shape
    # a dtype the fused backend accepts goes to it
    block.double()(x.double())
    assert picky.calls == 1


def test_auto_choosing_eager_over_a_slower_backend_does_not_warn(clean_registry):
    """One backend cannot serve the call, another could but is measured slower: eager is then a choice,
    not a fallback, and the refusal of the first (e.g. Triton on CPU tensors) is no news to the user."""
    clean_registry.register_backend(FakeFused("gpu_only", refuse="runs on GPU tensors only", priority=1))
    slow = clean_registry.register_backend(FakeFused("slow", slower="measured slower at this size"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pk.PNNHConv2d(4)(torch.randn(2, 4, 3, 3))
    assert slow.calls == 0


def test_explicit_backend_never_falls_back(clean_registry):
    clean_registry.register_backend(FakeFused("broken", unavailable="extension was not compiled"))
    clean_registry.register_backend(FakeFused("picky", refuse="float32 not supported by picky"))
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(pk.BackendUnavailableError, match="extension was not compiled"):
        pk.PNNHConv2d(4, backend="broken")(x)
    with pytest.raises(pk.BackendUnavailableError, match="float32 not supported"):
        pk.PNNHConv2d(4, backend="picky")(x)
    with pytest.raises(pk.BackendUnavailableError, match="runs on cpu tensors, not meta"):
        pk.PNNHConv2d(4, backend="picky", device="meta")(torch.randn(2, 4, 3, 3, device="meta"))


def test_auto_priority_order(clean_registry):
    slow = clean_registry.register_backend(FakeFused("slow", priority=50))
    fast = clean_registry.register_backend(FakeFused("fast", priority=5))
    pk.PNNHLinear(4)(torch.randn(3, 4))
    assert (fast.calls, slow.calls) == (1, 0)


def test_available_backends_lists_the_pure_pytorch_ones():
    names = pk.available_backends()
    assert "reference" in names and "eager" in names
