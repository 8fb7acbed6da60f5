"""The model families in timm's registry, so ``timm.create_model("pnnh_resnet56")`` builds them.

``pnnh_kernels.models`` calls :func:`register_with_timm` on import when timm is installed (timm stays
optional). Names timm already owns (``resnet18``, ``resnet34``, ``resnet50``) keep timm's models; this
package's versions of those stay under ``pnnh_kernels.models.create_model``. timm's training script, data
config, EMA and schedulers then work with the PNNH nets: each model carries a ``pretrained_cfg`` (input
size, normalisation) and ``num_classes`` as timm's own models do. No pretrained weights are offered.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Optional

from torch import nn

from .registry import create_model, list_models

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_IMAGENET_DEPTHS = ("18", "34", "50")

#: timm's ``create_model`` keywords that mean nothing here; dropped when unset or at their neutral value
_NEUTRAL = {"drop_rate": 0.0, "global_pool": "avg", "drop_block_rate": 0.0}

__all__ = ["register_with_timm"]  # timm appends the names it registers from this module


def _default_cfg(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    imagenet = name.endswith(_IMAGENET_DEPTHS) or "vit_" in name
    size = kwargs.get("img_size", 224 if imagenet else 32)
    return {
        "url": "",
        "architecture": name,
        "num_classes": 1000 if imagenet else 10,
        "input_size": (kwargs.get("in_chans", 3), size, size),
        "pool_size": None,
        "crop_pct": 0.875 if imagenet else 1.0,
        "interpolation": "bilinear",
        "mean": IMAGENET_MEAN if imagenet else CIFAR_MEAN,
        "std": IMAGENET_STD if imagenet else CIFAR_STD,
        "first_conv": "",
        "classifier": "head",
        "license": "apache-2.0",
    }


def _check_neutral(name: str, kwargs: dict[str, Any]) -> None:
    for key, neutral in _NEUTRAL.items():
        value = kwargs.pop(key, neutral)
        if value != neutral:
            raise ValueError(f"{name}: {key}={value!r} is not offered (only {neutral!r})")
    for key in ("bn_momentum", "bn_eps"):
        if kwargs.get(key) is not None:
            raise ValueError(f"{name}: {key} is not offered through timm; build with pnnh_kernels.models")


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    def build(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ValueError(f"{name}: pnnh_kernels has no pretrained weights; use pretrained=False")
        cfg = _default_cfg(name, kwargs)
        given = kwargs.pop("pretrained_cfg", None)
        cfg.update(given if isinstance(given, dict) else {})
        cfg.update(kwargs.pop("pretrained_cfg_overlay", None) or {})
        for key in ("cache_dir", "pretrained_model_args"):
            kwargs.pop(key, None)
        _check_neutral(name, kwargs)
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        model = create_model(name, **kwargs)
        model.num_classes = model.head.out_features
        cfg["num_classes"] = model.num_classes
        model.pretrained_cfg = model.default_cfg = cfg
        return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model

    build.__name__ = build.__qualname__ = name
    build.__module__ = __name__
    build.__doc__ = f"{name} from pnnh_kernels.models (no pretrained weights)."
    return build


def register_with_timm(names: Optional[list[str]] = None) -> list[str]:
    """Register this package's models with timm; returns the names registered (timm's own are skipped)."""
    from timm.models import is_model, register_model

    module = sys.modules[__name__]
    registered = []
    for name in names if names is not None else list_models():
        if is_model(name) and getattr(module, name, None) is None:
            continue  # timm's own model of that name
        fn = _entrypoint(name)
        setattr(module, name, fn)
        with warnings.catch_warnings():  # re-registering our own entry point after a reload
            warnings.simplefilter("ignore")
            register_model(fn)
        registered.append(name)
    return registered


def register_if_timm_is_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        return
    try:
        register_with_timm()
    except Exception as error:  # a broken timm or torchvision must not break this package's import
        warnings.warn(
            f"pnnh_kernels: timm is installed but could not be imported ({type(error).__name__}: {error}); "
            "the PNNH models are not registered with timm",
            RuntimeWarning,
            stacklevel=3,
        )
