"""What the fused backends ('cpu', 'cuda', 'triton') share: what they refuse, the call of their conv
block's custom op (all three ops take the same arguments), the affine parameters it takes, and the
running-statistics update (done here, outside the op, so the op stays functional for torch.compile)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._extension import extension_error
from ..block import BlockConfig, BlockNorms, BlockWeights
from ..norm import uses_batch_statistics
from .base import Backend
from .fused_conv_op import ConvBlockFusedFunction, conv_block_fused


class FusedConvBackend(Backend):
    """A backend whose PNNHConv2d is a custom op with :mod:`.fused_conv_op`'s signature."""

    fused = True
    #: the data dtypes its kernels compute in
    dtypes: tuple[torch.dtype, ...] = ()

    def conv_op(self):
        """(forward custom op, the same as an autograd.Function): torch.compile traces the op, eager
        calls take the Function (no custom-op dispatch overhead)."""
        return conv_block_fused, ConvBlockFusedFunction

    def unsupported_reason(self, op: str, x: Tensor, weights: BlockWeights, config: BlockConfig) -> Optional[str]:
        reason = super().unsupported_reason(op, x, weights, config)
        if reason:
            return reason
        if x.dtype not in self.dtypes:
            names = "/".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"the {self.name} backend computes in {names}, not {x.dtype}"
        if any(t is not None and t.dtype != x.dtype for t in (weights.encoder, weights.learner1, weights.learner2, weights.decoder)):
            return f"the {self.name} backend needs the weights in the input's dtype (no autocast)"
        if op == "linear":
            if config.norm != "layer":
                return f"the {self.name} backend fuses layer norm for PNNHLinear; norm={config.norm!r} runs on 'eager'"
            if any(b is not None for b in (weights.encoder_bias, weights.learner1_bias, weights.learner2_bias)):
                return f"the {self.name} backend's PNNHLinear takes no linear biases (a norm follows every linear map)"
        if op == "conv2d":
            if config.norm != "batch":
                return f"the {self.name} backend fuses batch norm for PNNHConv2d; norm={config.norm!r} runs on 'eager'"
            if not config.activation.is_leaky_family:
                return f"the {self.name} backend fuses the relu/leaky_relu/identity family, not {config.activation.kind}"
        return None

    def conv2d(self, x: Tensor, weights: BlockWeights, norms: BlockNorms, config: BlockConfig, training: bool) -> Tensor:
        use_batch = uses_batch_statistics(norms.coder, training)
        act = config.activation
        running_mean = running_var = None
        if not use_batch:
            running_mean = torch.cat([norms.coder.running_mean, norms.learner.running_mean, norms.out.running_mean])
            running_var = torch.cat([norms.coder.running_var, norms.learner.running_var, norms.out.running_var])
        affine = self._affine_params(weights, norms, x)
        op, function = self.conv_op()
        run = op if torch.compiler.is_compiling() else function.apply
        y, _zc, _zl, _u, mean, _invstd, var = run(
            x, weights.encoder, weights.learner1, weights.learner2, weights.decoder,
            *affine, running_mean, running_var,
            use_batch, config.eps, act.slope, act.scale, act.coder_gain, config.final_activation,
        )
        if training and norms.coder.running_mean is not None:
            self._update_running(norms, mean, var, config.momentum)
        return self._like_input(y, x)

    @staticmethod
    def _like_input(y: Tensor, x: Tensor) -> Tensor:
        """The output keeps the input's memory format (the op may return either)."""
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return y.contiguous(memory_format=torch.channels_last)
        return y.contiguous()

    @staticmethod
    def _affine_params(weights: BlockWeights, norms: BlockNorms, x: Tensor) -> list[Tensor]:
        """gamma, beta of the coder, learner and output norms (a norm without affine ones: 1 and 0)."""
        widths = (weights.encoder.shape[0], weights.learner1.shape[0], weights.learner2.shape[0])
        out = []
        for params, width in zip((norms.coder, norms.learner, norms.out), widths):
            if params.weight is not None:
                out += [params.weight, params.bias]
            else:
                out += [x.new_ones(width), x.new_zeros(width)]
        return out

    @staticmethod
    @torch.no_grad()
    def _update_running(norms: BlockNorms, mean: Tensor, var: Tensor, momentum: float) -> None:
        targets, sources, start = [], [], 0
        for params in (norms.coder, norms.learner, norms.out):
            width = params.running_mean.shape[0]
            for buffer, batch in ((params.running_mean, mean), (params.running_var, var)):
                part = batch[start : start + width]
                targets.append(buffer)
                sources.append(part if part.dtype == buffer.dtype else part.to(buffer.dtype))
            start += width
        torch._foreach_lerp_(targets, sources, momentum)  # one call for the six buffers


class ExtensionConvBackend(FusedConvBackend):
    """A backend whose PNNHConv2d runs the compiled extension's fused passes around library convolutions."""

    def unavailable_reason(self) -> Optional[str]:
        return extension_error()
