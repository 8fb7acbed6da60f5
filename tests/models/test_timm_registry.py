"""The timm entry points without timm (with timm: tests/zoo/test_timm.py, CI's zoo stage)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pnnh_kernels.models import timm_registry


def test_an_entry_point_builds_the_model_with_timms_metadata():
    model = timm_registry._entrypoint("pnnh_slim_resnet20")(
        pretrained=False, num_classes=3, in_chans=1, pretrained_cfg_overlay={"crop_pct": 0.9}, drop_rate=0.0
    )
    assert model.num_classes == 3 and model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (1, 32, 32) and cfg["num_classes"] == 3 and cfg["crop_pct"] == 0.9
    assert cfg["mean"] == timm_registry.CIFAR_MEAN and model.default_cfg is cfg


def test_imagenet_style_nets_get_imagenet_metadata():
    cfg = timm_registry._default_cfg("pnnh_slim_resnet50", {})
    assert cfg["input_size"] == (3, 224, 224) and cfg["mean"] == timm_registry.IMAGENET_MEAN
    assert timm_registry._default_cfg("pnnh_vit_tiny", {"img_size": 64})["input_size"] == (3, 64, 64)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(pretrained=True), "no pretrained weights"),
        (dict(drop_rate=0.1), "drop_rate=0.1 is not offered"),
        (dict(global_pool="max"), "global_pool='max' is not offered"),
        (dict(bn_momentum=0.01), "bn_momentum is not offered"),
    ],
)
def test_what_is_not_offered_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        timm_registry._entrypoint("pnnh_resnet20")(**options)


def test_a_broken_timm_does_not_break_the_import(monkeypatch):
    def broken(names=None):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(timm_registry, "register_with_timm", broken)
    with pytest.warns(RuntimeWarning, match="not registered with timm"):
        timm_registry.register_if_timm_is_installed()
