"""The contract every fused block op keeps, and the one helper that wires an op for autograd.

A fused backend computes the block as two functions, a forward and a backward, that it registers with
:class:`BlockOp`:

- ``forward(a: BlockArgs) -> (y, record)``: ``a`` holds the block's tensors and options by name
  (:class:`BlockArgs`, the same for the conv and the linear block); ``record`` is the op's own
  NamedTuple of the tensors backward needs (pre-norm outputs, statistics, packed weights...).
  A conv op's record has the fields ``mean`` and ``var`` (the batch statistics of the coder, learner
  and output channels, in that order), from which the backend updates the running statistics.
- ``backward(dy, a, record, need_dx) -> BlockGrads``: the gradients of the block's eleven tensors, in
  :class:`BlockArgs` order; ``x`` may be empty when ``need_dx`` is false, ``decoder`` is empty when
  the coder is tied. ``a`` comes without the running statistics (backward never reads them).

:class:`BlockOp` turns the two into ``torch.library`` custom ops (what ``torch.compile`` traces, as
opaque nodes), registers the backward as the forward's gradient, and builds an
``autograd.Function`` that runs the same two functions for eager calls (the custom-op autograd
wrapper costs hundreds of microseconds of Python per call, measured: more than a GPU spends on a
small block). Calling the ``BlockOp`` picks the right one. Under ``create_graph=True`` the eager
Function's backward recomputes the block with differentiable torch ops (:mod:`.recompute`) and
differentiates that, so every backend serves second-order gradients; first-order backward runs the kernels.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union, get_type_hints

import torch
from torch import Tensor

from ..activation import Activation
from ..block import BlockConfig, BlockNorms, BlockWeights

#: activation codes of :attr:`BlockArgs.activation`: the scaled leaky family, or GELU (linear only)
ACT_LEAKY, ACT_GELU = 0, 1


class BlockArgs(NamedTuple):
    """What every fused block op takes, conv and linear alike (the linear ops ignore the running
    statistics and ``use_batch``; the conv ops take the leaky family only)."""

    x: Tensor  #: conv: [N, C, H, W]; linear: [tokens, features]
    encoder: Tensor
    learner1: Tensor
    learner2: Tensor
    decoder: Optional[Tensor]  #: None: tied to the encoder
    coder_gamma: Tensor
    coder_beta: Tensor
    learner_gamma: Tensor
    learner_beta: Tensor
    out_gamma: Tensor
    out_beta: Tensor
    running_mean: Optional[Tensor]  #: [Cc + H + Cout] (coder, learner, out), None with batch statistics
    running_var: Optional[Tensor]
    use_batch: bool  #: normalise with the batch's statistics (training) or the running ones
    eps: float
    activation: int  #: ACT_LEAKY or ACT_GELU
    slope: float  #: the leaky family's negative slope (relu 0, identity 1)
    act_scale: float  #: the activation's scale
    gain: float  #: the coder gain: act(a) - act(-a) = gain * a
    final_act: bool  #: apply the activation after the output norm

    @property
    def affine(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """gamma, beta of the coder, learner and output norms."""
        return (self.coder_gamma, self.coder_beta, self.learner_gamma, self.learner_beta, self.out_gamma, self.out_beta)

    @property
    def gelu(self) -> bool:
        return self.activation == ACT_GELU


class BlockGrads(NamedTuple):
    """The gradients every backward op returns, in :class:`BlockArgs` order."""

    x: Tensor
    encoder: Tensor
    learner1: Tensor
    learner2: Tensor
    decoder: Tensor
    coder_gamma: Tensor
    coder_beta: Tensor
    learner_gamma: Tensor
    learner_beta: Tensor
    out_gamma: Tensor
    out_beta: Tensor


# The flat calling convention of the custom ops is BlockArgs' field order: the tensors gradients flow to
# (BlockGrads' fields), the running statistics (forward only), the options. Checked here, so that a field
# added out of place fails at import instead of shifting every argument after it.
_TENSOR_FIELDS: tuple[str, ...] = BlockGrads._fields
_RUNNING_FIELDS = ("running_mean", "running_var")
_OPTION_FIELDS: tuple[str, ...] = BlockArgs._fields[len(_TENSOR_FIELDS) + len(_RUNNING_FIELDS) :]
if BlockArgs._fields != _TENSOR_FIELDS + _RUNNING_FIELDS + _OPTION_FIELDS:
    raise AssertionError("BlockArgs must list BlockGrads' fields, then the running statistics, then the options")
_NUM_TENSORS = len(_TENSOR_FIELDS)
_OPTIONS = slice(_NUM_TENSORS + len(_RUNNING_FIELDS), None)


def activation_code(act: Activation) -> int:
    return ACT_GELU if act.kind == "gelu" else ACT_LEAKY


def affine_params(weights: BlockWeights, norms: BlockNorms, x: Tensor) -> list[Tensor]:
    """gamma, beta of the coder, learner and output norms (a norm without affine ones: 1 and 0)."""
    widths = (weights.encoder.shape[0], weights.learner1.shape[0], weights.learner2.shape[0])
    out: list[Tensor] = []
    for params, width in zip((norms.coder, norms.learner, norms.out), widths):
        if params is not None and params.weight is not None and params.bias is not None:
            out += [params.weight, params.bias]
        else:
            out += [x.new_ones(width), x.new_zeros(width)]
    return out


def block_args(
    x: Tensor,
    weights: BlockWeights,
    norms: BlockNorms,
    config: BlockConfig,
    *,
    use_batch: bool = True,
    running: Optional[tuple[Tensor, Tensor]] = None,
) -> BlockArgs:
    """The op arguments of one block call (``running``: the concatenated running mean and var)."""
    act = config.activation
    running_mean, running_var = running if running is not None else (None, None)
    return BlockArgs._make([
        x, weights.encoder, weights.learner1, weights.learner2, weights.decoder,
        *affine_params(weights, norms, x),
        running_mean, running_var, use_batch, config.eps,
        activation_code(act), act.slope, act.scale, act.coder_gain, config.final_activation,
    ])  # fmt: skip


def grads_like(a: BlockArgs, dx: Tensor, *, dense: bool) -> list[Tensor]:
    """Empty gradients as a backward returns them, for fake implementations: ``dx`` as given, the weights'
    and norm parameters' dense (``dense``) or in their own memory format, the decoder's empty when tied."""
    fmt = torch.contiguous_format if dense else torch.preserve_format

    def like(t: Tensor) -> Tensor:
        return torch.empty_like(t, memory_format=fmt)

    decoder = like(a.decoder) if a.decoder is not None else a.x.new_empty((0,))
    return [dx, like(a.encoder), like(a.learner1), like(a.learner2), decoder, *(like(t) for t in a.affine)]


# --------------------------------------------------------------------------- schemas

_SCHEMA_TYPES: dict[Any, str] = {
    Tensor: "Tensor",
    Optional[Tensor]: "Tensor?",
    bool: "bool",
    float: "float",
    int: "int",
}


def _arg_schema(names: tuple[str, ...], hints: dict[str, Any]) -> str:
    return ", ".join(f"{_SCHEMA_TYPES[hints[n]]} {n}" for n in names)


#: an op's saved record: a NamedTuple class of tensors
Record = Any


def _schemas(record: Record) -> tuple[str, str]:
    """(forward, backward) schemas of an op whose saved record is ``record``."""
    hints = get_type_hints(BlockArgs)
    outputs = ", ".join(["Tensor y", *(f"Tensor {n}" for n in record._fields)])
    fields: tuple[str, ...] = BlockArgs._fields
    forward = f"({_arg_schema(fields, hints)}) -> ({outputs})"
    tensors = _arg_schema(fields[:_NUM_TENSORS], hints)
    options = _arg_schema(fields[_OPTIONS], hints)
    saved = ", ".join(f"Tensor saved_{n}" for n in record._fields)
    backward = f"(Tensor dy, {tensors}, {saved}, {options}, bool need_dx) -> Tensor[]"
    return forward, backward


# --------------------------------------------------------------------------- the autograd helper

ForwardFn = Callable[[BlockArgs], tuple[Tensor, Any]]
BackwardFn = Callable[[Tensor, BlockArgs, Any, bool], Union[BlockGrads, list[Tensor]]]


class _Calls:
    """The flat calling conventions of one op's two functions (what the custom ops and the Function see)."""

    def __init__(self, record: Record, forward: ForwardFn, backward: BackwardFn) -> None:
        self.record, self.forward, self.backward = record, forward, backward
        self.num_saved = len(record._fields)

    def flat_forward(self, *args: Any) -> tuple[Tensor, ...]:
        y, saved = self.forward(BlockArgs._make(args))
        return (y, *saved)

    def flat_backward(self, dy: Tensor, *args: Any) -> list[Tensor]:
        tensors = args[:_NUM_TENSORS]
        saved = self.record(*args[_NUM_TENSORS : _NUM_TENSORS + self.num_saved])
        *options, need_dx = args[_NUM_TENSORS + self.num_saved :]
        a = BlockArgs(
            **dict(zip(_TENSOR_FIELDS, tensors)),
            running_mean=None,
            running_var=None,
            **dict(zip(_OPTION_FIELDS, options)),
        )
        return list(self.backward(dy, a, saved, need_dx))


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    y = output[0]
    ctx.save_for_backward(*inputs[:_NUM_TENSORS], *output[1:])
    ctx.running = inputs[_NUM_TENSORS : _NUM_TENSORS + len(_RUNNING_FIELDS)]  # buffers: read by a recompute only
    ctx.options = inputs[_OPTIONS]
    ctx.y_like = (y.shape, y.dtype, y.device)
    ctx.set_materialize_grads(False)  # only y's gradient is used: no zero tensors for the saved outputs


def _recomputed_grads(ctx: Any, dy: Tensor) -> tuple[Optional[Tensor], ...]:
    """The gradients as differentiable functions of the inputs (``create_graph=True``): the block recomputed
    with torch ops from the saved inputs and differentiated, so a second differentiation is exact."""
    from .recompute import differentiable_block  # imports the eager block, which imports this package's ops

    tensors = ctx.saved_tensors[:_NUM_TENSORS]
    a = BlockArgs(
        **dict(zip(_TENSOR_FIELDS, tensors)),
        **dict(zip(_RUNNING_FIELDS, ctx.running)),
        **dict(zip(_OPTION_FIELDS, ctx.options)),
    )
    wanted = [i for i, t in enumerate(tensors) if t is not None and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        y = differentiable_block(a)
    computed = torch.autograd.grad(y, [tensors[i] for i in wanted], dy, create_graph=True, allow_unused=True)
    grads: list[Optional[Tensor]] = [None] * _NUM_TENSORS
    for i, g in zip(wanted, computed):
        grads[i] = g if g is not None else torch.zeros_like(tensors[i])
    return tuple(grads)


def _autograd_backward(flat_backward: Callable[..., list[Tensor]], eager: bool) -> Callable[..., tuple]:
    """The backward autograd calls: the op's flat backward, its gradients mapped onto the inputs; for the
    ``eager`` Function under ``create_graph=True``, the recomputed differentiable gradients instead
    (torch.compile refuses double backward itself)."""

    def backward(ctx: Any, dy: Optional[Tensor], *_unused: Any) -> tuple:
        saved = ctx.saved_tensors
        if dy is None:  # a backward through the saved outputs only (opcheck does that)
            shape, dtype, device = ctx.y_like
            dy = torch.zeros(shape, dtype=dtype, device=device)
        options_none = (None,) * (len(BlockArgs._fields) - _NUM_TENSORS)
        if eager and torch.is_grad_enabled():  # create_graph=True: a second differentiation will follow
            return (*_recomputed_grads(ctx, dy), *options_none)
        need_dx = ctx.needs_input_grad[0]
        with torch.no_grad():
            computed = flat_backward(dy, *saved, *ctx.options, need_dx)
        tied = saved[_TENSOR_FIELDS.index("decoder")] is None
        named = BlockGrads._make(computed)
        grads: tuple[Optional[Tensor], ...] = named._replace(
            x=named.x if need_dx else None,  # type: ignore[arg-type]
            decoder=None if tied else named.decoder,  # type: ignore[arg-type]
        )
        return (*grads, *options_none)

    return backward


class BlockOp:
    """One fused block op (forward + backward), registered as ``pnnh::<name>`` and ``pnnh::<name>_backward``.

    ``fake_forward(a) -> (y, record)`` and ``fake_backward(dy, a, record, need_dx) -> list`` give the
    outputs' shapes, dtypes and strides for tracing; they must match what the real functions return.
    """

    def __init__(
        self,
        name: str,
        record: Record,
        forward: ForwardFn,
        backward: BackwardFn,
        *,
        fake_forward: ForwardFn,
        fake_backward: BackwardFn,
    ) -> None:
        self.name, self.record = name, record
        real, fake = _Calls(record, forward, backward), _Calls(record, fake_forward, fake_backward)
        forward_schema, backward_schema = _schemas(record)
        self.op = torch.library.custom_op(f"pnnh::{name}", real.flat_forward, mutates_args=(), schema=forward_schema)
        self.backward_op = torch.library.custom_op(
            f"pnnh::{name}_backward", real.flat_backward, mutates_args=(), schema=backward_schema
        )
        self.op.register_fake(fake.flat_forward)
        self.backward_op.register_fake(fake.flat_backward)
        self.op.register_autograd(_autograd_backward(self.backward_op, eager=False), setup_context=_setup_context)

        class EagerFunction(torch.autograd.Function):
            @staticmethod
            def forward(*args: Any) -> tuple[Tensor, ...]:
                return real.flat_forward(*args)

            setup_context = staticmethod(_setup_context)
            backward = staticmethod(_autograd_backward(real.flat_backward, eager=True))

        EagerFunction.__name__ = EagerFunction.__qualname__ = f"{name}_function"
        self.function = EagerFunction

    def __call__(self, a: BlockArgs) -> tuple[Tensor, Any]:
        """``(y, record)``: the custom op under torch.compile (it traces it), the Function otherwise."""
        run = self.op if torch.compiler.is_compiling() else self.function.apply
        out = run(*a)
        return out[0], self.record(*out[1:])
