"""pnnh_kernels: fused kernels and modules for deep plain networks (PNNH, TAT, feature reuse).

Public API:
    PNNHConv2d, PNNHLinear      drop-in PNNH blocks (modules)
    PNNHCoder                   the weight-sharing coder, shareable across blocks
    pnnh_conv2d, pnnh_linear    functional forms
    Activation                  activation spec (relu / leaky_relu / identity / gelu, with scale)
    available_backends()        backends that can run here
    set_auto_benchmark(True)    backend="auto" times the backends per call signature and keeps the fastest
    convert_resnet              a torchvision / timm ResNet -> its PNNH counterpart (pnnh_kernels.models)
"""

from typing import Any

from .activation import Activation, make_activation
from .backends import BackendUnavailableError, available_backends, register_backend, register_ops
from .backends.measured import measured_choices, set_auto_benchmark
from .block import BlockConfig, BlockNorms, BlockWeights, NormParams
from .coder import PNNHCoder, guard_shared_parameters
from .conv import PNNHConv2d
from .functional import pnnh_conv2d, pnnh_linear
from .linear import PNNHLinear
from .validation import set_finite_check

__version__ = "0.1.0"

register_ops()  # every backend's custom ops exist from import on (torch.export.load needs them)


def __getattr__(name: str) -> Any:
    # the converter lives with the models, which import this package: load it on first use
    if name == "reparameterize_model":
        from .deploy import reparameterize_model

        return reparameterize_model
    if name == "convert_resnet":
        from .models.convert import convert_resnet

        return convert_resnet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Activation",
    "BackendUnavailableError",
    "BlockConfig",
    "BlockNorms",
    "BlockWeights",
    "NormParams",
    "PNNHCoder",
    "PNNHConv2d",
    "PNNHLinear",
    "available_backends",
    "convert_resnet",
    "guard_shared_parameters",
    "make_activation",
    "measured_choices",
    "pnnh_conv2d",
    "pnnh_linear",
    "register_backend",
    "reparameterize_model",
    "set_auto_benchmark",
    "set_finite_check",
]
