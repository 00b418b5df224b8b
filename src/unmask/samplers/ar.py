"""Left-to-right sampling for autoregressive models, with a KV cache."""

from __future__ import annotations

import time

import torch

from .base import (
    PURPOSES,
    TOKEN,
    RowStreams,
    Sampler,
    SampleResult,
    StepCallback,
    _autocast_dtype,
    categorical_probs,
    check_knobs,
)


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

    @torch.no_grad()
    def sample(self, model, canvas: torch.Tensor, seeds: torch.Tensor,
               on_step: StepCallback | None = None) -> SampleResult:
        self.check(canvas, seeds)
        start = time.perf_counter()
        x, streams = canvas.clone(), RowStreams(seeds)
        b, length = x.shape
        columns = (x == self.mask_id).any(dim=0).nonzero()[:, 0].tolist()
        bos = torch.full((b, 1), self.bos_id, dtype=x.dtype, device=x.device)
        calls = 0
        if columns and self.kv_cache:
            dtype = _autocast_dtype(x.device) or next(model.parameters()).dtype
            cache = model.new_cache(b, x.device, dtype, capacity=length)
            fed = 0  # tokens of x fed so far (after BOS)
            logits = model(torch.cat([bos, x[:, :columns[0]]], dim=1), cache=cache)[:, -1]
            calls, fed = 1, columns[0]
            for i, j in enumerate(columns):
                self._draw(x, j, logits, streams)
                if on_step is not None:
                    on_step(x)
                if i + 1 < len(columns):
                    nxt = columns[i + 1]
                    logits = model(x[:, fed:nxt], cache=cache)[:, -1]
                    calls, fed = calls + 1, nxt
        elif columns:
            for j in columns:
                logits = model(torch.cat([bos, x[:, :j]], dim=1))[:, -1]
                calls += 1
                self._draw(x, j, logits, streams)
                if on_step is not None:
                    on_step(x)
        return SampleResult(x, calls, torch.full((b,), calls, dtype=torch.long), time.perf_counter() - start,
                            int((canvas == self.mask_id).sum()))
