"""Bad input raises a clear error, never a crash or a silently wrong result."""

import math

import pytest
import torch
from helpers import twin

import pnnh_kernels as pk


@pytest.fixture(params=["reference", "eager", "cpu"])
def backend(request):
    return request.param


def test_wrong_rank(backend):
    with pytest.raises(ValueError, match="4-D input"):
        pk.PNNHConv2d(4, backend=backend)(torch.randn(4, 3, 3))
    with pytest.raises(ValueError, match="at least a 1-D"):
        pk.PNNHLinear(4, backend=backend)(torch.tensor(1.0))


def test_wrong_channel_count(backend):
    with pytest.raises(ValueError, match="expects 4 input channels, got 5"):
        pk.PNNHConv2d(4, backend=backend)(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="expects 4 input features, got 3"):
        pk.PNNHLinear(4, backend=backend)(torch.randn(2, 3))


def test_wrong_dtype(backend):
    with pytest.raises(TypeError, match="input dtype must be"):
        pk.PNNHConv2d(4, backend=backend)(torch.ones(2, 4, 3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"does not match .* dtype torch.float32"):
        pk.PNNHConv2d(4, backend=backend)(torch.randn(2, 4, 3, 3, dtype=torch.float64))


def test_device_mismatch(backend):
    with pytest.raises(RuntimeError, match="input is on meta but encoder is on cpu"):
        pk.PNNHConv2d(4, backend=backend)(torch.randn(2, 4, 3, 3, device="meta"))


def test_not_a_tensor(backend):
    with pytest.raises(TypeError, match=r"must be a torch.Tensor"):
        pk.PNNHLinear(4, backend=backend)([[1.0, 2.0, 3.0, 4.0]])


def test_empty_input(backend):
    with pytest.raises(ValueError, match="no elements"):
        pk.PNNHConv2d(4, backend=backend)(torch.randn(0, 4, 3, 3))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_in_training_keeps_running_stats_clean(backend, bad):
    block = pk.PNNHConv2d(4, backend=backend).train()
    before = block.out_norm.running_mean.clone()
    x = torch.randn(2, 4, 3, 3)
    x[1, 2, 0, 0] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        block(x)
    assert torch.equal(block.out_norm.running_mean, before)
    assert int(block.out_norm.num_batches_tracked) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_finite_check_tells_overflowing_sums_from_non_finite_values(dtype):
    from pnnh_kernels.validation import _all_finite

    huge = torch.full((64, 64), torch.finfo(dtype).max / 8, dtype=dtype)  # finite, but its sum overflows
    assert _all_finite(huge)
    huge[5, 7] = math.inf
    assert not _all_finite(huge)
    huge[5, 7] = math.nan
    assert not _all_finite(huge)


def test_finite_check_can_be_disabled(backend):
    block = pk.PNNHConv2d(4, backend=backend).train()
    x = torch.randn(2, 4, 3, 3)
    x[0, 0, 0, 0] = math.nan
    pk.set_finite_check(False)
    try:
        assert torch.isnan(block(x)).any()
    finally:
        pk.set_finite_check(None)


def test_finite_check_defaults_to_cpu_tensors_only():
    """On a GPU the check would cost a host sync per call: off there unless asked for."""
    from pnnh_kernels.validation import _finite_check_applies

    cpu, gpu_like = torch.empty(1), torch.empty(1, device="meta")
    assert _finite_check_applies(cpu) and not _finite_check_applies(gpu_like)
    pk.set_finite_check(True)
    try:
        assert _finite_check_applies(gpu_like)
    finally:
        pk.set_finite_check(None)


def test_non_finite_input_in_eval_propagates(backend):
    x = torch.randn(2, 4, 3, 3)
    x[0, 0, 1, 1] = math.nan
    assert torch.isnan(pk.PNNHConv2d(4, backend=backend).eval()(x)).any()


def test_batch_norm_needs_more_than_one_value(backend):
    with pytest.raises(ValueError, match="more than one value per channel"):
        pk.PNNHConv2d(4, backend=backend).train()(torch.randn(1, 4, 1, 1))
    pk.PNNHConv2d(4, backend=backend).eval()(torch.randn(1, 4, 1, 1))  # eval uses running stats: fine


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(in_channels=0), ValueError, "in_channels must be a positive int"),
        (dict(in_channels=4, kernel_size=2), ValueError, "kernel_size must be a positive odd"),
        (dict(in_channels=4, coder_kernel_size=4), ValueError, "coder_kernel_size must be a positive odd"),
        (dict(in_channels=4, out_channels=8), ValueError, "needs tied=False"),
        (dict(in_channels=4, norm="layer"), ValueError, "norm must be one of"),
        (dict(in_channels=4, activation="swish"), ValueError, "activation must be one of"),
        (dict(in_channels=4, activation="relu", negative_slope=0.1), ValueError, "leaky_relu only"),
        (dict(in_channels=4, activation_scale=0.0), ValueError, "scale must be non-zero"),
        (dict(in_channels=4, activation="leaky_relu", negative_slope=math.nan), ValueError, "finite number"),
        (dict(in_channels=4, momentum=2.0), ValueError, "momentum must lie"),
    ],
)
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        pk.PNNHConv2d(**kwargs)


def test_shared_coder_must_fit():
    coder = pk.PNNHCoder(8, 8, 1)
    with pytest.raises(ValueError, match="shared coder maps 8 -> 8"):
        pk.PNNHConv2d(4, coder=coder)


def test_functional_rejects_inconsistent_weights():
    good = pk.PNNHConv2d(4, norm="none")
    w = good.block_weights()
    x = torch.randn(2, 4, 3, 3)
    config = pk.BlockConfig(norm="none")
    with pytest.raises(ValueError, match="learner2 reads 3 channels but learner1 makes 4"):
        pk.pnnh_conv2d(x, w._replace(learner2=torch.randn(4, 3, 3, 3)), config=config)
    with pytest.raises(ValueError, match="weight must be 4-D"):
        pk.pnnh_conv2d(x, w._replace(encoder=torch.randn(4, 4)), config=config)
    with pytest.raises(ValueError, match="needs NormParams"):
        pk.pnnh_conv2d(x, w)  # default config has batch norm


@pytest.mark.parametrize(
    "weights, match",
    [
        (lambda w: w._replace(encoder=[[1.0]]), "weights.encoder must be a torch.Tensor, got list"),
        (lambda w: w._replace(decoder=3.0), "weights.decoder must be a torch.Tensor, got float"),
        (lambda w: (w.encoder, w.learner1, w.learner2), "weights must be a pnnh_kernels.BlockWeights, got tuple"),
    ],
    ids=["list_encoder", "float_decoder", "plain_tuple"],
)
def test_functional_names_an_argument_that_is_not_a_tensor(weights, match):
    block = pk.PNNHConv2d(4)
    with pytest.raises(TypeError, match=match):
        pk.pnnh_conv2d(torch.randn(2, 4, 3, 3), weights(block.block_weights()), block.block_norms(), block.config)


def test_functional_names_a_norm_parameter_that_is_not_a_tensor():
    block = pk.PNNHConv2d(4)
    norms = block.block_norms()
    norms = norms._replace(out=norms.out._replace(weight=[1.0] * 4))
    with pytest.raises(TypeError, match=r"norms\.out\.weight must be a torch\.Tensor or None, got list"):
        pk.pnnh_conv2d(torch.randn(2, 4, 3, 3), block.block_weights(), norms, block.config)


@pytest.mark.parametrize(
    "make", [lambda: pk.PNNHConv2d(4), lambda: torch.nn.Sequential(pk.PNNHConv2d(4))], ids=["block", "in_a_model"]
)
def test_torchscript_is_refused_with_the_supported_paths(make):
    with pytest.raises(RuntimeError, match=r"TorchScript .* not supported.*torch\.compile or torch\.export"):
        torch.jit.script(make())
    with pytest.raises(RuntimeError, match=r"TorchScript .* not supported.*torch\.compile or torch\.export"):
        torch.jit.trace(make(), torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "make, shape",
    [(lambda: pk.PNNHConv2d(16), (8, 16, 16, 16)), (lambda: pk.PNNHLinear(64), (1024, 64))],
    ids=["conv", "linear"],
)
def test_autocast_works_with_auto_and_matches_eager_under_autocast(make, shape, dtype):
    # shapes large enough that auto would pick the 'cpu' backend without autocast
    block = make()
    x = torch.randn(shape, requires_grad=True)
    eager = twin(block, "eager")
    with torch.autocast("cpu", dtype=dtype):
        y = block(x)
        y_eager = eager(x)
    y.float().sum().backward()
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_the_cpu_backend_named_under_autocast_refuses_clearly():
    # 'cuda' and 'triton' compute under autocast (tests/backends); the C++ passes take float32/float64 only
    block = pk.PNNHConv2d(4, backend="cpu")
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pytest.raises(pk.BackendUnavailableError, match=r"does not compute under torch\.autocast"),
    ):
        block(torch.randn(2, 4, 3, 3))
