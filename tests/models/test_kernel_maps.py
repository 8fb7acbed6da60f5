"""TAT / DKS / EOC math, checked against values derived independently (numerical integration, limits)."""

import math

import numpy as np
import pytest
from scipy import integrate

from pnnh_kernels.models.kernel_maps import (
    composed_cmap,
    dks_activation,
    edge_of_chaos,
    leaky_relu_cmap,
    tat_leaky_relu,
)


def normal_mean(fn):
    """E[fn(z)], z ~ N(0, 1), by adaptive quadrature (independent of the module's Gauss-Hermite)."""
    return integrate.quad(lambda z: fn(z) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi), -12, 12, limit=200)[0]


def bivariate_mean(fn, c):
    """E[fn(u, v)] for standard normals of correlation c, by 2-D quadrature."""
    s = math.sqrt(1 - c * c)
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return integrate.dblquad(lambda y, x: fn(x, c * x + s * y) * pdf(x) * pdf(y), -9, 9, -9, 9, epsabs=1e-9)[0]


def scaled_lrelu(a):
    scale = math.sqrt(2 / (1 + a * a))
    return lambda x: scale * (x if x > 0 else a * x)


@pytest.mark.parametrize("slope", [0.0, 0.3, 0.8])
@pytest.mark.parametrize("c", [-0.5, 0.0, 0.6])
def test_cmap_closed_form_matches_integration(slope, c):
    phi = scaled_lrelu(slope)
    numeric = bivariate_mean(lambda u, v: phi(u) * phi(v), c)  # Q(1) = 1, so no division needed
    assert leaky_relu_cmap(c, slope) == pytest.approx(numeric, abs=1e-6)


@pytest.mark.parametrize("slope", [0.0, 0.5])
@pytest.mark.parametrize("q", [0.25, 1.0, 3.0])
def test_scaled_leaky_relu_has_the_identity_q_map(slope, q):
    phi = scaled_lrelu(slope)
    assert normal_mean(lambda z: phi(math.sqrt(q) * z) ** 2) == pytest.approx(q, rel=1e-7)


def test_cmap_limits():
    cs = np.linspace(-1, 1, 11)
    np.testing.assert_allclose(leaky_relu_cmap(cs, 1.0), cs)  # slope 1: a linear map keeps correlations
    assert leaky_relu_cmap(0.0, 0.0) == pytest.approx(1 / math.pi)  # ReLU's arc-cosine kernel at 0
    assert leaky_relu_cmap(1.0, 0.3) == pytest.approx(1.0)  # 1 is a fixed point


@pytest.mark.parametrize("depth, target", [(19, 0.9), (55, 0.9), (109, 0.5)])
def test_tat_slope_meets_its_target(depth, target):
    p = tat_leaky_relu(depth, target)
    assert 0 < p.negative_slope < 1
    assert p.output_scale == pytest.approx(math.sqrt(2 / (1 + p.negative_slope**2)))
    c = 0.0
    for _ in range(depth):  # independent composition through the numerically integrated C map
        c = (
            bivariate_mean(lambda u, v: scaled_lrelu(p.negative_slope)(u) * scaled_lrelu(p.negative_slope)(v), c)
            if depth == 19
            else leaky_relu_cmap(c, p.negative_slope)
        )
    assert c == pytest.approx(target, abs=1e-5)
    assert composed_cmap(0.0, p.negative_slope, depth) == pytest.approx(target, abs=1e-8)


def test_deeper_nets_need_more_linear_activations():
    assert tat_leaky_relu(20).negative_slope < tat_leaky_relu(50).negative_slope < tat_leaky_relu(100).negative_slope


def test_shallow_net_cannot_reach_the_target():
    with pytest.raises(ValueError, match=r"reaches C\(0\) = 0\.3183 at most"):
        tat_leaky_relu(1, 0.9)
    with pytest.raises(ValueError, match="c_val_0_target"):
        tat_leaky_relu(10, 1.5)


@pytest.mark.parametrize("activation", ["softplus", "tanh"])
def test_dks_conditions_hold(activation):
    depth, zeta = 19, 1.5
    p = dks_activation(activation, depth, zeta)
    f, df = p.numpy_fn(), p.numpy_derivative()
    q_map = lambda q: normal_mean(lambda z: f(math.sqrt(q) * z) ** 2)
    assert q_map(1.0) == pytest.approx(1.0, abs=1e-6)  # Q(1) = 1
    assert (q_map(1.0 + 1e-4) - q_map(1.0 - 1e-4)) / 2e-4 == pytest.approx(1.0, abs=1e-5)  # Q'(1) = 1
    assert normal_mean(f) == pytest.approx(0.0, abs=1e-7)  # C(0) = 0
    eps = 1e-6
    slope_numeric = normal_mean(lambda z: ((f(z + eps) - f(z - eps)) / (2 * eps)) ** 2)
    assert slope_numeric**depth == pytest.approx(zeta, rel=1e-4)  # the network's C'(1) = zeta
    assert df(0.3) == pytest.approx((f(0.3 + eps) - f(0.3 - eps)) / (2 * eps), rel=1e-6)


def test_edge_of_chaos():
    relu = edge_of_chaos("relu")
    assert relu.weight_std == pytest.approx(math.sqrt(2)) and relu.bias_std == 0
    tanh = edge_of_chaos("tanh", 0.05)
    sw2, q = tanh.weight_std**2, tanh.q_fixed_point
    assert sw2 * normal_mean(lambda z: math.tanh(math.sqrt(q) * z) ** 2) + 0.05 == pytest.approx(q, rel=1e-6)
    assert sw2 * normal_mean(lambda z: (1 - math.tanh(math.sqrt(q) * z) ** 2) ** 2) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError):
        edge_of_chaos("tanh", 0.0)
