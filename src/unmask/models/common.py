"""What every backbone shares: rotary positions, the KV cache of causal decoding, and the selection of
output positions.

Rotary embedding (Su et al. 2021), the non-interleaved "rotate-half" layout of MDLM, GPT-NeoX, Llama,
LLaDA and Qwen2: for a head vector ``x = [x1, x2]`` (two halves of d/2) at position ``p``,
``x' = x * cos(p w) + [-x2, x1] * sin(p w)`` with ``w = [w_0 .. w_{d/2-1}, w_0 .. w_{d/2-1}]`` and
``w_k = base^(-2k/d)``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

FIRST_TABLE = 4096  # rotary positions built at the first call (more as longer calls come)


class Rotary(nn.Module):
    """The cos/sin table of the rotary embedding, built for the positions asked for and sliced: at first
    for :data:`FIRST_TABLE` positions (at most ``max_length``, at least the length asked for), then
    doubled when a longer call comes, so a KV-cached decoder asking for one more position at every step
    rebuilds it a logarithmic number of times, and a model whose config allows 10^8 positions does not
    build a table of 10^8 rows before its first short call. It is also rebuilt on another device or when
    ``inv_freq`` is overwritten (loading a checkpoint); ``builds`` counts the builds. ``persistent``:
    whether ``inv_freq`` is part of the state dict (MDLM's checkpoints carry it; Llama-style ones do not)."""

    def __init__(self, head_dim: int, base: float = 10000.0, max_length: int = 0, persistent: bool = True):
        super().__init__()
        self.head_dim, self.base, self.max_length, self.builds = head_dim, base, max_length, 0
        self.register_buffer("inv_freq", self.frequencies(), persistent=persistent)
        self._cache: tuple[tuple, int, torch.Tensor, torch.Tensor] | None = None

    def frequencies(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``base^(-2k/d)``, k = 0 .. d/2 - 1, float32."""
        return 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))

    def reset(self, device: torch.device | str) -> None:
        """Recompute ``inv_freq`` on ``device`` (after the model was made on the meta device)."""
        self.inv_freq = self.frequencies(device)
        self._cache = None

    def forward(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (length, head_dim) of positions 0 .. length-1, float32."""
        key = (device, self.inv_freq._version)
        if self._cache is None or self._cache[0] != key or self._cache[1] < length:
            built = self._cache[1] if self._cache is not None else 0
            size = max(length, min(self.max_length, max(FIRST_TABLE, 2 * built)))
            t = torch.arange(size, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device=device, dtype=torch.float32))
            emb = torch.cat([freqs, freqs], dim=-1)
            self._cache = (key, size, emb.cos(), emb.sin())
            self.builds += 1
        return self._cache[2][:length], self._cache[3][:length]


def apply_rotary(x, cos, sin):
    """Rotate-half rotary embedding ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``
    (x1, x2 the two halves of the last dimension), computed as ``roll(x, d/2) * [-sin1, sin2]``: the
    same values with one elementwise pass fewer. cos/sin (..., d) broadcast against x (..., d)."""
    half = x.shape[-1] // 2
    signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).to(x.dtype)
    return x * cos.to(x.dtype) + x.roll(half, dims=-1) * signed


class KVCache:
    """Keys and values of the tokens a causal model has seen, per block: (B, kv_heads, capacity, d).
    ``length``: the position of the next token; ``advance(n)`` after a call on ``n`` new tokens."""

    bidirectional = False  # exact for causal models only

    def __init__(self, blocks: int, batch: int, heads: int, head_dim: int, capacity: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (batch, heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(blocks)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(blocks)]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new keys/values; return all keys/values so far and the attention mask of the
        new queries (``None`` when a plain full or causal pattern applies)."""
        start, new = self.length, k.shape[2]
        end = start + new
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        mask = None
        if new > 1:  # query i (absolute position start+i) sees keys 0..start+i
            mask = torch.ones(new, end, dtype=torch.bool, device=k.device).tril(diagonal=start)
        return self.keys[layer][:, :, :end].to(k.dtype), self.values[layer][:, :, :end].to(k.dtype), mask

    def advance(self, n: int) -> None:
        """Move the next position ``length`` past the ``n`` tokens of the last call."""
        self.length += n


class BlockCache:
    """Fast-dLLM's approximate caches for a bidirectional model decoding a canvas block by block (Wu et al.
    2025). A call with ``recording`` on the whole canvas stores every layer's keys and values (after
    rotary). Later calls feed a chunk starting at position ``length`` for the batch rows ``rows``:

    * ``prefix``: the chunk is the canvas from the block's start to its end; its queries attend to the
      stored keys/values of the positions before it and to the chunk's own fresh ones;
    * ``dual``: the chunk is the block; its fresh keys/values replace the stored ones at its positions and
      its queries attend to all stored positions (those after the block are as of the last recording).

    The stale keys/values make this an approximation (the canvas changed since the recording); the
    cache is refreshed by recording again, at every block's start."""

    bidirectional = True

    def __init__(self, mode: str):
        if mode not in ("prefix", "dual"):
            raise ValueError(f"block cache mode must be prefix or dual, got {mode!r}")
        self.mode, self.keys, self.values = mode, {}, {}
        self.recording, self.length = True, 0
        self.rows: torch.Tensor | None = None  # the batch rows of the next call (None: all)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Keys and values (B, kv_heads, Lk, d) the chunk's queries attend to, after storing ``k``, ``v``
        (B, kv_heads, Lc, d) as ``recording`` and ``mode`` say (class docstring); no mask."""
        if self.recording:  # copies: views would keep the whole projection (queries too) alive
            self.keys[layer], self.values[layer] = k.contiguous().clone(), v.contiguous().clone()
            return k, v, None
        rows = slice(None) if self.rows is None else self.rows
        start, end = self.length, self.length + k.shape[2]
        if self.mode == "prefix":
            keys, values = self.keys[layer][rows, :, :start], self.values[layer][rows, :, :start]
            return torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2), None
        self.keys[layer][rows, :, start:end] = k
        self.values[layer][rows, :, start:end] = v
        return self.keys[layer][rows], self.values[layer][rows], None

    def advance(self, n: int) -> None:
        """The positions of a chunk are set before each call (``length``); nothing moves after it."""


class BlockDiffusionCache:
    """The exact KV cache of block diffusion (BD3-LM): the keys and values of the committed clean blocks,
    per layer (B, kv_heads, capacity, d). Every call feeds a chunk at positions ``length ..`` for the batch
    rows ``rows`` (None: all), whose queries see every cached key and the chunk's keys as ``chunk_allowed``
    (Lc, Lc) bool says (None: all of them). The first ``commit`` tokens of the chunk are clean blocks being
    committed: their keys and values stay and ``length`` moves past them; the rest (the noisy block being
    denoised) leaves the cache as it was (the positions it wrote are overwritten when its block is
    committed). One call can commit the last block and denoise the next (``chunk_allowed`` from
    :func:`block_diffusion_layout`).

    Exact because a clean block of the two-stream input only sees clean blocks up to its own, and a noisy
    block only its own block and the clean blocks before it."""

    bidirectional = True

    def __init__(self, blocks: int, batch: int, heads: int, head_dim: int, capacity: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (batch, heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(blocks)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(blocks)]
        self.length, self.commit = 0, 0
        self.rows: torch.Tensor | None = None
        self.chunk_allowed: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the chunk's ``k``, ``v`` (B, kv_heads, Lc, d) at its positions; return every key and value up to its
        end and the attention mask (Lc, Lk) of its queries (None: all)."""
        start, end = self.length, self.length + k.shape[2]
        rows = slice(None) if self.rows is None else self.rows
        self.keys[layer][rows, :, start:end] = k
        self.values[layer][rows, :, start:end] = v
        mask = None
        if self.chunk_allowed is not None:
            seen = torch.ones(k.shape[2], start, dtype=torch.bool, device=k.device)
            mask = torch.cat([seen, self.chunk_allowed], dim=1)
        return self.keys[layer][rows, :, :end].to(k.dtype), self.values[layer][rows, :, :end].to(k.dtype), mask

    def advance(self, n: int) -> None:
        """Past the committed tokens of the call (its first ``commit``)."""
        self.length += self.commit


def bucketed_positions(mask: torch.Tensor, buckets: int = 16) -> tuple[torch.Tensor, int]:
    """Flat indices of the ``True`` entries of ``mask`` (B, L), padded with index 0 up to a multiple
    of ``B*L / buckets``; returns (indices, number of real entries).

    The count of masked positions changes every step. Padding it to a few sizes keeps the output
    layer's matmul at a handful of shapes: oneDNN (CPU bf16) and ``torch.compile`` build and cache a
    kernel per shape, and an unbounded number of shapes cost time and memory.
    """
    flat = mask.reshape(-1).nonzero()[:, 0]
    n, total = flat.numel(), mask.numel()
    quantum = -(-total // buckets)
    size = min(total, max(quantum, -(-n // quantum) * quantum))
    if size > n:
        flat = torch.cat([flat, flat.new_zeros(size - n)])
    return flat, n


def select_positions(h: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """Hidden states (B, L, H) at ``positions`` (a (B, L) bool mask or flat indices into B*L, see
    :func:`bucketed_positions`) -> (N, H); all of them when ``positions`` is None."""
    if positions is None:
        return h
    return h[positions] if positions.dtype == torch.bool else h.reshape(-1, h.shape[-1])[positions]


def count_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameters of ``model`` (shared ones once); ``exclude_embeddings`` leaves out its input embedding
    and output layer (``model.embedding_parameters()``), as scaling laws count."""
    params = {id(p): p for p in model.parameters()}
    if exclude_embeddings:
        for p in model.embedding_parameters():
            params.pop(id(p), None)
    return sum(p.numel() for p in params.values())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
           mask: torch.Tensor | tuple[AttentionTile, ...] | None = None, cache: KVCache | None = None,
           layer: int = 0) -> torch.Tensor:
    """SDPA over q (B, H, L, d) and k, v (B, K, L, d) (K divides H: grouped-query attention, query head ``j``
    on key/value head ``floor(j / (H / K))``). ``cache``: the new keys and values join the cached ones and
    the cache says which each query sees; else ``mask`` (bool, broadcast to (B, H, L, L), or a layout's
    tiles, see :func:`attention_mask`) hides keys, combined with the causal pattern when ``causal``."""
    length = q.shape[2]
    is_causal = causal
    if isinstance(mask, tuple):
        return tiled_attention(q, k, v, mask)
    if cache is not None:
        k, v, mask = cache.update(layer, k, v)
        is_causal = False
    elif mask is not None and causal:
        mask = mask & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


class AttentionTile(NamedTuple):
    """A run of consecutive queries and the only keys any of them sees: ``keys`` a slice or (K,) indices,
    ``allowed`` (Q, K) bool among those keys, or None where every query sees every one of them."""

    queries: slice
    keys: slice | torch.Tensor
    allowed: torch.Tensor | None


def attention_tiles(allowed: torch.Tensor, queries_per_tile: int) -> tuple[AttentionTile, ...]:
    """The (L, L) bool pattern ``allowed`` cut into runs of ``queries_per_tile`` queries, each keeping only
    the keys it sees. A sparse pattern (block diffusion's two streams: a noisy block sees its own block and
    the clean blocks before it) then costs the scores it allows plus the tiles' ragged edges, not L^2."""
    tiles = []
    for start in range(0, allowed.shape[0], queries_per_tile):
        rows = allowed[start:start + queries_per_tile]
        keys = rows.any(0).nonzero()[:, 0]
        sub = rows[:, keys]
        first, count = int(keys[0]), keys.numel()
        contiguous = int(keys[-1]) - first + 1 == count
        tiles.append(AttentionTile(slice(start, start + rows.shape[0]),
                                   slice(first, first + count) if contiguous else keys,
                                   None if bool(sub.all()) else sub))
    return tuple(tiles)


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    tiles: tuple[AttentionTile, ...]) -> torch.Tensor:
    """SDPA tile by tile (:func:`attention_tiles`, covering the queries in order): the same softmax over the
    same keys as one call with the whole mask, summed in another order (equal to float rounding)."""
    out = []
    queries = q.split([tile.queries.stop - tile.queries.start for tile in tiles], dim=2)
    for tile, query in zip(tiles, queries):
        if isinstance(tile.keys, slice):
            keys, values = k[:, :, tile.keys], v[:, :, tile.keys]
        else:
            keys, values = k.index_select(2, tile.keys), v.index_select(2, tile.keys)
        out.append(F.scaled_dot_product_attention(query, keys, values, attn_mask=tile.allowed,
                                                  enable_gqa=k.shape[1] != q.shape[1]))
    return torch.cat(out, dim=2)


class Layout(NamedTuple):
    """Tokens that are not one plain sequence (block diffusion's two streams): the rotary position of each
    input token (L,), which keys each query sees (L, L) bool, and ``span`` = the largest position + 1 (a
    Python int: no device synchronization in the forward pass). ``tiles``: the same pattern cut into
    :func:`attention_tiles` (what the forward pass uses when given), else the whole mask goes to SDPA.
    ``read``: only the first ``read`` tokens' outputs are read (None: all), so the last block computes
    queries, attention and MLP for them alone (every token's keys and values are still needed)."""

    positions: torch.Tensor
    allowed: torch.Tensor | None  # None: the tiles say it all
    span: int
    tiles: tuple[AttentionTile, ...] | None = None
    read: int | None = None


def block_diffusion_layout(positions: torch.Tensor, clean: torch.Tensor, block_size: int,
                           span: int | None = None) -> Layout:
    """BD3-LM's block-causal pattern (Arriola et al. 2025, the ``block_diff_mask``) for tokens at ``positions``
    (L,) of which ``clean`` (L,) bool belong to the clean stream ``x_0`` and the others to the noisy ``x_t``;
    block = position // ``block_size``. A noisy token sees the noisy tokens of its own block and the clean
    tokens of earlier blocks; a clean token sees the clean tokens of its own and earlier blocks."""
    block = positions // block_size
    qb, kb = block[:, None], block[None, :]
    qc, kc = clean[:, None], clean[None, :]
    allowed = (qc & kc & (kb <= qb)) | (~qc & ~kc & (kb == qb)) | (~qc & kc & (kb < qb))
    return Layout(positions, allowed, int(positions.max()) + 1 if span is None else span)


TILES_PER_STREAM = 4  # tiles of the two-stream training pattern: fewer calls, or fewer wasted scores


@functools.lru_cache(maxsize=16)
def two_stream_layout(length: int, block_size: int, device: torch.device | str, clean: int | None = None) -> Layout:
    """The training input ``[x_t ; x_0[:clean]]``: positions 0 .. L-1, then 0 .. clean-1 (``clean`` = L when
    None; no query of ``x_t`` reads the clean tokens of the last block, so the loss may leave them out).
    Its tiles are whole blocks, at most :data:`TILES_PER_STREAM` per stream, so each stream's tile skips
    the later blocks it cannot see; only the ``x_t`` half is read. Built once per shape and device; its
    tensors are never written."""
    clean = length if clean is None else clean
    positions = torch.cat([torch.arange(length, device=device), torch.arange(clean, device=device)])
    stream = torch.arange(length + clean, device=device) >= length
    layout = block_diffusion_layout(positions, stream, block_size, span=length)
    per_tile = block_size * -(-length // (block_size * TILES_PER_STREAM))
    noisy = attention_tiles(layout.allowed[:length], per_tile)
    clean_tiles = attention_tiles(layout.allowed[length:], per_tile) if clean else ()
    shifted = tuple(tile._replace(queries=slice(tile.queries.start + length, tile.queries.stop + length))
                    for tile in clean_tiles)
    return layout._replace(tiles=noisy + shifted, read=length)


def packed_layout(lengths: list[int], device: torch.device | str) -> Layout:
    """Sequences of ``lengths`` one after another in one row, each at positions 0 .. its length - 1 and seeing
    only itself: one tile per sequence, each the plain attention of that sequence alone (no mask, no padding),
    so every sequence gets the numbers it gets in a forward of its own."""
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    tiles = tuple(AttentionTile(slice(a, b), slice(a, b), None) for a, b in zip(starts, starts[1:]))
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    return Layout(positions, None, max(lengths), tiles)


def attention_mask(keep: torch.Tensor | None,
                   layout: Layout | None) -> torch.Tensor | tuple[AttentionTile, ...] | None:
    """The boolean SDPA mask of a call: ``keep`` (B, L) hides padding keys from every query; ``layout``
    gives its own pattern, its tiles when it has them (one of ``keep`` and ``layout`` at most)."""
    if keep is not None and layout is not None:
        raise ValueError("a key padding mask (keep) and a token layout do not combine")
    if keep is not None:
        return keep[:, None, None, :]
    if layout is None:
        return None
    return layout.allowed if layout.tiles is None else layout.tiles


def layer_attention(mask: torch.Tensor | tuple[AttentionTile, ...] | None, layout: Layout | None, layer: int,
                    layers: int) -> tuple[torch.Tensor | tuple[AttentionTile, ...] | None, int | None]:
    """The mask of block ``layer`` of ``layers`` and how many leading tokens it computes outputs for: in the
    last block, only the tokens the layout reads (its tiles of those queries), else all of them (None)."""
    if layout is None or layout.read is None or layer != layers - 1:
        return mask, None
    if isinstance(mask, tuple):
        mask = tuple(tile for tile in mask if tile.queries.stop <= layout.read)
    else:
        mask = mask[:layout.read]
    return mask, layout.read


def rotary_table(rotary: Rotary, start: int, length: int, layout: Layout | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, d) of the call's tokens: positions ``start .. start + length - 1``, or the layout's."""
    if layout is not None:
        cos, sin = rotary(layout.span, device)
        return cos[layout.positions], sin[layout.positions]
    cos, sin = rotary(start + length, device)
    return cos[start:], sin[start:]


def shift_by_one(h: torch.Tensor) -> torch.Tensor:
    """Dream's logit shift on (B, L, ...): position ``i`` gets position ``i - 1``'s, position 0 its own."""
    return torch.cat([h[:, :1], h[:, :-1]], dim=1)


def normal_init(module: nn.Module) -> None:
    """Llama's and GPT-2's initialisation: normal(0, 0.02) matrices and embeddings, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
