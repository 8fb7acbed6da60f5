"""Model families, constructible by name (installed as ``pnnh_kernels.models``).

    from pnnh_kernels.models import create_model, list_models
    net = create_model("pnnh_resnet56", num_classes=10, in_chans=1)

Families: ``resnet`` (residual), ``plain`` (shortcuts removed), ``pnnh`` (PNNH blocks),
``vanilla`` (TAT / DKS / EOC: no shortcuts, no norm), ``vit`` (ViT and PNNH-ViT).
``convert_resnet`` turns a torchvision or timm ResNet into its PNNH counterpart.
"""

from . import resnet, vanilla, vit  # noqa: F401  (registers the models)
from .convert import ResNetConversion, convert_resnet, plan_resnet_conversion
from .kernel_maps import dks_activation, edge_of_chaos, leaky_relu_cmap, tat_leaky_relu
from .layers import DropPath, PerLocationNormalization, drop_path, scaled_orthogonal_
from .registry import create_model, list_models, model_family, register_model
from .resnet import PNNHBottleneck, ResNet
from .timm_registry import register_if_timm_is_installed, register_with_timm
from .vanilla import VanillaNet
from .vit import VisionTransformer

register_if_timm_is_installed()

__all__ = [
    "DropPath",
    "PNNHBottleneck",
    "PerLocationNormalization",
    "ResNet",
    "ResNetConversion",
    "VanillaNet",
    "VisionTransformer",
    "convert_resnet",
    "create_model",
    "dks_activation",
    "drop_path",
    "edge_of_chaos",
    "leaky_relu_cmap",
    "list_models",
    "model_family",
    "plan_resnet_conversion",
    "register_model",
    "register_with_timm",
    "scaled_orthogonal_",
    "tat_leaky_relu",
]
