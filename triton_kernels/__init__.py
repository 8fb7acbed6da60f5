"""Triton kernels of the PNNH block (installed as ``pnnh_kernels.triton_kernels``).

- :mod:`.conv_implicit_gemm`: convolution as an implicit GEMM over any input strides (NCHW or
  channels_last), with an optional BN-apply + activation prologue on the loaded input, per-channel
  batch-statistics moments in the epilogue, and centre-tap-only channel ranges (a 1x1 coder beside
  a 3x3 learner in one GEMM without 9x the coder's work).
- :mod:`.conv_weight_grad`: the weight gradient of that convolution, with the same prologue (so the
  normalised / activated input is recomputed from the saved pre-norm tensor, never stored) and the
  backward prologue on the output gradient.
- :mod:`.bn_tiles`: the two load prologues: BN-apply + activation (:class:`Prologue`) and dAct + dBN
  (:class:`GradPrologue`, applied to an output gradient inside both backward convolutions).
- :mod:`.launch`: what every launch needs: the interpreter switch, dtypes, cached device constants.
- :mod:`.moments`: the epilogues' per-tile statistics in a form that cannot overflow (count, mean,
  scaled squared deviations) and their float64 merge.
- :mod:`.bn_stats`: batch-norm statistics and the prologue's scale / shift from the epilogues' partials,
  one launch; the backward's sums and :class:`GradPrologue` coefficients likewise.
- :mod:`.bn_act_rows`: the memory-bound passes over [rows, channels] tensors: BN-apply + activation,
  and the reduction of fused dActivation + dBN (its apply is a :class:`GradPrologue`).
- :mod:`.linear_gemm`: PNNHLinear's matrix products, with a layer-norm + activation prologue on either
  operand (coder and learner columns normalised separately), its backward on an output gradient, and
  row-statistics epilogues.
- :mod:`.ln_tiles`: those layer-norm prologues (:class:`LnPrologue`, :class:`LnGradPrologue`) on a tile.
- :mod:`.ln_act_rows`: PNNHLinear's layer-norm + activation pass and the reductions of the fused
  dActivation + dLayerNorm (its apply is an :class:`LnGradPrologue`).

Every kernel runs under ``TRITON_INTERPRET=1`` on CPU tensors (how CI tests them) and on CUDA;
``tools/compile_triton_kernels.py`` compiles them all for a GPU on a machine without one.
The ops built on them live in :mod:`pnnh_kernels.backends.triton` (``conv.py``, ``linear.py``).
"""

from .bn_act_rows import bn_act_backward_sums, bn_act_forward
from .bn_tiles import GradPrologue, Prologue
from .conv_implicit_gemm import conv2d_implicit_gemm
from .conv_weight_grad import conv2d_weight_grad
from .launch import interpreting
from .linear_gemm import ln_gemm, row_statistics
from .ln_act_rows import ln_act_forward, ln_grad_sums
from .ln_tiles import LnGradPrologue, LnPrologue

__all__ = [
    "GradPrologue",
    "LnGradPrologue",
    "LnPrologue",
    "Prologue",
    "bn_act_backward_sums",
    "bn_act_forward",
    "conv2d_implicit_gemm",
    "conv2d_weight_grad",
    "interpreting",
    "ln_act_forward",
    "ln_gemm",
    "ln_grad_sums",
    "row_statistics",
]
