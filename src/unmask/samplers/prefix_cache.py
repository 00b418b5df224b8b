"""Prefix reuse: the keys and values of prompt prefixes that causal decodings share (a block table, as vLLM's
automatic prefix caching).

A prefilled prompt is cut into blocks of ``block`` tokens; block ``i`` is keyed by a SHA-256 chain over the
token ids of blocks ``0..i`` (so a block is found only after the very same prefix), and holds every layer's
keys and values of its positions, (kv_heads, block, d) each. A later prompt takes the longest run of its
leading blocks that is stored, copies their keys and values into its own KV cache and feeds only the rest:
for a causal model the keys and values of a position depend only on the tokens up to it, so the result is
the same (to float rounding). Blocks are evicted least recently used first beyond ``budget`` bytes. Counts
``reused`` and ``computed`` prompt tokens (what the cache saved, and what was fed).
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

    def _keys(self, ids: list[int]) -> list[tuple[bytes, int]]:
        """The key of each whole block of ``ids`` (the hash chain up to it) and the block's end."""
        keys, digest = [], b""
        for end in range(self.block, len(ids) + 1, self.block):
            digest = hashlib.sha256(digest + np.asarray(ids[end - self.block:end], dtype=np.int64).tobytes()).digest()
            keys.append((digest, end))
        return keys

    def prefill(self, model, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The output of ``model`` on ``ids`` (B, n) fed into the empty ``cache``, the rows' longest stored
        common prefix (whole blocks, at least one token left to feed) copied in instead of computed; then the
        new whole blocks of the first row stored (when every row is that row: one prompt)."""
        same = bool((ids == ids[:1]).all())
        first = ids[0].tolist()
        found = 0
        if same:
            for key, end in self._keys(first[:-1]):
                if key not in self.blocks:
                    break
                self.blocks.move_to_end(key)
                keys, values = self.blocks[key]
                for layer, (k, v) in enumerate(zip(keys, values)):
                    cache.keys[layer][:, :, end - self.block:end] = k
                    cache.values[layer][:, :, end - self.block:end] = v
                found = end
        cache.length = found
        out = model(ids[:, found:], cache=cache)
        self.reused += found * len(ids)
        self.computed += (ids.shape[1] - found) * len(ids)
        if same:
            self._store(first, cache)
        return out

    def _store(self, ids: list[int], cache: KVCache) -> None:
        for key, end in self._keys(ids):
            if key in self.blocks:
                continue
            keys = [k[0, :, end - self.block:end].clone() for k in cache.keys]
            values = [v[0, :, end - self.block:end].clone() for v in cache.values]
            size = sum(t.nbytes for t in keys + values)
            if size > self.budget:
                return
            while self.bytes + size > self.budget:
                _, (old_k, old_v) = self.blocks.popitem(last=False)
                self.bytes -= sum(t.nbytes for t in old_k + old_v)
            self.blocks[key] = (keys, values)
            self.bytes += size
