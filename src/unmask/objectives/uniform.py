"""Uniform-noise diffusion of canvases (DiffusionGemma's training; the bound of UDLM, Schiff et al. 2024,
arXiv 2412.10193, section 4, and DUO, Sahoo et al. 2025, arXiv 2506.10892, section 2).

A row is cut into canvases of ``canvas`` tokens; each canvas is corrupted at its own time ``t`` by
``q_t(z | x) = alpha_t onehot(x) + (1 - alpha_t) / N`` over the ``N`` token ids (no mask token: a corrupted
position takes a uniform token, possibly ``x`` itself) and denoised given the clean tokens before it. With the
model's clean-token distribution ``x_theta(z_t)``, ``q^x = q_t(. | x)``, ``q^th = alpha_t x_theta + (1 - alpha_t)/N``
and ``i = z_t``, the continuous-time NELBO of a token is (UDLM's integrand, rearranged into non-negative terms)

    -log p(x) <= int_0^1 E_{z_t} [ f ] dt,
    f = -alpha'_t / (N alpha_t q^x_i) * [ KL(q^x || q^th) + psi(log q^x_i / q^th_i) ],  psi(u) = e^u - 1 - u.

``f = 0`` when ``x_theta`` is the clean token. The prior term ``KL(q_1(.|x) || uniform)`` vanishes when
``alpha_1 = 0`` (``diffusion.schedule_eps = 0``). Training draws ``t`` on ``[t_min, t_max]`` per canvas (as
block diffusion); evaluation integrates ``t`` over ``[0, 1]``. Self-conditioning (Chen et al. 2022): with
probability ``self_conditioning`` a row's first pass, without gradient, gives logits that the second pass
takes as input (evaluation always uses it when the probability is > 0, as generation does). Training conditions on
the first pass's untempered logits, while generation (``entropy_bound``, as transformers' ``generate``) feeds the
previous step's tempered ones: DiffusionGemma's training recipe is not public, so this is unmask's choice.
"""

from __future__ import annotations

import math

import torch

from .base import Noise, per_sequence_sums
from .block_diffusion import BlockDiffusion
from .schedules import NoiseSchedule

PSI_SERIES = 0.1  # |u| below it: psi by its series, where e^u - 1 - u would cancel
PSI_TERMS = tuple(1 / math.factorial(k) for k in range(2, 11))  # 1/k!, k = 2 .. 10: truncation < 1e-15 relative


def psi(u: torch.Tensor) -> torch.Tensor:
    """``e^u - 1 - u`` (>= 0) without cancellation near 0 (its series there)."""
    series = torch.zeros_like(u)
    for c in reversed(PSI_TERMS):
        series = series * u + c
    return torch.where(u.abs() < PSI_SERIES, u * u * series, torch.expm1(u) - u)


def uniform_nelbo_integrand(log_probs: torch.Tensor, x0: torch.Tensor, zt: torch.Tensor, alpha: torch.Tensor,
                            alpha_prime: torch.Tensor) -> torch.Tensor:
    """``f`` (module docstring) at N tokens: the model's log-probabilities of the clean token (N, V), clean ids
    ``x0`` (N,), noisy ids ``zt`` (N,), ``alpha_t`` and ``alpha'_t`` (N,); (N,) in ``log_probs``' dtype."""
    v, dtype = log_probs.shape[-1], log_probs.dtype
    alpha = alpha.double()
    zero = alpha <= 0  # the limit is 0 there; a finite stand-in keeps the gradients of the other rows finite
    alpha = torch.where(zero, torch.full_like(alpha, 0.5), alpha)
    log_alpha = alpha.log().to(dtype)[:, None]
    floor = (torch.log1p(-alpha) - math.log(v)).to(dtype)[:, None]  # log (1 - alpha) / N, from float64 alpha
    log_qth = torch.logaddexp(log_alpha + log_probs, floor)
    hit = torch.nn.functional.one_hot(x0, v).bool()
    log_qx = torch.where(hit, torch.logaddexp(log_alpha, floor), floor)
    # KL(q^x || q^th) = sum_j q^x_j psi(log q^th_j / q^x_j), non-negative terms (q^th_j where q^x_j = 0: alpha = 1)
    possible = log_qx > float("-inf")
    kl = torch.where(possible, log_qx.exp() * psi(log_qth - torch.where(possible, log_qx, 0)), log_qth.exp()).sum(-1)
    at = zt[:, None]
    log_qx_i, log_qth_i = log_qx.gather(-1, at)[:, 0], log_qth.gather(-1, at)[:, 0]
    scale = -alpha_prime.to(dtype) / (v * alpha.to(dtype) * log_qx_i.exp())
    f = scale * (kl + psi(log_qx_i - log_qth_i))
    # alpha = 0: the limit 0; a z_t that q_t cannot give (alpha = 1, z_t != x0): weight 0
    return torch.where(~zero & (log_qx_i > float("-inf")), f, torch.zeros_like(kl))


class UniformDiffusion(BlockDiffusion):
    """The uniform-noise canvas objective (module docstring) on a canvas network (``model(z, clean=x0,
    self_conditioning=...)``, :class:`~unmask.models.diffusiongemma.DiffusionGemma`)."""

    family = "udlm"
    count_estimator = False

    def __init__(self, schedule: NoiseSchedule, vocab: int, canvas: int, t_min: float = 1e-3, t_max: float = 1.0,
                 antithetic: bool = True, self_conditioning: float = 0.5, mask_id: int | None = None):
        super().__init__(schedule, vocab if mask_id is None else mask_id, canvas, t_min, t_max, 0, antithetic)
        if not 0 <= self_conditioning <= 1:
            raise ValueError(f"self_conditioning must lie in [0, 1], got {self_conditioning}")
        self.vocab, self.self_conditioning = vocab, self_conditioning

    def corrupt(self, x0: torch.Tensor, counted: torch.Tensor, noise: Noise, exact: bool):
        """``z_t`` (B, L), ``t`` (B, L) float64: each counted token replaced, with probability ``1 - alpha_t``
        of its canvas's time, by a uniform token (both drawn from the token's ``noise.mask_u``)."""
        length = x0.shape[1]
        u = self.block_uniforms(noise.time_u.to(x0.device), length)
        t, _ = self.times_and_weights(u, exact)
        t = t.repeat_interleave(self.block_size, 1)[:, :length]
        u, share = noise.mask_u.to(x0.device).double(), 1 - self.schedule.alpha(t)
        replaced = (u < share) & counted
        # given u < share, u / share is uniform on [0, 1): the replacing token, from the same uniform
        drawn = (u / share.clamp_min(torch.finfo(torch.float64).tiny) * self.vocab).long().clamp(0, self.vocab - 1)
        return torch.where(replaced, drawn, x0), t

    def loss(self, model, x0: torch.Tensor, counted: torch.Tensor, noise: Noise, exact: bool = False,
             guidance: float = 0.0) -> torch.Tensor:
        """Per-sequence sums (B,) of ``f`` over the counted tokens (module docstring)."""
        if guidance:
            raise ValueError("guidance applies to MDLM models, not to uniform-noise diffusion")
        zt, t = self.corrupt(x0, counted, noise, exact)
        feedback, conditioned = None, None
        if exact and self.self_conditioning > 0:
            conditioned = torch.ones(len(x0), dtype=torch.bool, device=x0.device)
        elif not exact and noise.soft_u is not None:
            conditioned = noise.soft_u.to(x0.device) < self.self_conditioning
        if conditioned is not None and bool(conditioned.any()):
            with torch.no_grad():
                feedback = model(zt, clean=x0).detach()
        logits = model(zt, clean=x0, self_conditioning=feedback, conditioned=conditioned)
        where = counted.reshape(-1).nonzero()[:, 0]
        dtype = torch.float64 if exact else torch.float32
        log_probs = logits.reshape(-1, logits.shape[-1])[where].to(dtype).log_softmax(-1)
        tt = t.reshape(-1)[where]
        f = uniform_nelbo_integrand(log_probs, x0.reshape(-1)[where], zt.reshape(-1)[where],
                                    self.schedule.alpha(tt), self.schedule.alpha_prime(tt))
        return per_sequence_sums(f.float(), where, x0.shape)

    def loss_by_count(self, model, x0, counted, noise, guidance: float = 0.0) -> torch.Tensor:
        """Not available: the count estimator is MDLM's; always raises ``ValueError``."""
        raise ValueError("the count estimator is MDLM's; uniform-noise diffusion is scored with the time estimator")

    NOISE_SEED = 0  # the fixed draw that stands for the mask in a canvas asked for at t = 1

    def logits(self, model, xt: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) at ``x_t``, each canvas given the clean tokens of ``x0`` before it; positions of ``x_t``
        holding the mask (a canvas at ``t = 1``, as the likelihood's greedy check asks) take uniform tokens of a
        fixed draw (:data:`NOISE_SEED`): a uniform-noise model never sees a mask."""
        noise = torch.randint(0, self.vocab, xt.shape, generator=torch.Generator().manual_seed(self.NOISE_SEED))
        xt = torch.where(xt == self.mask_id, noise.to(xt.device), xt)
        return model(xt, clean=x0)
