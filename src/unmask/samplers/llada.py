"""LLaDA's decoding (Nie et al. 2025, ``generate.py``): low-confidence remasking within semi-autoregressive
blocks, a fixed number of reveals per step, one network call per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..objectives.mdlm import MaskedDiffusion
from .base import (
    CONFIDENCE_SCORES,
    ORDER,
    PURPOSES,
    TOKEN,
    RowStreams,
    SamplingError,
    choose_per_row,
    confidence_scores,
    ranks_in_row,
    reveal_candidates,
    spread,
    top_index,
)
from .denoiser import BLOCK_CACHES, DenoiseSettings, DiffusionSampler, block_cache_start, block_chunk
from .engine import Decoding, Frame, Outcome


def per_step_counts(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's reveal schedule of a block: ``masked`` (R,) masks at the block's start over ``steps``
    steps -> (R, steps) counts ``floor(M / s) + 1`` for the first ``M mod s`` steps, ``floor(M / s)`` after."""
    base = (masked // steps)[:, None].expand(-1, steps)
    extra = torch.arange(steps, device=masked.device)[None] < (masked % steps)[:, None]
    return base + extra.long()


@dataclass(frozen=True)
class LLaDASettings(DenoiseSettings):
    """The ``sample.*`` keys of the ``llada`` sampler (:class:`LLaDASampler`)."""

    steps: int = 128  # denoising steps over all blocks
    block_length: int = 32  # semi-autoregressive block length
    score: str = "confidence"  # the order of reveals: LLaDA's low-confidence or random remasking, margin, entropy
    threshold: float = 0.0  # > 0: Fast-dLLM's threshold rule, every candidate whose confidence reaches it
    factor: float = 0.0  # > 0: Fast-dLLM's factor rule, the n best revealed while c_(n) >= 1 - factor/(n+1)
    block_cache: str = "none"  # Fast-dLLM's approximate KV cache: none, prefix or dual

    RANGES: ClassVar[dict[str, str]] = {"steps": "[1, inf)", "block_length": "[1, inf)", "threshold": "[0, 1]",
                                        "factor": "[0, inf)"}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"score": CONFIDENCE_SCORES, "block_cache": BLOCK_CACHES}
    SWITCHES: ClassVar[tuple[str, ...]] = ("factor",)


class LLaDASampler(DiffusionSampler):
    """LLaDA's sampler. The generated part of each row (from its first masked position to the end of the
    canvas) is cut into blocks of ``block_length`` positions, decoded left to right with ``steps / blocks``
    steps each (when they do not divide, the first ``steps mod blocks`` blocks get one step more). A step
    calls the network on the whole canvas; at the masked positions of the current block it takes a
    candidate ``x0`` (temperature 0: the argmax; else the Gumbel-max draw ``argmax(l / T + g)``, which is a
    draw from ``softmax(l / T)``) and a confidence (``score``: ``confidence`` = LLaDA's low-confidence
    remasking, the softmax probability of ``x0`` over the whole vocabulary; ``random`` = LLaDA's random
    remasking; ``margin``, ``entropy`` as in :class:`~unmask.samplers.confidence.ConfidenceSampler`) and
    reveals the ``k`` most confident, ``k`` from :func:`per_step_counts` of the block's masks. NFE =
    ``steps`` (guidance, LLaDA's ``cfg_scale``, adds a second pass per step). The mask id is never a
    candidate (LLaDA's argmax runs over the whole vocabulary; its released models never predict the
    mask). Per-row random streams: Gumbel noise and random confidences are keyed by (row seed, step,
    position), so rows are batch-invariant and ragged prompts get their own blocks.

    ``threshold > 0`` is Fast-dLLM's threshold decoding (Wu et al. 2025, ``generate(threshold=)``): a step
    reveals the most confident candidate of the block and every other whose confidence (float64, as
    Fast-dLLM computes it) reaches the threshold, and a block takes as many steps as it needs (``steps``
    is then unused; each row stops being evaluated when its block is complete).

    ``factor > 0`` is Fast-dLLM's factor rule (``get_transfer_index_dynamic``): with the block's candidates
    sorted by confidence ``c_(1) >= c_(2) >= ...``, a step reveals the ``n`` most confident, ``n`` the number
    of ranks with ``c_(n) >= 1 - factor / (n + 1)`` (at least 1): the more tokens decoded in parallel, the
    more confident each must be (their theorem's bound ``(n + 1) eps < factor``). Fast-dLLM's loop reveals
    all ``M`` masks when ``n = M - 1`` pass (an off-by-one at the end of its loop); unmask reveals ``M - 1``.
    Like the threshold, ``steps`` is then unused.
    """

    def __init__(self, diffusion: MaskedDiffusion, steps: int, block_length: int, score: str = "confidence",
                 threshold: float = 0.0, block_cache: str = "none", reference_compatible: bool = False,
                 factor: float = 0.0, **knobs):
        if steps < 1 or block_length < 1:
            raise SamplingError(f"steps and block_length must be >= 1, got {steps} and {block_length}")
        if not 0 <= threshold <= 1 or (threshold and score != "confidence"):
            raise SamplingError(f"threshold decoding takes a threshold in [0, 1] and score=confidence; got "
                                f"{threshold} and {score!r}")
        if factor < 0 or (factor and (threshold or score != "confidence")):
            raise SamplingError(f"the factor rule takes a factor >= 0, score=confidence and no threshold; got "
                                f"factor {factor}, threshold {threshold} and {score!r}")
        if score not in CONFIDENCE_SCORES:
            raise SamplingError(f"unknown confidence score {score!r}; known: {', '.join(CONFIDENCE_SCORES)}")
        super().__init__(diffusion, **knobs)
        if self.top_k or self.top_p < 1 or self.precision != "float64":
            raise SamplingError("the llada sampler draws by Gumbel-max over the whole vocabulary: top_k, top_p "
                                "and precision=float32 do not apply")
        if block_cache not in BLOCK_CACHES:
            raise SamplingError(f"block_cache must be none, prefix or dual, got {block_cache!r}")
        if block_cache != "none" and self.guidance:
            raise SamplingError("the block caches run the network directly: no guidance with them")
        self.steps, self.block_length, self.score, self.threshold = steps, block_length, score, threshold
        self.factor, self.parallel = factor, bool(threshold or factor)  # parallel: as many steps as needed
        self.block_cache, self.reference_compatible = block_cache, reference_compatible
        self.streams = RowStreams  # the per-row random streams (a test can give recorded draws instead)

    def candidates(self, logits: torch.Tensor, streams: RowStreams, rows: torch.Tensor, step: int,
                   cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, confidence) at N positions from their logits (N, V)."""
        logits = logits.float()
        # over the whole vocabulary; float32 as LLaDA's confidence, float64 as Fast-dLLM's with a threshold
        probs = (logits.double() if self.parallel else logits).softmax(-1)
        allowed = logits.index_fill(-1, torch.tensor([self.mask_id], device=logits.device), float("-inf"))
        counter = step * PURPOSES
        if self.temperature == 0:
            x0 = top_index(allowed)
        else:  # Gumbel-max in float64: argmax(l - T log(-log u)), LLaDA's exp(l) / (-log u)^T in log space
            u = streams.uniforms(rows, counter + TOKEN, cols, logits.shape[-1])
            x0 = top_index(allowed.double() - self.temperature * torch.log(-torch.log(u)))
        keys = streams.uniform(rows, counter + ORDER, cols) if self.score == "random" else None
        return x0, confidence_scores(probs, x0, self.score, keys).double()

    @property
    def holds_cache(self) -> bool:
        """Whether its decodings keep Fast-dLLM's block cache (``block_cache``)."""
        return self.block_cache != "none"

    def start(self, model, canvas: torch.Tensor, seeds: torch.Tensor) -> Decoding:
        """Check ``canvas`` (B, L) and ``seeds`` (B,) and return the decoding of the class docstring (``steps`` must
        cover the blocks unless the threshold or factor rule decodes in parallel)."""
        self.check(canvas, seeds)
        b, length = canvas.shape
        free = canvas == self.mask_id
        first = torch.where(free.any(dim=1), free.float().argmax(dim=1), torch.full((b,), length, device=canvas.device))
        blocks = int((-(-(length - first) // self.block_length)).max())
        if blocks > self.steps and not self.parallel:
            raise SamplingError(f"steps={self.steps} is fewer than the {blocks} blocks of {self.block_length} "
                                f"positions to generate")
        column = torch.arange(length, device=canvas.device)[None]
        block_of = torch.where(column >= first[:, None], (column - first[:, None]) // self.block_length, -1)
        if self.block_cache != "none":
            start = block_cache_start(model, canvas, self.mask_id, self.block_cache)
            return self._cached(canvas, self.streams(seeds), start, blocks, block_of)
        return self._decode(canvas, self.streams(seeds), self.denoiser(model, canvas), blocks, block_of)

    def _decode(self, canvas, streams, denoise, blocks: int, block_of) -> Decoding:
        x = canvas.clone()
        row_nfe = torch.zeros(len(x), dtype=torch.long)
        step = 0
        for k in range(blocks):
            in_block = block_of == k
            if self.parallel:  # Fast-dLLM: as many steps as the block needs
                while True:
                    todo = (x == self.mask_id) & in_block
                    rows = todo.any(dim=1).nonzero()[:, 0]
                    if not len(rows):
                        break
                    step += 1
                    logits = yield denoise(x[rows], self._time(step, len(rows), x.device), todo[rows], rows)
                    self._reveal(x, logits, streams, rows, todo, step, row_nfe, None)
                    yield Frame(x)
                continue
            per_block = self.steps // blocks + (k < self.steps % blocks)
            counts = per_step_counts(((x == self.mask_id) & in_block).sum(dim=1), per_block)
            for i in range(per_block):
                step += 1
                rows = (counts[:, i] > 0).nonzero()[:, 0]
                if not len(rows):
                    continue
                todo = (x == self.mask_id) & in_block
                logits = yield denoise(x[rows], self._time(step, len(rows), x.device), todo[rows], rows)
                self._reveal(x, logits, streams, rows, todo, step, row_nfe, counts[rows, i])
                yield Frame(x)
        return Outcome(x, row_nfe)

    def _time(self, step: int, rows: int, device) -> torch.Tensor:
        """The diffusion time (R,) the denoiser sees at ``step`` (1-based): ``1 - (step - 1) / steps``, at least 0."""
        return torch.full((rows,), max(0.0, 1 - (step - 1) / self.steps), dtype=torch.float64, device=device)

    def _cached(self, canvas, streams, first0: int, blocks: int, block_of) -> Decoding:
        """Fast-dLLM's cached decoding (``block_cache`` prefix or dual, see :class:`BlockCache`): per block,
        one full-canvas call that records the cache and reveals, then calls on the block (dual) or on the
        canvas from the block on (prefix) until the block is complete. Every row is evaluated at every call
        (its results do not depend on the others); the rows must share their block boundaries.
        ``reference_compatible``: like Fast-dLLM, call once more after the full forward even when it
        completed the block (the call changes nothing but is counted)."""
        x = canvas.clone()
        b, length = x.shape
        row_nfe = torch.zeros(b, dtype=torch.long)
        rows, step = torch.arange(b, device=x.device), 0
        for k in range(blocks):
            start = first0 + k * self.block_length
            end = min(start + self.block_length, length)
            in_block = block_of == k
            per_block = self.steps // blocks + (k < self.steps % blocks)
            counts = per_step_counts(((x == self.mask_id) & in_block).sum(dim=1), per_block)
            i = 0
            while True:
                todo = (x == self.mask_id) & in_block
                if i > 0 and not todo.any() and not (self.reference_compatible and i == 1):
                    break
                out = yield block_chunk(x, i, start, end, self.block_cache, read=todo)
                step += 1
                count = None if self.parallel else counts[:, i] if i < per_block else torch.zeros_like(counts[:, 0])
                self._reveal(x, out, streams, rows, todo, step, row_nfe, count)
                yield Frame(x)
                i += 1
                if i > 1 and not ((x == self.mask_id) & in_block).any():
                    break
        return Outcome(x, row_nfe)

    def _reveal(self, x, logits, streams, rows, todo, step: int, row_nfe, counts: torch.Tensor | None) -> None:
        """One network call's reveals for ``rows`` (``logits`` (N, V) at the ``todo`` positions of those rows,
        row-major): ``counts`` (per row) of the most confident candidates in ``todo``, or (``counts`` None)
        the most confident and every other that passes the threshold or the factor rule."""
        row_nfe[rows.cpu()] += 1
        where = todo[rows].nonzero()
        x0, score = self.candidates(logits, streams, rows[where[:, 0]], step - 1, where[:, 1])
        shape = todo[rows].shape
        confidence = spread(score, where, shape, float("-inf"))
        if counts is None:
            rank = ranks_in_row(confidence)
            # rank r is the (r + 1)-th most confident
            bar = 1 - self.factor / (rank.double() + 2) if self.factor else self.threshold
            chosen = ((rank == 0) | (confidence >= bar)) & (confidence > float("-inf"))
        else:
            chosen = choose_per_row(confidence, counts)
        reveal_candidates(x, rows, chosen, spread(x0, where, shape, self.mask_id))
