"""Insertion language models (ILM; Patel et al. 2025, arXiv 2505.05755).

An ILM state is a sequence without masks, ``[BOS] prefix tokens...``; position ``j`` owns the gap to
its right. The network (the shared bidirectional DiT, no time input, padding invisible through a key
padding mask) gives logits ``s[j, v]`` for inserting token ``v`` into gap ``j``, all under **one joint
softmax over (j, v)**, and stop scores from the BOS position (it plays the paper's ``[CLS]``).
Special tokens and gaps that may not grow (padding, inside a fixed prefix) get ``-inf``.

Training ("biased denoising", the paper's objective): with ``n0`` droppable tokens, draw
``n ~ Uniform{0..n0}`` and drop a uniformly random ``n``-subset; ``T[j, v]`` counts the dropped tokens
equal to ``v`` lying between kept token ``j`` and the next kept token, ``q = T / n``, and

    L = -sum_{j,v} q[j,v] log softmax_{(j,v)}(s)[j,v]   (only when n > 0)
        + BCE(stop logit, n == 0)

per sequence, averaged over the batch (no ``1/n`` weighting, no marginalisation over orders; a
multiset target per gap). ``sum T log p`` is computed as a sum over the dropped tokens of
``log p[gap, token]``, so ``T`` is never materialized.

Count head (``diffusion.ilm_stop_head=count``; ``models/insertion.py``). The BCE above has a positive
label on one row in ``n0 + 1`` (about 1 % of text rows). A count head predicts ``P(n | x)``, how many
tokens the state misses, with ``-log P(n | x)`` in place of the BCE: a graded label on every row. Its
optimum has ``P(n = 0 | x)`` equal to the binary head's optimal ``P(stop | x)`` (both are the
posterior that the visited state is complete), and the sampler stops with it, so everything below
holds for both heads (the enumeration tests run both).

Row weights (``weighting``). Sampling inserts one token per step in a uniformly random order, so a
sequence of ``n0`` tokens visits ``n0 + 1`` states, and at a visited state the right stop probability
and insertion distribution are the posterior over every sequence whose path passes through it. A
uniform ``n`` visits each of a row's states with probability ``1/(n0 + 1)``, so the paper's loss
(``"paper"``) fits the posterior of a data distribution reweighted by ``1/(n0 + 1)``: short sequences
count more, and the stop head and insertions learned from text of varying length are biased toward
short. ``"path"`` (the default) multiplies each row's loss by ``(n0 + 1) / L``, which makes it an
unbiased estimate (up to the constant ``1/L``) of ``sum`` over the row's path of the per-step losses:
the chain of optimal stop and insertion probabilities then generates exactly the data distribution
(``tests/test_insertion.py`` checks both claims by enumeration). With rows of one length the two agree.

Stop-head noise (``stop_noise = f > 0``; training only, off by default). A model's own samples have
defects the data never has (a wrong character, which no insertion can repair); a stop head trained on
clean states alone learns "defective, so incomplete", and defective samples keep growing. A share ``f``
of the rows gets a second copy of its state in which each kept text token is replaced, with a
probability ``r ~ U(0, 1)`` drawn per copy, by a uniformly drawn ordinary token; the copy adds only its
stop loss (the row's label, ``n == 0`` or for a count head ``n``, and the row's weight), so the head
learns to judge completeness through substitutions. The copies cost ``f`` more rows per forward and
leave the insertion targets alone; with ``f > 0`` the chain no longer generates exactly the data
distribution (the head's clean-state predictions are shared with the copies). Randomness:
``Noise.extra_u`` (B, L); column 0 picks the row (``u < f``, then ``r = u / f``), column ``i``
substitutes token ``i`` of the copy (``u < r``, token ``floor(u / r * K)`` of the ``K`` ordinary ones).
Evaluation noise has no ``extra_u``: no copies.

Which tokens may be dropped: the counted, non-special tokens of a row (``data.layout=pad``, so the
row is ``[BOS] (prompt) text [EOS] [PAD]...``). BOS and a prompt form the fixed prefix; the last
prefix position owns the first gap that may grow. EOS and PAD are not part of an ILM sequence: the
stop head decides where it ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Objective

ROW_WEIGHTINGS = ("path", "paper")


def forbidden_token_mask(vocab_size: int, special_ids, device=None) -> torch.Tensor:
    """(V,) bool: the tokens that are never inserted (the tokenizer's special tokens)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[list(special_ids)] = True
    return mask


def joint_log_probs(logits: torch.Tensor, open_gaps: torch.Tensor, forbidden: torch.Tensor) -> torch.Tensor:
    """``log softmax`` over all (gap, token) pairs of each row, float32 (B, L, V); closed gaps
    (``open_gaps`` False) and forbidden tokens get ``-inf``."""
    allowed = open_gaps[:, :, None] & ~forbidden[None, None, :]
    scores = logits.float().masked_fill(~allowed, float("-inf"))
    flat = scores.reshape(len(scores), -1)
    return (flat - flat.logsumexp(dim=-1, keepdim=True)).reshape(scores.shape)


@dataclass
class InsertionBatch:
    """What the network sees after dropping tokens, and the targets.

    ``ids`` (B, L): kept tokens left-aligned, PAD after; ``keep`` (B, L) the positions in use;
    ``open_gaps`` (B, L) the gaps that may receive insertions; ``dropped`` (B,) how many tokens were
    dropped (``n``) of the ``droppable`` (B,) (``n0``); the dropped tokens as flat lists ``row``, ``gap``,
    ``token`` (N,) (the gap is the index, in ``ids``, of the kept token before the dropped one)."""

    ids: torch.Tensor
    keep: torch.Tensor
    open_gaps: torch.Tensor
    dropped: torch.Tensor
    droppable: torch.Tensor
    row: torch.Tensor
    gap: torch.Tensor
    token: torch.Tensor

    def counts(self, vocab_size: int) -> torch.Tensor:
        """The count targets ``T`` (B, L, V) as a dense tensor (for inspection and tests)."""
        t = torch.zeros(*self.ids.shape, vocab_size, dtype=torch.float64, device=self.ids.device)
        return t.index_put_((self.row, self.gap, self.token), torch.ones_like(self.row, dtype=torch.float64),
                            accumulate=True)


class InsertionObjective(Objective):
    """The ILM training objective (module docstring) over rows from the data pipeline."""

    family = "ilm"
    per_sequence = True  # losses are per sequence, normalised by the number of rows, not of tokens
    bound = "none"  # the training objective, not a bound on the likelihood

    def __init__(self, bos_id: int, eos_id: int, pad_id: int, mask_id: int, special_ids, vocab_size: int,
                 weighting: str = "path", stop_noise: float = 0.0):
        if weighting not in ROW_WEIGHTINGS:
            raise ValueError(f"ILM weighting must be {' or '.join(ROW_WEIGHTINGS)}, got {weighting!r}")
        if not 0.0 <= stop_noise <= 1.0:
            raise ValueError(f"ILM stop noise must be in [0, 1], got {stop_noise}")
        self.stop_noise = stop_noise
        self.extra_noise = stop_noise > 0  # a step draws the uniforms of the stop-head copies
        self.bos_id, self.eos_id, self.pad_id, self.mask_id = bos_id, eos_id, pad_id, mask_id
        self.special = sorted(set(special_ids) | {bos_id, eos_id, pad_id, mask_id})
        self.vocab_size, self.weighting = vocab_size, weighting

    def forbidden(self, device) -> torch.Tensor:
        """(V,) bool on ``device``: the tokens never inserted (the special tokens)."""
        return forbidden_token_mask(self.vocab_size, self.special, device)

    def drop(self, x0: torch.Tensor, counted: torch.Tensor, time_u: torch.Tensor,
             mask_u: torch.Tensor) -> InsertionBatch:
        """Drop ``n = floor(u (n0 + 1))`` of each row's ``n0`` droppable tokens (a uniform count from
        the row's time uniform ``u``), those with the smallest ``mask_u``: a uniformly random subset."""
        b, length = x0.shape
        positions = torch.arange(length, device=x0.device)
        special = torch.isin(x0, torch.tensor(self.special, device=x0.device))
        present = (positions[None] == 0) | ~special  # BOS, prompt and text; EOS/PAD are not part of it
        droppable = counted & ~special
        n0 = droppable.sum(1)
        n = (time_u.to(x0.device, torch.float64) * (n0 + 1)).floor().long().clamp(max=n0)
        keys = torch.where(droppable, mask_u.to(x0.device), torch.full_like(mask_u, 2.0, device=x0.device))
        dropped = droppable & (keys.argsort(1).argsort(1) < n[:, None])
        kept = present & ~dropped
        new_index = kept.long().cumsum(1) - 1  # kept: its place in the new row; dropped: its gap
        sizes = kept.sum(1)
        ids = torch.full_like(x0, self.pad_id)
        rows_k, cols_k = kept.nonzero(as_tuple=True)
        ids[rows_k, new_index[rows_k, cols_k]] = x0[rows_k, cols_k]
        keep = positions[None] < sizes[:, None]
        # the first gap that may grow: the last fixed (present, not droppable) position before the text
        prefix = present & ~droppable
        last_fixed = torch.where(prefix & (positions[None] < first_true(droppable, length)[:, None]),
                                 positions[None], torch.zeros_like(positions)[None]).amax(1)
        first_open = new_index.gather(1, last_fixed[:, None])[:, 0]
        open_gaps = keep & (positions[None] >= first_open[:, None])
        rows_d, cols_d = dropped.nonzero(as_tuple=True)
        return InsertionBatch(ids, keep, open_gaps, n, n0, rows_d, new_index[rows_d, cols_d], x0[rows_d, cols_d])

    def row_weights(self, batch: InsertionBatch) -> torch.Tensor:
        """(B,) float weights of the rows' losses: 1 (``paper``) or ``(n0 + 1) / L`` (``path``)."""
        if self.weighting == "paper":
            return torch.ones(len(batch.ids), device=batch.ids.device)
        return (batch.droppable + 1).float() / batch.ids.shape[1]

    def stop_copies(self, batch: InsertionBatch, extra_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows given a substituted copy for the stop head (module docstring): their indices (C,)
        and the copies' ids (C, L)."""
        rows = (extra_u[:, 0] < self.stop_noise).nonzero()[:, 0]
        rate = (extra_u[rows, :1] / max(self.stop_noise, 1e-12)).clamp(min=1e-12)
        u = extra_u[rows]
        positions = torch.arange(batch.ids.shape[1], device=batch.ids.device)
        open_gaps = batch.open_gaps[rows]
        text = open_gaps & (positions[None] > first_true(open_gaps, len(positions))[:, None])
        ordinary = (~self.forbidden(batch.ids.device)).nonzero()[:, 0]
        pick = (u / rate * len(ordinary)).clamp(max=len(ordinary) - 1).long()
        return rows, torch.where(text & (u < rate), ordinary[pick], batch.ids[rows])

    def loss(self, model, x0: torch.Tensor, counted: torch.Tensor, noise, exact: bool = False) -> torch.Tensor:
        """Per-sequence ILM loss (B,): insertion cross-entropy against ``q = T/n`` plus the stop loss
        (plus, in training with ``stop_noise``, the stop loss of the row's substituted copy)."""
        batch = self.drop(x0, counted, noise.time_u, noise.mask_u)
        b = len(x0)
        rows, copies = batch.row[:0], batch.ids[:0]
        if self.stop_noise > 0 and noise.extra_u is not None:
            rows, copies = self.stop_copies(batch, noise.extra_u.to(x0.device))
        logits, stop = model(torch.cat([batch.ids, copies]), torch.cat([batch.keep, batch.keep[rows]]))
        log_p = joint_log_probs(logits[:b], batch.open_gaps, self.forbidden(x0.device))
        picked = log_p[batch.row, batch.gap, batch.token]
        insertion = torch.zeros(b, device=x0.device).index_add_(0, batch.row, -picked)
        insertion = insertion / batch.dropped.clamp(min=1).float()
        stop = stop_loss(stop[:b], batch.dropped).index_add(0, rows, stop_loss(stop[b:], batch.dropped[rows]))
        return (insertion + stop) * self.row_weights(batch)


def stop_loss(scores: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
    """(B,) loss of the stop scores (B, K) for states missing ``missing`` (B,) tokens: the BCE of
    ``P(stop)`` against ``n == 0`` (binary head, K = 1) or the cross-entropy of ``P(n)`` against ``n``
    (count head, ``n`` clipped to K - 1)."""
    if scores.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(scores[:, 0].float(), (missing == 0).float(), reduction="none")
    return F.cross_entropy(scores.float(), missing.clamp(max=scores.shape[1] - 1), reduction="none")


def first_true(mask: torch.Tensor, default: int) -> torch.Tensor:
    """Index of the first True per row of (B, L), or ``default`` where a row has none."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, positions[None], torch.full_like(positions, default)[None]).amin(1)
