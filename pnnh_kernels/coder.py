"""The weight-sharing coder: an encoder weight and, untied, a separate decoder weight.

One :class:`PNNHCoder` can be handed to several blocks (``coder=``) to share it across a stage.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from .block import DeviceLike


def orthogonal_kernel_(weight: Tensor) -> Tensor:
    """Orthogonal init; for ``k x k`` kernels *delta-orthogonal*: orthogonal centre tap, zeros elsewhere.

    With a square orthogonal encoder, the tied decoder (its adjoint) inverts it at initialisation.
    """
    with torch.no_grad():
        # QR in float64 whatever the parameter's dtype (half-precision QR is not offered everywhere)
        matrix = nn.init.orthogonal_(torch.empty(weight.shape[:2], dtype=torch.float64))
        if weight.dim() == 2:
            return weight.copy_(matrix)
        weight.zero_()
        centre = weight.shape[-1] // 2
        weight[:, :, centre, centre] = matrix
    return weight


class PNNHCoder(nn.Module):
    """Encoder (and, untied, decoder) weights of the coder path.

    ``kernel_size=None`` makes a linear coder (weights ``[out, in]``), otherwise a conv coder
    (``[out, in, k, k]``). Tied coders decode with the encoder's adjoint and so return to
    ``in_channels``; an untied coder owns a decoder to ``out_channels``.
    """

    def __init__(
        self,
        in_channels: int,
        coder_channels: int,
        kernel_size: Optional[int] = 1,
        *,
        tied: bool = True,
        out_channels: Optional[int] = None,
        bias: bool = False,
        device: DeviceLike = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        for name, value in (
            ("in_channels", in_channels),
            ("coder_channels", coder_channels),
            ("out_channels", out_channels),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0):
            raise ValueError(f"coder kernel_size must be odd ('same' padding), got {kernel_size}")
        if tied and out_channels != in_channels:
            raise ValueError(
                f"a tied coder decodes back to its {in_channels} input channels; "
                f"out_channels={out_channels} needs tied=False"
            )
        self.in_channels, self.coder_channels, self.out_channels = in_channels, coder_channels, out_channels
        self.kernel_size, self.tied = kernel_size, tied
        tail = () if kernel_size is None else (kernel_size, kernel_size)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.encoder = nn.Parameter(torch.empty(coder_channels, in_channels, *tail, **factory))
        self.decoder = None if tied else nn.Parameter(torch.empty(out_channels, coder_channels, *tail, **factory))
        self.encoder_bias = nn.Parameter(torch.zeros(coder_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        orthogonal_kernel_(self.encoder)
        if self.decoder is not None:
            orthogonal_kernel_(self.decoder)
        if self.encoder_bias is not None:
            nn.init.zeros_(self.encoder_bias)

    def extra_repr(self) -> str:
        kind = "linear" if self.kernel_size is None else f"kernel_size={self.kernel_size}"
        return (
            f"{self.in_channels} -> {self.coder_channels} -> {self.out_channels}, {kind}, "
            f"tied={self.tied}, bias={self.encoder_bias is not None}"
        )


def guard_shared_parameters(model: nn.Module) -> nn.Module:
    """Make loading a state dict into ``model`` check its shared tensors: a coder shared by several blocks
    is one parameter stored under one key per block, and ``load_state_dict`` would otherwise copy every key
    into it in turn, keeping the last (a per-block state dict, say, loads into a shared-coder net "strictly"
    with one coder of many). Keys of one tensor holding different values are an error naming them. The
    package's models install it; call it on a model whose blocks share a coder you passed by hand."""
    hook = _check_shared_values
    if hasattr(model, "register_load_state_dict_pre_hook"):
        model.register_load_state_dict_pre_hook(hook)
    else:  # torch before 2.5
        model._register_load_state_dict_pre_hook(hook, with_module=True)
    return model


def _check_shared_values(
    module: nn.Module, state_dict: dict, prefix: str, _metadata: Any, _strict: bool, _missing: list,
    _unexpected: list, error_msgs: list,
) -> None:  # fmt: skip
    keys_of: dict[int, list[str]] = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        keys_of.setdefault(id(tensor), []).append(prefix + name)
    for keys in keys_of.values():
        present = [k for k in keys if k in state_dict]
        differing = [k for k in present[1:] if not _same(state_dict[k], state_dict[present[0]])]
        if differing:
            error_msgs.append(
                f"{present[0]} and {', '.join(differing)} load one shared tensor (a shared coder) but hold "
                "different values: the state dict comes from a model that does not share it"
            )


def _same(a: Any, b: Any) -> bool:
    return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
