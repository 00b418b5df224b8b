"""SDAR's decoding inside a block (Cheng et al. 2025, ``generate.py`` ``block_diffusion_generate``): a fixed
schedule of commits per step, candidates drawn by multinomial sampling at every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..objectives.mdlm import MaskedDiffusion
from .base import PURPOSES, TOKEN, RowStreams, SamplingError, choose_per_row, drawn_candidates, spread
from .denoiser import DenoiseSettings, MultinomialSampler
from .engine import Decoding, Frame, Outcome

STRATEGIES = ("dynamic", "static", "sequential")


def schedule(size: int, steps: int) -> list[int]:
    """SDAR's commits per step of a block of ``size`` positions: ``size // steps``, one more for the first
    ``size % steps`` steps."""
    return [size // steps + (s < size % steps) for s in range(steps)]


@dataclass(frozen=True)
class SDARSettings(DenoiseSettings):
    """The ``sample.*`` keys of the ``sdar`` sampler (:class:`SDARSampler`)."""

    steps: int = 128  # denoising steps
    strategy: str = "dynamic"  # what a step commits: dynamic, static or sequential (SDAR's strategies)
    threshold: float = 0.0  # dynamic: every candidate whose confidence exceeds it, if at least the step's count

    RANGES: ClassVar[dict[str, str]] = {"steps": "[1, inf)", "threshold": "[0, 1]"}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"strategy": STRATEGIES}


class SDARSampler(MultinomialSampler):
    """SDAR's sampler for the positions of one block (the inner sampler of
    :class:`~unmask.samplers.block_diffusion.BlockDiffusionSampler`, which gives it each block's canvas).
    Step ``s`` of ``steps`` commits ``n_s`` of the block's masked positions (:func:`schedule` of the block
    size); each step draws a candidate ``x0`` for every masked position by multinomial sampling from the
    tempered, top-k/top-p filtered distribution (the exponential race ``argmax p / q``, ``q ~ Exp(1)``, as
    ``torch.multinomial``), with confidence ``p(x0)`` in that distribution, and commits:

    * ``dynamic`` (SDAR's ``low_confidence_dynamic``, its default): every candidate with confidence above
      ``threshold`` when there are at least ``n_s``, else the ``n_s`` most confident;
    * ``static`` (``low_confidence_static``): the ``n_s`` most confident;
    * ``sequential``: the ``n_s`` leftmost masked positions.

    A block ends when it has no masked position left. Where fewer positions are masked than ``n_s`` (a block
    holding the end of the prompt), all of them are committed: SDAR's own code then also overwrites prompt
    tokens with draws (``torch.topk`` over positions of confidence -inf), which unmask does not reproduce.
    As SDAR, the draw is made even at a low temperature (temperature 0: the argmax with its untempered
    probability as confidence, a limit SDAR's code cannot take; :func:`~unmask.samplers.base.drawn_candidates`),
    and the mask token is not excluded from it (SDAR's models give it no mass). With ``dynamic`` and
    temperature 0 this is also LLaDA2.0's ``generate`` (its threshold rule with a per-step floor). Its
    ``entropy_bounded`` strategy is not offered: SDAR's code for it fails before committing anything. Per-row
    random streams keyed by (row seed, step, position): rows are batch-invariant.
    """

    def __init__(self, diffusion: MaskedDiffusion, steps: int, strategy: str = "dynamic", threshold: float = 0.0,
                 **knobs):
        if steps < 1:
            raise SamplingError(f"steps must be >= 1, got {steps}")
        if strategy not in STRATEGIES:
            raise SamplingError(f"unknown SDAR strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        if not 0 <= threshold <= 1:
            raise SamplingError(f"threshold must lie in [0, 1], got {threshold}")
        super().__init__(diffusion, **knobs)
        self.steps, self.strategy, self.threshold = steps, strategy, threshold

    def _decode(self, canvas: torch.Tensor, streams: RowStreams, denoise) -> Decoding:
        x = canvas.clone()
        size = x.shape[1]
        row_nfe = torch.zeros(len(x), dtype=torch.long)
        column = torch.arange(size, device=x.device)
        for step, count in enumerate(schedule(size, self.steps)):
            todo = x == self.mask_id
            rows = todo.any(dim=1).nonzero()[:, 0]
            if not len(rows):
                break
            t = todo[rows].double().mean(dim=1)
            logits = yield denoise(x[rows], t, todo[rows], rows)
            row_nfe[rows.cpu()] += 1
            where = todo[rows].nonzero()
            x0, p = drawn_candidates(logits, streams, rows[where[:, 0]], step * PURPOSES + TOKEN, where[:, 1],
                                     self.temperature, self.top_k, self.top_p)
            shape = todo[rows].shape
            confidence = spread(p, where, shape, float("-inf"))
            counts = todo[rows].sum(dim=1).clamp(max=count)
            if self.strategy == "sequential":
                chosen = choose_per_row(spread(-column[where[:, 1]].double(), where, shape, float("-inf")), counts)
            else:
                chosen = choose_per_row(confidence, counts)
                if self.strategy == "dynamic":
                    high = confidence > self.threshold
                    chosen = torch.where((high.sum(dim=1) >= count)[:, None], high, chosen)
            block = x[rows]
            block[chosen] = spread(x0, where, shape, self.mask_id)[chosen]
            x[rows] = block
            yield Frame(x)
        return Outcome(x, row_nfe)
