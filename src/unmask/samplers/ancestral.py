"""MDLM's ancestral (``ddpm``) sampler, with its per-row cache (``ddpm_cache``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..objectives.base import unwrap
from ..objectives.mdlm import MaskedDiffusion
from .base import (
    PURPOSES,
    TIME,
    TOKEN,
    RowStreams,
    SamplingError,
    categorical_probs,
)
from .denoiser import DenoiseSettings, DiffusionSampler
from .engine import Decoding, Frame, Outcome


@dataclass(frozen=True)
class AncestralSettings(DenoiseSettings):
    """The ``sample.*`` keys of the ``ancestral`` sampler (:class:`AncestralSampler`)."""

    steps: int = 128  # denoising steps
    cache: bool = True  # reuse a row's prediction while its canvas is unchanged (same samples; where exact)

    RANGES: ClassVar[dict[str, str]] = {"steps": "[1, inf)"}


class AncestralSampler(DiffusionSampler):
    """MDLM's ``ddpm`` update on the grid ``t_i = i/T`` from ``t = 1`` to ``t = 0``.

    A masked position stays masked with weight ``(1 - alpha_s)/(1 - alpha_t)`` and becomes token
    ``v`` with weight ``p_theta(v | x_t) (alpha_s - alpha_t)/(1 - alpha_t)``; the last step unmasks
    every remaining position (draws from ``p_theta``, also for schedules with ``alpha(0) < 1``).
    With ``cache`` (the default, as MDLM's ``ddpm_cache``) a row whose canvas did not change in the last
    step reuses its last prediction: the same samples with fewer network calls, ``T (1 - (1 - 1/T)^L)``
    per row instead of ``min(T, L)``. It is exact only when the prediction depends on the canvas alone,
    so a time-conditioned model is evaluated at every step whatever ``cache`` says. The cache holds the
    last (B, L, V) logits: one step's output more in memory.
    In float64 the step draws "unmask or stay" first and a token only where a position unmasks (the
    same distribution as one categorical over {mask} + V); ``precision="float32"`` keeps MDLM's single
    float32 race over {mask} + V to reproduce its bias.
    """

    def __init__(self, diffusion: MaskedDiffusion, steps: int, cache: bool = True, **knobs):
        if steps < 1:
            raise SamplingError(f"steps must be >= 1, got {steps}")
        super().__init__(diffusion, **knobs)
        self.steps, self.cache = steps, cache

    def transition(self, t: float, s: float) -> tuple[float, float]:
        """(weight of unmasking, weight of staying masked) for one step ``t -> s``."""
        alpha = self.diffusion.schedule.alpha
        a_t = float(alpha(torch.tensor(t, dtype=torch.float64)))
        a_s = float(alpha(torch.tensor(s, dtype=torch.float64)))
        if s == 0:
            return 1.0, 0.0
        return (a_s - a_t) / (1 - a_t), (1 - a_s) / (1 - a_t)

    def start(self, model, canvas: torch.Tensor, seeds: torch.Tensor) -> Decoding:
        """Check ``canvas`` (B, L) and ``seeds`` (B,) and return the decoding of the class docstring (cached only for
        models without time conditioning)."""
        self.check(canvas, seeds)
        return self._decode(canvas, seeds, self.cache and not unwrap(model).time_conditioning,
                            self.denoiser(model, canvas))

    def _decode(self, canvas: torch.Tensor, seeds: torch.Tensor, cache: bool, denoise) -> Decoding:
        x, streams = canvas.clone(), RowStreams(seeds)
        b = x.shape[0]
        row_nfe = torch.zeros(b, dtype=torch.long)
        cached: torch.Tensor | None = None  # (B, L, V) logits of the last evaluation of each row
        stale = torch.ones(b, dtype=torch.bool, device=x.device)
        for step, i in enumerate(range(self.steps, 0, -1)):
            masked = x == self.mask_id
            active = masked.any(dim=1)
            if not active.any():
                break
            t, s = i / self.steps, (i - 1) / self.steps
            evaluate = active & stale if cache else active
            rows = evaluate.nonzero()[:, 0]
            if len(rows):
                logits = yield denoise(x[rows], torch.full((len(rows),), t, dtype=torch.float64, device=x.device),
                                       masked[rows], rows)
                row_nfe[rows.cpu()] += 1
                if cache:
                    if cached is None:
                        cached = logits.new_zeros(*x.shape, logits.shape[-1])
                    where = masked[rows].nonzero()
                    cached[rows[where[:, 0]], where[:, 1]] = logits
            unmask, stay = self.transition(t, s)
            where = masked.nonzero()
            if self.precision == "float32":
                # MDLM's one categorical over {mask} + V per masked position, with its truncation bias
                weights = categorical_probs(cached[masked] if cache else logits, self.temperature, self.top_k,
                                            self.top_p, exclude=self.mask_id) * unmask
                weights[:, self.mask_id] = stay
                draws = streams.categorical(weights, where[:, 0], step * PURPOSES + TOKEN, where[:, 1], "float32")
                chosen, draws = where[draws != self.mask_id], draws[draws != self.mask_id]
            else:
                # the same distribution in two stages: a position unmasks with probability `unmask`, and
                # only those draw a token from p_theta, so a step costs O(V) per *unmasking* position
                # (with the cache, most steps unmask nothing and cost no V-sized work at all)
                go = streams.uniform(where[:, 0], step * PURPOSES + TIME, where[:, 1]) < unmask
                chosen = where[go]
                chosen_logits = cached[chosen[:, 0], chosen[:, 1]] if cache else logits[go]
                weights = categorical_probs(chosen_logits, self.temperature, self.top_k, self.top_p,
                                            exclude=self.mask_id)
                draws = streams.categorical(weights, chosen[:, 0], step * PURPOSES + TOKEN, chosen[:, 1])
            x[chosen[:, 0], chosen[:, 1]] = draws
            if cache:
                stale = torch.zeros_like(stale)
                stale[chosen[:, 0]] = True
            yield Frame(x)
        return Outcome(x, row_nfe)
