"""One insertion per step for insertion LMs, stopping on the stop head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..models.insertion import stop_log_odds
from .base import (
    ORDER,
    PURPOSES,
    TIME,
    TOKEN,
    DrawSettings,
    RowStreams,
    SamplingError,
    categorical_probs,
    check_knobs,
)
from .engine import Decoding, Forward, Frame, Outcome, Sampler

GAP_CHOICES = ("greedy", "sample")  # the gap with the largest marginal, or one drawn (joint sampling)
# stop with probability P(stop), once P(stop) reaches a threshold, or after a count drawn at the start
STOP_RULES = ("draw", "threshold", "count")


@dataclass(frozen=True)
class InsertionSettings(DrawSettings):
    """The ``sample.*`` keys of the ``insertion`` sampler (:class:`InsertionSampler`)."""

    stop: str = "draw"  # stop with P(stop) (argmax at t=0), at stop_threshold, or after a count N ~ P(n)
    stop_threshold: float = 0.9  # stop=threshold: stop a row once P(stop) reaches this
    gap: str = "greedy"  # the gap with the largest marginal, or a draw (joint sampling)

    RANGES: ClassVar[dict[str, str]] = {"stop_threshold": "(0, 1]"}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"stop": STOP_RULES, "gap": GAP_CHOICES}


class InsertionSampler(Sampler):
    """Insertion LMs (Patel et al. 2025, arXiv 2505.05755): every step is one network call and one insertion
    per unfinished row, and rows finish at different lengths.

    The canvas (B, W) says where to insert: its tokens other than mask and PAD are kept, in order, and
    a run of mask ids after a token opens the gap after it (the number of masks does not matter: the
    model decides how many tokens a gap receives); PAD is room to grow into without opening a gap.
    ``[BOS] prompt [MASK]`` continues a prompt; ``[BOS] [MASK]`` is unconditional; ``[BOS] left [MASK]
    right [PAD]...`` infills one span of unknown length (``generate`` builds that from a template).
    Inserted tokens open the gaps after them. The width ``W`` bounds the final length; the result holds
    each row's sequence left-aligned, PAD after it.

    Per step and row: stop (or when the row is full); otherwise choose
    the gap from the position marginals ``logsumexp_v s[j, v]`` (``gap="greedy"``: the argmax, the
    released setting; ``"sample"``: a draw, which with the token draw below is a draw from the joint
    softmax) and the token from ``softmax(s[j, :])`` with temperature/top-k/top-p (float64), then
    shift everything after the gap right by one. The stop: ``stop="draw"`` stops with probability
    ``P(stop)`` (a uniform from the row's stream; at temperature 0 when ``P(stop) >= 0.5``), the hazard
    the stop head is trained to be, so that joint sampling generates the model's distribution (tested by
    enumeration); ``"threshold"`` stops once ``P(stop) >= stop_threshold`` (the released setting, 0.9: a
    row whose completion is never that certain, as on text, runs to the width); ``"count"`` (a count
    head only) draws ``N ~ P(n | x)`` once, from the canvas's own state (argmax at temperature 0), and
    inserts exactly ``N`` tokens: for an optimal model the number of insertions has the data's
    distribution given the canvas, but the text given that number is not the data's (each insertion
    averages over completions of every length), so it is not a draw from the model's chain.
    """

    def __init__(self, mask_id: int, pad_id: int, special_ids, stop: str = "draw", stop_threshold: float = 0.9,
                 gap: str = "greedy", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 precision: str = "float64"):
        check_knobs(temperature, top_k, top_p, precision)
        if not 0 < stop_threshold <= 1:
            raise SamplingError(f"stop_threshold must lie in (0, 1], got {stop_threshold}")
        if stop not in STOP_RULES:
            raise SamplingError(f"stop rule must be {' or '.join(STOP_RULES)}, got {stop!r}")
        if gap not in GAP_CHOICES:
            raise SamplingError(f"gap choice must be {' or '.join(GAP_CHOICES)}, got {gap!r}")
        self.mask_id, self.pad_id, self.special = mask_id, pad_id, sorted(set(special_ids) | {mask_id, pad_id})
        self.stop, self.stop_threshold, self.gap = stop, stop_threshold, gap
        self.temperature, self.top_k, self.top_p, self.precision = temperature, top_k, top_p, precision

    def layout(self, canvas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids (B, W) left-aligned, open gaps (B, W), lengths (B,)) of a canvas."""
        masks = canvas == self.mask_id
        fixed = ~masks & (canvas != self.pad_id)
        if not fixed[:, 0].all():
            raise SamplingError("an insertion canvas must start with a fixed token (BOS) that owns the first gap")
        before_mask = torch.cat([masks[:, 1:], torch.zeros_like(masks[:, :1])], dim=1)
        place = fixed.long().cumsum(1) - 1
        ids = torch.full_like(canvas, self.pad_id)
        opened = torch.zeros_like(masks)
        rows, cols = fixed.nonzero(as_tuple=True)
        ids[rows, place[rows, cols]] = canvas[rows, cols]
        opened[rows, place[rows, cols]] = before_mask[rows, cols]
        return ids, opened, fixed.sum(1)

    def start(self, model, canvas: torch.Tensor, seeds: torch.Tensor) -> Decoding:
        """Check ``canvas`` (B, L) and ``seeds`` (B,) and return the decoding of the class docstring."""
        self.check(canvas, seeds)
        return self._decode(canvas, seeds, model.backbone.vocab_size)

    def _decode(self, canvas: torch.Tensor, seeds: torch.Tensor, vocab_size: int) -> Decoding:
        ids, opened, lengths = self.layout(canvas)
        b, width = ids.shape
        streams = RowStreams(seeds)
        forbidden = torch.zeros(vocab_size, dtype=torch.bool, device=ids.device)
        forbidden[self.special] = True
        positions = torch.arange(width, device=ids.device)
        active = opened.any(1) & (lengths < width)
        row_nfe = torch.zeros(b, dtype=torch.long)
        budget = torch.zeros(b, dtype=torch.long, device=ids.device)  # stop="count": insertions left
        step = 0
        while active.any():
            rows = active.nonzero()[:, 0]
            keep = positions[None] < lengths[rows, None]
            logits, stop = yield Forward(ids[rows], dict(keep=keep))
            row_nfe[rows.cpu()] += 1
            if self.stop == "count":
                if step == 0:
                    budget[rows] = self.draw_count(stop, streams, rows)
                go = budget[rows] > 0
            else:
                go = self.go_on(stop_log_odds(stop).double().sigmoid(), streams, rows, step)
            active[rows[~go]] = False
            rows, logits = rows[go], logits[go]
            if len(rows):
                scores = logits.double().masked_fill(forbidden[None, None], float("-inf"))
                marginals = scores.logsumexp(-1).masked_fill(~(opened[rows] & keep[go]), float("-inf"))
                index = torch.zeros_like(rows)
                if self.gap == "greedy":
                    gap = marginals.argmax(1)
                else:
                    gap = streams.categorical(marginals.softmax(1), rows, step * PURPOSES + ORDER, index)
                probs = categorical_probs(scores[torch.arange(len(rows)), gap], self.temperature, self.top_k,
                                          self.top_p)
                token = streams.categorical(probs, rows, step * PURPOSES + TOKEN, index, self.precision)
                after = positions[None] > gap[:, None] + 1
                at = positions[None] == gap[:, None] + 1
                shifted_ids = torch.cat([ids[rows, :1], ids[rows, :-1]], 1)
                shifted_open = torch.cat([opened[rows, :1], opened[rows, :-1]], 1)
                ids[rows] = torch.where(at, token[:, None], torch.where(after, shifted_ids, ids[rows]))
                opened[rows] = at | torch.where(after, shifted_open, opened[rows])
                lengths[rows] += 1
                budget[rows] -= 1
                active[rows] = (lengths[rows] < width) & ((budget[rows] > 0) | (self.stop != "count"))
            step += 1
            yield Frame(ids)
        generated = int((lengths - ((canvas != self.mask_id) & (canvas != self.pad_id)).sum(1)).sum())
        return Outcome(ids, row_nfe, generated)

    def go_on(self, p_stop: torch.Tensor, streams: RowStreams, rows: torch.Tensor, step: int) -> torch.Tensor:
        """(N,) bool: the rows that insert at this step rather than stop (``stop`` draw or threshold)."""
        if self.stop == "threshold":
            return p_stop < self.stop_threshold
        if self.temperature == 0:
            return p_stop < 0.5
        # the stop's uniform takes the TIME purpose (an insertion sampler has no times)
        return streams.uniform(rows, step * PURPOSES + TIME, torch.zeros_like(rows)) >= p_stop

    def draw_count(self, scores: torch.Tensor, streams: RowStreams, rows: torch.Tensor) -> torch.Tensor:
        """(N,) numbers of insertions drawn from a count head's ``P(n | x)`` (scores (N, K)): one draw
        per row keyed by the row's stream at step 0 (the TIME purpose), the argmax at temperature 0."""
        if scores.shape[1] == 1:
            raise SamplingError("sample.stop=count needs a model with a count stop head "
                                "(trained with diffusion.ilm_stop_head=count)")
        probs = categorical_probs(scores, 0.0 if self.temperature == 0 else 1.0)
        return streams.categorical(probs, rows, TIME, torch.zeros_like(rows), self.precision)
