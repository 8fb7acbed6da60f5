"""reparameterize_model / .reparameterize(): a trained PNNH net in eval mode as plain torch.nn layers, every batch
norm folded, computing what the net computes (within 1e-5 relative in float32) in both forms."""

import pytest
import torch
from helpers import BLOCK_CASES, LINEAR_CASES, randomize_norms
from torch import nn

import pnnh_kernels as pk
from pnnh_kernels import reparameterize_model
from pnnh_kernels.models import create_model
from pnnh_kernels.models.resnet import PNNHBottleneck
from pnnh_kernels.models.vit import PNNHHalf

FORMS = ["fast", "plain"]
CONV_CASES = {
    **BLOCK_CASES,
    "norm_none": dict(norm="none"),
    "negative_scale": dict(activation="leaky_relu", negative_slope=0.1, activation_scale=-0.7),
    "coder_5x5_learner_3x3": dict(coder_kernel_size=5),
}
LINEAR_FORMS = {
    **LINEAR_CASES,
    "batch_norm": dict(norm="batch"),
    "norm_none": dict(norm="none"),
    "gelu_scaled": dict(activation="gelu", activation_scale=1.3),
    "batch_norm_negative_scale": dict(norm="batch", activation="leaky_relu", negative_slope=0.1, activation_scale=-0.6),
}
PNNH_TYPES = (pk.PNNHConv2d, pk.PNNHLinear, PNNHBottleneck, PNNHHalf)


def random_statistics(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters far from their initial values (as RepVGG verifies), eval mode."""
    randomize_norms(model, seed=1)
    return model.eval()


def assert_same_function(original: nn.Module, folded: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        want, got = original(x), folded(x)
    relative = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    assert relative < 1e-5, f"relative difference {relative:.2e}"
    assert not any(isinstance(m, PNNH_TYPES) for m in folded.modules()), "a PNNH block was left"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), "a batch norm was left"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_a_conv_block_folds_exactly(case, form):
    """Every block option: k x k coders at the border of odd-sized maps, untied decoders, norm='none',
    leaky and scaled (also negatively) activations, no final activation; channels_last inputs take the fast
    form's in-place path (its activations written over the layers' outputs)."""
    torch.manual_seed(0)
    block = random_statistics(pk.PNNHConv2d(5, backend="eager", **CONV_CASES[case]))
    for shape in [(1, 5, 7, 5), (3, 5, 4, 9)]:
        x = torch.randn(*shape)
        assert_same_function(block, block.reparameterize(form), x)
        assert_same_function(block, block.reparameterize(form), x.contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", sorted(LINEAR_FORMS))
def test_a_linear_block_folds_exactly(case, form):
    torch.manual_seed(0)
    block = random_statistics(pk.PNNHLinear(6, backend="eager", **LINEAR_FORMS[case]))
    assert_same_function(block, block.reparameterize(form), torch.randn(2, 3, 6))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    "name",
    [
        "pnnh_resnet20",
        "pnnh_slim_resnet20",
        "pnnh_resnet50",
        "pnnh_slim_resnet50",
        "pnnh_vit_tiny",
        "pnnh_slim_vit_tiny",
    ],
)
def test_every_family_folds_exactly(name, form):
    torch.manual_seed(0)
    options = dict(img_size=16, patch_size=4, depth=2) if "vit" in name else {}
    model = random_statistics(create_model(name, num_classes=10, **options))
    for batch, size in [(1, 16), (2, 15) if "vit" not in name else (2, 16)]:
        assert_same_function(model, reparameterize_model(model, form=form), torch.randn(batch, 3, size, size))


@pytest.mark.parametrize("form", FORMS)
def test_a_converted_resnet_with_shared_coders_folds_exactly(form):
    torch.manual_seed(0)
    model = random_statistics(pk.convert_resnet(create_model("resnet20"), share_coder=True, hidden_ratio=0.5))
    assert_same_function(model, reparameterize_model(model, form=form), torch.randn(2, 3, 13, 11))


def test_a_model_in_training_mode_is_refused_naming_the_block():
    """RepVGG's most reported mistake: folding in training mode gives a silently wrong model."""
    model = create_model("pnnh_resnet20")
    model.eval()
    model.stages[1][2].train()
    with pytest.raises(ValueError, match=r"stages\.1\.2 is in training mode; call model\.eval\(\) first"):
        reparameterize_model(model)


def test_the_batch_norms_outside_the_blocks_fold_and_training_mode_is_refused_naming_them():
    """A ResNet's stem and branches (Conv2d -> BatchNorm2d in a Sequential) fold too."""
    torch.manual_seed(0)
    model = random_statistics(create_model("resnet20", num_classes=10))
    assert_same_function(model, reparameterize_model(model), torch.randn(2, 3, 15, 17))
    model.stages[2][0].layer2[1].train()
    with pytest.raises(ValueError, match=r"stages\.2\.0\.layer2\.1 is in training mode; call model\.eval\(\)"):
        reparameterize_model(model)


def test_a_copy_by_default_in_place_on_request_and_idempotent():
    model = random_statistics(create_model("pnnh_resnet20"))
    folded = reparameterize_model(model)
    assert any(isinstance(m, pk.PNNHConv2d) for m in model.modules())  # the original is untouched
    again = reparameterize_model(folded)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(again(x), folded(x), rtol=0, atol=0)
    assert reparameterize_model(model, inplace=True) is model
    assert not any(isinstance(m, pk.PNNHConv2d) for m in model.modules())
    with pytest.raises(ValueError, match="form must be one of"):
        reparameterize_model(model, form="fastest")


def test_the_plain_form_has_no_addition_anywhere():
    """The paper's point made literal: Conv2d -> activation -> Conv2d, a single path."""
    model = random_statistics(create_model("pnnh_resnet20"))
    program = torch.export.export(reparameterize_model(model, form="plain"), (torch.randn(1, 3, 16, 16),))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("add" in t for t in targets), sorted(targets)


def test_the_plain_form_of_pnnh_vit_blocks_has_no_addition():
    """Each half: ``Linear -> [act(z_c), act(-z_c), the learner's hidden output] -> Linear``; the model's one
    addition, the position embedding, is outside the blocks."""
    torch.manual_seed(0)
    model = create_model("pnnh_slim_vit_tiny", dim=16, heads=2, img_size=8, patch_size=2, depth=2).eval()
    with torch.no_grad():  # a trained coder is no longer orthogonal
        for name, p in model.named_parameters():
            if ".coder." in name:
                p.add_(0.1 * torch.randn_like(p))
    folded = reparameterize_model(model, form="plain")
    x = torch.randn(2, 3, 8, 8)
    assert_same_function(model, folded, x)
    program = torch.export.export(folded.blocks, (torch.randn(1, 17, 16),))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("add" in t for t in targets), sorted(targets)


@pytest.mark.parametrize("name", ["pnnh_resnet20", "pnnh_slim_resnet20"])
@pytest.mark.parametrize("shape", [(2, 3, 15, 17), (1, 3, 8, 8)])
def test_the_fast_form_in_eager_channels_last_inference_accumulates_in_place_exactly(name, shape, monkeypatch):
    """No-grad channels_last calls add the 1x1 coder map into layer 2's output in place (deploy/conv.py); they
    compute what the plain path and the original net compute."""
    from pnnh_kernels.deploy.conv import FastBlock

    torch.manual_seed(0)
    model = random_statistics(create_model(name, num_classes=10)).to(memory_format=torch.channels_last)
    folded = reparameterize_model(model)
    calls, in_place_forward = [], FastBlock._forward_in_place
    monkeypatch.setattr(FastBlock, "_forward_in_place", lambda self, x: calls.append(1) or in_place_forward(self, x))
    x = torch.randn(*shape).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        in_place = folded(x)
        assert len(calls) == sum(isinstance(m, FastBlock) for m in folded.modules())  # every block took it
        with torch.enable_grad():
            plain_path = folded(x)  # autograd records it: the plain path
        assert_same_function(model, folded, x)
    torch.testing.assert_close(in_place, plain_path.detach(), rtol=1e-5, atol=1e-5 * plain_path.abs().max().item())
