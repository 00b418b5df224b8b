"""First-hitting sampling (Zheng et al. 2024, Alg. 1/2): exact, and k tokens per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..objectives.mdlm import MaskedDiffusion
from .base import (
    ORDER,
    PURPOSES,
    TIME,
    TOKEN,
    RowStreams,
    SamplingError,
    categorical_probs,
    choose_per_row,
)
from .denoiser import DenoiseSettings, DiffusionSampler
from .engine import Decoding, Frame, Outcome


@dataclass(frozen=True)
class FirstHittingSettings(DenoiseSettings):
    """The ``sample.*`` keys of the ``first_hitting`` sampler (:class:`FirstHittingSampler`)."""

    tokens_per_step: int = 1  # tokens revealed per network call (1: exact)

    RANGES: ClassVar[dict[str, str]] = {"tokens_per_step": "[1, inf)"}


class FirstHittingSampler(DiffusionSampler):
    """First-hitting sampler (Zheng et al. 2024, Prop. 4.1, Alg. 1; Alg. 2 with ``k > 1``).

    With ``n`` masks at time ``tau`` the next unmask time is
    ``alpha^{-1}(1 - u^{1/n} (1 - alpha(tau)))``; one masked position chosen uniformly gets a token from
    ``p_theta(. | x, tau_next)``. Every row keeps its own time and step count, so rows with different
    numbers of masks run their own schedules in one batch; NFE per row is its number of masks (``k = 1``,
    exact) or ``ceil(masks / k)`` (``k > 1``: k positions from one prediction, an approximation).
    """

    def __init__(self, diffusion: MaskedDiffusion, tokens_per_step: int = 1, **knobs):
        if tokens_per_step < 1:
            raise SamplingError(f"tokens per step must be >= 1, got {tokens_per_step}")
        super().__init__(diffusion, **knobs)
        self.k = tokens_per_step

    def next_time(self, tau: torch.Tensor, n: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The next unmask time ``alpha^{-1}(1 - u^{1/n} (1 - alpha(tau)))`` (R,) of rows at times ``tau`` with ``n``
        masks (Zheng et al., 2024, Prop. 4.1)."""
        schedule = self.diffusion.schedule
        target = 1 - u ** (1.0 / n.to(torch.float64)) * (1 - schedule.alpha(tau))
        alpha_0 = float(schedule.alpha(torch.zeros((), dtype=torch.float64)))
        return schedule.inverse(target.clamp(max=alpha_0)).clamp(0, 1)

    def start(self, model, canvas: torch.Tensor, seeds: torch.Tensor) -> Decoding:
        """Check ``canvas`` (B, L) and ``seeds`` (B,) and return the decoding of the class docstring."""
        self.check(canvas, seeds)
        if self.k > canvas.shape[1]:
            raise SamplingError(f"{self.k} tokens per step is larger than the canvas of {canvas.shape[1]}")
        return self._decode(canvas, seeds, self.denoiser(model, canvas))

    def _decode(self, canvas: torch.Tensor, seeds: torch.Tensor, denoise) -> Decoding:
        x, streams = canvas.clone(), RowStreams(seeds)
        b, length = x.shape
        tau = torch.ones(b, dtype=torch.float64, device=x.device)
        steps = torch.zeros(b, dtype=torch.long, device=x.device)
        cols = torch.arange(length, device=x.device)
        while True:
            masked = x == self.mask_id
            n = masked.sum(dim=1)
            rows = (n > 0).nonzero()[:, 0]
            if not len(rows):
                break
            counter = steps[rows] * PURPOSES
            k = n[rows].clamp(max=self.k)
            t_next = tau[rows]
            first = None
            for j in range(self.k):  # the next k unmask times, in order
                live = j < k
                u = streams.uniform(rows, counter + TIME, j)
                t_next = torch.where(live, self.next_time(t_next, (n[rows] - j).clamp(min=1), u), t_next)
                first = t_next if first is None else first
            keys = streams.uniform(rows[:, None], (counter + ORDER)[:, None], cols)
            chosen = choose_per_row(torch.where(masked[rows], keys, float("-inf")), k)
            logits = yield denoise(x[rows], first, chosen, rows)
            probs = categorical_probs(logits, self.temperature, self.top_k, self.top_p, exclude=self.mask_id)
            where = chosen.nonzero()
            draws = streams.categorical(probs, rows[where[:, 0]], counter[where[:, 0]] + TOKEN, where[:, 1],
                                        self.precision)
            sub = x[rows]
            sub[chosen] = draws
            x[rows] = sub
            tau[rows] = t_next
            steps[rows] += 1
            yield Frame(x)
        return Outcome(x, steps.cpu())
