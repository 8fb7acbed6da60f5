"""timm: converting its ResNets, and building this package's models through timm.create_model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zoo_conversion import check_conversion, pnnh_block_names
from zoo_imports import import_zoo

import pnnh_kernels.models as pnnh_models
from pnnh_kernels.models import convert_resnet, plan_resnet_conversion

timm = import_zoo("timm")


@pytest.mark.parametrize("name, converted, kept", [("resnet18", 5, 3), ("resnet50", 12, 4)])
def test_timm_resnets_convert_and_train(name, converted, kept):
    check_conversion(lambda: timm.create_model(name, num_classes=10), converted, kept)


def test_timms_zero_initialised_last_norms_are_reset():
    plan = plan_resnet_conversion(timm.create_model("resnet18", num_classes=10))
    assert len(plan.notes) == len(plan.converted)  # timm zero-inits every residual branch's last norm
    model = plan.apply()
    assert all(bool((model.get_submodule(n).out_norm.weight == 1).all()) for n in pnnh_block_names(model))


@pytest.mark.parametrize(
    "name, message", [("seresnet50", r"se \(SEModule\)"), ("resnext50_32x4d", "grouped convolution")]
)
def test_what_cannot_be_converted_is_refused(name, message):
    with pytest.raises(ValueError, match=message):
        convert_resnet(timm.create_model(name))


@pytest.mark.parametrize("name", ["pnnh_resnet56", "pnnh_slim_resnet20", "tat_vanilla20", "resnet110"])
def test_create_model_builds_the_families(name):
    model = timm.create_model(name, pretrained=False, num_classes=7, in_chans=1, drop_rate=0.0)
    assert type(model) is type(pnnh_models.create_model(name))
    assert model.num_classes == 7 and model.pretrained_cfg["input_size"] == (1, 32, 32)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert name in timm.list_models(name)


def test_timms_own_names_stay_timms():
    assert type(timm.create_model("resnet50")).__module__ == "timm.models.resnet"
    assert "resnet50" not in pnnh_models.register_with_timm()


def test_a_pnnh_vit_takes_its_image_size():
    model = timm.create_model("pnnh_vit_tiny", img_size=32, patch_size=8, depth=2, num_classes=10)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(pretrained=True), "no pretrained weights"),
        (dict(drop_rate=0.2), r"drop_rate=0.2 is not offered"),
        (dict(bn_eps=1e-3), "bn_eps is not offered"),
    ],
)
def test_what_the_models_do_not_offer_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model("pnnh_resnet20", **options)


def test_timms_training_utilities_train_a_pnnh_net():
    from timm.data import resolve_data_config
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = timm.create_model("pnnh_slim_resnet20", num_classes=10)
    config = resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 32, 32) and config["mean"] == pnnh_models.timm_registry.CIFAR_MEAN
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=2, warmup_epochs=0)
    ema = ModelEmaV3(model, decay=0.9)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    losses = []
    for epoch in range(2):
        for _ in range(2):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            ema.update(model)
            losses.append(loss.item())
        scheduler.step(epoch + 1)
    assert losses[-1] < losses[0]
    assert ema.module(x).shape == (8, 10)
