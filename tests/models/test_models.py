"""Model families: construction by name, parameter counts, no additions across plain/PNNH blocks,
literal forms of the PNNH bottleneck and attention, drop path, init statistics, a few training steps."""

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import pnnh_kernels as pk
from pnnh_kernels.models import create_model, list_models, model_family
from pnnh_kernels.models.layers import DropPath, scaled_orthogonal_
from pnnh_kernels.models.resnet import BasicBlock, Bottleneck, PNNHBottleneck
from pnnh_kernels.models.vit import PatchEmbed, PNNHAttention, PNNHHalf, PNNHMlp


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def cifar_resnet_params(depth, classes=10):
    """Independent count for option-A CIFAR ResNets: convs + BN affine + classifier."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16  # stem
    in_ch = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += 9 * in_ch * width + 9 * width * width + 4 * width
            in_ch = width
    return total + 64 * classes + classes


# Published counts: He et al. 2016 / the torchvision and timm definitions.
KNOWN_COUNTS = {
    "resnet20": 269_722,
    "resnet56": 853_018,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "vit_tiny": 5_717_416,
    "vit_small": 22_050_664,
}


@pytest.mark.parametrize("name", sorted(KNOWN_COUNTS))
def test_parameter_counts_match_the_standard_definitions(name):
    assert n_params(create_model(name)) == KNOWN_COUNTS[name]


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_cifar_counts_and_plain_counterparts(depth):
    assert n_params(create_model(f"resnet{depth}")) == cifar_resnet_params(depth)
    assert n_params(create_model(f"plain_resnet{depth}")) == cifar_resnet_params(depth)  # option A has no params


def test_plain_imagenet_drops_the_projection_shortcuts():
    projections = sum(
        n_params(m)
        for m in create_model("resnet18").modules()
        if getattr(m, "shortcut", None) is not None and not isinstance(m.shortcut, nn.Identity)
        for m in [m.shortcut]
    )
    assert n_params(create_model("plain_resnet18")) == KNOWN_COUNTS["resnet18"] - projections


def _small_input(name):
    family = model_family(name)
    if family == "vit":
        return dict(img_size=8, patch_size=4, in_chans=1, num_classes=5, depth=2), torch.randn(2, 1, 8, 8)
    if name.endswith(("18", "34", "50")):
        return dict(in_chans=1, num_classes=5), torch.randn(2, 1, 64, 64)
    return dict(in_chans=1, num_classes=5), torch.randn(2, 1, 8, 8)


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_by_name_and_runs(name):
    kwargs, x = _small_input(name)
    model = create_model(name, **kwargs)
    assert model(x).shape == (2, 5)


def test_unknown_model_and_bad_options():
    with pytest.raises(ValueError, match="unknown model 'resnet21'"):
        create_model("resnet21")
    with pytest.raises(ValueError, match="residual models only"):
        create_model("plain_resnet20", drop_path_rate=0.1)
    with pytest.raises(ValueError, match="residual models only"):
        create_model("tat_vanilla20", drop_path_rate=0.1)


def test_pnnh_variant_replaces_exactly_the_stride1_blocks():
    model = create_model("pnnh_resnet20")
    kinds = [[type(b).__name__ for b in stage] for stage in model.stages]
    assert kinds == [["PNNHConv2d"] * 3, ["BasicBlock"] + ["PNNHConv2d"] * 2, ["BasicBlock"] + ["PNNHConv2d"] * 2]
    assert all(not b.residual for stage in model.stages for b in stage if hasattr(b, "residual"))
    shared = create_model("pnnh_resnet20", share_coder=True)
    for stage in shared.stages:
        coders = {id(b.coder) for b in stage if isinstance(b, pk.PNNHConv2d)}
        assert len(coders) == 1
    assert n_params(shared) < n_params(model)


@pytest.mark.parametrize(
    "depth, at_most", [(56, 0.56), (110, 0.53), (50, 0.57), (34, 0.64)], ids=["56", "110", "50", "34"]
)
def test_slim_pnnh_nets_have_about_half_a_resnets_parameters(depth, at_most):
    ratio = n_params(create_model(f"pnnh_slim_resnet{depth}")) / n_params(create_model(f"resnet{depth}"))
    assert ratio <= at_most, ratio


def test_slim_widths_are_fractions_of_each_stage():
    model = create_model("pnnh_slim_resnet20")
    for stage, width in zip(model.stages, (16, 32, 64)):
        blocks = [b for b in stage if isinstance(b, pk.PNNHConv2d)]
        assert blocks and all(b.hidden_channels == width // 2 for b in blocks)
        assert len({id(b.coder) for b in blocks}) == 1  # one coder per stage
    narrow = create_model("pnnh_resnet20", hidden_ratio=0.25, coder_ratio=0.5)
    widths = [
        (b.hidden_channels, b.coder.coder_channels) for s in narrow.stages for b in s if isinstance(b, pk.PNNHConv2d)
    ]
    assert widths[0] == (4, 8) and widths[-1] == (16, 32)


def test_a_shared_coder_takes_the_coder_width_asked_for():
    model = create_model("pnnh_resnet20", share_coder=True, pnnh_options={"coder_channels": 8})
    coders = {b.coder.coder_channels for s in model.stages for b in s if isinstance(b, pk.PNNHConv2d)}
    assert coders == {8}


def test_conflicting_width_options_are_refused():
    with pytest.raises(ValueError, match=r"give hidden_ratio or pnnh_options\['hidden_channels'\], not both"):
        create_model("pnnh_resnet20", hidden_ratio=0.5, pnnh_options={"hidden_channels": 8})
    with pytest.raises(ValueError, match="hidden_ratio must lie in"):
        create_model("pnnh_resnet20", hidden_ratio=0)
    coder = pk.PNNHCoder(8, 4)
    with pytest.raises(ValueError, match="shared coder maps"):
        pk.PNNHConv2d(8, coder=coder, coder_channels=8)


def test_slim_bottlenecks_train():
    model = create_model("pnnh_slim_resnet50", num_classes=5)
    blocks = [m for m in model.modules() if isinstance(m, PNNHBottleneck)]
    assert blocks and all(b.coder.coder_channels == b.layer3.weight.shape[0] // 4 for b in blocks)
    assert all(b.layer1[0].weight.shape[0] == b.layer3.weight.shape[0] // 8 for b in blocks)  # half the inner width
    loss = model(torch.randn(2, 3, 64, 64)).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------- no addition across a block

_LEAVES = (pk.PNNHConv2d, pk.PNNHLinear, PNNHBottleneck, PNNHHalf, PatchEmbed)


class _Tracer(torch.fx.Tracer):
    """PNNH blocks are leaves: their insides are checked against literal, addition-free forms below."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def tensor_additions(module: nn.Module) -> int:
    # a PNNH block traced as the root would be opened up; wrapped, it stays the leaf it is elsewhere
    graph = _Tracer().trace(nn.Sequential(module) if isinstance(module, _LEAVES) else module)
    adds = 0
    for node in graph.nodes:
        is_add = node.target in (torch.add, torch.Tensor.add, torch.Tensor.add_, "add", "add_") or getattr(
            node.target, "__name__", ""
        ) in ("add", "iadd")
        if is_add and sum(isinstance(a, torch.fx.Node) for a in node.args) == 2:
            adds += 1
    return adds


def _blocks(model):
    if hasattr(model, "stages"):
        return [b for stage in model.stages for b in stage]
    return list(model.blocks)


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "vit_tiny"])
def test_the_addition_check_sees_residual_blocks(name):
    model = create_model(name, **({"depth": 2} if "vit" in name else {}))
    assert all(tensor_additions(b) >= 1 for b in _blocks(model))


@pytest.mark.parametrize(
    "name",
    [
        "plain_resnet20",
        "pnnh_resnet20",
        "pnnh_resnet20_shared",
        "plain_resnet50",
        "pnnh_resnet50",
        "pnnh_vit_tiny",
        "plain_vit_tiny",
        "pnnh_slim_vit_tiny",
        "tat_vanilla20",
    ],
)
def test_plain_and_pnnh_models_add_nothing_across_blocks(name):
    kwargs = {"depth": 2} if "vit" in name else {}
    if name.endswith("_shared"):
        name, kwargs = name.removesuffix("_shared"), {"share_coder": True}
    model = create_model(name, **kwargs)
    blocks = _blocks(model) if model_family(name) != "vanilla" else [model]
    assert blocks and all(tensor_additions(b) == 0 for b in blocks)


def test_pnnh_bottleneck_equals_its_literal_form():
    torch.manual_seed(0)
    block = PNNHBottleneck(16, final_activation=True).double().train()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    bn = lambda z: F.batch_norm(z, None, None, training=True)
    enc, w1, w2, w3 = block.coder.encoder, block.layer1[0].weight, block.layer2[0].weight, block.layer3.weight
    z_c = bn(F.conv2d(x, enc))
    h1 = F.relu(torch.cat([z_c, -z_c, bn(F.conv2d(x, w1))], 1))
    c = z_c.shape[1]
    passed = h1[:, :c] - h1[:, c : 2 * c]  # layer 2 passes the signed coder pair through as [I, -I]
    h2 = F.relu(torch.cat([passed, -passed, bn(F.conv2d(h1[:, 2 * c :], w2, padding=1))], 1))
    w_d = enc.transpose(0, 1).flip(-1, -2)
    literal = F.relu(bn(F.conv2d(h2, torch.cat([w_d, -w_d, w3], 1))))
    torch.testing.assert_close(block(x), literal)


def test_pnnh_models_default_to_no_final_activation():
    model = create_model("pnnh_resnet20")
    blocks = [b for stage in model.stages for b in stage if isinstance(b, pk.PNNHConv2d)]
    assert blocks and all(not b.config.final_activation for b in blocks)
    on = create_model("pnnh_resnet20", pnnh_options={"final_activation": True})
    assert all(b.config.final_activation for stage in on.stages for b in stage if isinstance(b, pk.PNNHConv2d))
    assert not any(b.final_activation for b in create_model("pnnh_resnet50").modules() if isinstance(b, PNNHBottleneck))


def _literal_half(block, x, core_of):
    """Layer 1: ``act([W_e x, -W_e x])`` beside the learner's hidden output; layer 2: one linear map over it
    with ``[W_e^T, -W_e^T, W_out]``."""
    enc, learner = block.coder.encoder, block.learner
    z_c = x @ enc.t()
    core, act, out = core_of(learner, block.norm(x))
    h = torch.cat([act(z_c), act(-z_c), core], -1)
    return F.linear(h, torch.cat([enc.t(), -enc.t(), out.weight], 1), out.bias)


def test_pnnh_vit_halves_equal_their_literal_forms():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64)

    def attention_core(attn, x):
        b, n, d = x.shape
        q, k, v = attn.qkv(x).reshape(b, n, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        core = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return core, F.relu, attn.proj  # the attention output is not activated: only the signed pair is

    def mlp_core(mlp, x):
        return F.gelu(mlp.fc1(x)), F.gelu, mlp.fc2  # GELU(a) - GELU(-a) = a passes the signed pair

    for block, core_of in [(PNNHAttention(8, 2), attention_core), (PNNHMlp(8, 12), mlp_core)]:
        block = block.double()
        torch.testing.assert_close(block(x), _literal_half(block, x, core_of))


def test_pnnh_vit_coder_path_starts_as_the_identity_and_carries_no_norm():
    """A tied orthogonal coder's ``W_e^T W_e`` is the identity at init: with the learner's output projection
    zeroed, a half returns its input unchanged, whatever its scale (no norm rescales the carried input)."""
    torch.manual_seed(0)
    half = PNNHMlp(16, 16)
    with torch.no_grad():
        half.learner.fc2.weight.zero_()
        half.learner.fc2.bias.zero_()
    x = 7.0 * torch.randn(3, 4, 16)
    torch.testing.assert_close(half(x), x, atol=1e-5, rtol=1e-5)


def test_pnnh_vit_coders_learn_at_their_scaled_rate():
    from pnnh_kernels.train.optim import make_optimizer

    small = dict(dim=16, heads=2, img_size=8, patch_size=2, depth=2, num_classes=10)
    model = create_model("pnnh_slim_vit_tiny", coder_lr_scale=0.25, **small)
    optimizer = make_optimizer(model, "adamw", 1e-3, 0.05)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    coders = {id(p) for n, p in model.named_parameters() if ".coder." in n}
    assert len(coders) == 2  # one attention and one MLP coder, shared by the group of blocks
    assert all(lr_of[i] == pytest.approx(2.5e-4) for i in coders)
    assert all(lr == 1e-3 for i, lr in lr_of.items() if i not in coders)
    assert sorted(lr_of) == sorted(id(p) for p in model.parameters())  # every parameter in exactly one group
    with pytest.raises(ValueError, match="coder_lr_scale is an option of the PNNH-ViTs"):
        create_model("vit_tiny", coder_lr_scale=0.5, **small)
    with pytest.raises(ValueError, match="finite number >= 0"):
        create_model("pnnh_vit_tiny", coder_lr_scale=float("nan"), **small)


# --------------------------------------------------------------------------- drop path, init


def test_drop_path_is_per_sample_and_unbiased():
    torch.manual_seed(0)
    dp = DropPath(0.25).train()
    x = torch.ones(4000, 3, 2, 2)
    y = dp(x)
    per_sample = y.flatten(1)
    assert torch.all((per_sample == 0).all(1) | torch.isclose(per_sample, torch.tensor(1 / 0.75)).all(1))
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.03
    assert abs(y.mean().item() - 1.0) < 0.05
    assert torch.equal(dp.eval()(x), x)


def test_residual_models_get_linearly_increasing_drop_path():
    model = create_model("resnet20", drop_path_rate=0.2)
    rates = [b.drop_path.drop_prob for stage in model.stages for b in stage]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)


def test_scaled_delta_orthogonal_init():
    conv = torch.empty(32, 16, 3, 3)
    scaled_orthogonal_(conv)
    centre = conv[:, :, 1, 1]
    torch.testing.assert_close(centre.t() @ centre, 2.0 * torch.eye(16), atol=1e-5, rtol=0)  # sqrt(32/16)^2
    conv[:, :, 1, 1] = 0
    assert conv.abs().sum() == 0
    dense = torch.empty(10, 20)
    scaled_orthogonal_(dense, gain=1.5)
    torch.testing.assert_close(dense @ dense.t(), 2.25 * torch.eye(10), atol=1e-5, rtol=0)


def _orthogonal_pair(channels=32, size=8):
    """Two inputs, unit q at every location, uncorrelated (c = 0) location by location."""
    a, b = torch.randn(2, channels, size, size)
    b = b - (a * b).sum(0, keepdim=True) / (a * a).sum(0, keepdim=True) * a
    x = torch.stack([a, b])
    return x / x.pow(2).mean(1, keepdim=True).sqrt()


def _wide_vanilla_features(name):
    torch.manual_seed(0)
    model = create_model(name, in_chans=32, widths=(128, 128, 128), per_location_norm=False).eval()
    with torch.no_grad():
        return model, model.forward_features(_orthogonal_pair(), return_all=True)


def _output_correlation(last):
    a, b = last[0], last[1]  # (C, H, W): correlation over channels, averaged over locations
    return ((a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))).mean().item()


@pytest.mark.parametrize("name", ["tat_vanilla56", "dks_vanilla56"])
def test_signal_scale_survives_a_deep_vanilla_net_at_init(name):
    _, features = _wide_vanilla_features(name)
    q = torch.tensor([f.pow(2).mean().item() for f in features])
    assert len(q) == 55
    assert 0.5 < q.log().mean().exp() < 2.0 and 0.25 < q[-1] < 4.0, q


def test_tat_net_shapes_the_kernel_as_designed():
    """At init the network's C map sends c = 0 to about the TAT target 0.9; EOC-ReLU nets degenerate to ~1."""
    _model, features = _wide_vanilla_features("tat_vanilla56")
    c_tat = _output_correlation(features[-1])
    assert abs(c_tat - 0.9) < 0.06, c_tat
    _, eoc_features = _wide_vanilla_features("eoc_vanilla56")
    assert _output_correlation(eoc_features[-1]) > 0.97


def test_vanilla_net_with_wrong_gain_loses_its_signal():
    """The same check fails for a ReLU net initialised at gain 1 instead of the critical sqrt(2)."""
    torch.manual_seed(0)
    model = create_model("eoc_vanilla56", in_chans=3).eval()
    for conv in model.convs:
        scaled_orthogonal_(conv.weight, gain=1.0)
    with torch.no_grad():
        q_last = model.forward_features(torch.randn(16, 3, 16, 16)).pow(2).mean().item()
    assert q_last < 1e-4


# --------------------------------------------------------------------------- a few optimisation steps


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("resnet20", {}),
        ("plain_resnet20", {}),
        ("pnnh_resnet20", {}),
        ("tat_vanilla20", {}),
        ("dks_vanilla20", {}),
        ("eoc_vanilla20", {}),
        ("vit_tiny", {"img_size": 8, "patch_size": 2, "depth": 2}),
        ("pnnh_vit_tiny", {"img_size": 8, "patch_size": 2, "depth": 2}),
        ("pnnh_slim_vit_tiny", {"img_size": 8, "patch_size": 2, "depth": 2}),
        ("plain_vit_tiny", {"img_size": 8, "patch_size": 2, "depth": 2}),
    ],
)
def test_a_few_steps_reduce_the_loss(name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, in_chans=1, num_classes=4, **kwargs).train()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_a_per_block_state_dict_does_not_load_into_a_shared_coder_net():
    """One coder per block cannot load into a stage's one shared coder (it kept the last block's before)."""
    per_block = create_model("pnnh_resnet20", num_classes=10)
    shared = create_model("pnnh_resnet20", num_classes=10, share_coder=True)
    state = per_block.state_dict()
    assert set(state) == set(shared.state_dict())  # the same keys: strict loading alone does not notice
    with pytest.raises(RuntimeError, match=r"stages\.0\.0\.coder\.encoder and .* hold different values"):
        shared.load_state_dict(state)
    shared_state = shared.state_dict()
    create_model("pnnh_resnet20", num_classes=10, share_coder=True).load_state_dict(shared_state)  # its own kind loads


def test_a_converted_shared_coder_net_checks_its_state_dict_too():
    from pnnh_kernels import convert_resnet

    convert = lambda: convert_resnet(create_model("resnet20", num_classes=10), share_coder=True)
    model, other = convert(), convert()
    state = other.state_dict()
    first = next(k for k in state if k.endswith("coder.encoder"))
    state[first] = state[first] + 1  # one block's copy of the stage's coder differs
    with pytest.raises(RuntimeError, match="load one shared tensor"):
        model.load_state_dict(state)


@pytest.mark.parametrize("depth", [6, 12, 24])
def test_the_slim_pnnh_vit_has_at_most_0_6x_the_vits_parameters(depth):
    """A narrower MLP learner (ratio 1) and one attention and one MLP coder per group of 4 blocks."""
    small = dict(dim=64, heads=4, img_size=8, patch_size=2, depth=depth, num_classes=10)
    vit, slim = create_model("vit_tiny", **small), create_model("pnnh_slim_vit_tiny", **small)
    assert n_params(slim) <= 0.6 * n_params(vit)
    blocks = list(slim.blocks)
    assert blocks[0].attn.coder is blocks[3].attn.coder and blocks[0].mlp.coder is blocks[3].mlp.coder
    assert depth <= 4 or blocks[0].attn.coder is not blocks[4].attn.coder


def test_the_plain_vit_is_the_vit_without_its_additions():
    """The same layers and parameters: only the residual additions are gone."""
    small = dict(dim=32, heads=2, img_size=8, patch_size=2, depth=3, num_classes=10)
    vit, plain = create_model("vit_tiny", **small), create_model("plain_vit_tiny", **small)
    assert [n for n, _ in vit.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert all(tensor_additions(b) > 0 for b in vit.blocks) and all(tensor_additions(b) == 0 for b in plain.blocks)


def _out_of_place(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The residual block's formula with fresh tensors everywhere."""
    layers = [m for m in (block.layer1, block.layer2, getattr(block, "layer3", None)) if m is not None]
    h = x
    for i, layer in enumerate(layers):
        h = layer(h) if i == len(layers) - 1 else F.relu(layer(h))
    return F.relu(h if block.shortcut is None else block.shortcut(x) + h)


@pytest.mark.parametrize(
    "make",
    [
        lambda: BasicBlock(8, 8),
        lambda: BasicBlock(8, 16, stride=2),  # option A: a strided, zero-padded view of x
        lambda: BasicBlock(8, 8, shortcut=None),
        lambda: Bottleneck(8, 16, stride=2),  # option B: a convolution
    ],
)
def test_residual_blocks_work_in_place_without_touching_their_input(make):
    """The blocks add and activate in place (torchvision's form): outputs and every gradient equal the formula's
    with fresh tensors, in training mode, and the input is left as it was."""
    torch.manual_seed(0)
    block = make().train()
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    kept = x.detach().clone()
    y = block(x)
    assert torch.equal(x.detach(), kept)
    grads = torch.autograd.grad(y.square().sum(), [x, *block.parameters()])
    want = _out_of_place(block, x)
    want_grads = torch.autograd.grad(want.square().sum(), [x, *block.parameters()])
    torch.testing.assert_close(y, want)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected)
