"""The schedule-driven sampler of Co-GRPO rollouts (``algorithms.md`` section 4; trained by
:mod:`unmask.train.rl`).

At step ``k`` of ``K`` a :class:`Schedule` draws each row's action: a reveal fraction ``r_k``, a token
temperature ``tau_k`` and a guidance weight ``w_k``. Every masked position draws a token from
``softmax(l / tau_k)`` (SUBS: the mask excluded; with guidance ``l = l_u + (1 + w_k)(l_c - l_u)``), and
the ``max(1, round(r_k m))`` most confident of the row's ``m`` masked positions are revealed. The sampler
keeps the whole :class:`Trajectory` (canvases, schedule draws, actions, and the log-probabilities of the
revealed tokens), which is what RL learns from. Draws use the per-row streams of every sampler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from ..objectives.guidance import guided_logits, unconditional_input
from ..objectives.mdlm import MaskedDiffusion
from .base import PURPOSES, TOKEN, RowStreams, Sampler, SampleResult, StepCallback, choose_per_row


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


def rollout_logits(model, diffusion: MaskedDiffusion, x: torch.Tensor, prompt: torch.Tensor,
                   guidance: torch.Tensor) -> torch.Tensor:
    """Logits (N, L, V) in float32 with the mask class at ``-inf``; rows with ``guidance != 0`` are
    guided, the unconditional branch being ``x`` with the prompt masked."""
    masked = (x == diffusion.mask_id).float()
    sigma = diffusion.model_sigma((masked.sum(1) / (~prompt).sum(1).clamp(min=1)).double())
    logits = model(x, sigma).float()
    guided = guidance != 0
    if guided.any():
        rows = guided.nonzero()[:, 0]
        l_u = model(unconditional_input(x[rows], prompt[rows], diffusion.mask_id), sigma[rows]).float()
        w = guidance[rows].float()[:, None, None]
        logits = logits.index_put((rows,), guided_logits(logits[rows], l_u, w))
    return logits.index_fill(-1, torch.tensor([diffusion.mask_id], device=x.device), float("-inf"))


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

    @torch.no_grad()
    def sample(self, model, canvas: torch.Tensor, seeds: torch.Tensor,
               on_step: StepCallback | None = None) -> SampleResult:
        self.check(canvas, seeds)
        start = time.perf_counter()
        n, steps, mask_id = len(canvas), self.schedule.steps, self.mask_id
        x, prompt, streams = canvas.clone(), canvas != mask_id, RowStreams(seeds)
        canvases = [x.clone()]
        zs, temps, weights, log_probs = [], [], [], []
        nfe = 0
        for k in range(steps):
            z = self.schedule.sample(k, n, self.generator).to(x.device)
            a = self.schedule.actions(k, z)
            masked = x == mask_id
            m = masked.sum(1)
            count = torch.minimum(m, torch.floor(a["reveal"].to(x.device) * m + 0.5).long().clamp(min=1))
            guidance = a["guidance"].to(x.device)
            logits = rollout_logits(model, self.diffusion, x, prompt, guidance)
            nfe += 1 + int(bool((guidance != 0).any()))
            lp = tempered_log_probs(logits, a["temperature"].to(x.device))
            rows, cols = masked.nonzero(as_tuple=True)
            tokens = streams.categorical(lp[rows, cols].double().exp(), rows, k * PURPOSES + TOKEN, cols)
            drawn = torch.full_like(x, mask_id)
            drawn[rows, cols] = tokens
            confidence = torch.full(x.shape, float("-inf"), dtype=torch.float64, device=x.device)
            confidence[rows, cols] = lp[rows, cols].gather(1, tokens[:, None])[:, 0].double()
            reveal = choose_per_row(confidence, count) & masked
            x = torch.where(reveal, drawn, x)
            chosen = torch.zeros(x.shape, device=x.device)
            chosen[reveal] = lp.gather(2, x[:, :, None])[:, :, 0][reveal]
            canvases.append(x.clone())
            zs.append(z)
            temps.append(a["temperature"])
            weights.append(a["guidance"])
            log_probs.append(chosen)
            if on_step is not None:
                on_step(x)
        self.trajectory = Trajectory(torch.stack(canvases, 1), torch.stack(zs, 1), torch.stack(temps, 1),
                                     torch.stack(weights, 1), torch.stack(log_probs, 1))
        return SampleResult(x, nfe, torch.full((n,), steps, dtype=torch.long), time.perf_counter() - start,
                            int((canvas == mask_id).sum()))
