"""What the fused backends ('cpu', 'cuda', 'triton') share: what they refuse, how a call becomes their
op's :class:`~.contract.BlockArgs`, and the running-statistics update (done here, outside the op, so
the op stays functional for torch.compile)."""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import Tensor

from .._extension import extension_error
from ..block import BlockConfig, BlockNorms, BlockWeights
from ..norm import uses_batch_statistics
from ..validation import autocast_enabled
from .base import Backend
from .contract import BlockArgs, BlockOp, block_args
from .geometry import memory_format_of


class FusedBackend(Backend):
    """A backend whose blocks are :class:`~.contract.BlockOp` s: subclasses name them in :meth:`conv_op`
    and :meth:`linear_op`."""

    fused = True
    #: the data dtypes its kernels compute in
    dtypes: tuple[torch.dtype, ...] = ()
    #: whether its ops compute under torch.autocast (low-precision convolutions, float32 statistics)
    serves_autocast = False

    def conv_op(self) -> BlockOp:
        raise NotImplementedError

    def linear_op(self) -> BlockOp:
        raise NotImplementedError

    def register_ops(self) -> None:
        """Define this backend's custom ops (``pnnh::<kind>_block_<backend>``) now: a program exported with
        them (``torch.export.save``) then loads in a process that has not run a block yet."""
        for make in (self.conv_op, self.linear_op):
            with contextlib.suppress(NotImplementedError):
                make()

    def unsupported_reason(self, op: str, x: Tensor, weights: BlockWeights, config: BlockConfig) -> Optional[str]:
        reason = super().unsupported_reason(op, x, weights, config)
        if reason:
            return reason
        autocast = autocast_enabled(x.device.type)
        if autocast and not self.serves_autocast:
            return f"the {self.name} backend does not compute under torch.autocast; autocast runs on 'eager'"
        dtype = self.compute_dtype(x)
        if dtype not in self.dtypes:
            names = "/".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"the {self.name} backend computes in {names}, not {dtype}"
        block_tensors = (weights.encoder, weights.learner1, weights.learner2, weights.decoder)
        allowed = (dtype, torch.float32) if autocast else (dtype,)  # autocast: float32 parameters
        if any(t is not None and t.dtype not in allowed for t in block_tensors):
            return f"the {self.name} backend needs the weights in the input's dtype (or float32 under autocast)"
        return self._linear_reason(weights, config) if op == "linear" else self._conv_reason(config)

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the kernels compute in: autocast's for float32 data under autocast, else the data's.
        Statistics, norm parameters and the parameters' gradients stay float32 either way."""
        if self.serves_autocast and x.dtype == torch.float32 and autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def _run(self, op: BlockOp, a: BlockArgs) -> tuple[Tensor, Any]:
        """The op on ``a`` with its data in the compute dtype (the cast is autograd's, so the input's
        gradient comes back in the input's dtype); autocast off inside, the op chose the dtypes."""
        dtype = self.compute_dtype(a.x)
        if dtype == a.x.dtype:
            return op(a)
        with torch.autocast(a.x.device.type, enabled=False):
            return op(a._replace(x=a.x.to(dtype)))

    def _linear_reason(self, weights: BlockWeights, config: BlockConfig) -> Optional[str]:
        if config.norm != "layer":
            return f"the {self.name} backend fuses layer norm for PNNHLinear; norm={config.norm!r} runs on 'eager'"
        if any(b is not None for b in (weights.encoder_bias, weights.learner1_bias, weights.learner2_bias)):
            return f"the {self.name} backend's PNNHLinear takes no linear biases (a norm follows every linear map)"
        return None

    def _conv_reason(self, config: BlockConfig) -> Optional[str]:
        if config.norm != "batch":
            return f"the {self.name} backend fuses batch norm for PNNHConv2d; norm={config.norm!r} runs on 'eager'"
        if not config.activation.is_leaky_family:
            return f"the {self.name} backend fuses the relu/leaky_relu/identity family, not {config.activation.kind}"
        return None

    def conv2d(
        self, x: Tensor, weights: BlockWeights, norms: BlockNorms, config: BlockConfig, training: bool
    ) -> Tensor:
        use_batch = uses_batch_statistics(norms.coder, training)
        running = None
        if not use_batch:
            parts = (norms.coder, norms.learner, norms.out)
            running = (
                torch.cat([p.running_mean for p in parts]),  # type: ignore[union-attr, misc]
                torch.cat([p.running_var for p in parts]),  # type: ignore[union-attr, misc]
            )
        args = block_args(x, weights, norms, config, use_batch=use_batch, running=running)
        y, saved = self._run(self.conv_op(), args)
        if training and norms.coder is not None and norms.coder.running_mean is not None:
            _update_running(norms, saved.mean, saved.var, config.momentum)
        return _like_input(y, x)

    def linear(
        self, x: Tensor, weights: BlockWeights, norms: BlockNorms, config: BlockConfig, training: bool
    ) -> Tensor:
        rows = self.linear_rows(x)
        y, _ = self._run(self.linear_op(), block_args(rows, weights, norms, config))
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def linear_rows(self, x: Tensor) -> Tensor:
        """The linear block's input as a [tokens, features] matrix."""
        return x.reshape(-1, x.shape[-1])


def _like_input(y: Tensor, x: Tensor) -> Tensor:
    """The output keeps the input's memory format (the op may return either)."""
    return y.contiguous(memory_format=memory_format_of(x))


@torch.no_grad()
def _update_running(norms: BlockNorms, mean: Tensor, var: Tensor, momentum: float) -> None:
    targets, sources, start = [], [], 0
    for params in (norms.coder, norms.learner, norms.out):
        assert params is not None and params.running_mean is not None and params.running_var is not None
        width = params.running_mean.shape[0]
        for buffer, batch in ((params.running_mean, mean), (params.running_var, var)):
            part = batch[start : start + width]
            targets.append(buffer)
            sources.append(part if part.dtype == buffer.dtype else part.to(buffer.dtype))
        start += width
    torch._foreach_lerp_(targets, sources, momentum)  # one call for the six buffers


class ExtensionBackend(FusedBackend):
    """A fused backend whose passes are the compiled extension's (around library convolutions)."""

    def unavailable_reason(self) -> Optional[str]:
        return extension_error()
