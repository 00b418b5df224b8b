"""Confidence-ordered decoding with a reveal schedule and optional remasking."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..objectives.mdlm import MaskedDiffusion
from .base import (
    CONFIDENCE_SCORES,
    ORDER,
    PURPOSES,
    REMASK,
    TOKEN,
    RowStreams,
    SamplingError,
    categorical_probs,
    choose_per_row,
    confidence_scores,
    reveal_candidates,
    spread,
)
from .denoiser import DenoiseSettings, DiffusionSampler
from .engine import Decoding, Frame, Outcome

REVEAL_SCHEDULES = ("linear", "cosine")


def reveal_schedule(kind: str, total: torch.Tensor, step: int, steps: int) -> torch.Tensor:
    """Masks that should remain after ``step`` of ``steps`` (1-based) out of ``total`` (per row):
    linear ``total (1 - step/steps)``, cosine (MaskGIT) ``total cos(pi/2 step/steps)``."""
    frac = step / steps
    if kind == "linear":
        remain = total.to(torch.float64) * (1 - frac)
    elif kind == "cosine":
        remain = total.to(torch.float64) * math.cos(math.pi / 2 * frac)
    else:
        raise SamplingError(f"unknown reveal schedule {kind!r} ({' or '.join(REVEAL_SCHEDULES)})")
    return remain.floor().long() if step < steps else torch.zeros_like(total)


@dataclass(frozen=True)
class ConfidenceSettings(DenoiseSettings):
    """The ``sample.*`` keys of the ``confidence`` sampler (:class:`ConfidenceSampler`)."""

    steps: int = 128  # denoising steps
    score: str = "confidence"  # the order of reveals: probability of the draw, margin, entropy, or random
    reveal: str = "linear"  # how many masks remain after each step: linear or cosine (MaskGIT)
    remask: float = 0.0  # share of revealed tokens masked again per step

    RANGES: ClassVar[dict[str, str]] = {"steps": "[1, inf)", "remask": "[0, 1)"}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"score": CONFIDENCE_SCORES, "reveal": REVEAL_SCHEDULES}


class ConfidenceSampler(DiffusionSampler):
    """Confidence-ordered decoding (MaskGIT/LLaDA style), T steps.

    Each step predicts every masked position, draws a candidate token for each (temperature,
    top-k, top-p; temperature 0 = argmax), and keeps the candidates at the most confident positions:
    ``confidence`` (probability of the candidate), ``margin`` (top-1 minus top-2 probability),
    ``entropy`` (lowest entropy), or ``random`` (uniform order: LLaDA's random remasking). How many
    are revealed follows a linear or cosine schedule of the row's own mask count. ``remask > 0``
    re-masks each token generated in earlier steps with that probability after every step but the
    last (fixed tokens never), so the model can revise them.
    """

    def __init__(self, diffusion: MaskedDiffusion, steps: int, score: str = "confidence", reveal: str = "linear",
                 remask: float = 0.0, **knobs):
        if steps < 1:
            raise SamplingError(f"steps must be >= 1, got {steps}")
        if score not in CONFIDENCE_SCORES:
            raise SamplingError(f"unknown confidence score {score!r}; known: {', '.join(CONFIDENCE_SCORES)}")
        if reveal not in REVEAL_SCHEDULES:
            raise SamplingError(f"unknown reveal schedule {reveal!r} ({' or '.join(REVEAL_SCHEDULES)})")
        if not 0 <= remask < 1:
            raise SamplingError(f"remask probability must lie in [0, 1), got {remask}")
        super().__init__(diffusion, **knobs)
        self.steps, self.score, self.reveal, self.remask = steps, score, reveal, remask

    @property
    def revises(self) -> bool:
        """Whether revealed tokens may be masked again (``remask > 0``)."""
        return self.remask > 0

    def start(self, model, canvas: torch.Tensor, seeds: torch.Tensor) -> Decoding:
        """Check ``canvas`` (B, L) and ``seeds`` (B,) and return the decoding of the class docstring."""
        self.check(canvas, seeds)
        return self._decode(canvas, seeds, self.denoiser(model, canvas))

    def _decode(self, canvas: torch.Tensor, seeds: torch.Tensor, denoise) -> Decoding:
        x, streams = canvas.clone(), RowStreams(seeds)
        b = x.shape[0]
        free = canvas == self.mask_id
        total = free.sum(dim=1)
        remain = [reveal_schedule(self.reveal, total, step + 1, self.steps) for step in range(self.steps)]
        row_nfe = torch.zeros(b, dtype=torch.long)
        for step in range(self.steps):
            masked = x == self.mask_id
            count = masked.sum(dim=1) - remain[step]
            rows = (count > 0).nonzero()[:, 0]
            if not len(rows):
                continue
            every = len(rows) == b  # (then the canvas itself, no gathers)
            here = masked if every else masked[rows]
            t = torch.full((len(rows),), 1 - step / self.steps, dtype=torch.float64, device=x.device)
            logits = yield denoise(x if every else x[rows], t, here, rows)
            row_nfe[rows.cpu()] += 1
            probs = categorical_probs(logits, self.temperature, self.top_k, self.top_p, exclude=self.mask_id)
            where = here.nonzero()
            abs_rows = where[:, 0] if every else rows[where[:, 0]]
            counter = step * PURPOSES
            draws = streams.categorical(probs, abs_rows, counter + TOKEN, where[:, 1], self.precision)
            keys = streams.uniform(abs_rows, counter + ORDER, where[:, 1])
            score = spread(confidence_scores(probs, draws, self.score, keys).double(), where, here.shape, float("-inf"))
            chosen = choose_per_row(score, count[rows])
            reveal_candidates(x, None if every else rows, chosen, spread(draws, where, here.shape, self.mask_id))
            if self.remask and step < self.steps - 1:
                generated = free & (x != self.mask_id)
                spots = generated.nonzero()
                u = streams.uniform(spots[:, 0], counter + REMASK, spots[:, 1])
                back = spots[u < self.remask]
                x[back[:, 0], back[:, 1]] = self.mask_id
            yield Frame(x)
        return Outcome(x, row_nfe)
