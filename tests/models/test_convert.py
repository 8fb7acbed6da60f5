"""convert_resnet on this package's ResNets (torchvision and timm: tests/zoo)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_float32_close
from torch import nn

import pnnh_kernels
from pnnh_kernels import PNNHConv2d
from pnnh_kernels.models import PNNHBottleneck, create_model, plan_resnet_conversion
from pnnh_kernels.models.convert import convert_resnet


def _pnnh_blocks(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (PNNHConv2d, PNNHBottleneck))}


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_package_exports_the_converter():
    assert pnnh_kernels.convert_resnet is convert_resnet


def test_stride_one_blocks_become_pnnh_and_shape_changing_blocks_stay():
    model = create_model("resnet20")
    plan = plan_resnet_conversion(model)
    assert not _pnnh_blocks(model)  # planning changes nothing
    converted = plan.apply()
    assert converted is model
    assert sorted(_pnnh_blocks(model)) == sorted(c.name for c in plan.converted)
    assert len(plan.converted) == 7 and plan.kept == {
        "stages.1.0": "stride 2 (changes the resolution)",
        "stages.2.0": "stride 2 (changes the resolution)",
    }
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert plan.parameters_after == _parameter_count(model)
    assert "7 blocks become PNNH, 2 stay residual" in plan.summary()


def test_the_learner_takes_the_blocks_weights_and_the_block_computes_pnnh_without_the_shortcut():
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    for m in model.modules():  # non-trivial statistics, so a copy of the wrong norm shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    old = copy.deepcopy(model.stages[0][1])
    convert_resnet(model, backend="reference")
    new = model.stages[0][1]
    assert isinstance(new, PNNHConv2d) and new.backend == "reference" and not new.training
    x = torch.randn(2, 16, 8, 8)
    # float32 judged against the same composition in float64 (accuracy.py)
    exact = _composed(copy.deepcopy(old).double(), copy.deepcopy(new).double(), x.double())
    assert_float32_close(new(x), exact, _composed(old, new, x))
    torch.testing.assert_close(new.learner1_weight, old.layer1[0].weight)
    torch.testing.assert_close(new.out_norm.running_var, old.layer2[1].running_var)


def _composed(old: nn.Module, new: PNNHConv2d, x: torch.Tensor) -> torch.Tensor:
    """What the converted block must compute, from the ResNet block's own layers and the new coder."""
    norm = new.coder_norm
    coder = F.batch_norm(F.conv2d(x, new.coder.encoder), norm.running_mean, norm.running_var, norm.weight, norm.bias)
    learner = old.layer2[0](F.relu(old.layer1(x)))
    return old.layer2[1](F.conv_transpose2d(coder, new.coder.encoder) + learner)  # no ReLU, no shortcut


def test_bottlenecks_take_the_three_convolutions():
    model = create_model("resnet50", num_classes=5)
    old = copy.deepcopy(model.stages[0][1])
    convert_resnet(model)
    new = model.stages[0][1]
    assert isinstance(new, PNNHBottleneck)
    for i, conv in enumerate((new.layer1[0], new.layer2[0], new.layer3), start=1):
        torch.testing.assert_close(conv.weight, getattr(old, f"layer{i}")[0].weight)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


@pytest.mark.parametrize("depth", [56, 110])
def test_slim_matches_the_registered_slim_nets(depth):
    plan = plan_resnet_conversion(create_model(f"resnet{depth}"), slim=True)
    assert plan.parameters_after == _parameter_count(create_model(f"pnnh_slim_resnet{depth}"))
    assert plan.parameters_after < 0.6 * plan.parameters_before
    assert all(not c.copied_weights for c in plan.converted)  # half-width learners: fresh


def test_a_shared_coder_is_one_per_stage():
    model = convert_resnet(create_model("resnet20"), share_coder=True)
    coders = {stage: {id(b.coder) for b in _pnnh_blocks(s).values()} for stage, s in enumerate(model.stages)}
    assert all(len(ids) == 1 for ids in coders.values())
    assert len(set().union(*coders.values())) == 3


def test_options_reach_the_blocks_and_ratios_set_widths():
    model = convert_resnet(
        create_model("resnet20"), hidden_ratio=0.5, coder_ratio=2.0, final_activation=True, backend="eager"
    )
    block = model.stages[2][1]
    assert (block.hidden_channels, block.coder.coder_channels) == (32, 128)
    assert block.config.final_activation and block.backend == "eager"


def test_dtype_and_mode_are_kept():
    model = create_model("resnet20").double().eval()
    convert_resnet(model)
    block = model.stages[1][1]
    assert block.learner1_weight.dtype == torch.float64 and not block.training
    assert model(torch.randn(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_a_training_step_and_a_state_dict_round_trip():
    torch.manual_seed(0)
    model = convert_resnet(create_model("resnet20"), slim=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = F.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    optimizer.step()
    # the coder norm's bias decodes to a per-channel constant that the out norm removes: no gradient
    unchanged = {n for n, p in model.named_parameters() if torch.equal(before[n], p)}
    assert unchanged == {n for n in before if n.endswith("coder_norm.bias")}

    twin = convert_resnet(create_model("resnet20"), slim=True)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(twin.eval()(x), model.eval()(x))


def test_a_zero_initialised_last_norm_is_reset():
    model = create_model("resnet20")
    nn.init.zeros_(model.stages[0][1].layer2[1].weight)
    plan = plan_resnet_conversion(model)
    assert len(plan.notes) == 1 and "stages.0.1" in plan.notes[0]
    plan.apply()
    assert bool((model.stages[0][1].out_norm.weight == 1).all())


def test_what_a_pnnh_block_cannot_express_is_refused_before_anything_changes():
    model = create_model("resnet20")
    model.stages[0][1].layer1[0] = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
    with pytest.raises(ValueError, match=r"stages\.0\.1: grouped convolution \(groups=4"):
        convert_resnet(model)
    assert not _pnnh_blocks(model)

    residual = create_model("resnet20", drop_path_rate=0.1)
    with pytest.raises(ValueError, match=r"drop_path \(DropPath\) has no PNNH counterpart"):
        convert_resnet(residual)


@pytest.mark.parametrize(
    "model, message",
    [
        (nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), "no residual blocks were found"),
        (create_model("plain_resnet20"), "no residual blocks were found"),
    ],
)
def test_nothing_to_convert_is_an_error(model, message):
    with pytest.raises(ValueError, match=message):
        convert_resnet(model)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(hidden_ratio=0.0), r"hidden_ratio must lie in \(0, 4\]"),
        (dict(hidden_ratio=0.5, hidden_channels=8), "give hidden_ratio or hidden_channels, not both"),
        (dict(backend="nonsense"), "backend"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        convert_resnet(create_model("resnet20"), **options)


def test_bottleneck_options_are_checked():
    with pytest.raises(ValueError, match="PNNH bottleneck blocks take"):
        convert_resnet(create_model("resnet50"), activation="leaky_relu")


@pytest.mark.parametrize("name, depth_kind", [("resnet56", "cifar"), ("resnet50", "imagenet")])
def test_plain_transitions_give_the_registered_shortcut_free_net(name, depth_kind):
    plan = plan_resnet_conversion(create_model(name, num_classes=10), slim=True, plain_transitions=True)
    model = plan.apply()
    assert plan.plain == list(plan.kept) and "0 stay residual" in plan.summary()
    registered = create_model(f"pnnh_slim_{name}", num_classes=10)
    assert _parameter_count(model) == _parameter_count(registered) == plan.parameters_after
    assert not any(getattr(m, "residual", False) for m in model.modules())  # no block adds across itself
    size = 16 if depth_kind == "cifar" else 64
    model(torch.randn(2, 3, size, size)).sum().backward()


def test_a_plain_block_runs_the_blocks_own_layers():
    from pnnh_kernels.models.convert import PlainBlock, block_parts

    block = create_model("resnet20").stages[1][0].eval()
    plain = PlainBlock(block_parts(block)).eval()
    x = torch.randn(2, 16, 8, 8)
    expected = F.relu(block.layer2(F.relu(block.layer1(x))))  # the block without its shortcut
    torch.testing.assert_close(plain(x), expected)
    assert plain.convs[0] is block.layer1[0]  # the same modules: the weights are kept


def test_plain_transitions_refuse_what_the_plain_form_would_drop():
    with pytest.raises(ValueError, match=r"stages\.1\.0: drop_path \(DropPath\) would be dropped"):
        convert_resnet(create_model("resnet20", drop_path_rate=0.1), plain_transitions=True)


def _with_norms(model: nn.Module, **options) -> nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.BatchNorm2d(child.num_features, **options))
    return model


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: _with_norms(m, affine=False), "batch norm without affine parameters"),
        (lambda m: _with_norms(m, track_running_stats=False), "batch norm without running statistics"),
        (lambda m: setattr(m.stages[0][1].layer1[0], "padding_mode", "reflect"), "padding_mode 'reflect'"),
        (lambda m: m.stages[0].__setitem__(2, m.stages[0][1]), r"stages\.0\.2: the same module as stages\.0\.1"),
    ],
    ids=["no_affine", "no_running_stats", "reflect_padding", "block_used_twice"],
)
def test_blocks_a_pnnh_block_would_silently_change_are_refused_in_one_line(change, message):
    """Before, these converted (a reflect-padded or twice-used block changed what it computes) or failed
    with a traceback from deep inside the weight copy."""
    model = create_model("resnet20")
    change(model)
    with pytest.raises(ValueError, match=message):
        convert_resnet(model)
    assert not _pnnh_blocks(model)


def test_a_meta_device_model_converts_without_reading_values():
    model = convert_resnet(create_model("resnet20").to("meta"))
    blocks = _pnnh_blocks(model)
    assert blocks and all(p.is_meta for b in blocks.values() for p in b.parameters())
