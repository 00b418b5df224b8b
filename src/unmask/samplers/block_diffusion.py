"""Block diffusion decoding (BD3-LM, Arriola et al. 2025): blocks left to right, any diffusion sampler inside
a block, an exact KV cache of the committed blocks."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from .. import rng
from ..objectives.base import unwrap
from .base import SamplingError, stop_at_eos
from .engine import BlockContext, Decoding, Outcome, Sampler, relay


@dataclass(frozen=True)
class BlockSettings:
    """The keys of block diffusion, around the diffusion sampler that decodes inside each block."""

    kv_cache: bool = True  # keep the keys and values of the committed blocks (exact)
    stop_at_eos: bool = False  # stop a row at its first generated EOS (PAD after it)

    SWITCHES: ClassVar[tuple[str, ...]] = ("stop_at_eos",)


class BlockDiffusionSampler(Sampler):
    """BD3-LM's sampling. The canvas is cut into blocks of ``block_size`` positions (the model's); block by
    block, rows with masked positions in it run ``inner`` (any diffusion sampler: ancestral, first-hitting,
    confidence, llada with Fast-dLLM's threshold or factor rule...) on the block, seeing the committed blocks
    before it. With ``kv_cache`` the keys and values of committed blocks are cached: a finished block is
    committed by the first call of the next block, which feeds it with the noisy block (one call; BD3-LM's
    reference spends a call of its own on it), and runs of blocks without masks, such as a prompt, go in
    the same call. The cache is exact, so cached and uncached decoding give the same tokens (tested).
    Prompts of any length and ragged rows: a row's blocks without masked positions are only committed
    (by a call of their own when other rows have work there). With ``eos_id`` a row stops at its first
    generated EOS: the positions after it become PAD and the row is no longer evaluated. NFE counts every
    network call.
    """

    def __init__(self, inner: Sampler, block_size: int, kv_cache: bool = True, eos_id: int | None = None,
                 pad_id: int | None = None):
        if block_size < 1:
            raise SamplingError(f"block_size must be >= 1, got {block_size}")
        if eos_id is not None and pad_id is None:
            raise SamplingError("stopping at EOS needs a PAD id to fill the rest")
        self.inner, self.block_size, self.kv_cache = inner, block_size, kv_cache
        self.mask_id, self.eos_id, self.pad_id = inner.mask_id, eos_id, pad_id

    def start(self, model, canvas: torch.Tensor, seeds: torch.Tensor) -> Decoding:
        """Check ``canvas`` (B, L) and ``seeds`` (B,) and return the decoding of the class docstring (the canvas at
        most the model's length)."""
        self.check(canvas, seeds)
        if canvas.shape[1] > unwrap(model).cfg.length:
            raise SamplingError(f"a canvas of {canvas.shape[1]} positions exceeds the model's maximum length "
                                f"{unwrap(model).cfg.length}")
        return self._decode(canvas, seeds)

    def _decode(self, canvas: torch.Tensor, seeds: torch.Tensor) -> Decoding:
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
            context = BlockContext(x, rows, start, size, self.kv_cache, committed, alive)
            inner = self.inner.start(context, x[rows, start:end], rng.hash64(seeds.to(x.device)[rows], j))
            result = yield from relay(inner, call=lambda c: replace(c, context=context),
                                      frame=lambda f: f.placed(x, rows, start, end))
            x[rows, start:end] = result.tokens
            row_nfe[rows.cpu()] += result.row_nfe
            row_nfe[alive.cpu()] += context.extra_calls
            committed = context.pending
            if self.eos_id is not None:
                stop_at_eos(x, free, done, end, self.eos_id, self.pad_id)
        return Outcome(x, row_nfe)
