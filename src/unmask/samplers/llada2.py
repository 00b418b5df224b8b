"""LLaDA2.1's decoding inside a block (Ant Group's LLaDA2.1 ``generate``): threshold commits of masked
positions and token-to-token editing of decoded ones, in the same steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..objectives.mdlm import MaskedDiffusion
from .base import PURPOSES, TOKEN, RowStreams, SamplingError, drawn_candidates, ranks_in_row, spread
from .denoiser import DenoiseSettings, MultinomialSampler
from .engine import Decoding, Frame, Outcome


@dataclass(frozen=True)
class LLaDA2Settings(DenoiseSettings):
    """The ``sample.*`` keys of the ``llada2`` sampler (:class:`LLaDA2Sampler`)."""

    threshold: float = 0.0  # commit every masked candidate whose confidence exceeds it (else the most confident)
    edit_threshold: float = 1.0  # replace a decoded token by a different candidate more confident than this (1: never)
    max_post_steps: int = 16  # calls on a block with no mask left, each may edit (the first verifies)

    RANGES: ClassVar[dict[str, str]] = {"threshold": "[0, 1]", "edit_threshold": "[0, inf)",
                                        "max_post_steps": "[0, inf)"}


class LLaDA2Sampler(MultinomialSampler):
    """LLaDA2.1's sampler for the positions of one block (the inner sampler of
    :class:`~unmask.samplers.block_diffusion.BlockDiffusionSampler`). Every call evaluates the block's
    generated positions (those that were masked when the block started; the others are prompt and stay) and
    draws a candidate ``x0`` and its confidence for each
    (:func:`~unmask.samplers.base.drawn_candidates`: the argmax at temperature 0). A call then

    * commits the masked positions whose confidence exceeds ``threshold``, or the most confident one when none
      does (M2T, mask to token);
    * edits the positions decoded before the call whose candidate differs from their token with a confidence
      above ``edit_threshold`` (T2T, token to token; ``edit_threshold >= 1`` never edits).

    A call on a block without masks is a verification: the block ends after one that edits nothing, or when
    ``max_post_steps`` such calls were made. So every block ends with at least one call that sees no mask
    (the number of steps is not set; the threshold decides it). Per-row random streams keyed by (row seed,
    call, position): rows are batch-invariant, and each row ends its block on its own.
    """

    def __init__(self, diffusion: MaskedDiffusion, threshold: float = 0.0, edit_threshold: float = 1.0,
                 max_post_steps: int = 16, **knobs):
        if not 0 <= threshold <= 1 or edit_threshold < 0 or max_post_steps < 0:
            raise SamplingError(f"threshold in [0, 1], edit_threshold >= 0 and max_post_steps >= 0; got {threshold}, "
                                f"{edit_threshold} and {max_post_steps}")
        super().__init__(diffusion, **knobs)
        self.threshold, self.edit_threshold, self.max_post_steps = threshold, edit_threshold, max_post_steps

    @property
    def revises(self) -> bool:
        """Whether decoded tokens may be edited (``edit_threshold < 1``)."""
        return self.edit_threshold < 1

    def _decode(self, canvas: torch.Tensor, streams: RowStreams, denoise) -> Decoding:
        x = canvas.clone()
        generated = x == self.mask_id  # the positions this decoding may write; the rest is prompt
        going = generated.any(dim=1)
        post = torch.zeros(len(x), dtype=torch.long, device=x.device)
        row_nfe = torch.zeros(len(x), dtype=torch.long)
        call = 0
        while True:
            active = x == self.mask_id
            settled = going & ~active.any(dim=1)
            post += settled.long()
            going &= post <= self.max_post_steps
            rows = going.nonzero()[:, 0]
            if not len(rows):
                break
            read = generated[rows]
            logits = yield denoise(x[rows], active[rows].double().mean(dim=1), read, rows)
            row_nfe[rows.cpu()] += 1
            where = read.nonzero()
            x0, p = drawn_candidates(logits, streams, rows[where[:, 0]], call * PURPOSES + TOKEN, where[:, 1],
                                     self.temperature, self.top_k, self.top_p)
            shape = read.shape
            candidate, confidence = spread(x0, where, shape, self.mask_id), spread(p, where, shape, float("-inf"))
            old, masked = x[rows], active[rows]
            score = confidence.masked_fill(~masked, float("-inf"))
            # every candidate above the threshold, or the most confident (the best is among them when any is)
            commit = masked & ((score > self.threshold) | (ranks_in_row(score) == 0))
            edit = read & ~masked & (confidence > self.edit_threshold) & (candidate != old)
            change = commit | edit
            old[change] = candidate[change]
            x[rows] = old
            going[rows] &= masked.any(dim=1) | edit.any(dim=1)  # a verification that edits nothing ends the block
            call += 1
            yield Frame(x)
        return Outcome(x, row_nfe)
