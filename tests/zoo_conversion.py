"""What every converted zoo ResNet must satisfy: the checks test_torchvision.py and test_timm.py share."""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pnnh_kernels import PNNHConv2d
from pnnh_kernels.models import PNNHBottleneck, plan_resnet_conversion


def pnnh_block_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (PNNHConv2d, PNNHBottleneck))}


def check_conversion(build: Callable[[], nn.Module], converted: int, kept: int) -> None:
    """Blocks converted and kept, learner weights copied, a training step, parameters, a state-dict round trip."""
    torch.manual_seed(0)
    model = _as_if_pretrained(build())
    original = copy.deepcopy(model)
    plan = plan_resnet_conversion(model)
    assert (len(plan.converted), len(plan.kept)) == (converted, kept), plan.summary()
    assert all("stride" in r or "projection" in r for r in plan.kept.values())
    plan.apply()
    assert pnnh_block_names(model) == {c.name for c in plan.converted}
    _check_learner_copied(model, original, plan.converted[0].name)
    assert plan.parameters_after == sum(p.numel() for p in model.parameters())
    assert f"{plan.parameters_before:,} -> {plan.parameters_after:,}" in plan.summary()

    _check_training_step(model)
    twin = build()
    plan_resnet_conversion(twin).apply()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(twin.eval()(x), model.eval()(x))


def _as_if_pretrained(model: nn.Module) -> nn.Module:
    """Norm statistics and affine parameters away from their init, so a norm copied wrong shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _check_learner_copied(model: nn.Module, original: nn.Module, name: str) -> None:
    new, old = model.get_submodule(name), original.get_submodule(name)
    if isinstance(new, PNNHConv2d):
        pairs = [(new.learner1_weight, old.conv1.weight), (new.learner2_weight, old.conv2.weight)]
        norms = [(new.learner_norm, old.bn1)]
    else:
        pairs = [(new.layer1[0].weight, old.conv1.weight), (new.layer3.weight, old.conv3.weight)]
        norms = [(new.layer2[1], old.bn2)]
    for mine, theirs in pairs:
        torch.testing.assert_close(mine, theirs)
    for mine, theirs in norms:
        torch.testing.assert_close(mine.weight, theirs.weight)
        torch.testing.assert_close(mine.running_var, theirs.running_var)


def _check_training_step(model: nn.Module) -> None:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # three steps on one batch must fit it a little
