"""Kernel-map math for deep vanilla networks: TAT (Leaky ReLU), DKS (smooth activations), Edge of Chaos.

For an activation ``phi`` and unit-variance inputs, the local *Q map* tracks the second moment
``q -> E[phi(sqrt(q) z)^2]`` and the local *C map* tracks the correlation of two inputs with
correlation ``c``:  ``C(c) = E[phi(u) phi(v)] / E[phi(z)^2]`` with ``(u, v)`` standard normal of
correlation ``c``. A vanilla chain of ``L`` nonlinear layers composes the local map ``L`` times.

- TAT (Zhang, Botev, Martens 2022): ``phi = sqrt(2 / (1 + a^2)) * LReLU_a`` has the identity Q map and
  ``C(c) = c + (1 - a)^2 / (pi (1 + a^2)) * (sqrt(1 - c^2) - c arccos c)``. The slope ``a`` is chosen so
  that the whole network's C map reaches ``eta`` at 0: ``C^L(0) = eta`` (default 0.9).
- DKS (Martens et al. 2021): ``phi_hat(x) = gamma (phi(alpha x + beta) + delta)`` with ``Q(1) = 1``,
  ``Q'(1) = 1``, ``C(0) = 0`` and ``C'(1) = zeta^(1/L)`` (so the network's ``C'(1) = zeta``, default 1.5).
- Edge of Chaos (Poole et al. 2016; Schoenholz et al. 2017): weight and bias variances on the critical
  line, where the correlation map's slope at its fixed point is 1.

All expectations use Gauss-Hermite quadrature (exact enough for these smooth integrands).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Callable

import numpy as np

_QUADRATURE_POINTS = 201


@cache
def _hermite(n: int = _QUADRATURE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.hermite_e.hermegauss(n)
    return nodes, weights / math.sqrt(2.0 * math.pi)


def gaussian_mean(fn: Callable[[np.ndarray], np.ndarray]) -> float:
    """``E[fn(z)]`` for ``z ~ N(0, 1)``."""
    nodes, weights = _hermite()
    return float(np.sum(weights * fn(nodes)))


# ----------------------------------------------------------------------------- TAT (Leaky ReLU)


def leaky_relu_output_scale(slope: float) -> float:
    """The scale that makes ``scale * LReLU_slope`` preserve the second moment (identity Q map)."""
    return math.sqrt(2.0 / (1.0 + slope * slope))


def leaky_relu_cmap(c, slope: float):
    """Local C map of the scaled Leaky ReLU (closed form); works on floats and arrays."""
    c = np.clip(c, -1.0, 1.0)
    return c + (1.0 - slope) ** 2 / (math.pi * (1.0 + slope**2)) * (np.sqrt(1.0 - c * c) - c * np.arccos(c))


def composed_cmap(c: float, slope: float, depth: int) -> float:
    """The C map of a vanilla chain of ``depth`` scaled-Leaky-ReLU layers, at ``c``."""
    for _ in range(depth):
        c = float(leaky_relu_cmap(c, slope))
    return c


@dataclass(frozen=True)
class LeakyReLUParams:
    negative_slope: float
    output_scale: float


def tat_leaky_relu(depth: int, c_val_0_target: float = 0.9, tol: float = 1e-10) -> LeakyReLUParams:
    """TAT's Leaky ReLU for a vanilla chain of ``depth`` nonlinear layers: ``C^depth(0) = c_val_0_target``.

    ``C^depth(0)`` falls from its ReLU value (slope 0) to 0 (slope 1, a linear network). A network too
    shallow to reach the target even with ReLUs has no solution: that is an error, not a clamp.
    """
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    if not 0.0 < c_val_0_target < 1.0:
        raise ValueError(f"c_val_0_target must lie in (0, 1), got {c_val_0_target}")
    relu_value = composed_cmap(0.0, 0.0, depth)
    if relu_value < c_val_0_target:
        raise ValueError(
            f"a vanilla chain of {depth} layers reaches C(0) = {relu_value:.4f} at most (with ReLUs), below "
            f"the target {c_val_0_target}; lower the target or use a deeper network"
        )
    low, high = 0.0, 1.0  # composed_cmap(0, ., depth) decreases in the slope
    while high - low > tol:
        mid = 0.5 * (low + high)
        if composed_cmap(0.0, mid, depth) > c_val_0_target:
            low = mid
        else:
            high = mid
    slope = 0.5 * (low + high)
    return LeakyReLUParams(slope, leaky_relu_output_scale(slope))


# ----------------------------------------------------------------------------- DKS (smooth activations)

SMOOTH_ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "softplus": (lambda x: np.logaddexp(0.0, x), lambda x: 1.0 / (1.0 + np.exp(-x))),
    "tanh": (np.tanh, lambda x: 1.0 - np.tanh(x) ** 2),
}


@dataclass(frozen=True)
class DKSParams:
    """``phi_hat(x) = output_scale * (phi(input_scale * x + input_shift) + output_shift)``."""

    activation: str
    input_scale: float
    input_shift: float
    output_shift: float
    output_scale: float

    def numpy_fn(self) -> Callable[[np.ndarray], np.ndarray]:
        phi, _ = SMOOTH_ACTIVATIONS[self.activation]
        return lambda x: self.output_scale * (phi(self.input_scale * x + self.input_shift) + self.output_shift)

    def numpy_derivative(self) -> Callable[[np.ndarray], np.ndarray]:
        _, dphi = SMOOTH_ACTIVATIONS[self.activation]
        return lambda x: self.output_scale * self.input_scale * dphi(self.input_scale * x + self.input_shift)


def _dks_from(activation: str, alpha: float, beta: float) -> DKSParams:
    phi, _ = SMOOTH_ACTIVATIONS[activation]
    shift = -gaussian_mean(lambda x: phi(alpha * x + beta))  # C(0) = 0: zero mean output
    scale = 1.0 / math.sqrt(gaussian_mean(lambda x: (phi(alpha * x + beta) + shift) ** 2))  # Q(1) = 1
    return DKSParams(activation, alpha, beta, shift, scale)


def dks_activation(activation: str, depth: int, c_slope_1_target: float = 1.5) -> DKSParams:
    """DKS's transformation of a smooth activation for a vanilla chain of ``depth`` nonlinear layers."""
    from scipy import optimize

    if activation not in SMOOTH_ACTIVATIONS:
        raise ValueError(f"DKS activation must be one of {sorted(SMOOTH_ACTIVATIONS)}, got {activation!r}")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    if c_slope_1_target <= 1.0:
        raise ValueError(f"c_slope_1_target must exceed 1, got {c_slope_1_target}")
    local_slope = c_slope_1_target ** (1.0 / depth)

    def residuals(p):
        params = _dks_from(activation, float(p[0]), float(p[1]))
        f, df = params.numpy_fn(), params.numpy_derivative()
        q_slope = gaussian_mean(lambda x: f(x) * df(x) * x)  # Q'(1)
        c_slope = gaussian_mean(lambda x: df(x) ** 2)  # C'(1), with Q(1) = 1
        return [q_slope - 1.0, c_slope - local_slope]

    for start in ((1.0, 0.0), (0.5, 0.5), (0.1, 1.0), (1.0, 1.0), (0.1, -1.0), (0.3, 0.0)):
        solution = optimize.root(residuals, np.asarray(start), method="hybr")
        if solution.success and solution.x[0] > 0 and max(abs(r) for r in residuals(solution.x)) < 1e-8:
            return _dks_from(activation, float(solution.x[0]), float(solution.x[1]))
    raise ValueError(f"DKS found no transformation of {activation} for depth {depth} and target {c_slope_1_target}")


# ----------------------------------------------------------------------------- Edge of Chaos


@dataclass(frozen=True)
class EOCParams:
    activation: str
    weight_std: float  # sigma_w: weights ~ sigma_w / sqrt(fan_in) (here: orthogonal times sigma_w)
    bias_std: float
    q_fixed_point: float


def edge_of_chaos(activation: str = "relu", bias_variance: float = 0.0) -> EOCParams:
    """Weight/bias scales on the critical line ``chi = sigma_w^2 E[phi'(sqrt(q*) z)^2] = 1``.

    ReLU: ``sigma_w^2 = 2``, ``sigma_b = 0`` (He initialisation; any other bias has no fixed point).
    tanh: for the given ``sigma_b^2 > 0``, solve the Q-map fixed point ``q*`` and ``chi(q*) = 1`` together.
    """
    if activation == "relu":
        if bias_variance != 0.0:
            raise ValueError("ReLU's edge of chaos has sigma_b = 0")
        return EOCParams("relu", math.sqrt(2.0), 0.0, float("nan"))
    if activation != "tanh":
        raise ValueError(f"edge_of_chaos supports relu and tanh, got {activation!r}")
    if bias_variance <= 0.0:
        raise ValueError("tanh's edge of chaos needs a positive bias variance (zero gives sigma_w = 1, q* = 0)")
    from scipy import optimize

    def residuals(p):
        sw2, q = math.exp(p[0]), math.exp(p[1])
        fixed = sw2 * gaussian_mean(lambda x: np.tanh(math.sqrt(q) * x) ** 2) + bias_variance - q
        chi = sw2 * gaussian_mean(lambda x: (1.0 - np.tanh(math.sqrt(q) * x) ** 2) ** 2) - 1.0
        return [fixed, chi]

    solution = optimize.root(residuals, np.log([1.5, max(bias_variance, 0.1)]), method="hybr")
    if not solution.success:
        raise ValueError(f"no edge-of-chaos point found for tanh with sigma_b^2 = {bias_variance}")
    sw2, q = (math.exp(v) for v in solution.x)
    return EOCParams("tanh", math.sqrt(sw2), math.sqrt(bias_variance), q)
