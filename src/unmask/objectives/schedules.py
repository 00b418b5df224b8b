"""Noise schedules for absorbing-state (masked) diffusion.

A schedule gives ``alpha(t)``, the probability that a token is still clean at time ``t`` in
``[0, 1]`` (``alpha(0) = 1``, decreasing), its derivative ``alpha_prime(t)``, and the inverse
``t = alpha^{-1}(a)``. MDLM writes the same thing as total noise ``sigma(t) = -log alpha(t)``.

The continuous-time NELBO weight (MDLM eq. 10) is ``w(t) = -alpha'(t) / (1 - alpha(t))``, which is
exactly ``1/t`` for the log-linear schedule with ``eps = 0``.

``eps`` defaults to 0 for log-linear and cosine so that ``alpha(1) = 0``: every token is masked at
``t = 1`` and the prior term of the bound vanishes. MDLM hard-codes ``eps = 1e-3`` (``alpha(1) =
1e-3``); set ``diffusion.schedule_eps=1e-3`` to reproduce its masking rate exactly. The linear and
geometric schedules (in sigma) end at ``alpha(1) = exp(-sigma_max) > 0``.
"""

from __future__ import annotations

import math

import torch

from ..config import DiffusionConfig


class NoiseSchedule:
    """A noise schedule (module docstring): ``alpha(t)``, its derivative and its inverse, on ``t`` in [0, 1]."""

    name = "schedule"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha(t)``, the probability that a token is still clean at time ``t``."""
        raise NotImplementedError

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        """The derivative ``alpha'(t)`` (negative)."""
        raise NotImplementedError

    def inverse(self, alpha: torch.Tensor) -> torch.Tensor:
        """The time ``t`` at which ``alpha(t) = alpha``."""
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise ``-log alpha(t)`` (what MDLM's time embedding sees)."""
        return -torch.log(self.alpha(t))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Continuous NELBO weight ``-alpha'(t) / (1 - alpha(t))``."""
        return -self.alpha_prime(t) / (1 - self.alpha(t))

    @property
    def alpha_one(self) -> float:
        """``alpha(1)``: the share of tokens still clean at the end (0: every token is masked)."""
        return float(self.alpha(torch.tensor(1.0, dtype=torch.float64)))


class LogLinear(NoiseSchedule):
    """``alpha(t) = 1 - (1-eps) t``; ``sigma = -log(1 - (1-eps) t)`` (MDLM's default)."""

    name = "loglinear"

    def __init__(self, eps: float = 0.0):
        self.eps = eps

    def alpha(self, t):
        """``1 - (1 - eps) t``."""
        return 1 - (1 - self.eps) * t

    def alpha_prime(self, t):
        """``-(1 - eps)`` everywhere."""
        return torch.full_like(t, -(1 - self.eps))

    def inverse(self, alpha):
        """``(1 - alpha) / (1 - eps)``."""
        return (1 - alpha) / (1 - self.eps)

    def weight(self, t):
        """The NELBO weight ``-alpha'(t) / (1 - alpha(t)) = 1 / t`` for every ``eps`` (MDLM, Sahoo et al., 2024,
        eq. 10)."""
        return 1 / t


class Cosine(NoiseSchedule):
    """``alpha(t) = eps + (1-eps) cos(pi t / 2)`` (MDLM's cosine: ``sigma = -log alpha``)."""

    name = "cosine"

    def __init__(self, eps: float = 0.0):
        self.eps = eps

    def alpha(self, t):
        """``eps + (1 - eps) cos(pi t / 2)``."""
        return self.eps + (1 - self.eps) * torch.cos(math.pi / 2 * t)

    def alpha_prime(self, t):
        """``-(1 - eps) (pi / 2) sin(pi t / 2)``."""
        return -(1 - self.eps) * math.pi / 2 * torch.sin(math.pi / 2 * t)

    def inverse(self, alpha):
        """``(2 / pi) arccos((alpha - eps) / (1 - eps))``."""
        return 2 / math.pi * torch.arccos(((alpha - self.eps) / (1 - self.eps)).clamp(-1, 1))


class SigmaSchedule(NoiseSchedule):
    """Schedules written as total noise ``sigma(t)``; ``alpha = exp(-sigma)``."""

    def __init__(self, sigma_min: float, sigma_max: float):
        if not 0 <= sigma_min < sigma_max:
            raise ValueError(f"need 0 <= sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def total(self, t):
        """The total noise ``sigma(t)``."""
        raise NotImplementedError

    def rate(self, t):
        """The noise rate ``sigma'(t)``."""
        raise NotImplementedError

    def total_inverse(self, sigma):
        """The time ``t`` at which ``sigma(t) = sigma``."""
        raise NotImplementedError

    def sigma(self, t):
        """The total noise ``sigma(t)`` (:meth:`total`)."""
        return self.total(t)

    def alpha(self, t):
        """``exp(-sigma(t))``."""
        return torch.exp(-self.total(t))

    def alpha_prime(self, t):
        """``-sigma'(t) exp(-sigma(t))``."""
        return -self.rate(t) * torch.exp(-self.total(t))

    def inverse(self, alpha):
        """``sigma^{-1}(-log alpha)``."""
        return self.total_inverse(-torch.log(alpha))

    def weight(self, t):
        """The NELBO weight ``sigma'(t) / expm1(sigma(t))`` (MDLM, Sahoo et al., 2024, eq. 10, in sigma)."""
        return self.rate(t) / torch.expm1(self.total(t))


class Linear(SigmaSchedule):
    """``sigma(t) = sigma_min + t (sigma_max - sigma_min)``."""

    name = "linear"

    def total(self, t):
        """``sigma_min + t (sigma_max - sigma_min)``."""
        return self.sigma_min + t * (self.sigma_max - self.sigma_min)

    def rate(self, t):
        """``sigma_max - sigma_min`` everywhere."""
        return torch.full_like(t, self.sigma_max - self.sigma_min)

    def total_inverse(self, sigma):
        """``(sigma - sigma_min) / (sigma_max - sigma_min)``."""
        return (sigma - self.sigma_min) / (self.sigma_max - self.sigma_min)


class Geometric(SigmaSchedule):
    """``sigma(t) = sigma_min^(1-t) sigma_max^t``."""

    name = "geometric"

    def __init__(self, sigma_min: float, sigma_max: float):
        if sigma_min <= 0:
            raise ValueError("the geometric schedule needs sigma_min > 0")
        super().__init__(sigma_min, sigma_max)
        self.log_ratio = math.log(sigma_max / sigma_min)

    def total(self, t):
        """``sigma_min^(1-t) sigma_max^t``."""
        return self.sigma_min * torch.exp(t * self.log_ratio)

    def rate(self, t):
        """``sigma(t) log(sigma_max / sigma_min)``."""
        return self.total(t) * self.log_ratio

    def total_inverse(self, sigma):
        """``log(sigma / sigma_min) / log(sigma_max / sigma_min)``."""
        return torch.log(sigma / self.sigma_min) / self.log_ratio


def make_schedule(cfg: DiffusionConfig) -> NoiseSchedule:
    """The schedule that ``diffusion.schedule`` names, with its ``eps`` or sigma bounds."""
    if cfg.schedule == "loglinear":
        return LogLinear(cfg.schedule_eps)
    if cfg.schedule == "cosine":
        return Cosine(cfg.schedule_eps)
    if cfg.schedule == "linear":
        return Linear(cfg.sigma_min, cfg.sigma_max)
    if cfg.schedule == "geometric":
        return Geometric(cfg.sigma_min, cfg.sigma_max)
    raise ValueError(f"unknown noise schedule '{cfg.schedule}'")
