"""The literal reference and the algebraic eager block compute the same function, gradients and stats."""

import pytest
import torch
from helpers import assert_matches_reference, randomize_norms, twin

import pnnh_kernels as pk

CONV_CASES = {
    "default": dict(),
    "leaky_scaled": dict(activation="leaky_relu", negative_slope=0.2, activation_scale=1.3),
    "identity": dict(activation="identity", activation_scale=0.7),
    "no_final_act": dict(final_activation=False),
    "no_norm_bias": dict(norm="none"),
    "untied": dict(tied=False),
    "untied_in_ne_out": dict(tied=False, out_channels=7),
    "coder_3x3": dict(coder_kernel_size=3),
    "learner_1x1_coder_3x3": dict(kernel_size=1, coder_kernel_size=3),
    "narrow_coder_wide_learner": dict(coder_channels=3, hidden_channels=11),
    "learner_5x5": dict(kernel_size=5),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv_block_agrees(case, training, dtype):
    options = CONV_CASES[case]
    ref = pk.PNNHConv2d(5, backend="reference", **options).to(dtype).train(training)
    randomize_norms(ref)
    eager = twin(ref, "eager")
    x = torch.randn(3, 5, 7, 6, dtype=dtype)
    # float32: judged against float64, the bound set by the literal reference block in float32
    assert_matches_reference(ref, eager, x, baseline="reference")


@pytest.mark.parametrize(
    "shape",
    [(1, 4, 7, 7), (2, 4, 1, 1), (2, 4, 13, 1), (1, 4, 1, 13)],
    ids=["batch1", "spatial1x1", "column", "row"],
)
def test_conv_block_odd_shapes(shape):
    ref = pk.PNNHConv2d(4, backend="reference").double()
    eager = twin(ref, "eager")
    assert_matches_reference(ref, eager, torch.randn(shape, dtype=torch.float64))


def test_conv_block_channels_last_and_strided_input():
    ref = pk.PNNHConv2d(6, backend="reference").double()
    randomize_norms(ref)
    eager = twin(ref, "eager")
    base = torch.randn(2, 12, 9, 10, dtype=torch.float64)
    strided = base[:, ::2, :, 1:]  # non-contiguous view
    channels_last = torch.randn(2, 6, 9, 9, dtype=torch.float64).to(memory_format=torch.channels_last)
    for x in (strided, channels_last):
        assert_matches_reference(ref, eager, x)
    y = eager(channels_last)
    assert y.shape == channels_last.shape


LINEAR_CASES = {
    "layer_relu": dict(),
    "layer_gelu": dict(activation="gelu"),
    "batch_leaky": dict(norm="batch", activation="leaky_relu", negative_slope=0.1),
    "none_identity": dict(norm="none", activation="identity"),
    "untied_out_ne_in": dict(tied=False, out_features=9),
    "narrow_coder": dict(coder_features=2, final_activation=False),
}


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
@pytest.mark.parametrize("training", [True, False])
def test_linear_block_agrees(case, training):
    ref = pk.PNNHLinear(6, hidden_features=10, backend="reference", **LINEAR_CASES[case]).double().train(training)
    randomize_norms(ref)
    eager = twin(ref, "eager")
    for shape in [(5, 6), (2, 3, 6), (6,)]:
        if len(shape) == 1 and ref.config.norm == "batch" and training:
            continue  # one vector has one value per channel: batch norm cannot train on it
        assert_matches_reference(ref, eager, torch.randn(shape, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["reference", "eager"])
def test_gradcheck_float64(backend):
    conv = pk.PNNHConv2d(3, hidden_channels=4, coder_kernel_size=3, backend=backend, activation="leaky_relu").double()
    lin = pk.PNNHLinear(4, hidden_features=5, backend=backend, activation="gelu").double()
    x_conv = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    x_lin = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    conv_params = tuple(conv.parameters())
    lin_params = tuple(lin.parameters())

    def conv_fn(x, *params):
        return torch.func.functional_call(conv, dict(zip([n for n, _ in conv.named_parameters()], params)), (x,))

    def lin_fn(x, *params):
        return torch.func.functional_call(lin, dict(zip([n for n, _ in lin.named_parameters()], params)), (x,))

    conv.eval()  # running statistics are buffers updated in training; gradcheck needs a pure function
    assert torch.autograd.gradcheck(conv_fn, (x_conv, *conv_params))
    lin.train()  # layer norm has no running statistics: training mode is a pure function here
    assert torch.autograd.gradcheck(lin_fn, (x_lin, *lin_params))


def test_gradcheck_training_batch_statistics():
    """Training-mode batch norm (batch statistics) through the whole block, with running stats detached."""
    block = pk.PNNHConv2d(3, hidden_channels=4, backend="eager").double().train()
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = None
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_eager_error_within_twice_reference(dtype):
    """FlashAttention's rule: eager in low precision errs at most ~2x the reference in that precision."""
    ref64 = pk.PNNHConv2d(16, backend="reference").double().eval()
    randomize_norms(ref64)
    x64 = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    expected = ref64(x64)
    errors = {}
    for backend in ("reference", "eager"):
        m = twin(ref64, backend).to(dtype)
        try:
            y = m(x64.to(dtype))
        except RuntimeError as exc:  # a CPU build without this dtype's conv
            pytest.skip(f"{dtype} conv not supported here: {exc}")
        errors[backend] = (y.double() - expected).abs().max().item()
    assert errors["eager"] <= 2 * errors["reference"] + 1e-2, errors


def test_tied_orthogonal_coder_inverts_at_init():
    """decode(encode(x)) == x for a square orthogonal coder, 1x1 and delta-orthogonal 3x3."""
    for k in (1, 3):
        coder = pk.PNNHCoder(6, 6, k, dtype=torch.float64)
        x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
        z = torch.nn.functional.conv2d(x, coder.encoder, padding=k // 2)
        back = torch.nn.functional.conv_transpose2d(z, coder.encoder, padding=k // 2)
        torch.testing.assert_close(back, x)


def test_coder_path_carries_the_input_through_the_block():
    """With the learner silenced, the block outputs act(BN(g * x)) exactly: the input survives layer 1."""
    block = pk.PNNHConv2d(4, backend="reference", final_activation=False).double().train()
    with torch.no_grad():
        block.learner2_weight.zero_()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    y = block(x)
    # with a 1x1 orthogonal coder, BN_c rescales per coder channel; undo it by hand
    z_c = torch.nn.functional.conv2d(x, block.coder.encoder)
    z_c = torch.nn.functional.batch_norm(z_c, None, None, training=True)
    u = torch.nn.functional.conv_transpose2d(z_c, block.coder.encoder)
    expected = torch.nn.functional.batch_norm(u, None, None, training=True)
    torch.testing.assert_close(y, expected)
