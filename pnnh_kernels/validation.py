"""Clear errors for bad input, checked once before any backend runs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
from torch import Tensor

from .block import BlockConfig, BlockNorms, BlockWeights, NormParams

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_finite_check_enabled: Optional[bool] = None  # None: on for CPU tensors, off for GPU ones


def set_finite_check(enabled: Optional[bool]) -> None:
    """Turn the non-finite-input check on (``True``) or off (``False``) for every device, or back to
    the default (``None``): on for CPU tensors, off for GPU tensors.

    The check runs only where a non-finite value does lasting harm (batch norm in training: one NaN
    poisons the running statistics for good). It costs one reduction, and on a GPU a host sync that
    stalls the launch queue (measured: it doubled a small block's step on an H100), hence off there
    unless asked for; even then it is skipped while a CUDA graph is being captured.
    """
    global _finite_check_enabled
    _finite_check_enabled = None if enabled is None else bool(enabled)


def _finite_check_applies(x: Tensor) -> bool:
    if _finite_check_enabled is None:
        return x.device.type == "cpu"
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return False  # the check reads a value back: impossible inside a CUDA-graph capture
    return _finite_check_enabled


def _all_finite(x: Tensor) -> bool:
    """One plain reduction first (any NaN/Inf makes the sum non-finite); only when it is not finite, which
    an overflow of finite values can also cause, the exact element-wise check. A float64 sum would be
    safe from overflow but converts the whole tensor first on the CPU (measured: 5x the plain sum)."""
    total = x.sum(dtype=torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(x).all())


def _tensors(weights: BlockWeights, norms: BlockNorms) -> Iterator[tuple[str, Tensor]]:
    # zip over the fields, not _asdict(): this runs on every call, and a dict per record costs microseconds
    for name, t in zip(BlockWeights._fields, weights):
        if t is not None:
            yield name, t
    for part, params in zip(BlockNorms._fields, norms):
        if params is not None:
            for name, t in zip(NormParams._fields, params):
                if t is not None:
                    yield f"{part}_norm.{name}", t


def autocast_enabled(device_type: str) -> bool:
    """Whether torch.autocast is on for ``device_type`` (False for device types autocast does not know)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return False


def _check_common(x: Tensor, weights: BlockWeights, norms: BlockNorms, config: BlockConfig, training: bool) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input dtype must be one of float16/bfloat16/float32/float64, got {x.dtype}")
    for name, t in _tensors(weights, norms):
        if t.device != x.device:
            raise RuntimeError(f"input is on {x.device} but {name} is on {t.device}; move the module with .to()")
        if name.endswith(("running_mean", "running_var")):
            continue
        if t.dtype != x.dtype and not autocast_enabled(x.device.type):
            raise TypeError(
                f"input dtype {x.dtype} does not match {name} dtype {t.dtype}; "
                "convert the module with .to(dtype) or run under torch.autocast"
            )
    if x.numel() == 0:
        raise ValueError(f"input has no elements (shape {tuple(x.shape)})")
    if (
        config.norm == "batch"
        and training
        and _finite_check_applies(x)
        and not torch.compiler.is_compiling()
        and x.device.type != "meta"
        and not _all_finite(x)
    ):
        raise ValueError(
            "input contains NaN or Inf in training mode; batch norm would corrupt its running statistics "
            "(pnnh_kernels.set_finite_check(False) turns this check off)"
        )


def _check_batch_statistics(count: int, config: BlockConfig, training: bool) -> None:
    if config.norm == "batch" and training and count < 2:
        raise ValueError(
            "batch norm in training needs more than one value per channel "
            f"(got {count}); use a larger batch or spatial size, or eval mode"
        )


def check_conv_inputs(x: Tensor, weights: BlockWeights, norms: BlockNorms, config: BlockConfig, training: bool) -> None:
    """Validate a PNNH conv block call; raises TypeError / ValueError / RuntimeError with the reason."""
    if isinstance(x, Tensor) and x.dim() != 4:
        raise ValueError(f"PNNHConv2d expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    _check_common(x, weights, norms, config, training)
    in_channels = weights.encoder.shape[1]
    if x.shape[1] != in_channels:
        raise ValueError(f"PNNHConv2d expects {in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    _check_batch_statistics(x.shape[0] * x.shape[2] * x.shape[3], config, training)


def check_linear_inputs(
    x: Tensor, weights: BlockWeights, norms: BlockNorms, config: BlockConfig, training: bool
) -> None:
    """Validate a PNNH linear block call."""
    if isinstance(x, Tensor) and x.dim() < 1:
        raise ValueError("PNNHLinear expects at least a 1-D input (..., features)")
    _check_common(x, weights, norms, config, training)
    in_features = weights.encoder.shape[1]
    if x.shape[-1] != in_features:
        raise ValueError(f"PNNHLinear expects {in_features} input features, got {x.shape[-1]} (shape {tuple(x.shape)})")
    if config.norm == "batch":
        _check_batch_statistics(x.numel() // x.shape[-1], config, training)


_REQUIRED_WEIGHTS = frozenset(("encoder", "learner1", "learner2"))


def _check_tensors(weights: BlockWeights, norms: BlockNorms) -> None:
    """Every weight, bias and norm parameter a tensor (or None where optional), named when it is not."""
    if not isinstance(weights, BlockWeights):
        raise TypeError(f"weights must be a pnnh_kernels.BlockWeights, got {type(weights).__name__}")
    if not isinstance(norms, BlockNorms):
        raise TypeError(f"norms must be a pnnh_kernels.BlockNorms, got {type(norms).__name__}")
    for name, t in zip(BlockWeights._fields, weights):
        if not isinstance(t, Tensor) and (t is not None or name in _REQUIRED_WEIGHTS):
            raise TypeError(f"weights.{name} must be a torch.Tensor, got {type(t).__name__}")
    for part, params in zip(BlockNorms._fields, norms):
        if params is None:
            continue
        if not isinstance(params, NormParams):
            raise TypeError(f"norms.{part} must be a pnnh_kernels.NormParams or None, got {type(params).__name__}")
        for name, t in zip(NormParams._fields, params):
            if t is not None and not isinstance(t, Tensor):
                raise TypeError(f"norms.{part}.{name} must be a torch.Tensor or None, got {type(t).__name__}")


def check_block_weights(weights: BlockWeights, norms: BlockNorms, config: BlockConfig, *, conv: bool) -> None:
    """Check that the weight shapes describe one consistent block (a functional call can pass anything)."""
    rank = 4 if conv else 2
    kind = "conv" if conv else "linear"
    _check_tensors(weights, norms)
    for name in ("encoder", "learner1", "learner2", "decoder"):
        t = getattr(weights, name)
        if t is not None and t.dim() != rank:
            raise ValueError(f"{kind} block: {name} weight must be {rank}-D, got shape {tuple(t.shape)}")
    enc, l1, l2, dec = weights.encoder, weights.learner1, weights.learner2, weights.decoder
    coder, in_ch, hidden, out = enc.shape[0], enc.shape[1], l1.shape[0], l2.shape[0]
    if l1.shape[1] != in_ch:
        raise ValueError(f"learner1 reads {l1.shape[1]} channels but the encoder reads {in_ch}")
    if l2.shape[1] != hidden:
        raise ValueError(f"learner2 reads {l2.shape[1]} channels but learner1 makes {hidden}")
    if dec is None and out != in_ch:
        raise ValueError(
            f"a tied coder decodes back to the input's {in_ch} channels, but the block outputs {out}; "
            "use tied=False (a separate decoder weight) when in and out channels differ"
        )
    if dec is not None and (dec.shape[0] != out or dec.shape[1] != coder):
        raise ValueError(f"decoder weight must be [{out}, {coder}, ...], got {tuple(dec.shape)}")
    if conv:
        for name, t in (("encoder", enc), ("learner1", l1), ("learner2", l2), ("decoder", dec)):
            if t is not None and (t.shape[-1] != t.shape[-2] or t.shape[-1] % 2 == 0):
                raise ValueError(f"{name} kernel must be square and odd ('same' padding), got {tuple(t.shape[-2:])}")
        if dec is not None and dec.shape[-1] != enc.shape[-1]:
            raise ValueError("decoder and encoder kernels must have the same size")
    if config.norm != "none":
        for part, width in (("coder", coder), ("learner", hidden), ("out", out)):
            params = getattr(norms, part)
            if params is None:
                raise ValueError(f"norm={config.norm!r} needs NormParams for the {part} normalisation")
            for name, t in params._asdict().items():
                if t is not None and t.shape != (width,):
                    raise ValueError(f"{part} norm {name} must have shape ({width},), got {tuple(t.shape)}")
        if config.norm == "layer" and conv:
            raise ValueError("layer norm is offered for PNNHLinear only; PNNHConv2d takes 'batch' or 'none'")
