"""Objectives: masked diffusion (MDLM) and the autoregressive baseline, on the same rows.

Masked diffusion (MDLM, Sahoo et al. 2024, arXiv 2406.07524, section 3):

* forward process ``q(x_t | x_0)``: each counted token independently becomes the mask with
  probability ``1 - alpha(t)`` (positions that do not count stay clean);
* SUBS parameterization: the mask logit is excluded (``-inf``) and unmasked positions carry their
  token over with probability 1;
* continuous-time Rao-Blackwellized NELBO (MDLM eq. 10)
  ``E_t [ w(t) sum_{l masked} -log p_theta(x_0^l | x_t) ]`` with ``w(t) = -alpha'(t)/(1-alpha(t))``;
* discrete-time T-step NELBO: ``t = i/T`` with ``i`` uniform on ``{1..T}`` and weight
  ``T (alpha(t - 1/T) - alpha(t)) / (1 - alpha(t))``, which tends to ``w(t)`` as ``T`` grows;
* low-discrepancy (antithetic) times: one uniform per sequence, stratified over the global batch.

Training draws ``t = t_min + (t_max - t_min) u`` (MDLM: ``t_max = 1``; a smaller ``t_max`` clips the
schedule as BD3-LM). Evaluation uses a valid bound on ``[0, 1]``:
for ``u >= t_min`` the integrand at ``t = u``; for ``u < t_min`` the reconstruction term
``E[-log p(x_0 | x_{t_min})]`` spread over ``[0, t_min)`` (weight ``1/t_min`` at ``t = t_min``),
which for the log-linear schedule is simply ``t = max(u, t_min)`` with weight ``1/t``.

Soft-masking (Hersche et al. 2025, arXiv 2510.17206) for models with a soft-mask module: a share
``soft_mask_prob`` of the rows (all rows in evaluation) is scored in two passes on the same ``x_t``:
a no-gradient pass gives the feedback (:class:`~unmask.models.softmask.SoftFeedback`), the second pass, with
soft inputs, is the one scored and trained. The feedback is a deterministic function of ``x_t``, so
the two-pass network is just another denoiser and its NELBO is still a bound.

All losses return per-sequence sums of nats over counted tokens; callers divide by token counts.
"""

from __future__ import annotations

import torch

from ..models.common import bucketed_positions
from ..models.softmask import SoftFeedback
from .base import Noise, Objective, masked_cross_entropy, per_sequence_sums, unwrap
from .guidance import guided_logits, unconditional_input
from .schedules import NoiseSchedule


def subs_log_probs(logits: torch.Tensor, xt: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS parameterization in float32: log p_theta(x_0 | x_t) of shape (B, L, V).

    The mask token gets probability 0; every unmasked position puts probability 1 on its token.
    """
    logits = logits.float().clone()
    logits[..., mask_id] = float("-inf")
    log_probs = logits.log_softmax(dim=-1)
    unmasked = xt != mask_id
    carry = torch.full_like(log_probs[unmasked], float("-inf"))
    carry.scatter_(-1, xt[unmasked][:, None], 0.0)
    log_probs[unmasked] = carry
    return log_probs


class MaskedDiffusion(Objective):
    """The MDLM objective over a noise schedule."""

    family = "mdlm"
    per_sequence = False
    bound = "nelbo"

    def __init__(self, schedule: NoiseSchedule, mask_id: int, t_min: float = 1e-3,
                 discrete_steps: int = 0, antithetic: bool = True, soft_mask_top_k: int = 0,
                 soft_mask_prob: float = 0.0, t_max: float = 1.0):
        if not 0 <= t_min < t_max <= 1:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        self.schedule, self.mask_id = schedule, mask_id
        self.t_min, self.t_max, self.discrete_steps, self.antithetic = t_min, t_max, discrete_steps, antithetic
        self.soft_mask_top_k, self.soft_mask_prob = soft_mask_top_k, soft_mask_prob

    # --- forward process -------------------------------------------------------------------
    def mask(self, x0: torch.Tensor, t: torch.Tensor, mask_u: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        """``x_t ~ q(x_t | x_0)``: counted tokens become the mask with probability ``1 - alpha(t)``."""
        p_mask = 1 - self.schedule.alpha(t.to(torch.float64)).float()
        masked = (mask_u < p_mask[:, None]) & counted
        return torch.where(masked, torch.full_like(x0, self.mask_id), x0)

    # --- time and weight -------------------------------------------------------------------
    def times_and_weights(self, time_u: torch.Tensor, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Map uniforms to (t, weight) in float64. ``exact`` selects the evaluation bound (see module
        docstring); otherwise the training draw on ``[t_min, t_max]``."""
        u = time_u.to(torch.float64)
        s = self.schedule
        if self.discrete_steps:
            steps = self.discrete_steps
            i = (u * steps).floor().clamp(0, steps - 1) + 1
            t, prev = i / steps, (i - 1) / steps
            return t, steps * (s.alpha(prev) - s.alpha(t)) / (1 - s.alpha(t))
        if not exact:
            t = self.t_min + (self.t_max - self.t_min) * u
            return t, s.weight(t)
        if self.t_min == 0:
            t = u.clamp_min(torch.finfo(torch.float64).tiny)
            return t, s.weight(t)
        below = u < self.t_min
        t = torch.where(below, torch.full_like(u, self.t_min), u)
        return t, torch.where(below, torch.full_like(u, 1 / self.t_min), s.weight(t))

    def model_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """What a time-conditioned network sees: ``sigma(t)``, kept finite at ``t = 1`` (where it is
        infinite when ``alpha(1) = 0``) by evaluating it at ``min(t, 1 - 1e-6)``."""
        return self.schedule.sigma(t.to(torch.float64).clamp(max=1 - 1e-6)).float()

    count_estimator = True  # :meth:`loss_by_count` applies (models without time conditioning)

    def logits(self, model, xt: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The network's logits (B, L, V) at ``x_t`` (``x0``: the clean row, unused by MDLM)."""
        return model(xt, sigma)

    # --- loss --------------------------------------------------------------------------------
    def masked_nll(self, model, x0: torch.Tensor, xt: torch.Tensor, sigma: torch.Tensor,
                   feedback: SoftFeedback | None = None, guidance: float = 0.0,
                   condition: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sequence ``sum_{l masked in x_t} -log p_theta(x_0^l | x_t)`` (B,).

        With ``guidance`` w != 0 and ``condition`` (B, L) bool (the conditioning positions), the
        distribution is SMDM's rescaled conditional (eq. 7): logits ``l_u + (1 + w)(l_c - l_u)`` with
        ``l_u`` from ``x_t`` with the condition masked."""
        index, n = bucketed_positions(xt == self.mask_id)
        extra = {} if feedback is None else {"feedback": feedback}
        logits = model(xt, sigma, positions=index, **extra)
        if guidance and condition is not None:
            l_u = model(unconditional_input(xt, condition, self.mask_id), sigma, positions=index, **extra).float()
            logits = guided_logits(logits.float(), l_u, guidance)
        return per_sequence_sums(masked_cross_entropy(logits, x0.reshape(-1)[index], self.mask_id, n), index,
                                 x0.shape)

    @torch.no_grad()
    def soft_feedback(self, model, xt: torch.Tensor, sigma: torch.Tensor, noise: Noise,
                      exact: bool) -> SoftFeedback | None:
        """The first pass of the soft-mask recipe on the rows that get soft inputs (every row when
        ``exact`` or without ``noise.soft_u``), or None for a binary model."""
        if not self.soft_mask_top_k:
            return None
        rows = torch.ones(len(xt), dtype=torch.bool, device=xt.device)
        if not exact and noise.soft_u is not None:
            rows = noise.soft_u.to(xt.device) < self.soft_mask_prob
        where = (xt == self.mask_id) & rows[:, None]
        picked = rows.nonzero()[:, 0]
        if not len(picked):  # no feedback, but the soft-mask scalars stay in the graph (DDP needs them)
            return SoftFeedback.empty(*xt.shape, self.soft_mask_top_k, device=xt.device)
        index, n = bucketed_positions(where[picked])
        # the bare module: a no-gradient pass needs no DDP hooks (and must not broadcast buffers)
        logits = unwrap(model)(xt[picked], sigma[picked], positions=index)[:n]
        return SoftFeedback.from_logits(logits, where, self.mask_id, self.soft_mask_top_k)

    def loss(self, model, x0: torch.Tensor, counted: torch.Tensor, noise: Noise, exact: bool = False,
             guidance: float = 0.0) -> torch.Tensor:
        """Per-sequence NELBO terms (B,): ``w(t) * sum_{masked} -log p_theta(x_0 | x_t)``; ``guidance``
        scores with the rescaled conditional, the uncounted positions being the condition."""
        t, weight = self.times_and_weights(noise.time_u.to(x0.device), exact)
        xt = self.mask(x0, t, noise.mask_u.to(x0.device), counted)
        sigma = self.model_sigma(t)
        feedback = self.soft_feedback(model, xt, sigma, noise, exact)
        return self.masked_nll(model, x0, xt, sigma, feedback, guidance, ~counted) * weight.to(x0.device).float()

    def loss_by_count(self, model, x0: torch.Tensor, counted: torch.Tensor, noise: Noise,
                      guidance: float = 0.0) -> torch.Tensor:
        """The any-order form of the NELBO for models without time conditioning (Ou et al. 2024):
        ``(n/k) sum_{l in M} -log p_theta(x_0^l | x_0 with M masked)``, with ``k = 1 + floor(u n)`` from
        the row's (stratified) time uniform and ``M`` the ``k`` counted positions with the smallest mask
        uniforms. Equal in expectation to :meth:`loss` with ``exact``, with bounded weights (B,).
        ``guidance``: score with the rescaled conditional, the uncounted positions being the condition."""
        n = counted.sum(1)
        k = (1 + (noise.time_u.to(x0.device) * n).floor().long()).clamp(max=n)
        keys = torch.where(counted, noise.mask_u.to(x0.device), torch.full_like(noise.mask_u, 2.0, device=x0.device))
        masked = keys.argsort(1).argsort(1) < k[:, None]
        xt = torch.where(masked, torch.full_like(x0, self.mask_id), x0)
        sigma = torch.zeros(len(x0), device=x0.device)
        feedback = self.soft_feedback(model, xt, sigma, noise, exact=True)
        return self.masked_nll(model, x0, xt, sigma, feedback, guidance, ~counted) * (n / k).float()
