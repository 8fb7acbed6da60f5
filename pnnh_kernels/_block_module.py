"""What PNNHConv2d and PNNHLinear share: options, parameters, and the forward call."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from typing_extensions import TypedDict

from .activation import ActivationLike, make_activation
from .backends import check_backend_name
from .block import BlockConfig, BlockNorms, BlockWeights, DeviceLike, NormParams
from .coder import PNNHCoder

_NO_TORCHSCRIPT = (
    "pnnh_kernels: TorchScript (torch.jit.script / torch.jit.trace) is not supported: the block picks its "
    "backend per call; use torch.compile or torch.export instead"
)


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class BlockOptions(TypedDict, total=False):
    """The keyword options PNNHConv2d and PNNHLinear share, passed through to :class:`PNNHBlockBase` as one
    dict (their defaults are its; PNNHConv2d's docstring says what each does)."""

    activation: ActivationLike
    negative_slope: Optional[float]
    activation_scale: float
    final_activation: bool
    bias: Optional[bool]
    tied: bool
    coder: Optional[PNNHCoder]
    eps: float
    momentum: float
    backend: str
    device: DeviceLike
    dtype: Optional[torch.dtype]


class PNNHBlockBase(nn.Module):
    """Parameters and forward of a PNNH block; subclasses give shapes, norms (:meth:`_make_norm`) and the
    functional op."""

    _functional: Callable[..., Tensor]

    def __init__(
        self,
        in_channels: int,
        out_channels: Optional[int],
        hidden_channels: Optional[int],
        coder_channels: Optional[int],
        learner_tail: tuple[int, ...],
        coder_kernel_size: Optional[int],
        *,
        norm: str,
        activation: ActivationLike = "relu",
        negative_slope: Optional[float] = None,
        activation_scale: float = 1.0,
        final_activation: bool = True,
        bias: Optional[bool] = None,
        tied: bool = True,
        coder: Optional[PNNHCoder] = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
        backend: str = "auto",
        device: DeviceLike = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        in_channels = _positive_int("in_channels", in_channels)
        out_channels = _positive_int("out_channels", in_channels if out_channels is None else out_channels)
        hidden_channels = _positive_int("hidden_channels", out_channels if hidden_channels is None else hidden_channels)
        self.config = BlockConfig(
            activation=make_activation(activation, negative_slope, activation_scale),
            norm=norm,
            final_activation=bool(final_activation),
            eps=float(eps),
            momentum=float(momentum),
        )
        self.backend = check_backend_name(backend)
        bias = (norm == "none") if bias is None else bool(bias)  # a norm right after makes a bias redundant
        factory: dict[str, Any] = {"device": device, "dtype": dtype}

        if coder is None:
            coder_channels = _positive_int("coder_channels", in_channels if coder_channels is None else coder_channels)
            coder = PNNHCoder(
                in_channels,
                coder_channels,
                coder_kernel_size,
                tied=tied,
                out_channels=out_channels,
                bias=bias,
                **factory,
            )
        elif (coder.in_channels, coder.out_channels, coder.kernel_size) != (
            in_channels,
            out_channels,
            coder_kernel_size,
        ):
            raise ValueError(
                f"shared coder maps {coder.in_channels} -> {coder.out_channels} channels with kernel "
                f"{coder.kernel_size}; this block needs {in_channels} -> {out_channels} with kernel {coder_kernel_size}"
            )
        elif coder_channels is not None and coder_channels != coder.coder_channels:
            raise ValueError(
                f"shared coder maps through {coder.coder_channels} channels, not coder_channels={coder_channels}"
            )
        self.coder = coder
        self.in_channels, self.out_channels, self.hidden_channels = in_channels, out_channels, hidden_channels
        self.learner1_weight = nn.Parameter(torch.empty(hidden_channels, in_channels, *learner_tail, **factory))
        self.learner2_weight = nn.Parameter(torch.empty(out_channels, hidden_channels, *learner_tail, **factory))
        self.learner1_bias = nn.Parameter(torch.zeros(hidden_channels, **factory)) if bias else None
        self.learner2_bias = nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None

        self.coder_norm = self.learner_norm = self.out_norm = None
        if norm != "none":
            self.coder_norm = self._make_norm(coder.coder_channels)
            self.learner_norm = self._make_norm(hidden_channels)
            self.out_norm = self._make_norm(out_channels)
            if device is not None or dtype is not None:
                for n in (self.coder_norm, self.learner_norm, self.out_norm):
                    n.to(device=device, dtype=dtype)
        self.reset_learner_parameters()

    def _make_norm(self, channels: int) -> nn.Module:
        """One of the block's three norms (``self.config`` holds its kind, eps and momentum)."""
        raise NotImplementedError

    def reset_learner_parameters(self) -> None:
        """He init of the learner (as torchvision ResNets); the coder starts orthogonal."""
        for w in (self.learner1_weight, self.learner2_weight):
            nn.init.kaiming_normal_(w, mode="fan_out" if w.dim() == 4 else "fan_in", nonlinearity="relu")
        for b in (self.learner1_bias, self.learner2_bias):
            if b is not None:
                nn.init.zeros_(b)

    def block_weights(self) -> BlockWeights:
        return BlockWeights(
            encoder=self.coder.encoder,
            learner1=self.learner1_weight,
            learner2=self.learner2_weight,
            decoder=self.coder.decoder,
            encoder_bias=self.coder.encoder_bias,
            learner1_bias=self.learner1_bias,
            learner2_bias=self.learner2_bias,
        )

    def block_norms(self) -> BlockNorms:
        def params(n: Optional[nn.Module]) -> Optional[NormParams]:
            if n is None:
                return None
            running = (getattr(n, "running_mean", None), getattr(n, "running_var", None))
            return NormParams(n.weight, n.bias, *running)  # type: ignore[arg-type]

        return BlockNorms(params(self.coder_norm), params(self.learner_norm), params(self.out_norm))

    def _count_batch(self) -> None:
        # keep num_batches_tracked as torch.nn.BatchNorm does, so state dicts stay interchangeable
        if self.training and self.config.norm == "batch":
            for n in (self.coder_norm, self.learner_norm, self.out_norm):
                tracked = getattr(n, "num_batches_tracked", None)
                if tracked is not None:
                    tracked.add_(1)

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError(_NO_TORCHSCRIPT)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError(_NO_TORCHSCRIPT)
        # an ONNX graph cannot hold the fused custom ops: an export records eager's standard operators
        backend = "eager" if torch.onnx.is_in_onnx_export() else self.backend
        out = type(self)._functional(
            x, self.block_weights(), self.block_norms(), self.config, training=self.training, backend=backend
        )
        self._count_batch()
        return out

    def extra_repr(self) -> str:
        act = self.config.activation
        act_desc = act.kind if act.kind in ("relu", "identity", "gelu") else f"{act.kind}({act.negative_slope:g})"
        if act.scale != 1.0:
            act_desc += f"*{act.scale:g}"
        return (
            f"{self.in_channels} -> {self.out_channels}, hidden={self.hidden_channels}, "
            f"coder={self.coder.coder_channels}, act={act_desc}, norm={self.config.norm}, "
            f"final_activation={self.config.final_activation}, backend={self.backend!r}"
        )
