"""The decoding engine and the step-policy interface every sampler implements.

A sampler is a **step policy**: ``sampler.start(model, canvas, seeds)`` checks the request and returns a
decoding (a Python generator) that never calls the network. Each time it needs the network it yields a
*call* saying what to evaluate, and it is resumed with the output:

* :class:`Denoise`: logits at some positions of some rows of a diffusion canvas at times ``t`` (the
  denoiser of the decoding says its guidance and soft-mask feedback; a block-diffusion ``context`` says
  which committed blocks the rows see);
* :class:`Chunk`: a chunk of the canvas through the decoding's Fast-dLLM block cache (prefix or dual,
  recording or reading), or without a cache;
* :class:`Causal`: next-token logits of a causal model, through the decoding's KV cache or over the whole
  prefix;
* :class:`Forward`: the network's output on some ids as it is (insertion models, RL rollouts);
* :class:`Store`: block diffusion's committed blocks stored in the decoding's cache, alone (SDAR's calls);
* :class:`Encode` / :class:`DecodeCanvas`: an encoder-decoder canvas model (DiffusionGemma) encoding clean
  tokens into the decoding's encoder cache (not counted in NFE, as the reference counts: ``extra_calls``), and
  decoding a canvas of some rows against it.

It yields a :class:`Frame` after every step of its own (for streaming) and returns a :class:`Outcome`.

The :class:`DecodingEngine` owns everything around the policies: the network calls (guidance's second
pass, padding to a few shapes), the caches of each decoding (KV, Fast-dLLM, BD3's exact block cache),
NFE accounting, timing and ``on_step`` streaming. It holds any number of decodings (different requests,
samplers, canvases, step counts) and advances them together: :meth:`DecodingEngine.step` evaluates every
decoding's next call, the denoiser calls in **one batched forward** (canvases of different lengths packed
into one row, or padded, see :meth:`DecodingEngine.evaluate`), and advances each decoding by its own rule.
Each row's draws come from its own seed, so a decoding gives the same tokens alone or interleaved with
others (tested for every sampler). Calls through a cache (KV, Fast-dLLM's, BD3's) and calls of soft-mask
models take one forward per decoding in the same step: sharing those forwards needs per-row cache lengths.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.common import (
    BlockCache,
    BlockDiffusionCache,
    block_diffusion_layout,
    bucketed_positions,
    packed_layout,
)
from ..objectives.base import unwrap
from .base import SampleResult, SamplingError, StepCallback, _autocast_dtype
from .prefix_cache import PrefixCache, block_layout


@dataclass
class Denoise:
    """Logits (N, V) float32 at ``positions`` (R, L) bool (row-major) of canvases ``x`` (R, L) at diffusion
    times ``t`` (R,) float64; ``rows`` (R,) are the rows of ``denoiser``'s canvas (its guidance prompt and
    soft-mask feedback); ``context`` (a :class:`BlockContext`): the rows
    are a block that sees the committed blocks before it."""

    denoiser: Any
    x: torch.Tensor
    t: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor
    context: Any = None


@dataclass
class Chunk:
    """Fast-dLLM's cached decoding: logits float32 of ``ids`` (B, Lc), the canvas from position ``length``
    on, through the decoding's block cache of ``mode`` (prefix or dual; ``record``: store every layer's keys
    and values, ``length`` 0), or without a cache (``mode`` None): (B, Lc, V), or (N, V) at the ``positions``
    (B, Lc) bool the decoding reads, row-major (the output layer runs only there)."""

    ids: torch.Tensor
    mode: str | None
    record: bool = False
    length: int = 0
    positions: torch.Tensor | None = None


@dataclass
class Causal:
    """A causal model's next-token logits (B, V) after ``ids`` (B, n): the new tokens through the decoding's
    KV cache of ``capacity`` positions (``cached``), or the whole prefix."""

    ids: torch.Tensor
    cached: bool
    capacity: int = 0


@dataclass
class Forward:
    """The network's output on ``ids`` with keyword arguments ``kwargs``, as it is."""

    ids: torch.Tensor
    kwargs: dict = field(default_factory=dict)


@dataclass
class Store:
    """Block diffusion: the keys and values of the clean positions ``[context.pending, end)`` of the
    context's rows stored in the decoding's block cache by a call of their own (no output)."""

    context: Any
    end: int


@dataclass
class Encode:
    """Encode ``ids`` (B, n) of every row after its encoded tokens into the decoding's encoder cache;
    ``valid`` (B, n): which are tokens (the rest is padding). No output."""

    ids: torch.Tensor
    valid: torch.Tensor


@dataclass
class DecodeCanvas:
    """Logits (R, C, V) float32 of the canvas ``x`` (R, C) of batch rows ``rows`` (R,) at each row's next
    positions, against the encoder cache; ``self_conditioning`` (R, C, V): the previous step's logits."""

    x: torch.Tensor
    rows: torch.Tensor
    self_conditioning: torch.Tensor | None = None


Call = Denoise | Chunk | Causal | Forward | Store | Encode | DecodeCanvas


@dataclass
class Frame:
    """A step's canvas (B, L) for ``on_step`` (a view the receiver copies if it keeps it), or a function that
    makes it (composed only when someone streams)."""

    canvas: torch.Tensor | Callable[[], torch.Tensor]

    def view(self) -> torch.Tensor:
        """The canvas (B, L), composed now if the frame holds a function."""
        return self.canvas() if callable(self.canvas) else self.canvas

    def placed(self, canvas: torch.Tensor, rows: torch.Tensor, start: int, end: int) -> Frame:
        """This frame, a window (R, end - start) of ``rows`` (R,), shown in place in the whole ``canvas``."""
        def view() -> torch.Tensor:
            full = canvas.clone()
            full[rows, start:end] = self.view()
            return full
        return Frame(view)


@dataclass
class Outcome:
    """What a decoding returns: ``tokens`` (B, L), evaluations of each row ``row_nfe`` (B,), generated
    positions (``None``: the masked positions of the input canvas)."""

    tokens: torch.Tensor
    row_nfe: torch.Tensor
    generated: int | None = None
    row_tokens: torch.Tensor | None = None  # (B,) tokens each row generated (for tokens per forward)


Decoding = Generator["Call | Frame", Any, Outcome]


class Sampler:
    """A step policy (module docstring). Subclasses implement :meth:`start`; ``sample`` runs one decoding
    through a :class:`DecodingEngine`.

    ``on_step`` (optional) is called with the canvas (B, L) after every step, for streaming; it must copy
    what it keeps and must not modify it.
    """

    mask_id: int
    coupled = False  # True: the rows of a canvas are decoded together (a reference's literal mode), not alone

    @property
    def revises(self) -> bool:
        """Whether a revealed token may still change before the decoding ends (remasking, editing, renoising):
        only where it may not is a revealed token final as soon as it shows (what a stream may commit)."""
        return False

    @property
    def holds_cache(self) -> bool:
        """Whether a decoding keeps keys and values between its calls (a KV, Fast-dLLM, block-diffusion or
        encoder cache, see :class:`Handle`), which a server counts against its memory budget."""
        return False

    def cache_positions(self, length: int) -> int:
        """Positions per row the caches of a decoding of a canvas of ``length`` may hold (0: it keeps none)."""
        return length if self.holds_cache else 0

    def start(self, model, canvas: torch.Tensor, seeds: torch.Tensor) -> Decoding:
        """Check the request and return its decoding; ``model`` is read (its kind, its caches' shapes),
        never called."""
        raise NotImplementedError

    def sample(self, model, canvas: torch.Tensor, seeds: torch.Tensor,
               on_step: StepCallback | None = None) -> SampleResult:
        """Decode ``canvas`` (B, L) with one seed per row (B,) through a fresh :class:`DecodingEngine`; ``on_step``
        gets the canvas after every step."""
        engine = DecodingEngine(model)
        handle = engine.add(self, canvas, seeds, on_step)
        engine.run()
        return handle.result

    def check(self, canvas: torch.Tensor, seeds: torch.Tensor) -> None:
        """Raise a :class:`SamplingError` unless ``canvas`` is a non-empty (B, L) tensor and ``seeds`` is (B,)."""
        if canvas.dim() != 2 or canvas.shape[0] == 0 or canvas.shape[1] == 0:
            raise SamplingError(f"the canvas must be a non-empty (batch, length) tensor, got shape "
                                f"{tuple(canvas.shape)}")
        if seeds.shape != (canvas.shape[0],):
            raise SamplingError(f"need one seed per row: {canvas.shape[0]} rows, seeds of shape {tuple(seeds.shape)}")


def relay(decoding: Decoding, call: Callable[[Call], Call] | None = None,
          frame: Callable[[Frame], Frame | None] | None = None) -> Generator[Call | Frame, Any, Outcome]:
    """Run an inner decoding inside an outer one (``yield from``, with its calls and frames rewritten by
    ``call`` and ``frame``; a frame rewritten to None is dropped)."""
    try:
        item = next(decoding)
        while True:
            if isinstance(item, Frame):
                shown = item if frame is None else frame(item)
                if shown is not None:
                    yield shown
                item = decoding.send(None)
            else:
                item = decoding.send((yield item if call is None else call(item)))
    except StopIteration as stop:
        return stop.value


class Handle:
    """One decoding in an engine: ``result`` (a :class:`SampleResult`, its ``seconds`` the wall time from
    :meth:`DecodingEngine.add` to the end) once ``done``; ``nfe`` so far; the decoding's ``caches``."""

    def __init__(self, decoding: Decoding, canvas: torch.Tensor, mask_id: int, on_step: StepCallback | None):
        self.decoding, self.on_step, self.started = decoding, on_step, time.perf_counter()
        self.masked = int((canvas == mask_id).sum())
        self.caches: dict[Any, Any] = {}
        self.prompt_to_store: tuple[list[int], int] | None = None  # block diffusion: (prompt ids, row) to share
        self.nfe, self.extra_calls, self.done = 0, 0, False
        self.result: SampleResult | None = None
        self.call: Call | None = None

    def cache_bytes(self) -> int:
        """Bytes held by the decoding's caches now (every tensor they keep)."""
        return sum(tensor_bytes(cache) for cache in self.caches.values())

    def advance(self, output) -> None:
        """Resume the decoding with ``output`` until its next call (frames go to ``on_step``) or its end."""
        try:
            item = self.decoding.send(output)
            while isinstance(item, Frame):
                if self.on_step is not None:
                    self.on_step(item.view())
                item = self.decoding.send(None)
            self.call = item
        except StopIteration as stop:
            outcome: Outcome = stop.value
            self.done, self.call = True, None
            generated = self.masked if outcome.generated is None else outcome.generated
            self.result = SampleResult(outcome.tokens, self.nfe, outcome.row_nfe, time.perf_counter() - self.started,
                                       generated, outcome.row_tokens, self.extra_calls)


def tensor_bytes(obj, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` through its attributes, lists, tuples and
    dicts (a cache object)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return tensor_bytes(vars(obj), seen)
    return 0


# ------------------------------------------------------------ block diffusion: the network a block sees


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
    ``extra_calls``); with ``separate`` always by a call of their own (and the block, once decoded, by a
    :class:`Store` call). Without: the committed prefix is fed again with the block at every call (the
    two-stream pattern of clean prefix and noisy block; the same numbers up to float rounding)."""

    takes_rows = True  # the denoiser says which canvas rows a call is for
    soft_mask = None
    time_conditioning = False

    def __init__(self, canvas: torch.Tensor, rows: torch.Tensor, start: int, block_size: int, cached: bool,
                 pending: int = 0, alive: torch.Tensor | None = None, separate: bool = False):
        self.canvas, self.batch_rows, self.start = canvas, rows, start
        self.block_size, self.cached, self.pending, self.alive = block_size, cached, pending, alive
        self.separate = separate
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
        """Logits of the block canvas ``ids`` (R, size) for batch rows ``rows`` given the committed blocks:
        (R, size, V), or (N, V) at ``positions``; through the cache when bound to one."""
        batch_rows = self.batch_rows if rows is None else self.batch_rows[rows]
        r, size = ids.shape
        if self.cache is None:
            return self._uncached(ids, positions, batch_rows)
        if self.pending < self.start and (self.separate or not bool(torch.isin(self.alive, batch_rows).all())):
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
        self.cache.rows = self.cache.chunk_allowed = None  # a call's own, not kept between steps
        return out if positions is not None else out[:, self.start - first:]

    def store(self, end: int) -> None:
        """Store the clean positions ``[pending, end)`` of the alive rows in the cache (a :class:`Store` call)."""
        commit(self.model, self.cache, self.canvas, self.alive, self.pending, end, self.block_size)
        self.pending = end

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
    cache.rows = cache.chunk_allowed = None
    return 1


class DecodingEngine:
    """Runs decodings of step policies on ``model`` (module docstring)."""

    def __init__(self, model, prefixes: PrefixCache | None = None):
        self.model, self.prefixes = model, prefixes  # prefixes: causal prompts' keys and values shared
        self.handles: list[Handle] = []  # the decodings added and not yet returned by a step

    @torch.no_grad()
    def add(self, sampler: Sampler, canvas: torch.Tensor, seeds: torch.Tensor,
            on_step: StepCallback | None = None) -> Handle:
        """Start decoding ``canvas`` (B, L) with ``sampler`` and per-row ``seeds`` (B,); the request is
        checked here (a :class:`SamplingError`) and the decoding runs up to its first call."""
        handle = Handle(sampler.start(self.model, canvas, seeds), canvas, sampler.mask_id, on_step)
        handle.advance(None)  # a generator starts with send(None)
        self.handles.append(handle)
        return handle

    def remove(self, handle: Handle) -> None:
        """Abandon a decoding (a cancelled request): it leaves the engine with its caches, unfinished."""
        if handle in self.handles:
            self.handles.remove(handle)
        handle.decoding.close()
        handle.caches.clear()

    @property
    def active(self) -> list[Handle]:
        """The decodings not done yet."""
        return [h for h in self.handles if not h.done]

    @torch.no_grad()
    def step(self) -> list[Handle]:
        """One network evaluation for every unfinished decoding (denoiser calls on canvases of one length
        share a forward), then each advances to its next call. Returns the decodings that finished; they
        leave the engine (their handles keep the results)."""
        return self._step()

    def _step(self) -> list[Handle]:
        active = self.active
        outputs = [self._alone(active[0])] if len(active) == 1 else self.evaluate(active)
        for handle, output in zip(active, outputs):
            handle.advance(output)
        finished = [h for h in self.handles if h.done]
        if finished:
            self.handles = [h for h in self.handles if not h.done]
        return finished

    @torch.no_grad()
    def run(self) -> list[SampleResult]:
        """Step until every decoding is done; the results of the decodings in the engine when called, in
        the order they were added."""
        pending = list(self.handles)
        while self.handles:
            self._step()
        return [h.result for h in pending]

    # --------------------------------------------------------------------------------------- network calls

    def evaluate(self, handles: list[Handle]) -> list[Any]:
        """The outputs of the handles' pending calls: denoiser calls without a block context or soft-mask
        feedback (which are per canvas row) in one forward: of every length for a network that packs (``packs``:
        the canvases one after another in one row, see :meth:`denoise`), else per :func:`length_bucket` for one
        that takes a key padding mask (``KEY_PADDING``: shorter canvases padded, their padding hidden from every
        query), else per canvas length; the other calls alone."""
        outputs: list[Any] = [None] * len(handles)
        groups: dict[Any, list[int]] = {}
        net = unwrap(self.model)
        packs, ragged = getattr(net, "packs", False), getattr(net, "KEY_PADDING", False)
        for i, h in enumerate(handles):
            call = h.call
            shared = isinstance(call, Denoise) and call.context is None and call.denoiser.feedback is None
            if shared:
                length = call.x.shape[1]
                key = 0 if packs else length_bucket(length) if ragged else length
                groups.setdefault(("denoise", key), []).append(i)
            else:
                groups[i] = [i]
        for members in groups.values():
            if len(members) == 1:
                outputs[members[0]] = self._alone(handles[members[0]])
                continue
            for i, out in zip(members, self.denoise([handles[i].call for i in members])):
                outputs[i] = out
                handles[i].nfe += 1
        return outputs

    def _alone(self, handle: Handle) -> Any:
        call = handle.call
        if isinstance(call, Denoise):
            handle.nfe += 1
            if call.context is None:
                return self.denoise([call])[0]
            net = call.context.bind(self.model, self._block_cache(handle, call.context))
            before = net.extra_calls
            out = self.denoise([call], net)[0]
            handle.nfe += net.extra_calls - before
            if handle.prompt_to_store is not None and net.pending >= len(handle.prompt_to_store[0]):
                ids, row = handle.prompt_to_store  # the prompt's clean blocks are in the cache now: share them
                self.prefixes.store(ids, net.cache, net.block_size, block_layout(net.block_size), row)
                handle.prompt_to_store = None
            return out
        if isinstance(call, Encode):
            cache = handle.caches.get("encoder")
            if cache is None:
                cache = handle.caches["encoder"] = unwrap(self.model).new_encoder_cache(len(call.ids), call.ids.device)
            if call.ids.shape[1]:  # (unconditional rows start with nothing to encode)
                handle.extra_calls += 1
                self.model(call.ids, cache=cache, encode=True, valid=call.valid)
            return None
        handle.nfe += 1
        if isinstance(call, DecodeCanvas):
            return self.model(call.x, cache=handle.caches["encoder"], rows=call.rows,
                              self_conditioning=call.self_conditioning)
        if isinstance(call, Store):
            call.context.bind(self.model, self._block_cache(handle, call.context)).store(call.end)
            return None
        if isinstance(call, Chunk):
            if call.mode is None:
                return self.model(call.ids, positions=call.positions).float()
            cache = handle.caches.get(call.mode)
            if cache is None:
                cache = handle.caches[call.mode] = BlockCache(call.mode)
            cache.recording, cache.length = call.record, call.length
            return self.model(call.ids, cache=cache, positions=call.positions).float()
        if isinstance(call, Causal):
            if not call.cached:
                return self.model(call.ids)[:, -1]
            cache = handle.caches.get("kv")
            if cache is None:
                cache = handle.caches["kv"] = self._kv_cache(call)
                if self.prefixes is not None:  # a prefill: stored prompt blocks are copied, not computed
                    return self.prefixes.prefill(self.model, call.ids, cache)[:, -1]
            return self.model(call.ids, cache=cache)[:, -1]
        if isinstance(call, Forward):
            return self.model(call.ids, **call.kwargs)
        raise TypeError(f"a decoding yielded {type(call).__name__}, not a call")

    def _block_cache(self, handle: Handle, context: BlockContext) -> BlockDiffusionCache | None:
        """The decoding's exact block cache (made at its first use), or None for an uncached context."""
        if not context.cached:
            return None
        cache = handle.caches.get("block_diffusion")
        if cache is None:
            cache = handle.caches["block_diffusion"] = context.new_cache(self.model)
            if self.prefixes is not None:
                self._reuse_prompt(handle, context, cache)
        return cache

    def _reuse_prompt(self, handle: Handle, context: BlockContext, cache: BlockDiffusionCache) -> None:
        """Block diffusion with a prefix cache: the clean blocks before the first decoded one (the prompt, when
        every row has the same) come from the cache as far as it has them, and are shared once committed."""
        prompt = context.canvas[context.alive, :context.start]
        if context.pending or not prompt.numel() or not bool((prompt == prompt[:1]).all()):
            return
        ids = prompt[0].tolist()
        found = self.prefixes.restore(ids, cache, context.block_size, block_layout(context.block_size))
        context.pending = found
        self.prefixes.reused += found * len(prompt)
        self.prefixes.computed += (len(ids) - found) * len(prompt)
        handle.prompt_to_store = (ids, int(context.alive[0]))

    def _kv_cache(self, call: Causal):
        device = call.ids.device
        dtype = _autocast_dtype(device) or next(self.model.parameters()).dtype
        return self.model.new_cache(call.ids.shape[0], device, dtype, capacity=call.capacity)

    @torch.no_grad()
    def denoise(self, calls: list[Denoise], net=None) -> list[torch.Tensor]:
        """Denoiser calls in one forward (two with guidance); each call gets its own logits back. Canvases of
        one length: their rows concatenated and padded up to a multiple of ``rows / 8`` with copies of the first
        row (a handful of shapes, see :func:`bucketed_positions`). Of several lengths: packed into one row (a
        network that ``packs``: every canvas row attends to itself alone, so it gets the logits it gets alone,
        see :func:`~unmask.models.common.packed_layout`), else right-padded under a key padding mask."""
        net = self.model if net is None else net
        prepared = [c.denoiser.prepare(c) for c in calls]
        quantum = max(1, math.ceil(sum(c.denoiser.batch for c in calls) / 8))
        # one call alone keeps its rows: a block context and soft-mask feedback are per canvas row
        rows = calls[0].rows if len(calls) == 1 else None
        feedback = calls[0].denoiser.feedback if len(calls) == 1 else None
        width = max(p.x.shape[1] for p in prepared)
        packs = getattr(unwrap(net), "packs", False) and any(p.x.shape[1] != width for p in prepared)

        def forward(members: list[Any], inputs: list[torch.Tensor]) -> torch.Tensor:
            positions = [p.positions for p in members]
            if packs:
                return _packed_forward(net, inputs, positions)
            return self._forward(net, *_ragged(inputs, positions, width), _joined([p.sigma for p in members]),
                                 rows, feedback, quantum)

        logits = forward(prepared, [p.x for p in prepared])
        counts = [int(p.positions.sum()) for p in prepared] if len(calls) > 1 else [len(logits)]
        parts = list(logits.split(counts))
        guided = [i for i, p in enumerate(prepared) if p.unconditional is not None]
        if guided:
            l_u = forward([prepared[i] for i in guided], [prepared[i].unconditional for i in guided])
            for i, part_u in zip(guided, l_u.split([counts[i] for i in guided])):
                parts[i] = prepared[i].guide(parts[i], part_u)
        return [c.denoiser.finish(p, part) for c, p, part in zip(calls, prepared, parts)]

    @staticmethod
    def _forward(net, x, positions, keep, sigma, rows, feedback, quantum: int) -> torch.Tensor:
        """The network at ``positions`` of ``x`` (R, L), its rows padded to a multiple of ``quantum`` with
        copies of the first (whose outputs are not read); ``feedback``: the soft-mask feedback of ``rows``;
        ``keep`` (R, L) bool: the key padding mask of ragged rows (None: every position is a token)."""
        pad = -(-len(x) // quantum) * quantum - len(x)
        if pad:
            x, sigma, positions = (torch.cat([v, v[:1].expand(pad, *v.shape[1:])]) for v in (x, sigma, positions))
            positions[-pad:] = False
            if keep is not None:
                keep = torch.cat([keep, keep[:1].expand(pad, -1)])
            if rows is not None:
                rows = torch.cat([rows, rows[:1].expand(pad)])
        index, n = bucketed_positions(positions)
        extra = {} if feedback is None else {"feedback": feedback.select(rows)}
        if keep is not None:
            extra["keep"] = keep
        if getattr(net, "takes_rows", False):
            extra["rows"] = rows
        return net(x, sigma, positions=index, **extra)[:n].float()


PACKED_STEPS_PER_OCTAVE = 16  # a packed row's length is rounded up to one of 16 sizes per power of two


def _packed_forward(net, xs: list[torch.Tensor], positions: list[torch.Tensor]) -> torch.Tensor:
    """The logits (N, V) float32 at ``positions`` of the canvases ``xs`` (R_i, L_i) (row-major, canvas after
    canvas) from one forward of a network that packs: every canvas row one after another in one row, each its
    own sequence (:func:`~unmask.models.common.packed_layout`), the row's length rounded up to one of
    :data:`PACKED_STEPS_PER_OCTAVE` sizes per power of two (or a multiple of the longest canvas) by a sequence
    of padding tokens of its own (a handful of shapes, as :func:`bucketed_positions` keeps them). ``sigma`` is
    not read: a packing network has no time conditioning."""
    lengths = [x.shape[1] for x in xs for _ in range(len(x))]
    total = sum(lengths)
    quantum = max(1, min(length_bucket(total) // PACKED_STEPS_PER_OCTAVE, max(lengths)))  # (padding < a canvas)
    pad = -(-total // quantum) * quantum - total
    device = xs[0].device
    ids = torch.cat([x.reshape(-1) for x in xs] + ([xs[0].new_zeros(pad)] if pad else []))
    wanted = torch.cat([p.reshape(-1) for p in positions] + ([positions[0].new_zeros(pad)] if pad else []))
    layout = packed_layout(lengths + ([pad] if pad else []), device)
    index, n = bucketed_positions(wanted[None])
    return net(ids[None], None, positions=index, layout=layout)[:n].float()


def length_bucket(length: int) -> int:
    """The power of two at or above ``length``: canvases of one bucket share a forward when the network takes a
    key padding mask, so no row is padded to more than twice its length."""
    return 1 << max(0, length - 1).bit_length()


def _ragged(xs: list[torch.Tensor], positions: list[torch.Tensor],
            width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Canvases ``xs`` (R_i, L_i) and their output ``positions`` joined into (R, ``width``), the shorter ones
    right-padded (token 0, never an output position), and the key padding mask (R, width) that hides the
    padding (None when every canvas is ``width`` long)."""
    if all(x.shape[1] == width for x in xs):
        return _joined(xs), _joined(positions), None
    def pad(x, fill):
        return x if x.shape[1] == width else torch.cat([x, x.new_full((len(x), width - x.shape[1]), fill)], dim=1)
    keep = torch.cat([pad(torch.ones_like(p), False) for p in positions])
    return torch.cat([pad(x, 0) for x in xs]), torch.cat([pad(p, False) for p in positions]), keep


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated along the rows (the one tensor itself, not a copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
