"""``reparameterize_model``: every PNNH block of a model as plain torch.nn layers (timm's name and signature)."""

from __future__ import annotations

import copy

from torch import nn

from .._block_module import PNNHBlockBase
from .batch_norm import fold_sequential_batch_norms, foldable_pairs
from .folding import CannotFold

FORMS = ("fast", "plain")


def reparameterizable(module: nn.Module) -> bool:
    """A PNNH block with a ``reparameterize(form)``: PNNHConv2d, PNNHLinear, and the models' blocks that
    say so (``_pnnh_reparameterizable = True``, the bottleneck)."""
    return isinstance(module, PNNHBlockBase) or getattr(type(module), "_pnnh_reparameterizable", False)


def reparameterize_model(model: nn.Module, inplace: bool = False, form: str = "fast") -> nn.Module:
    """``model`` with every PNNH block replaced by plain torch.nn layers computing the same eval-mode
    function, every batch norm folded (a deep copy unless ``inplace``; idempotent). ``form``: ``"fast"``
    (fewest operations) or ``"plain"`` (``Conv2d -> activation -> Conv2d``, no addition anywhere); see
    :mod:`pnnh_kernels.deploy.conv`. Outside the blocks, a ``Conv2d -> BatchNorm2d`` pair in an
    ``nn.Sequential`` folds too (:mod:`pnnh_kernels.deploy.batch_norm`). A block or batch norm in training mode,
    or a block that cannot fold, is refused with one line naming it, before anything changes."""
    if form not in FORMS:
        raise ValueError(f"reparameterize_model: form must be one of {FORMS}, got {form!r}")
    blocks = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if reparameterizable(m)]
    norms = [(name, seq[i + 1]) for name, seq, i in foldable_pairs(model)]
    for name, module in [*blocks, *norms]:
        if module.training:
            raise ValueError(
                f"reparameterize_model: {name or type(module).__name__} is in training mode; call model.eval() "
                "first (batch norm folds its running statistics)"
            )
    target = model if inplace else copy.deepcopy(model)
    if reparameterizable(target):
        return _replacement(target, "the model", form, {})
    made: dict[int, nn.Module] = {}  # a block used at two places becomes one module used at both
    for name, _ in blocks:
        parent_name, _, child = name.rpartition(".")
        parent = target.get_submodule(parent_name)
        setattr(parent, child, _replacement(getattr(parent, child), name, form, made))
    fold_sequential_batch_norms(target)
    return target


def _replacement(block: nn.Module, name: str, form: str, made: dict[int, nn.Module]) -> nn.Module:
    if id(block) not in made:
        try:
            made[id(block)] = block.reparameterize(form)  # type: ignore[operator]
        except CannotFold as why:
            raise ValueError(f"reparameterize_model: {name} cannot be folded: {why}") from None
    return made[id(block)]
