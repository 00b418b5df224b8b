"""Left-to-right sampling for autoregressive models, with a KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PURPOSES, TOKEN, DrawSettings, RowStreams, categorical_probs, check_knobs
from .engine import Causal, Decoding, Frame, Outcome, Sampler


@dataclass(frozen=True)
class AutoregressiveSettings(DrawSettings):
    """The ``sample.*`` keys of the ``ar`` sampler (:class:`AutoregressiveSampler`)."""

    kv_cache: bool = True  # reuse the keys and values of the prefix


class AutoregressiveSampler(Sampler):
    """Left to right for the causal baseline: each masked position, in order, is drawn from the
    model's next-token distribution given everything before it. With ``kv_cache`` every call feeds
    only the new tokens (exact for a causal model); fixed tokens are fed in runs."""

    def __init__(self, bos_id: int, mask_id: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, precision: str = "float64", kv_cache: bool = True):
        check_knobs(temperature, top_k, top_p, precision)
        self.bos_id, self.mask_id = bos_id, mask_id
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.precision, self.kv_cache = precision, kv_cache

    def _draw(self, x, j, logits, streams):
        rows = (x[:, j] == self.mask_id).nonzero()[:, 0]
        probs = categorical_probs(logits[rows].float(), self.temperature, self.top_k, self.top_p, exclude=self.mask_id)
        cols = torch.full_like(rows, j)
        x[rows, j] = streams.categorical(probs, rows, j * PURPOSES + TOKEN, cols, self.precision)

    @property
    def holds_cache(self) -> bool:
        """Whether its decodings keep a KV cache (``kv_cache``)."""
        return self.kv_cache

    def start(self, model, canvas: torch.Tensor, seeds: torch.Tensor) -> Decoding:
        """Check ``canvas`` (B, L) and ``seeds`` (B,) and return the decoding of the class docstring."""
        self.check(canvas, seeds)
        return self._decode(canvas, seeds)

    def _decode(self, canvas: torch.Tensor, seeds: torch.Tensor) -> Decoding:
        x, streams = canvas.clone(), RowStreams(seeds)
        b, length = x.shape
        columns = (x == self.mask_id).any(dim=0).nonzero()[:, 0].tolist()
        bos = torch.full((b, 1), self.bos_id, dtype=x.dtype, device=x.device)
        calls = 0
        if columns and self.kv_cache:
            fed = columns[0]  # tokens of x fed so far (after BOS)
            logits = yield Causal(torch.cat([bos, x[:, :fed]], dim=1), cached=True, capacity=length)
            calls = 1
            for i, j in enumerate(columns):
                self._draw(x, j, logits, streams)
                yield Frame(x)
                if i + 1 < len(columns):
                    nxt = columns[i + 1]
                    logits = yield Causal(x[:, fed:nxt], cached=True)
                    calls, fed = calls + 1, nxt
        elif columns:
            for j in columns:
                logits = yield Causal(torch.cat([bos, x[:, :j]], dim=1), cached=False)
                calls += 1
                self._draw(x, j, logits, streams)
                yield Frame(x)
        return Outcome(x, torch.full((b,), calls, dtype=torch.long))
