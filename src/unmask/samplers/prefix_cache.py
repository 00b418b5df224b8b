"""Prefix reuse: the keys and values of prompt prefixes that decodings share (a block table, as vLLM's automatic
prefix caching), for causal models and block diffusion.

A prefilled prompt is cut into blocks of ``block`` tokens; block ``i`` is keyed by a SHA-256 chain over the
token ids of blocks ``0..i`` (so a block is found only after the very same prefix), and holds every layer's
keys and values of its positions, (kv_heads, block, d) each. A later prompt takes the longest run of its
leading blocks that is stored, copies their keys and values into its own KV cache and feeds only the rest:
for a causal model the keys and values of a position depend only on the tokens up to it, so the result is
the same (to float rounding). Blocks are evicted least recently used first beyond ``budget`` bytes. Counts
``reused`` and ``computed`` prompt tokens (what the cache saved, and what was fed).

Block diffusion (BD3-LM, SDAR, LLaDA2 with the exact block cache): the clean blocks before the first decoded
block, whose keys and values depend only on the blocks up to their own, are stored and found in blocks of the
decoding's block size, keyed from that block layout (:func:`block_layout`), and restored into a decoding's
block cache before its first call, which then commits only the rest.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np
import torch

from ..models.common import KVCache


class PrefixCache:
    """Keys and values of prompt blocks shared between decodings (module docstring)."""

    def __init__(self, budget: int, block: int = 16):
        if block < 1 or budget < 0:
            raise ValueError(f"need block >= 1 and budget >= 0, got {block} and {budget}")
        self.budget, self.block = budget, block
        self.blocks: collections.OrderedDict[bytes, tuple[list[torch.Tensor], list[torch.Tensor]]] = \
            collections.OrderedDict()
        self.bytes = 0
        self.reused = self.computed = 0

    def _keys(self, ids: list[int], block: int, layout: bytes) -> list[tuple[bytes, int]]:
        """The key of each whole block of ``block`` tokens of ``ids`` (the hash chain up to it, started from the
        attention ``layout``) and the block's end."""
        keys, digest = [], layout
        for end in range(block, len(ids) + 1, block):
            digest = hashlib.sha256(digest + np.asarray(ids[end - block:end], dtype=np.int64).tobytes()).digest()
            keys.append((digest, end))
        return keys

    def restore(self, ids: list[int], cache, block: int, layout: bytes) -> int:
        """Copy the stored keys and values of the longest run of leading whole blocks of ``ids`` into every row of
        ``cache`` (keys and values per layer, (B, kv_heads, capacity, d)); returns how many positions."""
        found = 0
        for key, end in self._keys(ids, block, layout):
            if key not in self.blocks:
                break
            self.blocks.move_to_end(key)
            keys, values = self.blocks[key]
            for layer, (k, v) in enumerate(zip(keys, values)):
                cache.keys[layer][:, :, end - block:end] = k
                cache.values[layer][:, :, end - block:end] = v
            found = end
        return found

    def store(self, ids: list[int], cache, block: int, layout: bytes, row: int = 0) -> None:
        """Store the keys and values of the whole blocks of ``ids`` from row ``row`` of ``cache`` (those not stored
        yet), evicting the least recently used beyond the budget."""
        for key, end in self._keys(ids, block, layout):
            if key in self.blocks:
                continue
            keys = [k[row, :, end - block:end].clone() for k in cache.keys]
            values = [v[row, :, end - block:end].clone() for v in cache.values]
            size = sum(t.nbytes for t in keys + values)
            if size > self.budget:
                return
            while self.bytes + size > self.budget:
                _, (old_k, old_v) = self.blocks.popitem(last=False)
                self.bytes -= sum(t.nbytes for t in old_k + old_v)
            self.blocks[key] = (keys, values)
            self.bytes += size

    def prefill(self, model, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The output of a causal ``model`` on ``ids`` (B, n) fed into the empty ``cache``, the rows' longest
        stored common prefix (whole blocks, at least one token left to feed) copied in instead of computed; then
        the new whole blocks of the first row stored (when every row is that row: one prompt)."""
        same = bool((ids == ids[:1]).all())
        first = ids[0].tolist()
        found = self.restore(first[:-1], cache, self.block, CAUSAL) if same else 0
        cache.length = found
        out = model(ids[:, found:], cache=cache)
        self.reused += found * len(ids)
        self.computed += (ids.shape[1] - found) * len(ids)
        if same:
            self.store(first, cache, self.block, CAUSAL)
        return out


CAUSAL = b"causal"  # the layout of a causal model's keys and values: each position sees those before it


def block_layout(block_size: int) -> bytes:
    """The layout of block diffusion's clean keys and values: each position sees the blocks up to its own."""
    return b"blocks:%d" % block_size
