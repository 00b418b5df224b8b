"""The schedule-driven sampler of Co-GRPO rollouts (Co-GRPO, Zhou et al. 2025; trained by
:mod:`unmask.train.rl`).

At step ``k`` of ``K`` a :class:`Schedule` draws each row's action: a reveal fraction ``r_k``, a token
temperature ``tau_k`` and a guidance weight ``w_k``. Every masked position draws a token from
``softmax(l / tau_k)`` (SUBS: the mask excluded; with guidance ``l = l_u + (1 + w_k)(l_c - l_u)``), and
the ``max(1, round(r_k m))`` most confident of the row's ``m`` masked positions are revealed. The sampler
keeps the whole :class:`Trajectory` (canvases, schedule draws, actions, and the log-probabilities of the
revealed tokens), which is what RL learns from. Draws use the per-row streams of every sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..objectives.guidance import guided_logits, unconditional_input
from ..objectives.mdlm import MaskedDiffusion
from .base import PURPOSES, TOKEN, RowStreams, choose_per_row, spread
from .engine import Decoding, Forward, Frame, Outcome, Sampler


class Schedule(Protocol):
    """A per-step policy over the sampler's actions (``unmask.train.rl.SchedulePolicy``)."""

    steps: int

    def sample(self, step: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """Draws ``z`` (n, D) for ``step``."""

    def actions(self, step: int, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """``reveal``, ``temperature`` and ``guidance`` (n,) from the draws."""


@dataclass
class Trajectory:
    """What a rollout did: ``canvases`` (N, K+1, L) before each step and at the end, the schedule draws
    ``z`` (N, K, D), the ``temperature`` and ``guidance`` used (N, K), and ``log_probs`` (N, K, L) of the
    tokens revealed at each step (0 elsewhere)."""

    canvases: torch.Tensor
    z: torch.Tensor
    temperature: torch.Tensor
    guidance: torch.Tensor
    log_probs: torch.Tensor


def rollout_sigma(diffusion: MaskedDiffusion, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """What the network sees as the time of canvases ``x`` (N, L): ``sigma`` of their masked share of the
    positions outside the prompt."""
    masked = (x == diffusion.mask_id).float()
    return diffusion.model_sigma((masked.sum(1) / (~prompt).sum(1).clamp(min=1)).double())


def rollout_guided(logits: torch.Tensor, l_u: torch.Tensor | None, guidance: torch.Tensor,
                   mask_id: int) -> torch.Tensor:
    """The rollout's logits (N, L, V) float32 with the mask class at ``-inf``: the rows with ``guidance != 0``
    guided by their unconditional logits ``l_u`` (in row order)."""
    logits = logits.float()
    if l_u is not None:
        rows = (guidance != 0).nonzero()[:, 0]
        weight = guidance[rows].float()[:, None, None]
        logits = logits.index_put((rows,), guided_logits(logits[rows], l_u.float(), weight))
    return logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))


def tempered_log_probs(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``log softmax(l / tau)`` per row: logits (N, L, V), temperature (N,)."""
    return (logits / temperature.float()[:, None, None]).log_softmax(-1)


class ScheduledSampler(Sampler):
    """Samples ``schedule.steps`` steps under ``schedule`` (module docstring); ``trajectory`` holds the
    last call's :class:`Trajectory`."""

    def __init__(self, diffusion: MaskedDiffusion, schedule: Schedule, generator: torch.Generator):
        self.diffusion, self.schedule, self.generator = diffusion, schedule, generator
        self.mask_id = diffusion.mask_id
        self.trajectory: Trajectory | None = None

    def start(self, model, canvas: torch.Tensor, seeds: torch.Tensor) -> Decoding:
        """Check ``canvas`` (B, L) and ``seeds`` (B,) and return the decoding of the class docstring."""
        self.check(canvas, seeds)
        return self._decode(canvas, seeds)

    def _decode(self, canvas: torch.Tensor, seeds: torch.Tensor) -> Decoding:
        n, steps, mask_id = len(canvas), self.schedule.steps, self.mask_id
        x, prompt, streams = canvas.clone(), canvas != mask_id, RowStreams(seeds)
        canvases = [x.clone()]
        zs, temps, weights, log_probs = [], [], [], []
        for k in range(steps):
            z = self.schedule.sample(k, n, self.generator).to(x.device)
            a = self.schedule.actions(k, z)
            masked = x == mask_id
            m = masked.sum(1)
            count = torch.minimum(m, torch.floor(a["reveal"].to(x.device) * m + 0.5).long().clamp(min=1))
            guidance = a["guidance"].to(x.device)
            sigma = rollout_sigma(self.diffusion, x, prompt)
            conditional = yield Forward(x, dict(sigma=sigma))
            guided = (guidance != 0).nonzero()[:, 0]
            l_u = None
            if len(guided):
                l_u = yield Forward(unconditional_input(x[guided], prompt[guided], mask_id), dict(sigma=sigma[guided]))
            logits = rollout_guided(conditional, l_u, guidance, mask_id)
            lp = tempered_log_probs(logits, a["temperature"].to(x.device))
            where = masked.nonzero()
            rows, cols = where[:, 0], where[:, 1]
            tokens = streams.categorical(lp[rows, cols].double().exp(), rows, k * PURPOSES + TOKEN, cols)
            drawn = spread(tokens, where, x.shape, mask_id)
            confidence = spread(lp[rows, cols].gather(1, tokens[:, None])[:, 0].double(), where, x.shape, float("-inf"))
            reveal = choose_per_row(confidence, count) & masked
            x = torch.where(reveal, drawn, x)
            chosen = torch.zeros(x.shape, device=x.device)
            chosen[reveal] = lp.gather(2, x[:, :, None])[:, :, 0][reveal]
            canvases.append(x.clone())
            zs.append(z)
            temps.append(a["temperature"])
            weights.append(a["guidance"])
            log_probs.append(chosen)
            yield Frame(x)
        self.trajectory = Trajectory(torch.stack(canvases, 1), torch.stack(zs, 1), torch.stack(temps, 1),
                                     torch.stack(weights, 1), torch.stack(log_probs, 1))
        return Outcome(x, torch.full((n,), steps, dtype=torch.long))
