"""Models by name, in the style of timm's ``create_model``."""

from __future__ import annotations

from typing import Callable

from torch import nn

_models: dict[str, Callable[..., nn.Module]] = {}
_families: dict[str, str] = {}


def register_model(family: str):
    """Decorator: register a builder under its function name, grouped in ``family``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if fn.__name__ in _models:
            raise ValueError(f"model {fn.__name__!r} is registered twice")
        _models[fn.__name__] = fn
        _families[fn.__name__] = family
        return fn

    return wrap


def list_models(family: str | None = None) -> list[str]:
    """Registered model names, optionally of one family (resnet, plain, pnnh, vanilla, vit)."""
    return sorted(n for n in _models if family is None or _families[n] == family)


def model_family(name: str) -> str:
    return _families[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model: ``create_model("pnnh_resnet56", num_classes=10, in_chans=1)``.

    Common keyword arguments: ``num_classes``, ``in_chans``, ``drop_path_rate`` (residual models),
    ``backend`` (models with PNNH blocks). Others are passed to the builder.
    """
    if name not in _models:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _models[name](**kwargs)
