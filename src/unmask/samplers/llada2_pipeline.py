"""diffusers' ``LLaDA2Pipeline`` with its ``BlockRefinementScheduler`` as it decodes (diffusers 0.42), literally:
a reference mode for LLaDA2 folders, which differs from LLaDA2's own ``generate`` (the ``llada2`` sampler)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..models.common import Layout
from ..objectives.mdlm import MaskedDiffusion
from .base import PURPOSES, TOKEN, RowStreams, SamplingError, choose_per_row, drawn_candidates
from .denoiser import DenoiseSettings, MultinomialSampler
from .engine import Decoding, Forward, Frame, Outcome
from .sdar import schedule


@dataclass(frozen=True)
class LLaDA2PipelineSettings(DenoiseSettings):
    """The ``sample.*`` keys of the ``llada2_pipeline`` sampler (:class:`LLaDA2PipelineSampler`)."""

    steps: int = 128  # the scheduler's num_inference_steps: commits per block spread over at most this many steps
    block_length: int = 32  # the pipeline's block length
    threshold: float = 0.0  # commit every masked candidate above it, if at least the step's count
    edit_threshold: float = 1.0  # replace a decoded token by a different candidate more confident than this (1: never)
    max_post_steps: int = 16  # calls on a block with no mask left

    RANGES: ClassVar[dict[str, str]] = {"steps": "[1, inf)", "block_length": "[1, inf)", "threshold": "[0, 1]",
                                        "edit_threshold": "[0, inf)", "max_post_steps": "[0, inf)"}


class LLaDA2PipelineSampler(MultinomialSampler):
    """diffusers' LLaDA2 pipeline, call for call. The canvas (rows of one prompt length ``P``, ``G`` positions to
    generate) is decoded in blocks of ``block_length`` from the block holding the end of the prompt; the last
    block is filled up with masks beyond ``P + G``. Every call feeds the window of the blocks so far; attention
    is bidirectional over the window (the pipeline's 2-D mask of ones, which LLaDA2's model file applies as
    no mask), or causal without the filled-up positions where the window holds some (its 2-D mask with
    zeros). A step draws candidates (:func:`~unmask.samplers.base.drawn_candidates`) for the block; while the
    batch has masks in it, each row commits its masked candidates above ``threshold`` when there are at least
    the step's count (``min(steps, G)`` steps, :func:`~unmask.samplers.sdar.schedule`), else that many of the
    most confident; with ``edit_threshold < 1`` decoded tokens whose different candidate is more confident are
    replaced. A row whose committed or edited token is an EOS with every position from ``P`` to the row's
    first EOS decoded is finished and frozen. The block continues until every row is finished, or the batch
    had no mask and nothing was edited, or the steps are used up, or ``max_post_steps`` calls without masks
    were made; decoding stops when every row is finished.

    Unlike LLaDA2's ``generate`` it attends bidirectionally instead of block-causally (diffusers never applies
    the block mask), commits by a step schedule, and decides when a block ends over the whole batch, so a
    row's tokens depend on the rows decoded with it: this one sampler is **not batch-invariant** (the
    vectors' ``d2`` run gives another output for its first row alone), and it is offered to reproduce the
    pipeline, not as a decoding of choice. Rows finished early keep the masks after their EOS, as the
    pipeline returns them.
    """

    coupled = True

    def __init__(self, diffusion: MaskedDiffusion, steps: int = 128, block_length: int = 32, threshold: float = 0.0,
                 edit_threshold: float = 1.0, max_post_steps: int = 16, eos_id: int | None = None, **knobs):
        if steps < 1 or block_length < 1 or not 0 <= threshold <= 1 or edit_threshold < 0 or max_post_steps < 0:
            raise SamplingError(f"steps and block_length >= 1, threshold in [0, 1], edit_threshold and max_post_steps "
                                f">= 0; got {steps}, {block_length}, {threshold}, {edit_threshold}, {max_post_steps}")
        super().__init__(diffusion, **knobs)
        self.steps, self.block_length, self.threshold = steps, block_length, threshold
        self.edit_threshold, self.max_post_steps, self.eos_id = edit_threshold, max_post_steps, eos_id

    @property
    def revises(self) -> bool:
        """Whether decoded tokens may be edited (``edit_threshold < 1``)."""
        return self.edit_threshold < 1

    def _decode(self, canvas: torch.Tensor, streams: RowStreams, denoise) -> Decoding:
        b, total = canvas.shape
        masked = canvas == self.mask_id
        first = torch.where(masked.any(dim=1), masked.float().argmax(dim=1), torch.full((b,), total))
        if not bool((first == first[0]).all()) or bool(masked[:, :int(first[0])].any()):
            raise SamplingError("diffusers' LLaDA2 pipeline decodes rows of one prompt length after which every "
                                "position is generated")
        prompt, size = int(first[0]), self.block_length
        blocks = -(-total // size)
        x = torch.cat([canvas, canvas.new_full((b, blocks * size - total), self.mask_id)], dim=1)
        counts = schedule(size, min(self.steps, total - prompt) or 1)
        finished = torch.zeros(b, dtype=torch.bool, device=x.device)
        row_nfe = torch.zeros(b, dtype=torch.long)
        call, rows = 0, torch.arange(b, device=x.device)
        for block in range(prompt // size, blocks):
            start, end = block * size, (block + 1) * size
            fixed = torch.arange(start, end, device=x.device) < prompt
            step, post = 0, 0
            while True:
                old = x[:, start:end].clone()
                active = old == self.mask_id
                remaining = bool(active.any())
                post += not remaining
                read = torch.zeros(b, end, dtype=torch.bool, device=x.device)
                read[:, start:] = True
                kwargs = {"positions": read}
                if end > total:  # the filled-up positions: causal attention without them
                    keep = torch.arange(end, device=x.device) < total
                    kwargs["layout"] = Layout(torch.arange(end, device=x.device),
                                              torch.ones(end, end, dtype=torch.bool, device=x.device).tril() & keep,
                                              end)
                logits = yield Forward(x[:, :end], kwargs)
                row_nfe += 1
                where = read[:, start:].nonzero()
                x0, p = drawn_candidates(logits.float(), streams, rows[where[:, 0]], call * PURPOSES + TOKEN,
                                         where[:, 1], self.temperature, self.top_k, self.top_p)
                candidate, confidence = x0.view(b, size), p.view(b, size)
                commit = torch.zeros_like(active)
                if remaining:
                    count = counts[min(step, len(counts) - 1)]
                    score = confidence.masked_fill(~active, float("-inf"))
                    high = score > self.threshold
                    commit = torch.where((high.sum(dim=1) >= count)[:, None], high,
                                         choose_per_row(score, active.sum(dim=1).clamp(max=count)))
                edit = ~active & ~fixed & (confidence > self.edit_threshold) & (candidate != old) & ~finished[:, None]
                change = (commit & ~finished[:, None]) | edit  # rows finished before this step are frozen
                new = torch.where(change, candidate, old)
                x[:, start:end] = new
                if self.eos_id is not None:
                    self._finish(x[:, :end], change & (new == self.eos_id), finished, prompt)
                call += 1
                step += remaining
                yield Frame(x[:, :total])
                if bool(finished.all()) or (not remaining and (not edit.any() or post > self.max_post_steps)) \
                        or (remaining and step >= len(counts)):
                    break
            if bool(finished.all()):
                break
        return Outcome(x[:, :total], row_nfe)

    def _finish(self, window: torch.Tensor, wrote_eos: torch.Tensor, finished: torch.Tensor, prompt: int) -> None:
        """Rows that just wrote an EOS finish when the first EOS of their window lies at or after the prompt
        and every position from the prompt to it is decoded."""
        for r in wrote_eos.any(dim=1).nonzero()[:, 0].tolist():
            eos = (window[r] == self.eos_id).nonzero()
            if len(eos) and int(eos[0]) >= prompt and not bool((window[r, prompt:int(eos[0])] == self.mask_id).any()):
                finished[r] = True
