"""Noise schedules: boundary values, derivatives (finite differences), inverses, NELBO weights."""

import math

import pytest
import torch

from unmask.config import DiffusionConfig
from unmask.objectives.schedules import (
    Cosine,
    Geometric,
    Linear,
    LogLinear,
    make_schedule,
)

SCHEDULES = {
    "loglinear": LogLinear(0.0),
    "loglinear-eps": LogLinear(1e-3),
    "cosine": Cosine(0.0),
    "cosine-eps": Cosine(1e-3),
    "linear": Linear(1e-3, 7.0),
    "geometric": Geometric(1e-4, 20.0),
}
T = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)


@pytest.mark.parametrize("name", SCHEDULES)
def test_alpha_is_one_at_zero_and_decreasing(name):
    s = SCHEDULES[name]
    zero = s.alpha(torch.tensor(0.0, dtype=torch.float64))
    # linear/geometric start at exp(-sigma_min), the others at exactly 1
    expected = math.exp(-s.sigma_min) if hasattr(s, "sigma_min") else 1.0
    assert float(zero) == pytest.approx(expected, abs=1e-12)
    a = s.alpha(T)
    assert torch.all(a[1:] < a[:-1])


@pytest.mark.parametrize("name", SCHEDULES)
def test_derivative_matches_finite_differences(name):
    s = SCHEDULES[name]
    h = 1e-6
    numeric = (s.alpha(T + h) - s.alpha(T - h)) / (2 * h)
    assert torch.allclose(s.alpha_prime(T), numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", SCHEDULES)
def test_inverse_round_trip(name):
    s = SCHEDULES[name]
    assert torch.allclose(s.inverse(s.alpha(T)), T, atol=1e-9)


@pytest.mark.parametrize("name", SCHEDULES)
def test_weight_is_minus_alpha_prime_over_one_minus_alpha(name):
    s = SCHEDULES[name]
    expected = -s.alpha_prime(T) / (1 - s.alpha(T))
    assert torch.allclose(s.weight(T), expected, rtol=1e-9)
    # sigma = -log alpha, and its derivative times exp(-sigma) is -alpha'
    h = 1e-6
    dsigma = (s.sigma(T + h) - s.sigma(T - h)) / (2 * h)
    assert torch.allclose(dsigma * torch.exp(-s.sigma(T)), -s.alpha_prime(T), rtol=1e-5)


def test_loglinear_weight_is_exactly_one_over_t():
    t = torch.rand(1000, dtype=torch.float64).clamp_min(1e-6)
    assert torch.equal(LogLinear(0.0).weight(t), 1 / t)
    # with MDLM's eps the weight is still exactly 1/t (MDLM: "this factor is exactly 1/t")
    assert torch.allclose(LogLinear(1e-3).weight(t), 1 / t, rtol=1e-12)
    assert torch.allclose(-LogLinear(1e-3).alpha_prime(t) / (1 - LogLinear(1e-3).alpha(t)), 1 / t, rtol=1e-12)


def test_endpoints_and_mdlm_sigma_forms():
    one = torch.tensor(1.0, dtype=torch.float64)
    assert LogLinear(0.0).alpha_one == 0.0
    assert Cosine(0.0).alpha_one == pytest.approx(0.0, abs=1e-15)
    assert LogLinear(1e-3).alpha_one == pytest.approx(1e-3)
    # MDLM writes loglinear as sigma = -log(1 - (1-eps) t)
    t = T
    assert torch.allclose(LogLinear(1e-3).sigma(t), -torch.log1p(-(1 - 1e-3) * t))
    assert torch.allclose(Linear(1e-3, 7.0).sigma(one), torch.tensor(7.0, dtype=torch.float64))
    g = Geometric(1e-4, 20.0)
    assert torch.allclose(g.sigma(t), 1e-4 ** (1 - t) * 20.0 ** t)


def test_make_schedule_from_config():
    assert isinstance(make_schedule(DiffusionConfig()), LogLinear)
    assert isinstance(make_schedule(DiffusionConfig(schedule="cosine")), Cosine)
    s = make_schedule(DiffusionConfig(schedule="geometric", sigma_min=1e-3, sigma_max=5.0))
    assert (s.sigma_min, s.sigma_max) == (1e-3, 5.0)
    with pytest.raises(ValueError):
        Linear(5.0, 1.0)
