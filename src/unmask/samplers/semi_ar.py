"""Any diffusion sampler in overlapping windows (MDLM's semi-autoregressive decoding)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .. import rng
from .base import SamplingError, stop_at_eos
from .engine import Decoding, Outcome, Sampler, relay


@dataclass(frozen=True)
class WindowSettings:
    """The keys of semi-autoregressive windows, around any diffusion sampler of a full-sequence model."""

    window: int = 0  # > 0: decode in overlapping windows of this length (outputs longer than the model)
    stride: int = 0  # tokens a window advances (0: window / 2)
    stop_at_eos: bool = False  # stop a row at its first generated EOS (PAD after it)
    stop_ids: list[int] = field(default_factory=list)  # stop_at_eos: more ids that stop a row as EOS does

    RANGES: ClassVar[dict[str, str]] = {"window": "[0, inf)", "stride": "[0, inf)"}
    SWITCHES: ClassVar[tuple[str, ...]] = ("window", "stop_at_eos", "stop_ids")


class SemiAutoregressiveSampler(Sampler):
    """MDLM's semi-autoregressive generation for canvases longer than the model.

    Windows of ``window`` positions, shifted by ``stride``: each round runs ``inner`` on the window
    (the tokens of earlier rounds are fixed there, so the tail of the previous window is the prompt of
    the next) until the end of the canvas. With ``eos_id`` (an id, or several: a stop list) a row stops at its
    first generated EOS;
    the positions after it that were still to be generated become PAD. The inner sampler's guidance
    treats every fixed token of a window (prompt and earlier rounds) as the condition.
    """

    def __init__(self, inner: Sampler, window: int, stride: int, eos_id: int | tuple[int, ...] | None = None,
                 pad_id: int | None = None):
        if window < 1 or not 1 <= stride <= window:
            raise SamplingError(f"need 1 <= stride <= window, got window {window}, stride {stride}")
        if eos_id is not None and pad_id is None:
            raise SamplingError("stopping at EOS needs a PAD id to fill the rest")
        self.inner, self.window, self.stride = inner, window, stride
        self.mask_id, self.eos_id, self.pad_id = inner.mask_id, eos_id, pad_id

    @property
    def revises(self) -> bool:
        """Whether the inner sampler revises revealed tokens."""
        return self.inner.revises

    @property
    def holds_cache(self) -> bool:
        """Whether a decoding keeps a cache between calls (its own or the inner sampler's)."""
        return self.inner.holds_cache

    def start(self, model, canvas: torch.Tensor, seeds: torch.Tensor) -> Decoding:
        """Check ``canvas`` (B, L) and ``seeds`` (B,) and return the decoding of the class docstring."""
        self.check(canvas, seeds)
        return self._decode(model, canvas, seeds)

    def _decode(self, model, canvas: torch.Tensor, seeds: torch.Tensor) -> Decoding:
        x = canvas.clone()
        b, n = x.shape
        free = canvas == self.mask_id
        done = torch.zeros(b, dtype=torch.bool, device=x.device)
        row_nfe = torch.zeros(b, dtype=torch.long)
        start, round_ = 0, 0
        while True:
            end = min(start + self.window, n)
            rows = (~done).nonzero()[:, 0]
            if len(rows):
                inner = self.inner.start(model, x[rows, start:end], rng.hash64(seeds.to(x.device)[rows], round_))
                result = yield from relay(inner, frame=lambda f: f.placed(x, rows, start, end))
                x[rows, start:end] = result.tokens
                row_nfe[rows.cpu()] += result.row_nfe
            if self.eos_id is not None:
                stop_at_eos(x, free, done, end, self.eos_id, self.pad_id)
            if end == n or bool(done.all()):
                break
            start += self.stride
            round_ += 1
        return Outcome(x, row_nfe)
