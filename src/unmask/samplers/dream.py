"""Dream's decoding (Ye et al. 2025, ``diffusion_generate``): algorithms ``origin``, ``maskgit_plus``,
``topk_margin``, ``entropy``, with ``alg_temp``, and Fast-dLLM's ``confidence_threshold``."""

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
    confidence_scores,
    ranks_in_row,
    reveal_candidates,
    spread,
    top_index,
)
from .denoiser import BLOCK_CACHES, DenoiseSettings, DiffusionSampler, block_cache_start, block_chunk
from .engine import Decoding, Frame, Outcome

# Dream's algorithm names, and what unmask's `sample.score` calls them
DREAM_ALGORITHMS = {"origin": "origin", "maskgit_plus": "confidence", "topk_margin": "margin", "entropy": "entropy"}
DREAM_SCORES = tuple(DREAM_ALGORITHMS.values())


@dataclass(frozen=True)
class DreamSettings(DenoiseSettings):
    """The ``sample.*`` keys of the ``dream`` sampler (:class:`DreamSampler`)."""

    steps: int = 128  # denoising steps
    score: str = "confidence"  # Dream's algorithm: origin (ancestral), confidence, margin or entropy
    alg_temp: float = 0.0  # > 0 draws the revealed positions from softmax(confidence / alg_temp)
    eps: float = 1e-3  # the time grid runs from 1 to eps
    threshold: float = 0.0  # > 0: Fast-dLLM's threshold rule, every candidate whose confidence reaches it
    block_cache: str = "none"  # Fast-dLLM's approximate KV cache, in blocks: none, prefix or dual
    block_length: int = 32  # the blocks of a block_cache

    RANGES: ClassVar[dict[str, str]] = {"steps": "[1, inf)", "alg_temp": "[0, inf)", "eps": "(0, 1)",
                                        "threshold": "[0, 1]", "block_length": "[1, inf)"}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"score": DREAM_SCORES, "block_cache": BLOCK_CACHES}


class DreamSampler(DiffusionSampler):
    """Dream's sampler on the time grid ``t_i = linspace(1, eps, steps + 1)`` (float32). Every step calls
    the network on the whole canvas and, at each masked position, takes ``x0`` (temperature 0: the argmax
    of ``p = softmax(logits)``; else a draw from ``p`` after temperature, top-k, top-p) and a confidence.

    * ``score="origin"``: each masked position gets ``x0`` with probability ``1 - t_{i+1}/t_i`` (1 at the
      last step), independently: the ancestral step of ``alpha_t = 1 - t``.
    * otherwise ``n = int(M (1 - t_{i+1}/t_i))`` positions (M: the row's masks; all at the last step) with
      the highest confidence are revealed: ``confidence`` = max p (Dream's ``maskgit_plus``), ``margin``
      = top-1 minus top-2 p (``topk_margin``), ``entropy`` = ``sum p log(p + 1e-10)``. With ``alg_temp >
      0`` the n positions are drawn without replacement from ``softmax(confidence / alg_temp)``
      (Gumbel-top-k, the same law as Dream's sequential multinomial draws).
    * ``threshold > 0`` (Fast-dLLM's ``confidence_threshold``): a row asks for ``n0 + carry`` tokens per
      step (``n0 = M // steps``, the remainder starting in the carry); the most confident is always
      revealed, each other one only if its max-p confidence is ``>= threshold``, else it moves to the carry.
      A rejection in the row's last step sets ``n0 = 0`` and adds a step, until the row is complete.

    Dream computes M as the batch's average mask count; here it is the row's own (the same whenever the
    rows have as many masks, as in Dream's use, and rows stay batch-invariant). The mask id is never a
    candidate ``x0``; confidences use ``p`` over the whole vocabulary, as Dream does.
    """

    def __init__(self, diffusion: MaskedDiffusion, steps: int, score: str = "entropy", alg_temp: float = 0.0,
                 eps: float = 1e-3, threshold: float = 0.0, block_length: int = 0, block_cache: str = "none",
                 **knobs):
        if steps < 1:
            raise SamplingError(f"steps must be >= 1, got {steps}")
        score = DREAM_ALGORITHMS.get(score, score)
        if score not in DREAM_SCORES:
            raise SamplingError(f"unknown Dream algorithm {score!r}; known: {', '.join(DREAM_SCORES)} "
                                f"(Dream's {', '.join(DREAM_ALGORITHMS)})")
        if not 0 < eps < 1 or alg_temp < 0 or not 0 <= threshold <= 1:
            raise SamplingError(f"need 0 < eps < 1, alg_temp >= 0 and 0 <= threshold <= 1; got {eps}, {alg_temp}, "
                                f"{threshold}")
        if threshold and score != "confidence":
            raise SamplingError("threshold decoding ranks by max-probability confidence (score=confidence)")
        if block_length < 0 or block_cache not in BLOCK_CACHES or (block_cache != "none" and
                                                                                 not block_length):
            raise SamplingError(f"block_length >= 0 and block_cache none, prefix or dual (with blocks); got "
                                f"{block_length}, {block_cache!r}")
        super().__init__(diffusion, **knobs)
        if block_length and (self.guidance or alg_temp or score == "origin"):
            raise SamplingError("Fast-dLLM's block sampler takes neither guidance, alg_temp nor origin")
        self.steps, self.score, self.alg_temp, self.eps, self.threshold = steps, score, alg_temp, eps, threshold
        self.block_length, self.block_cache = block_length, block_cache
        self.streams = RowStreams  # the per-row random streams (a test can give recorded draws instead)

    def candidates(self, logits: torch.Tensor, streams, rows, counter, cols) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, confidence) at N positions from their logits (N, V)."""
        logits = logits.float()
        if self.temperature == 0:
            probs = logits.softmax(-1)
            allowed = probs.index_fill(-1, torch.tensor([self.mask_id], device=probs.device), -1.0)
            x0 = top_index(allowed)
        else:
            probs = categorical_probs(logits, self.temperature, self.top_k, self.top_p).float()
            x0 = streams.categorical(categorical_probs(logits, self.temperature, self.top_k, self.top_p,
                                                       exclude=self.mask_id), rows, counter + TOKEN, cols,
                                     self.precision)
        return x0, confidence_scores(probs, x0, "confidence" if self.score == "origin" else self.score)

    @property
    def holds_cache(self) -> bool:
        """Whether its decodings keep Fast-dLLM's block cache (``block_cache``)."""
        return self.block_cache != "none"

    def start(self, model, canvas: torch.Tensor, seeds: torch.Tensor) -> Decoding:
        """Check ``canvas`` (B, L) and ``seeds`` (B,) and return the decoding of the class docstring (in Fast-dLLM's
        cached blocks with ``block_length``)."""
        self.check(canvas, seeds)
        if self.block_length:
            start = block_cache_start(model, canvas, self.mask_id, self.block_cache)
            return self._blocks(canvas, self.streams(seeds), start)
        return self._decode(canvas, self.streams(seeds), self.denoiser(model, canvas))

    def _decode(self, canvas, streams, denoise) -> Decoding:
        x = canvas.clone()
        b, length = x.shape
        free = canvas == self.mask_id
        grid = torch.linspace(1, self.eps, self.steps + 1)  # float32, as Dream
        row_nfe = torch.zeros(b, dtype=torch.long)
        masks = free.sum(dim=1)
        n0, carry = masks // self.steps, masks % self.steps  # threshold decoding's per-row state
        last = torch.full((b,), self.steps - 1, device=x.device)
        step = 0
        while True:
            todo = x == self.mask_id
            rows = todo.any(dim=1).nonzero()[:, 0]
            if not len(rows) or (not self.threshold and step >= self.steps):
                break
            final = step >= self.steps - 1
            t = grid[min(step, self.steps - 1)]
            s = grid[min(step + 1, self.steps)]
            logits = yield denoise(x[rows], t.double().expand(len(rows)).to(x.device), todo[rows], rows)
            row_nfe[rows.cpu()] += 1
            where = todo[rows].nonzero()
            abs_rows, counter = rows[where[:, 0]], step * PURPOSES
            x0, confidence = self.candidates(logits, streams, abs_rows, counter, where[:, 1])
            if self.score == "origin":
                u = streams.uniform(abs_rows, counter + TIME, where[:, 1])
                take = u < (1.0 if final else float(1 - s / t))
                chosen = torch.zeros_like(todo[rows])
                chosen[where[take, 0], where[take, 1]] = True
            else:
                score = spread(confidence.double(), where, (len(rows), length), float("-inf"))
                if self.threshold:
                    chosen, n0[rows], carry[rows], last[rows] = self._threshold(score, step, n0[rows], carry[rows],
                                                                                last[rows])
                else:
                    left = todo[rows].sum(dim=1)
                    n = left if final else (left.float() * (1 - s / t)).long()  # float32 then truncation
                    if self.alg_temp:  # Gumbel-top-k: n draws without replacement from softmax(score / T)
                        g = -torch.log(-torch.log(streams.uniform(abs_rows, counter + ORDER, where[:, 1])))
                        score[where[:, 0], where[:, 1]] = score[where[:, 0], where[:, 1]] / self.alg_temp + g
                    chosen = choose_per_row(score, n)
            reveal_candidates(x, rows, chosen, spread(x0, where, (len(rows), length), self.mask_id))
            step += 1
            yield Frame(x)
        return Outcome(x, row_nfe)

    def _threshold(self, score, step, n0, carry, last):
        """One step of threshold decoding for R rows: (chosen (R, L), n0, carry, last)."""
        ask = n0 + carry
        rank = ranks_in_row(score)
        asked = (rank < ask[:, None]) & (score > float("-inf"))
        chosen = asked & ((rank == 0) | (score >= self.threshold))
        rejected = (asked & ~chosen).sum(dim=1)
        extend = (rejected > 0) & (last == step)
        return chosen, torch.where(extend, 0, n0), rejected, last + extend.long()

    def _blocks(self, canvas, streams, start0: int) -> Decoding:
        """Fast-dLLM's block-wise Dream sampler (``generation_utils_block``): the generated part in blocks of
        ``block_length``; per block one full-canvas call (recording the ``block_cache``) whose shifted
        logits reveal the block's first position by argmax, then calls on the canvas from the block on
        (prefix, or without cache the whole canvas) or on the block alone (dual) until it is complete:
        with ``threshold`` the best candidate and every other at or above it; else the schedule of
        ``steps / blocks`` steps per block, ``int(M (1 - t_{i+1}/t_i))`` at step ``i`` (the full call was
        step 0), everything left at the last. The rows must share their block boundaries."""
        x = canvas.clone()
        b, length = x.shape
        free = x == self.mask_id
        row_nfe = torch.zeros(b, dtype=torch.long)
        blocks = -(-(length - start0) // self.block_length)
        per_block = max(1, self.steps // max(blocks, 1))
        grid = torch.linspace(1, self.eps, per_block + 1)
        mode = None if self.block_cache == "none" else self.block_cache
        step = 0
        for k in range(blocks):
            start, end = start0 + k * self.block_length, min(start0 + (k + 1) * self.block_length, length)
            i = 0
            while i == 0 or (x[:, start:end] == self.mask_id).any():
                todo = torch.zeros_like(free)
                todo[:, start:end] = x[:, start:end] == self.mask_id
                out = yield block_chunk(x, i, start, end, mode, read=todo)
                step += 1
                row_nfe += 1
                where = todo.nonzero()
                x0, confidence = self.candidates(out, streams, where[:, 0], step * PURPOSES, where[:, 1])
                score = spread(confidence.double(), where, x.shape, float("-inf"))
                if i == 0:  # the block's first position, by argmax, whatever its confidence
                    chosen = torch.zeros_like(free)
                    chosen[:, start] = todo[:, start]
                elif self.threshold:
                    chosen = ((ranks_in_row(score) == 0) | (score >= self.threshold)) & todo
                else:
                    left = todo.sum(dim=1)
                    n = left if i >= per_block - 1 else (left.float() * (1 - grid[i + 1] / grid[i])).long()
                    chosen = choose_per_row(score, n)
                reveal_candidates(x, None, chosen, spread(x0, where, x.shape, self.mask_id))
                i += 1
                yield Frame(x)
        return Outcome(x, row_nfe)

