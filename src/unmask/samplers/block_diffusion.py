"""Block diffusion decoding (BD3-LM, Arriola et al. 2025): blocks left to right, any diffusion sampler inside
a block, an exact KV cache of the committed blocks."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from .. import rng
from ..objectives.base import unwrap
from .base import SamplingError, stop_at_eos
from .engine import BlockContext, Decoding, Outcome, Sampler, Store, relay

COMMIT_CALLS = ("joint", "separate")  # how finished blocks enter the KV cache
AFTER_STOP = ("pad", "keep")  # what follows a row's stop


@dataclass(frozen=True)
class BlockSettings:
    """The keys of block diffusion, around the diffusion sampler that decodes inside each block."""

    kv_cache: bool = True  # keep the keys and values of the committed blocks (exact)
    stop_at_eos: bool = False  # stop a row after the block that holds its first generated EOS
    block_size: int = 0  # positions per decoded block (0: the model's model.block_size)
    commit_calls: str = "joint"  # a decoded block enters the cache with the next block's first call, or alone
    after_stop: str = "pad"  # stop_at_eos: PAD after the EOS, or keep the block as decoded (later blocks masked)
    stop_ids: list[int] = field(default_factory=list)  # stop_at_eos: more ids that stop a row as EOS does

    RANGES: ClassVar[dict[str, str]] = {"block_size": "[0, inf)"}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"commit_calls": COMMIT_CALLS, "after_stop": AFTER_STOP}
    SWITCHES: ClassVar[tuple[str, ...]] = ("stop_at_eos", "block_size", "commit_calls", "after_stop", "stop_ids")


class BlockDiffusionSampler(Sampler):
    """BD3-LM's sampling. The canvas is cut into blocks of ``block_size`` positions (the model's); block by
    block, rows with masked positions in it run ``inner`` (any diffusion sampler: ancestral, first-hitting,
    confidence, llada with Fast-dLLM's threshold or factor rule, SDAR's...) on the block, seeing the
    committed blocks before it. A canvas whose length is not a multiple of ``block_size`` is decoded with its
    last block filled up with masked positions (as SDAR and LLaDA2 decode; the model is trained on whole
    blocks), which are dropped from the result, where the model's length allows. With ``kv_cache`` the keys
    and values of committed blocks are cached. ``commit_calls="joint"``: a finished block is committed by
    the first call of the next block, which feeds it with the noisy block (one call), and runs of blocks
    without masks, such as a prompt, go in the same call; ``"separate"``: the blocks before the first one
    decoded are stored by a call of their own, and so is every block once decoded, the last one included
    (SDAR's and BD3-LM's reference code: more calls, the same tokens). The cache is exact, so cached and
    uncached decoding give the same tokens (tested). Prompts of any length and ragged rows: a row's blocks
    without masked positions are only committed (by a call of their own when other rows have work there).
    With ``eos_id`` a row stops after the block that holds its first generated EOS: ``after_stop="pad"``
    makes the positions after that EOS PAD; ``"keep"`` leaves that block as decoded and the later blocks
    masked (SDAR's ``stopping_criteria_idx``); ``eos_id`` may be several ids (a stop list: any of them stops a
    row). A stopped row is no longer evaluated. NFE counts every
    network call.
    """

    def __init__(self, inner: Sampler, block_size: int, kv_cache: bool = True,
                 eos_id: int | tuple[int, ...] | None = None, pad_id: int | None = None, commit_calls: str = "joint",
                 after_stop: str = "pad"):
        if block_size < 1:
            raise SamplingError(f"block_size must be >= 1, got {block_size}")
        if eos_id is not None and pad_id is None and after_stop == "pad":
            raise SamplingError("stopping at EOS needs a PAD id to fill the rest")
        if commit_calls not in COMMIT_CALLS or after_stop not in AFTER_STOP:
            raise SamplingError(f"commit_calls is one of {', '.join(COMMIT_CALLS)} and after_stop one of "
                                f"{', '.join(AFTER_STOP)}; got {commit_calls!r} and {after_stop!r}")
        self.inner, self.block_size, self.kv_cache = inner, block_size, kv_cache
        self.mask_id, self.eos_id, self.pad_id = inner.mask_id, eos_id, pad_id
        self.separate, self.after_stop = commit_calls == "separate", after_stop

    @property
    def revises(self) -> bool:
        """Whether the inner sampler revises revealed tokens."""
        return self.inner.revises

    @property
    def holds_cache(self) -> bool:
        """Whether a decoding keeps a cache between calls (its own or the inner sampler's)."""
        return self.kv_cache or self.inner.holds_cache

    def cache_positions(self, length: int) -> int:
        """The canvas filled up to whole blocks, when a decoding keeps a cache."""
        return -(-length // self.block_size) * self.block_size if self.holds_cache else 0

    def start(self, model, canvas: torch.Tensor, seeds: torch.Tensor) -> Decoding:
        """Check ``canvas`` (B, L) and ``seeds`` (B,) and return the decoding of the class docstring (the canvas at
        most the model's length)."""
        self.check(canvas, seeds)
        limit = unwrap(model).cfg.length
        if canvas.shape[1] > limit:
            raise SamplingError(f"a canvas of {canvas.shape[1]} positions exceeds the model's maximum length "
                                f"{limit}")
        return self._decode(canvas, seeds, limit)

    def _decode(self, canvas: torch.Tensor, seeds: torch.Tensor, limit: int) -> Decoding:
        length = canvas.shape[1]
        fill = -length % self.block_size  # the last block filled up, where the model's length allows
        fill = fill if length + fill <= limit else 0
        canvas = torch.cat([canvas, canvas.new_full((len(canvas), fill), self.mask_id)], dim=1)
        b, n = canvas.shape
        x, free = canvas.clone(), canvas == self.mask_id
        done = torch.zeros(b, dtype=torch.bool, device=x.device)
        row_nfe = torch.zeros(b, dtype=torch.long)
        size = self.block_size
        committed = 0  # positions whose keys and values are in the cache (for every row still going)
        for j in range(-(-n // size)):
            start, end = j * size, min((j + 1) * size, n)
            alive = (~done).nonzero()[:, 0]
            if not len(alive):
                break
            rows = alive[(x[alive, start:end] == self.mask_id).any(dim=1)]
            if not len(rows):
                continue
            context = BlockContext(x, rows, start, size, self.kv_cache, committed, alive, separate=self.separate)
            inner = self.inner.start(context, x[rows, start:end], rng.hash64(seeds.to(x.device)[rows], j))
            result = yield from relay(inner, call=lambda c: replace(c, context=context),
                                      frame=lambda f: f.placed(x, rows, start, end))
            x[rows, start:end] = result.tokens
            row_nfe[rows.cpu()] += result.row_nfe
            committed = context.pending
            if self.separate and self.kv_cache:  # the decoded block is stored by a call of its own
                yield Store(context, end)
                context.extra_calls += 1
                committed = end
            row_nfe[alive.cpu()] += context.extra_calls
            if self.eos_id is not None:
                stop_at_eos(x, free, done, end, self.eos_id, self.pad_id if self.after_stop == "pad" else None)
        return Outcome(x[:, :length], row_nfe)
