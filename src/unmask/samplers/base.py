"""What every sampler shares: the float64 categorical primitive, per-row random streams, the
``Sampler`` interface and its result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import rng

ROWS_PER_CHUNK_ELEMENTS = 1 << 24


# what a draw is for: part of the counter, so the streams for different purposes never overlap
TOKEN, TIME, ORDER, REMASK = 0, 1, 2, 3


PURPOSES = 4


class SamplingError(ValueError):
    """Impossible sampling request (steps < 1, top-p outside (0, 1], k larger than the canvas...)."""


@dataclass(frozen=True)
class DrawSettings:
    """The categorical draw every sampler makes. A sampler's settings extend these: their fields are the
    ``sample.*`` keys it reads (help from the comments), with ``RANGES`` and ``CHOICES`` of allowed values
    and ``SWITCHES``, keys whose value off the default asks for this reader (refused by the others)."""

    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set with this probability mass
    precision: str = "float64"  # float64 (exact draws) or float32 (MDLM's truncated draw, research only)

    RANGES: ClassVar[dict[str, str]] = {"temperature": "[0, inf)", "top_k": "[0, inf)", "top_p": "(0, 1]"}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"precision": ("float64", "float32")}
    SWITCHES: ClassVar[tuple[str, ...]] = ()


def top_index(values: torch.Tensor) -> torch.Tensor:
    """The index of the largest entry along the last dimension (the first of equal ones, NaN counting as
    largest): ``values.argmax(-1)``, computed as ``values.max(-1).indices``, the same indices about 3x as
    fast over a vocabulary on this project's CPUs (torch 2.13: 0.53 against 1.5 ms for (32, 32000))."""
    return values.max(-1).indices


def categorical_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      exclude: int | None = None) -> torch.Tensor:
    """float64 probabilities (N, V) from logits (N, V): temperature (0 = greedy, one-hot on the
    argmax), then top-k, then top-p (the smallest set of most likely tokens whose mass reaches
    ``top_p``); ``exclude`` gets probability 0."""
    logits = logits.to(torch.float64, copy=exclude is not None)
    if exclude is not None:
        logits[:, exclude] = float("-inf")
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, top_index(logits)[..., None], 1.0)
    if temperature != 1:  # shifted first, so that a tiny temperature sends the others to -inf, not the best to +inf
        logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass strictly before each token
        drop = before >= top_p
        drop[:, 0] = False
        probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_categorical(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row of nonnegative (unnormalised) ``weights`` (N, V) in float64, from
    uniforms ``u`` (N,) on [0, 1)."""
    n, v = weights.shape
    out = torch.empty(n, dtype=torch.long, device=weights.device)
    rows = max(1, ROWS_PER_CHUNK_ELEMENTS // max(v, 1))
    for start in range(0, n, rows):
        cdf = weights[start:start + rows].to(torch.float64).cumsum(dim=-1)
        target = u[start:start + rows, None].to(torch.float64) * cdf[:, -1:]
        out[start:start + rows] = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_max(v - 1)
    return out


def sample_exponential_race_float32(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """MDLM's float32 draw ``argmax(w / -log u)`` with float32 uniforms ``u`` (N, V)."""
    return top_index(weights.to(torch.float32) / -torch.log(u))


def drawn_candidates(logits: torch.Tensor, streams: RowStreams, rows: torch.Tensor, counter: int, cols: torch.Tensor,
                     temperature: float, top_k: int = 0, top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, confidence) at N positions from their logits (N, V), as ``torch.multinomial`` draws them in SDAR's and
    LLaDA2's samplers: ``x0 = argmax(p / q)`` over the tempered, top-k/top-p filtered distribution ``p``, with
    ``q = -log u`` an Exp(1) draw per (row, ``counter``, position) and vocabulary entry, and confidence ``p(x0)``;
    temperature 0: the argmax, its confidence under the untempered distribution."""
    if temperature == 0:
        probs = logits.double().softmax(-1)
        x0 = top_index(logits)
    else:
        probs = categorical_probs(logits, temperature, top_k, top_p)
        x0 = top_index(probs / -torch.log(streams.uniforms(rows, counter, cols, probs.shape[-1])))
    return x0, probs.gather(-1, x0[:, None])[:, 0]


class RowStreams:
    """Per-row random streams: draw ``counter`` of row ``r`` at ``index`` is
    ``rng.uniform(seed_r, counter, index)``."""

    def __init__(self, seeds: torch.Tensor):
        self.seeds = seeds.to(torch.int64)
        self.keys = rng.hash64(self.seeds)  # each row's seed hashed once: every draw continues from it

    def _row_keys(self, rows: torch.Tensor) -> torch.Tensor:
        if self.keys.device != rows.device:
            self.keys = self.keys.to(rows.device)
        return self.keys[rows]

    def _key(self, rows: torch.Tensor, counter, index) -> torch.Tensor:
        """``rng.hash64(seed_r, counter, index)`` for the rows ``rows``."""
        return rng.absorb(self._row_keys(rows), counter, index)

    def uniform(self, rows: torch.Tensor, counter, index) -> torch.Tensor:
        """float64 uniforms (N,), one per (row of ``rows``, ``counter``, ``index``)."""
        return rng.uniform_after(self._row_keys(rows), counter, index)

    def uniforms(self, rows: torch.Tensor, counter, index: torch.Tensor, n: int) -> torch.Tensor:
        """float64 uniforms (N, n): ``n`` per (row, counter, index), from one hashed key each."""
        return rng.to_uniform(rng.stream(self._key(rows, counter, index)[:, None], torch.arange(n, device=rows.device)))

    def integers(self, rows: torch.Tensor, counter, index, high: int) -> torch.Tensor:
        """Uniform integers in ``[0, high)`` (N,), one per (row, ``counter``, ``index``)."""
        return (self.uniform(rows, counter, index) * high).long().clamp_max(high - 1)

    def categorical(self, weights: torch.Tensor, rows: torch.Tensor, counter, index: torch.Tensor,
                    precision: str = "float64") -> torch.Tensor:
        """One categorical draw per row of ``weights`` (N, V), keyed by (row, counter, index)."""
        if precision == "float64":
            return sample_categorical(weights, self.uniform(rows, counter, index))
        if precision == "float32":
            cells = torch.arange(weights.shape[1], device=weights.device)
            return sample_exponential_race_float32(weights, rng.to_uniform32(rng.stream(
                self._key(rows, counter, index)[:, None], cells)))
        raise SamplingError(f"unknown sampling precision {precision!r} (float64 or float32)")


def row_seeds(seed: int, n: int, first: int = 0) -> torch.Tensor:
    """Seeds of rows ``first .. first+n-1`` of a request with base ``seed``."""
    return rng.hash64(seed, torch.arange(first, first + n))


@dataclass
class SampleResult:
    """What a sampler returns: the final canvases, network calls per batch and per row, wall time."""

    tokens: torch.Tensor  # (B, L)
    nfe: int  # network calls (a batched forward counts once)
    row_nfe: torch.Tensor  # (B,) evaluations of each row
    seconds: float
    generated: int  # positions that were masked in the input canvas
    row_tokens: torch.Tensor | None = None  # (B,) tokens each row generated, where it differs from its masked positions
    extra_calls: int = 0  # network passes not counted in NFE (an encoder-decoder's encoder passes)

    @property
    def tokens_per_forward(self) -> torch.Tensor:
        """(B,) float32: each row's generated tokens over the network calls it took part in."""
        if self.row_tokens is None:
            raise ValueError("this sampler does not report tokens per row")
        return self.row_tokens.float() / self.row_nfe.clamp(min=1).float()

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens (only) per second of wall time."""
        return self.generated / self.seconds if self.seconds > 0 else float("inf")


StepCallback = Callable[[torch.Tensor], None]


def check_knobs(temperature: float, top_k: int, top_p: float, precision: str) -> None:
    """Raise a :class:`SamplingError` for a negative temperature or top-k, a top-p outside (0, 1] or an unknown
    precision."""
    if temperature < 0:
        raise SamplingError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise SamplingError(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise SamplingError(f"top_p must lie in (0, 1], got {top_p}")
    if precision not in ("float64", "float32"):
        raise SamplingError(f"sampling precision must be float64 or float32, got {precision!r}")


CONFIDENCE_SCORES = ("confidence", "margin", "entropy", "random")


def confidence_scores(probs: torch.Tensor, draws: torch.Tensor, score: str,
                      random: torch.Tensor | None = None) -> torch.Tensor:
    """How sure each of N predictions is (N,), from its probabilities ``probs`` (N, V) and drawn token
    ``draws`` (N,), in ``probs``' dtype: ``confidence`` = p(draw) (LLaDA's low-confidence remasking, Dream's
    ``maskgit_plus``), ``margin`` = top-1 minus top-2 probability (Dream's ``topk_margin``), ``entropy`` =
    ``sum p log(p + 1e-10)``, the negative entropy as Dream computes it (higher is surer), ``random`` = the
    given keys ``random`` (N,) (LLaDA's random remasking)."""
    if score == "confidence":
        return probs.gather(1, draws[:, None])[:, 0]
    if score == "margin":
        top = probs.topk(2, dim=1).values
        return top[:, 0] - top[:, 1]
    if score == "entropy":
        return (probs * torch.log(probs + 1e-10)).sum(dim=1)
    if score == "random" and random is not None:
        return random
    raise SamplingError(f"unknown confidence score {score!r}; known: {', '.join(CONFIDENCE_SCORES)}")


def spread(values: torch.Tensor, where: torch.Tensor, shape: tuple[int, int], fill) -> torch.Tensor:
    """A (R, L) tensor holding ``values`` (N,) at ``where`` (N, 2: row, position) and ``fill`` elsewhere."""
    out = torch.full(shape, fill, dtype=values.dtype, device=values.device)
    out[where[:, 0], where[:, 1]] = values
    return out


def reveal_candidates(x: torch.Tensor, rows: torch.Tensor | None, chosen: torch.Tensor,
                      candidates: torch.Tensor) -> None:
    """Write the ``candidates`` (R, L) of the canvas rows ``rows`` (R,) into ``x`` where ``chosen`` (R, L),
    in place (``rows`` None: every row)."""
    if rows is None:
        x[chosen] = candidates[chosen]
        return
    sub = x[rows]
    sub[chosen] = candidates[chosen]
    x[rows] = sub


def ranks_in_row(scores: torch.Tensor) -> torch.Tensor:
    """(R, L) rank of each entry in its row by descending score (0 = best; ties in position order)."""
    return scores.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # the inverse permutation


def choose_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool (R, L): in each row the ``counts[r]`` entries with the highest ``scores`` (-inf never)."""
    return (ranks_in_row(scores) < counts[:, None]) & (scores > float("-inf"))


def stop_at_eos(x: torch.Tensor, free: torch.Tensor, done: torch.Tensor, end: int, eos_id: int | tuple[int, ...],
                pad_id: int | None) -> None:
    """Rows not yet ``done`` whose generated positions (``free``) before ``end`` hold an EOS (or any of the stop ids
    ``eos_id`` names) stop: ``done`` is set (in place) and their generated positions after the first such token
    become PAD (``pad_id`` None: they are left as they are)."""
    hit = free & torch.isin(x, torch.tensor(eos_id, device=x.device))
    hit[:, end:] = False
    stopped = hit.any(dim=1) & ~done
    for r in stopped.nonzero()[:, 0].tolist() if pad_id is not None else []:
        tail = free[r].clone()
        tail[:int(hit[r].nonzero()[0]) + 1] = False
        x[r, tail] = pad_id
    done |= stopped


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None
