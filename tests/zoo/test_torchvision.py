"""convert_resnet on torchvision's ResNets (skips without torchvision)."""

from __future__ import annotations

import pytest
import torch
from zoo_conversion import check_conversion
from zoo_imports import import_zoo

from pnnh_kernels.models import convert_resnet, plan_resnet_conversion

torchvision = import_zoo("torchvision")


@pytest.mark.parametrize("name, converted, kept", [("resnet18", 5, 3), ("resnet34", 13, 3), ("resnet50", 12, 4)])
def test_torchvision_resnets_convert_and_train(name, converted, kept):
    check_conversion(lambda: getattr(torchvision.models, name)(num_classes=10), converted, kept)


def test_plain_transitions_remove_every_shortcut():
    plan = plan_resnet_conversion(torchvision.models.resnet18(num_classes=10), plain_transitions=True)
    model = plan.apply()
    assert plan.plain == ["layer2.0", "layer3.0", "layer4.0"]
    assert not any("downsample" in n for n, _ in model.named_parameters())
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_slim_halves_resnet50():
    plan = plan_resnet_conversion(torchvision.models.resnet50(num_classes=10), slim=True)
    assert plan.parameters_after < 0.7 * plan.parameters_before


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: torchvision.models.resnext50_32x4d(), r"grouped convolution \(groups=32"),
        (lambda: torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True]), "dilated"),
        (lambda: torchvision.models.vgg11(), "no residual blocks were found"),
    ],
)
def test_what_cannot_be_converted_is_refused(build, message):
    with pytest.raises(ValueError, match=message):
        convert_resnet(build())


def test_wide_resnets_keep_their_inner_width():
    plan = plan_resnet_conversion(torchvision.models.wide_resnet50_2(num_classes=10))
    assert plan.converted[0].hidden_channels == 128 and all(c.copied_weights for c in plan.converted)
