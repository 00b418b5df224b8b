"""Block diffusion decoding (BD3-LM, Arriola et al. 2025): blocks left to right, any diffusion sampler inside
a block, an exact KV cache of the committed blocks."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from .. import rng
from ..models.common import BlockDiffusionCache, block_diffusion_layout
from ..objectives.base import unwrap
from .base import SamplingError, _autocast_dtype, stop_at_eos
from .engine import Decoding, Outcome, Sampler, relay


def _in_chunk(positions: torch.Tensor | None, rows: int, size: int, offset: int) -> torch.Tensor | None:
    """Output positions of a block (R, size) (a bool mask or flat indices) in a chunk whose block follows
    ``offset`` other tokens per row."""
    if positions is None or not offset:
        return positions
    if positions.dtype == torch.bool:
        return torch.cat([positions.new_zeros(rows, offset), positions], dim=1)
    return (positions // size) * (offset + size) + offset + positions % size


def _rows(rows: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor | None:
    """``rows`` for the cache, None when they are every row in order (slices instead of gathers)."""
    if len(rows) == len(canvas) and bool((rows == torch.arange(len(canvas), device=rows.device)).all()):
        return None
    return rows


class BlockContext:
    """The model as the inner sampler of block ``[start, start + size)`` sees it: the network on the block's
    canvas (R, size) for the batch rows ``rows`` (R,), conditioned on the committed blocks before it. The
    inner sampler is started with the context as its model (no soft-mask, no time conditioning); its
    denoiser calls carry the context, and the engine runs them through :meth:`bind` with the network and
    the decoding's cache. Denoisers pass the canvas rows they evaluate as ``rows``.

    With a cache (``cached``): the clean blocks ``[pending, start)`` of the batch rows ``alive`` are not in
    it yet; the first call that evaluates every alive row feeds them with the block and commits them (one
    call, no separate commit), else they are committed by a call of their own first (counted in
    ``extra_calls``). Without: the committed prefix is fed again with the block at every call (the
    two-stream pattern of clean prefix and noisy block; the same numbers up to float rounding)."""

    takes_rows = True  # the denoiser says which canvas rows a call is for
    soft_mask = None
    time_conditioning = False

    def __init__(self, canvas: torch.Tensor, rows: torch.Tensor, start: int, block_size: int, cached: bool,
                 pending: int = 0, alive: torch.Tensor | None = None):
        self.canvas, self.batch_rows, self.start = canvas, rows, start
        self.block_size, self.cached, self.pending, self.alive = block_size, cached, pending, alive
        self.model, self.cache = None, None
        self.extra_calls = 0

    def new_cache(self, model) -> BlockDiffusionCache:
        """The exact block cache of the whole canvas (every row, every position)."""
        net = unwrap(model)
        dtype = _autocast_dtype(self.canvas.device) or next(net.parameters()).dtype
        return net.new_cache(len(self.canvas), self.canvas.device, dtype, capacity=self.canvas.shape[1],
                             kind=BlockDiffusionCache)

    def bind(self, model, cache: BlockDiffusionCache | None) -> BlockContext:
        """The context calling ``model`` with the decoding's ``cache`` (None without one)."""
        self.model, self.cache = model, cache
        return self

    def __call__(self, ids: torch.Tensor, sigma: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        batch_rows = self.batch_rows if rows is None else self.batch_rows[rows]
        r, size = ids.shape
        if self.cache is None:
            return self._uncached(ids, positions, batch_rows)
        if self.pending < self.start and not bool(torch.isin(self.alive, batch_rows).all()):
            self.extra_calls += commit(self.model, self.cache, self.canvas, self.alive, self.pending, self.start,
                                       self.block_size)
            self.pending = self.start
        first = self.pending
        where = torch.arange(first, self.start + size, device=ids.device)
        layout = block_diffusion_layout(where, where < self.start, self.block_size, self.start + size)
        chunk = torch.cat([self.canvas[batch_rows, first:self.start], ids], dim=1)
        self.cache.rows, self.cache.length = _rows(batch_rows, self.canvas), first
        self.cache.commit = self.start - first
        self.cache.chunk_allowed = layout.allowed if first < self.start else None
        self.pending = self.start
        out = self.model(chunk, positions=_in_chunk(positions, r, size, self.start - first), cache=self.cache)
        return out if positions is not None else out[:, self.start - first:]

    def _uncached(self, ids, positions, batch_rows):
        r, size = ids.shape
        where = torch.arange(self.start + size, device=ids.device)
        layout = block_diffusion_layout(where, where < self.start, self.block_size, self.start + size)
        full = torch.cat([self.canvas[batch_rows, :self.start], ids], dim=1)
        out = self.model(full, positions=_in_chunk(positions, r, size, self.start), layout=layout)
        return out if positions is not None else out[:, self.start:]


def commit(model, cache: BlockDiffusionCache, x: torch.Tensor, rows: torch.Tensor, start: int, end: int,
           block_size: int) -> int:
    """Store the keys and values of the clean blocks ``[start, end)`` of ``rows`` in one call; returns 1."""
    where = torch.arange(start, end, device=x.device)
    cache.rows, cache.length, cache.commit = _rows(rows, x), start, end - start
    clean = torch.ones_like(where, dtype=torch.bool)
    cache.chunk_allowed = block_diffusion_layout(where, clean, block_size, end).allowed
    model(x[rows, start:end], positions=torch.zeros(0, dtype=torch.long, device=x.device), cache=cache)
    return 1


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
