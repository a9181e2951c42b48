"""k-TV penalty: exact derivatives per point, unbiasedness against quadrature (1-D) and an analytic
value (d-D quadratic) within Monte Carlo error, differentiability, bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from scipy.integrate import quad

from engm_fast.regularizers import ktv_penalty

LOW, HIGH = -0.5, 1.0


class SinQuartic(nn.Module):
    """f(x) = sin(3x) + 0.5 x^4 with derivatives known in closed form."""

    def forward(self, x):
        return (torch.sin(3 * x) + 0.5 * x ** 4).squeeze(1)


DERIVS = {
    1: lambda x: 3 * math.cos(3 * x) + 2 * x ** 3,
    2: lambda x: -9 * math.sin(3 * x) + 6 * x ** 2,
    3: lambda x: -27 * math.cos(3 * x) + 12 * x,
    4: lambda x: 81 * math.sin(3 * x) + 12,
}


def _mc(fn, calls):
    vals = torch.tensor([float(fn().detach()) for _ in range(calls)], dtype=torch.float64)
    return float(vals.mean()), float(vals.std() / math.sqrt(calls))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_1d_per_point_value_is_exact(k):
    # the same generator state gives the same points: recompute V * mean |f^(k)(z)|^q by hand
    gen = torch.Generator().manual_seed(5)
    got = ktv_penalty(SinQuartic(), k=k, q=1.5, domain=(LOW, HIGH), n_points=9, generator=gen, dtype=torch.float64)
    z = LOW + (HIGH - LOW) * torch.rand(9, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = (HIGH - LOW) * sum(abs(DERIVS[k](float(v))) ** 1.5 for v in z.flatten()) / 9
    assert abs(float(got) - expected) <= 1e-10 * max(1.0, abs(expected))


@pytest.mark.parametrize("k,q", [(1, 2), (2, 2), (3, 2), (4, 2), (2, 1)])
def test_1d_unbiased_against_quadrature(k, q):
    exact, _ = quad(lambda x: abs(DERIVS[k](x)) ** q, LOW, HIGH, limit=200)
    f = SinQuartic()
    mean, se = _mc(lambda: ktv_penalty(f, k=k, q=q, domain=(LOW, HIGH), n_points=400, dtype=torch.float64), calls=40)
    # 4.5 standard errors: a false alarm has probability ~1e-5; a missing volume factor
    # (1.5x) or a wrong derivative order is many standard errors away
    assert abs(mean - exact) < 4.5 * se, (mean, exact, se)
    assert se < 0.05 * exact  # the check has power


class Quadratic(nn.Module):
    def __init__(self, A, b):
        super().__init__()
        self.A, self.b = nn.Parameter(A), nn.Parameter(b)

    def forward(self, x):
        return 0.5 * ((x @ self.A) * x).sum(1) + x @ self.b


def _quadratic():
    A = torch.tensor([[2.0, 0.5, -1.0], [0.5, -1.0, 0.3], [-1.0, 0.3, 0.7]], dtype=torch.float64)
    b = torch.tensor([0.2, -0.4, 1.0], dtype=torch.float64)
    low = torch.tensor([-1.0, 0.0, 0.5], dtype=torch.float64)
    high = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    return Quadratic(A, b), A, b, low, high


def test_dd_quadratic_analytic():
    model, A, b, low, high = _quadratic()
    d, V = 3, float(torch.prod(high - low))
    # k = 2: D_u^2 f = u^T A u everywhere; E_u (u^T A u)^2 = [(tr A)^2 + 2 tr(A^2)] / (d (d + 2))
    exact2 = V * (float(A.trace()) ** 2 + 2 * float((A @ A).trace())) / (d * (d + 2))
    mean, se = _mc(lambda: ktv_penalty(model, k=2, domain=(low, high), n_points=300), calls=40)
    assert abs(mean - exact2) < 4.5 * se and se < 0.05 * exact2, (mean, exact2, se)
    # k = 1: E_u (u . grad f)^2 = |A x + b|^2 / d; E_x |Ax + b|^2 = |A mu + b|^2 + sum_j (A^T A)_jj var_j
    mu, var = (low + high) / 2, (high - low) ** 2 / 12
    exact1 = V * (float((A @ mu + b).pow(2).sum()) + float(((A.T @ A).diagonal() * var).sum())) / d
    mean, se = _mc(lambda: ktv_penalty(model, k=1, domain=(low, high), n_points=300), calls=40)
    assert abs(mean - exact1) < 4.5 * se and se < 0.05 * exact1, (mean, exact1, se)
    # k = 3: the third derivative of a quadratic vanishes identically
    assert float(ktv_penalty(model, k=3, domain=(low, high), n_points=50).detach()) == pytest.approx(0.0, abs=1e-20)


def test_gradient_wrt_parameters_matches_finite_differences():
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    box = (torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 0.5]))

    def value():
        return ktv_penalty(net, k=3, domain=box, n_points=7, generator=torch.Generator().manual_seed(3))

    value().backward()
    W = net[0].weight
    analytic = W.grad.clone()
    h = 1e-6
    numeric = torch.zeros_like(W)
    with torch.no_grad():
        for idx in [(0, 0), (1, 1), (3, 0), (2, 1)]:
            W[idx] += h
            up = float(value())
            W[idx] -= 2 * h
            down = float(value())
            W[idx] += h
            numeric[idx] = (up - down) / (2 * h)
            assert abs(float(analytic[idx]) - float(numeric[idx])) <= 1e-6 * max(1.0, abs(float(numeric[idx])))


def test_fresh_points_each_call_and_output_shapes():
    f = SinQuartic().double()
    a = ktv_penalty(f, k=1, domain=(LOW, HIGH), n_points=5)
    b = ktv_penalty(f, k=1, domain=(LOW, HIGH), n_points=5)
    assert float(a) != float(b)
    column = lambda x: torch.sin(x)  # [N, 1] output is accepted
    assert ktv_penalty(column, k=1, domain=(0.0, 1.0), n_points=3).shape == ()
    assert ktv_penalty(lambda x: x.sum(1), k=1, domain=(0.0, 1.0), dim=4, n_points=3).dtype == torch.float32


def test_bad_input():
    f = SinQuartic()
    with pytest.raises(ValueError, match="k must be an int in 1..4, got 5"):
        ktv_penalty(f, k=5)
    with pytest.raises(ValueError, match="k must be"):
        ktv_penalty(f, k=2.0)
    with pytest.raises(ValueError, match="q must be"):
        ktv_penalty(f, k=1, q=0.5)
    with pytest.raises(ValueError, match="high > low"):
        ktv_penalty(f, k=1, domain=(1.0, 1.0))
    with pytest.raises(ValueError, match="different lengths"):
        ktv_penalty(f, k=1, domain=(torch.zeros(2), torch.ones(3)))
    with pytest.raises(ValueError, match="finite"):
        ktv_penalty(f, k=1, domain=(0.0, float("inf")))
    with pytest.raises(ValueError, match="pair"):
        ktv_penalty(f, k=1, domain=(0.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="dim=2"):
        ktv_penalty(f, k=1, domain=(torch.zeros(3), 1.0), dim=2)
    with pytest.raises(ValueError, match="n_points"):
        ktv_penalty(f, k=1, n_points=0)
    with pytest.raises(ValueError, match=r"to shape \(4, 2\)"):
        ktv_penalty(lambda x: x.repeat(1, 2), k=1, n_points=4)
    with pytest.raises(ValueError, match="dtype"):
        ktv_penalty(f, k=1, dtype=torch.int64)
    with pytest.raises(TypeError, match="callable"):
        ktv_penalty("net", k=1)


def test_input_dimension_from_the_first_linear_layer():
    """Float bounds and no dim=: d is the first Linear's in_features (the issue's failure was a
    raw "mat1 and mat2 shapes cannot be multiplied (4000x1 and 4x4)")."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    inferred = ktv_penalty(net, k=2, domain=(0.0, 1.0), n_points=64, generator=torch.Generator().manual_seed(1))
    explicit = ktv_penalty(net, k=2, domain=(0.0, 1.0), n_points=64, dim=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(inferred, explicit) and float(inferred.detach()) > 0


def test_a_model_that_rejects_the_points_gets_an_error_naming_dim():
    class HeadFirst(torch.nn.Module):  # its first registered Linear is not the one that reads x
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 1)
            self.body = torch.nn.Linear(3, 4)

        def forward(self, x):
            return self.head(torch.tanh(self.body(x)))

    with pytest.raises(ValueError, match=r"\[16, 4\].*first layer 'head'.*pass dim="):
        ktv_penalty(HeadFirst(), k=1, n_points=16)
    assert ktv_penalty(HeadFirst(), k=1, n_points=16, dim=3).shape == ()
    w = torch.ones(1, 3)
    with pytest.raises(ValueError, match=r"\[8, 1\].*default d = 1.*pass dim="):
        ktv_penalty(lambda x: torch.nn.functional.linear(x, w), k=1, n_points=8)
    with pytest.raises(ValueError, match=r"\[8, 2\].*length of the domain bounds.*mat1 and mat2"):
        ktv_penalty(lambda x: torch.nn.functional.linear(x, w), k=1, n_points=8,
                    domain=(torch.zeros(2), torch.ones(2)))
