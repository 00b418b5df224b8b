"""Samplers behind one interface, over one float64 categorical primitive.

``sampler.sample(model, canvas, seeds)``: ``canvas`` (B, L) holds the mask id where tokens are to be
generated and fixed tokens everywhere else (prompts, suffixes, several infill spans, ragged lengths);
fixed tokens are never overwritten. ``seeds`` (B,) gives every row its own random stream: draws are
keyed by (row seed, the row's step, position) through :mod:`unmask.rng`, so a row's sample does not
depend on the other rows or on the batch size. The result carries the tokens, the number of
network calls (``nfe``), how often each row was evaluated (``row_nfe``) and the wall time.

Samplers (``mdlm-reference.md`` section 3, ``algorithms.md`` sections 2, 3, 6):

* :class:`AncestralSampler`: MDLM's ``ddpm`` update on T steps of any schedule; with ``cache=True``
  a row whose canvas did not change reuses its last prediction (decided per row; models without
  time conditioning only).
* :class:`FirstHittingSampler`: Zheng et al. 2024 Alg. 1/2, each row draws its own next unmask
  time and unmasks ``k`` uniformly chosen masked positions per step (exact for ``k = 1``).
* :class:`ConfidenceSampler`: reveal the most confident positions (probability, margin or entropy,
  or random order) on a linear or cosine reveal schedule, with optional random remasking.
* :class:`SemiAutoregressiveSampler`: any of the above in overlapping windows (MDLM's semi-AR), for
  outputs longer than the model, stopping at EOS.
* :class:`AutoregressiveSampler`: left to right for the AR baseline, with a KV cache.

The categorical primitive draws in float64 by inverse CDF with one 53-bit uniform per draw. The
``float32`` option is MDLM's exponential race ``argmax(p / -log u)`` with float32 uniforms, whose
truncated noise lowers the effective temperature (Zheng et al. 2024, section 5); for research
comparisons only.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import rng
from .config import SampleConfig
from .diffusion import MaskedDiffusion
from .model import bucketed_positions
from .softmask import SoftFeedback
from .tokenization import Tokenizer

ROWS_PER_CHUNK_ELEMENTS = 1 << 24
# what a draw is for: part of the counter, so the streams for different purposes never overlap
TOKEN, TIME, ORDER, REMASK = 0, 1, 2, 3
PURPOSES = 4


class SamplingError(ValueError):
    """Impossible sampling request (steps < 1, top-p outside (0, 1], k larger than the canvas...)."""


# ----------------------------------------------------------------------------- the primitive

def categorical_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      exclude: int | None = None) -> torch.Tensor:
    """float64 probabilities (N, V) from logits (N, V): temperature (0 = greedy, one-hot on the
    argmax), then top-k, then top-p (the smallest set of most likely tokens whose mass reaches
    ``top_p``); ``exclude`` gets probability 0."""
    logits = logits.to(torch.float64)
    if exclude is not None:
        logits = logits.index_fill(-1, torch.tensor([exclude], device=logits.device), float("-inf"))
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    # shifted first, so that a tiny temperature sends the others to -inf instead of the best to +inf
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
    return (weights.to(torch.float32) / -torch.log(u)).argmax(dim=-1)


class RowStreams:
    """Per-row random streams: draw ``counter`` of row ``r`` at ``index`` is
    ``rng.uniform(seed_r, counter, index)``."""

    def __init__(self, seeds: torch.Tensor):
        self.seeds = seeds.to(torch.int64)

    def uniform(self, rows: torch.Tensor, counter, index) -> torch.Tensor:
        return rng.uniform(self.seeds.to(rows.device)[rows], counter, index)

    def categorical(self, weights: torch.Tensor, rows: torch.Tensor, counter, index: torch.Tensor,
                    precision: str = "float64") -> torch.Tensor:
        """One categorical draw per row of ``weights`` (N, V), keyed by (row, counter, index)."""
        if precision == "float64":
            return sample_categorical(weights, self.uniform(rows, counter, index))
        if precision == "float32":
            base = rng.hash64(self.seeds.to(rows.device)[rows], counter, index)
            cells = torch.arange(weights.shape[1], device=weights.device)
            return sample_exponential_race_float32(weights, rng.to_uniform32(rng.stream(base[:, None], cells)))
        raise SamplingError(f"unknown sampling precision {precision!r} (float64 or float32)")


def row_seeds(seed: int, n: int, first: int = 0) -> torch.Tensor:
    """Seeds of rows ``first .. first+n-1`` of a request with base ``seed``."""
    return rng.hash64(seed, torch.arange(first, first + n))


# ----------------------------------------------------------------------------- interface

@dataclass
class SampleResult:
    tokens: torch.Tensor  # (B, L)
    nfe: int  # network calls (a batched forward counts once)
    row_nfe: torch.Tensor  # (B,) evaluations of each row
    seconds: float
    generated: int  # positions that were masked in the input canvas

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens (only) per second of wall time."""
        return self.generated / self.seconds if self.seconds > 0 else float("inf")


StepCallback = Callable[[torch.Tensor], None]


class Sampler:
    """Generates the masked positions of a canvas (B, L); see the module docstring.

    ``on_step`` (optional) is called with the canvas (B, L) after every step, for streaming; it must
    copy what it keeps and must not modify it.
    """

    mask_id: int

    def sample(self, model, canvas: torch.Tensor, seeds: torch.Tensor,
               on_step: StepCallback | None = None) -> SampleResult:
        raise NotImplementedError

    def check(self, canvas: torch.Tensor, seeds: torch.Tensor) -> None:
        if canvas.dim() != 2 or canvas.shape[0] == 0 or canvas.shape[1] == 0:
            raise SamplingError(f"the canvas must be a non-empty (batch, length) tensor, got shape "
                                f"{tuple(canvas.shape)}")
        if seeds.shape != (canvas.shape[0],):
            raise SamplingError(f"need one seed per row: {canvas.shape[0]} rows, seeds of shape {tuple(seeds.shape)}")


def check_knobs(temperature: float, top_k: int, top_p: float, precision: str) -> None:
    if temperature < 0:
        raise SamplingError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise SamplingError(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise SamplingError(f"top_p must lie in (0, 1], got {top_p}")
    if precision not in ("float64", "float32"):
        raise SamplingError(f"sampling precision must be float64 or float32, got {precision!r}")


GUIDANCE_SCHEDULES = ("constant", "linear")


def guidance_weight(weight: float, schedule: str, t: torch.Tensor) -> torch.Tensor:
    """Per-row guidance weight at times ``t`` (R,): ``constant`` w, or ``linear`` w t (strongest at the
    first step, t = 1, and fading to 0 as the canvas fills)."""
    if schedule == "constant":
        return torch.full_like(t, weight)
    if schedule == "linear":
        return weight * t
    raise SamplingError(f"unknown guidance schedule {schedule!r} ({' or '.join(GUIDANCE_SCHEDULES)})")


class Denoiser:
    """The backbone seen by diffusion samplers: logits at the selected positions of some rows.

    The number of rows evaluated changes from step to step (rows finish, cached rows are skipped);
    it is padded up to a multiple of ``batch / 8`` with copies of the first row (whose outputs are
    not read), so the network sees a handful of shapes (see :func:`bucketed_positions`).

    Unsupervised classifier-free guidance (SMDM, Nie et al. 2024, eq. 7; ``algorithms.md`` section 3)
    with weight ``w != 0``: the unconditional branch is the same canvas with every fixed token of the
    sampler's input canvas (the prompt) replaced by the mask, and the logits become
    ``l_u + (1 + w)(l_c - l_u)``: two forward passes per evaluation of a row that has a prompt. With
    ``w = 0`` (or no prompt) only the conditional pass runs, so the result is exactly the unguided one.

    Soft-masking (a model with a soft-mask module, ``soft=True``): the denoiser keeps, per row, the
    summary of that row's last evaluation at the positions that were masked then, and feeds it back
    at the row's next evaluation (the first evaluation of a row has none). So the feedback is always
    the row's previous forward pass, refreshed only when the row is evaluated: with the cached
    ancestral sampler a row whose canvas did not change keeps its cached logits and its feedback. To
    summarize every masked position, a soft-mask model computes the output layer at all of them, also
    when the sampler asks for fewer (first-hitting). With guidance, the feedback is the guided
    prediction and both branches receive it.
    """

    def __init__(self, model, diffusion: MaskedDiffusion, canvas: torch.Tensor, soft: bool = True,
                 guidance: float = 0.0, guidance_schedule: str = "constant"):
        self.model, self.diffusion = model, diffusion
        self.quantum = max(1, -(-len(canvas) // 8))
        self.calls = 0
        self.feedback: SoftFeedback | None = None
        if soft and getattr(model, "soft_mask", None) is not None:
            self.feedback = SoftFeedback.empty(*canvas.shape, model.soft_mask.top_k, device=canvas.device)
        self.guidance, self.guidance_schedule = guidance, guidance_schedule
        self.prompt = (canvas != diffusion.mask_id) if guidance else None

    def _pad(self, rows: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Pad the row dimension to a multiple of the quantum with copies of the first row."""
        extra = -(-rows // self.quantum) * self.quantum - rows
        return [torch.cat([v, v[:1].expand(extra, *v.shape[1:])]) if extra else v for v in tensors]

    def _forward(self, x, sigma, positions, feedback) -> torch.Tensor:
        index, n = bucketed_positions(positions)
        extra = {} if feedback is None else {"feedback": feedback}
        return self.model(x, sigma, positions=index, **extra)[:n].float()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x (R, L) the canvases of batch rows ``rows`` (R,), t (R,) float64, positions (R, L) bool
        (masked positions) -> logits (N, V) at ``positions`` in row-major order."""
        self.calls += 1
        n_rows = x.shape[0]
        wanted = positions
        if self.feedback is not None:
            positions = x == self.diffusion.mask_id
        feedback = None if self.feedback is None else self.feedback.select(rows)
        padded = self._pad(n_rows, x, t, positions, rows)
        x_p, t_p, pos_p = padded[:3]
        pos_p[n_rows:] = False
        if feedback is not None:
            feedback = self.feedback.select(padded[3])
        sigma = self.diffusion.model_sigma(t_p)
        logits = self._forward(x_p, sigma, pos_p, feedback)
        if self.prompt is not None:
            prompt = self.prompt[rows]
            guided = prompt.any(dim=1)
            if guided.any():
                unconditional = torch.where(prompt, torch.full_like(x, self.diffusion.mask_id), x)
                x_u = self._pad(n_rows, unconditional)[0]
                l_u = self._forward(x_u, sigma, pos_p, feedback)
                w = guidance_weight(self.guidance, self.guidance_schedule, t).to(logits.dtype)
                per_position = (w * guided)[positions.nonzero()[:, 0]][:, None]
                logits = torch.where(per_position != 0, l_u + (1 + per_position) * (logits - l_u), logits)
        if self.feedback is not None:
            self.feedback.store(rows, positions, logits, self.diffusion.mask_id)
            return logits[wanted[positions]]
        return logits


class DiffusionSampler(Sampler):
    """What every masked-diffusion sampler shares: the categorical knobs (temperature, top-k, top-p,
    precision), soft-mask feedback (``soft_mask``, for models that have it) and unsupervised
    classifier-free guidance (``guidance`` weight, ``guidance_schedule``); see :class:`Denoiser`."""

    def __init__(self, diffusion: MaskedDiffusion, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 precision: str = "float64", soft_mask: bool = True, guidance: float = 0.0,
                 guidance_schedule: str = "constant"):
        check_knobs(temperature, top_k, top_p, precision)
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise SamplingError(f"unknown guidance schedule {guidance_schedule!r} ({' or '.join(GUIDANCE_SCHEDULES)})")
        if not math.isfinite(guidance):
            raise SamplingError(f"the guidance weight must be finite, got {guidance}")
        self.diffusion, self.mask_id = diffusion, diffusion.mask_id
        self.temperature, self.top_k, self.top_p, self.precision = temperature, top_k, top_p, precision
        self.soft_mask, self.guidance, self.guidance_schedule = soft_mask, guidance, guidance_schedule

    def denoiser(self, model, canvas: torch.Tensor) -> Denoiser:
        return Denoiser(model, self.diffusion, canvas, self.soft_mask, self.guidance, self.guidance_schedule)


# ----------------------------------------------------------------------------- ancestral

class AncestralSampler(DiffusionSampler):
    """MDLM's ``ddpm`` update on the grid ``t_i = i/T`` from ``t = 1`` to ``t = 0``.

    A masked position stays masked with weight ``(1 - alpha_s)/(1 - alpha_t)`` and becomes token
    ``v`` with weight ``p_theta(v | x_t) (alpha_s - alpha_t)/(1 - alpha_t)``; the last step unmasks
    every remaining position (draws from ``p_theta``, also for schedules with ``alpha(0) < 1``).
    With ``cache`` a row whose canvas did not change in the last step reuses its last prediction.
    In float64 the step draws "unmask or stay" first and a token only where a position unmasks (the
    same distribution as one categorical over {mask} + V); ``precision="float32"`` keeps MDLM's single
    float32 race over {mask} + V to reproduce its bias.
    """

    def __init__(self, diffusion: MaskedDiffusion, steps: int, cache: bool = False, **knobs):
        if steps < 1:
            raise SamplingError(f"steps must be >= 1, got {steps}")
        super().__init__(diffusion, **knobs)
        self.steps, self.cache = steps, cache

    def transition(self, t: float, s: float) -> tuple[float, float]:
        """(weight of unmasking, weight of staying masked) for one step ``t -> s``."""
        alpha = self.diffusion.schedule.alpha
        a_t = float(alpha(torch.tensor(t, dtype=torch.float64)))
        a_s = float(alpha(torch.tensor(s, dtype=torch.float64)))
        if s == 0:
            return 1.0, 0.0
        return (a_s - a_t) / (1 - a_t), (1 - a_s) / (1 - a_t)

    @torch.no_grad()
    def sample(self, model, canvas: torch.Tensor, seeds: torch.Tensor,
               on_step: StepCallback | None = None) -> SampleResult:
        self.check(canvas, seeds)
        if self.cache and getattr(model, "time_conditioning", False):
            raise SamplingError("the cached ancestral sampler needs a model without time conditioning")
        start = time.perf_counter()
        x, streams, denoise = canvas.clone(), RowStreams(seeds), self.denoiser(model, canvas)
        b = x.shape[0]
        row_nfe = torch.zeros(b, dtype=torch.long)
        cached: torch.Tensor | None = None  # (B, L, V) logits of the last evaluation of each row
        stale = torch.ones(b, dtype=torch.bool, device=x.device)
        for step, i in enumerate(range(self.steps, 0, -1)):
            masked = x == self.mask_id
            active = masked.any(dim=1)
            if not active.any():
                break
            t, s = i / self.steps, (i - 1) / self.steps
            evaluate = active & stale if self.cache else active
            rows = evaluate.nonzero()[:, 0]
            if len(rows):
                logits = denoise(x[rows], torch.full((len(rows),), t, dtype=torch.float64, device=x.device),
                                 masked[rows], rows)
                row_nfe[rows.cpu()] += 1
                if self.cache:
                    if cached is None:
                        cached = logits.new_zeros(*x.shape, logits.shape[-1])
                    where = masked[rows].nonzero()
                    cached[rows[where[:, 0]], where[:, 1]] = logits
            unmask, stay = self.transition(t, s)
            where = masked.nonzero()
            if self.precision == "float32":
                # MDLM's one categorical over {mask} + V per masked position, with its truncation bias
                weights = categorical_probs(cached[masked] if self.cache else logits, self.temperature, self.top_k,
                                            self.top_p, exclude=self.mask_id) * unmask
                weights[:, self.mask_id] = stay
                draws = streams.categorical(weights, where[:, 0], step * PURPOSES + TOKEN, where[:, 1], "float32")
                chosen, draws = where[draws != self.mask_id], draws[draws != self.mask_id]
            else:
                # the same distribution in two stages: a position unmasks with probability `unmask`, and
                # only those draw a token from p_theta, so a step costs O(V) per *unmasking* position
                # (with the cache, most steps unmask nothing and cost no V-sized work at all)
                go = streams.uniform(where[:, 0], step * PURPOSES + TIME, where[:, 1]) < unmask
                chosen = where[go]
                chosen_logits = cached[chosen[:, 0], chosen[:, 1]] if self.cache else logits[go]
                weights = categorical_probs(chosen_logits, self.temperature, self.top_k, self.top_p,
                                            exclude=self.mask_id)
                draws = streams.categorical(weights, chosen[:, 0], step * PURPOSES + TOKEN, chosen[:, 1])
            x[chosen[:, 0], chosen[:, 1]] = draws
            if self.cache:
                stale = torch.zeros_like(stale)
                stale[chosen[:, 0]] = True
            if on_step is not None:
                on_step(x)
        return SampleResult(x, denoise.calls, row_nfe, time.perf_counter() - start, int((canvas == self.mask_id).sum()))


# ----------------------------------------------------------------------------- first hitting

def _choose_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool (R, L): in each row the ``counts[r]`` entries with the highest ``scores`` (-inf never)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device)
                                             .expand_as(order).contiguous())
    return (ranks < counts[:, None]) & (scores > float("-inf"))


class FirstHittingSampler(DiffusionSampler):
    """First-hitting sampler (Zheng et al. 2024, Prop. 4.1, Alg. 1; Alg. 2 with ``k > 1``).

    With ``n`` masks at time ``tau`` the next unmask time is
    ``alpha^{-1}(1 - u^{1/n} (1 - alpha(tau)))``; one masked position chosen uniformly gets a token from
    ``p_theta(. | x, tau_next)``. Every row keeps its own time and step count, so rows with different
    numbers of masks run their own schedules in one batch; NFE per row is its number of masks (``k = 1``,
    exact) or ``ceil(masks / k)`` (``k > 1``: k positions from one prediction, an approximation).
    """

    def __init__(self, diffusion: MaskedDiffusion, tokens_per_step: int = 1, **knobs):
        if tokens_per_step < 1:
            raise SamplingError(f"tokens per step must be >= 1, got {tokens_per_step}")
        super().__init__(diffusion, **knobs)
        self.k = tokens_per_step

    def next_time(self, tau: torch.Tensor, n: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        schedule = self.diffusion.schedule
        target = 1 - u ** (1.0 / n.to(torch.float64)) * (1 - schedule.alpha(tau))
        return schedule.inverse(target.clamp(max=float(schedule.alpha(torch.zeros((), dtype=torch.float64))))).clamp(0, 1)

    @torch.no_grad()
    def sample(self, model, canvas: torch.Tensor, seeds: torch.Tensor,
               on_step: StepCallback | None = None) -> SampleResult:
        self.check(canvas, seeds)
        if self.k > canvas.shape[1]:
            raise SamplingError(f"{self.k} tokens per step is larger than the canvas of {canvas.shape[1]}")
        start = time.perf_counter()
        x, streams, denoise = canvas.clone(), RowStreams(seeds), self.denoiser(model, canvas)
        b, length = x.shape
        tau = torch.ones(b, dtype=torch.float64, device=x.device)
        steps = torch.zeros(b, dtype=torch.long, device=x.device)
        cols = torch.arange(length, device=x.device)
        while True:
            masked = x == self.mask_id
            n = masked.sum(dim=1)
            rows = (n > 0).nonzero()[:, 0]
            if not len(rows):
                break
            counter = steps[rows] * PURPOSES
            k = n[rows].clamp(max=self.k)
            t_next = tau[rows]
            first = None
            for j in range(self.k):  # the next k unmask times, in order
                live = j < k
                u = streams.uniform(rows, counter + TIME, j)
                t_next = torch.where(live, self.next_time(t_next, (n[rows] - j).clamp(min=1), u), t_next)
                first = t_next if first is None else first
            keys = streams.uniform(rows[:, None], (counter + ORDER)[:, None], cols)
            chosen = _choose_per_row(torch.where(masked[rows], keys, float("-inf")), k)
            logits = denoise(x[rows], first, chosen, rows)
            probs = categorical_probs(logits, self.temperature, self.top_k, self.top_p, exclude=self.mask_id)
            where = chosen.nonzero()
            draws = streams.categorical(probs, rows[where[:, 0]], counter[where[:, 0]] + TOKEN, where[:, 1],
                                        self.precision)
            sub = x[rows]
            sub[chosen] = draws
            x[rows] = sub
            tau[rows] = t_next
            steps[rows] += 1
            if on_step is not None:
                on_step(x)
        return SampleResult(x, denoise.calls, steps.cpu(), time.perf_counter() - start,
                            int((canvas == self.mask_id).sum()))


# ----------------------------------------------------------------------------- confidence

def reveal_schedule(kind: str, total: torch.Tensor, step: int, steps: int) -> torch.Tensor:
    """Masks that should remain after ``step`` of ``steps`` (1-based) out of ``total`` (per row):
    linear ``total (1 - step/steps)``, cosine (MaskGIT) ``total cos(pi/2 step/steps)``."""
    frac = step / steps
    if kind == "linear":
        remain = total.to(torch.float64) * (1 - frac)
    elif kind == "cosine":
        remain = total.to(torch.float64) * math.cos(math.pi / 2 * frac)
    else:
        raise SamplingError(f"unknown reveal schedule {kind!r} (linear or cosine)")
    return remain.floor().long() if step < steps else torch.zeros_like(total)


CONFIDENCE_SCORES = ("confidence", "margin", "entropy", "random")


class ConfidenceSampler(DiffusionSampler):
    """Confidence-ordered decoding (MaskGIT/LLaDA style), T steps.

    Each step predicts every masked position, draws a candidate token for each (temperature,
    top-k, top-p; temperature 0 = argmax), and keeps the candidates at the most confident positions:
    ``confidence`` (probability of the candidate), ``margin`` (top-1 minus top-2 probability),
    ``entropy`` (lowest entropy), or ``random`` (uniform order: LLaDA's random remasking). How many
    are revealed follows a linear or cosine schedule of the row's own mask count. ``remask > 0``
    re-masks each token generated in earlier steps with that probability after every step but the
    last (fixed tokens never), so the model can revise them.
    """

    def __init__(self, diffusion: MaskedDiffusion, steps: int, score: str = "confidence", schedule: str = "linear",
                 remask: float = 0.0, **knobs):
        if steps < 1:
            raise SamplingError(f"steps must be >= 1, got {steps}")
        if score not in CONFIDENCE_SCORES:
            raise SamplingError(f"unknown confidence score {score!r}; known: {', '.join(CONFIDENCE_SCORES)}")
        if schedule not in ("linear", "cosine"):
            raise SamplingError(f"unknown reveal schedule {schedule!r} (linear or cosine)")
        if not 0 <= remask < 1:
            raise SamplingError(f"remask probability must lie in [0, 1), got {remask}")
        super().__init__(diffusion, **knobs)
        self.steps, self.score, self.schedule, self.remask = steps, score, schedule, remask

    def scores(self, probs: torch.Tensor, draws: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if self.score == "confidence":
            return probs.gather(1, draws[:, None])[:, 0]
        if self.score == "margin":
            top = probs.topk(2, dim=1).values
            return top[:, 0] - top[:, 1]
        if self.score == "entropy":
            return (probs * probs.clamp_min(1e-300).log()).sum(dim=1)  # -H: higher is more confident
        return keys

    @torch.no_grad()
    def sample(self, model, canvas: torch.Tensor, seeds: torch.Tensor,
               on_step: StepCallback | None = None) -> SampleResult:
        self.check(canvas, seeds)
        start = time.perf_counter()
        x, streams, denoise = canvas.clone(), RowStreams(seeds), self.denoiser(model, canvas)
        b = x.shape[0]
        free = canvas == self.mask_id
        total = free.sum(dim=1)
        row_nfe = torch.zeros(b, dtype=torch.long)
        for step in range(self.steps):
            masked = x == self.mask_id
            reveal = masked.sum(dim=1) - reveal_schedule(self.schedule, total, step + 1, self.steps)
            rows = (reveal > 0).nonzero()[:, 0]
            if not len(rows):
                continue
            t = torch.full((len(rows),), 1 - step / self.steps, dtype=torch.float64, device=x.device)
            logits = denoise(x[rows], t, masked[rows], rows)
            row_nfe[rows.cpu()] += 1
            probs = categorical_probs(logits, self.temperature, self.top_k, self.top_p, exclude=self.mask_id)
            where = masked[rows].nonzero()
            abs_rows = rows[where[:, 0]]
            counter = step * PURPOSES
            draws = streams.categorical(probs, abs_rows, counter + TOKEN, where[:, 1], self.precision)
            keys = streams.uniform(abs_rows, counter + ORDER, where[:, 1])
            score = torch.full(masked[rows].shape, float("-inf"), dtype=torch.float64, device=x.device)
            score[where[:, 0], where[:, 1]] = self.scores(probs, draws, keys)
            chosen = _choose_per_row(score, reveal[rows])
            sub = x[rows]
            candidate = torch.full_like(sub, self.mask_id)
            candidate[where[:, 0], where[:, 1]] = draws
            sub[chosen] = candidate[chosen]
            x[rows] = sub
            if self.remask and step < self.steps - 1:
                generated = free & (x != self.mask_id)
                spots = generated.nonzero()
                u = streams.uniform(spots[:, 0], counter + REMASK, spots[:, 1])
                back = spots[u < self.remask]
                x[back[:, 0], back[:, 1]] = self.mask_id
            if on_step is not None:
                on_step(x)
        return SampleResult(x, denoise.calls, row_nfe, time.perf_counter() - start, int(free.sum()))


# ----------------------------------------------------------------------------- semi-autoregressive

class SemiAutoregressiveSampler(Sampler):
    """MDLM's semi-autoregressive generation for canvases longer than the model.

    Windows of ``window`` positions, shifted by ``stride``: each round runs ``inner`` on the window
    (the tokens of earlier rounds are fixed there, so the tail of the previous window is the prompt of
    the next) until the end of the canvas. With ``eos_id`` a row stops at its first generated EOS;
    the positions after it that were still to be generated become PAD. The inner sampler's guidance
    treats every fixed token of a window (prompt and earlier rounds) as the condition.
    """

    def __init__(self, inner: Sampler, window: int, stride: int, eos_id: int | None = None, pad_id: int | None = None):
        if window < 1 or not 1 <= stride <= window:
            raise SamplingError(f"need 1 <= stride <= window, got window {window}, stride {stride}")
        if eos_id is not None and pad_id is None:
            raise SamplingError("stopping at EOS needs a PAD id to fill the rest")
        self.inner, self.window, self.stride = inner, window, stride
        self.mask_id, self.eos_id, self.pad_id = inner.mask_id, eos_id, pad_id

    @torch.no_grad()
    def sample(self, model, canvas: torch.Tensor, seeds: torch.Tensor,
               on_step: StepCallback | None = None) -> SampleResult:
        self.check(canvas, seeds)
        start_time = time.perf_counter()
        x = canvas.clone()
        b, n = x.shape
        free = canvas == self.mask_id
        done = torch.zeros(b, dtype=torch.bool, device=x.device)
        nfe, row_nfe = 0, torch.zeros(b, dtype=torch.long)
        start, round_ = 0, 0
        while True:
            end = min(start + self.window, n)
            rows = (~done).nonzero()[:, 0]
            if len(rows):
                inner_step = None
                if on_step is not None:
                    def inner_step(window, rows=rows, start=start, end=end):
                        view = x.clone()
                        view[rows, start:end] = window
                        on_step(view)
                result = self.inner.sample(model, x[rows, start:end], rng.hash64(seeds.to(x.device)[rows], round_),
                                           inner_step)
                x[rows, start:end] = result.tokens
                nfe += result.nfe
                row_nfe[rows.cpu()] += result.row_nfe
            if self.eos_id is not None:
                hit = free & (x == self.eos_id)
                hit[:, end:] = False
                stopped = hit.any(dim=1) & ~done
                for r in stopped.nonzero()[:, 0].tolist():
                    first = int(hit[r].nonzero()[0])
                    tail = free[r].clone()
                    tail[:first + 1] = False
                    x[r, tail] = self.pad_id
                done |= stopped
            if end == n or bool(done.all()):
                break
            start += self.stride
            round_ += 1
        return SampleResult(x, nfe, row_nfe, time.perf_counter() - start_time, int(free.sum()))


# ----------------------------------------------------------------------------- autoregressive

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


# ----------------------------------------------------------------------------- insertion

class InsertionSampler(Sampler):
    """Insertion LMs (``algorithms.md`` section 5): every step is one network call and one insertion
    per unfinished row, and rows finish at different lengths.

    The canvas (B, W) says where to insert: its tokens other than mask and PAD are kept, in order, and
    a run of mask ids after a token opens the gap after it (the number of masks does not matter: the
    model decides how many tokens a gap receives); PAD is room to grow into without opening a gap.
    ``[BOS] prompt [MASK]`` continues a prompt; ``[BOS] [MASK]`` is unconditional; ``[BOS] left [MASK]
    right [PAD]...`` infills one span of unknown length (``generate`` builds that from a template).
    Inserted tokens open the gaps after them. The width ``W`` bounds the final length; the result holds
    each row's sequence left-aligned, PAD after it.

    Per step and row: stop when ``P(stop) >= stop_threshold`` (or the row is full); otherwise choose
    the gap from the position marginals ``logsumexp_v s[j, v]`` (``gap="greedy"``: the argmax, the
    released setting; ``"sample"``: a draw, which with the token draw below is a draw from the joint
    softmax) and the token from ``softmax(s[j, :])`` with temperature/top-k/top-p (float64), then
    shift everything after the gap right by one.
    """

    def __init__(self, mask_id: int, pad_id: int, special_ids, stop_threshold: float = 0.9, gap: str = "greedy",
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, precision: str = "float64"):
        check_knobs(temperature, top_k, top_p, precision)
        if not 0 < stop_threshold <= 1:
            raise SamplingError(f"stop_threshold must lie in (0, 1], got {stop_threshold}")
        if gap not in ("greedy", "sample"):
            raise SamplingError(f"gap choice must be greedy or sample, got {gap!r}")
        self.mask_id, self.pad_id, self.special = mask_id, pad_id, sorted(set(special_ids) | {mask_id, pad_id})
        self.stop_threshold, self.gap = stop_threshold, gap
        self.temperature, self.top_k, self.top_p, self.precision = temperature, top_k, top_p, precision

    def start(self, canvas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids (B, W) left-aligned, open gaps (B, W), lengths (B,)) of a canvas."""
        masks = canvas == self.mask_id
        fixed = ~masks & (canvas != self.pad_id)
        if not fixed[:, 0].all():
            raise SamplingError("an insertion canvas must start with a fixed token (BOS) that owns the first gap")
        before_mask = torch.cat([masks[:, 1:], torch.zeros_like(masks[:, :1])], dim=1)
        place = fixed.long().cumsum(1) - 1
        ids = torch.full_like(canvas, self.pad_id)
        opened = torch.zeros_like(masks)
        rows, cols = fixed.nonzero(as_tuple=True)
        ids[rows, place[rows, cols]] = canvas[rows, cols]
        opened[rows, place[rows, cols]] = before_mask[rows, cols]
        return ids, opened, fixed.sum(1)

    @torch.no_grad()
    def sample(self, model, canvas: torch.Tensor, seeds: torch.Tensor,
               on_step: StepCallback | None = None) -> SampleResult:
        self.check(canvas, seeds)
        start = time.perf_counter()
        ids, opened, lengths = self.start(canvas)
        b, width = ids.shape
        streams = RowStreams(seeds)
        forbidden = torch.zeros(model.backbone.vocab_size, dtype=torch.bool, device=ids.device)
        forbidden[self.special] = True
        positions = torch.arange(width, device=ids.device)
        active = opened.any(1) & (lengths < width)
        row_nfe = torch.zeros(b, dtype=torch.long)
        calls = step = 0
        while active.any():
            rows = active.nonzero()[:, 0]
            keep = positions[None] < lengths[rows, None]
            logits, stop = model(ids[rows], keep)
            calls += 1
            row_nfe[rows.cpu()] += 1
            go = stop.double().sigmoid() < self.stop_threshold
            active[rows[~go]] = False
            rows, logits = rows[go], logits[go]
            if len(rows):
                scores = logits.double().masked_fill(forbidden[None, None], float("-inf"))
                marginals = scores.logsumexp(-1).masked_fill(~(opened[rows] & keep[go]), float("-inf"))
                index = torch.zeros_like(rows)
                if self.gap == "greedy":
                    gap = marginals.argmax(1)
                else:
                    gap = streams.categorical(marginals.softmax(1), rows, step * PURPOSES + ORDER, index)
                probs = categorical_probs(scores[torch.arange(len(rows)), gap], self.temperature, self.top_k, self.top_p)
                token = streams.categorical(probs, rows, step * PURPOSES + TOKEN, index, self.precision)
                after = positions[None] > gap[:, None] + 1
                at = positions[None] == gap[:, None] + 1
                shifted_ids = torch.cat([ids[rows, :1], ids[rows, :-1]], 1)
                shifted_open = torch.cat([opened[rows, :1], opened[rows, :-1]], 1)
                ids[rows] = torch.where(at, token[:, None], torch.where(after, shifted_ids, ids[rows]))
                opened[rows] = at | torch.where(after, shifted_open, opened[rows])
                lengths[rows] += 1
                active[rows] = lengths[rows] < width
            step += 1
            if on_step is not None:
                on_step(ids)
        generated = int((lengths - ((canvas != self.mask_id) & (canvas != self.pad_id)).sum(1)).sum())
        return SampleResult(ids, calls, row_nfe, time.perf_counter() - start, generated)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


# ----------------------------------------------------------------------------- from a config

def make_sampler(cfg: SampleConfig, objective, tokenizer: Tokenizer, model_length: int) -> Sampler:
    """The sampler a :class:`SampleConfig` describes, wrapped in semi-AR windows when ``window`` > 0."""
    kind = cfg.sampler
    is_diffusion = isinstance(objective, MaskedDiffusion)
    is_insertion = getattr(objective, "family", None) == "ilm"
    if kind == "auto":
        kind = "ancestral" if is_diffusion else "insertion" if is_insertion else "ar"
    knobs = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, precision=cfg.precision)
    if (kind == "insertion") != is_insertion:
        raise SamplingError(f"sampler '{kind}' does not apply to a {getattr(objective, 'family', '?')} model"
                            + ("; insertion models use sampler=insertion (or auto)" if is_insertion else ""))
    if kind == "insertion":
        if cfg.guidance or cfg.window:
            raise SamplingError("guidance and semi-autoregressive windows are not defined for insertion models")
        return InsertionSampler(tokenizer.mask_id, tokenizer.pad_id, tokenizer.special_ids, cfg.stop_threshold,
                                cfg.gap, **knobs)
    if kind == "ar":
        if is_diffusion:
            raise SamplingError("sampler 'ar' needs an autoregressive model (family ar)")
        if cfg.guidance:
            raise SamplingError("unsupervised guidance (sample.guidance) is for masked diffusion samplers")
        if cfg.window:
            raise SamplingError("semi-autoregressive windows are for diffusion samplers; the AR sampler "
                                "generates up to the model length")
        return AutoregressiveSampler(tokenizer.bos_id, tokenizer.mask_id, kv_cache=cfg.kv_cache, **knobs)
    if not is_diffusion:
        raise SamplingError(f"sampler '{kind}' needs a masked diffusion model; use sampler=ar or auto")
    knobs.update(soft_mask=cfg.soft_mask, guidance=cfg.guidance, guidance_schedule=cfg.guidance_schedule)
    if kind == "ancestral":
        inner: Sampler = AncestralSampler(objective, cfg.steps, cache=cfg.cache, **knobs)
    elif kind == "first_hitting":
        inner = FirstHittingSampler(objective, cfg.tokens_per_step, **knobs)
    elif kind == "confidence":
        inner = ConfidenceSampler(objective, cfg.steps, cfg.score, cfg.reveal, cfg.remask, **knobs)
    else:
        raise SamplingError(f"unknown sampler {kind!r}")
    if not cfg.window:
        if cfg.stop_at_eos:
            raise SamplingError("sample.stop_at_eos needs semi-autoregressive windows (sample.window > 0)")
        return inner
    if cfg.window > model_length:
        raise SamplingError(f"sample.window={cfg.window} exceeds the model's maximum length {model_length}")
    stride = cfg.stride or max(1, cfg.window // 2)
    eos = tokenizer.eos_id if cfg.stop_at_eos else None
    return SemiAutoregressiveSampler(inner, cfg.window, stride, eos, tokenizer.pad_id)


MASK_MARK = re.compile(r"\[MASK(?:\*([^\[\]]*))?\]")  # [MASK], or [MASK*anything]: the count is checked


def _mask_count(mark: re.Match) -> int:
    """The number of masked positions a ``[MASK]`` / ``[MASK*n]`` marker stands for."""
    count = mark.group(1)
    if count is None:
        return 1
    shown = mark.group(0) if len(mark.group(0)) <= 40 else mark.group(0)[:36] + "...]"
    digits = count.strip().lstrip("0")
    if not (digits.isascii() and digits.isdigit()):
        raise SamplingError(f"{shown}: a [MASK*n] marker needs a whole number n >= 1")
    if len(digits) > 18:
        raise SamplingError(f"{shown}: n is too large")
    return int(digits)


def encode_template(tokenizer: Tokenizer, template: str, max_length: int | None = None) -> list[int]:
    """Token ids of ``template`` where ``[MASK]`` is one masked position and ``[MASK*n]`` is n.

    With ``max_length``, a template that would take more tokens is refused before its masks are built.
    """
    ids: list[int] = []
    pos = 0

    def check(extra: int) -> None:
        if max_length is not None and len(ids) + extra > max_length:
            raise SamplingError(f"the template takes more than the maximum of {max_length} tokens")

    for m in MASK_MARK.finditer(template):
        ids += encode_fixed(tokenizer, template[pos:m.start()])
        count = _mask_count(m)
        check(count)
        ids += [tokenizer.mask_id] * count
        pos = m.end()
    ids += encode_fixed(tokenizer, template[pos:])
    check(0)
    return ids


def encode_fixed(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of fixed text, which must not contain the mask token itself."""
    ids = tokenizer.encode(text).tolist() if text else []
    if tokenizer.mask_id in ids:
        raise SamplingError("fixed text contains the mask token itself; mark masked positions with [MASK]")
    return ids


def make_canvas(tokenizer: Tokenizer, rows: list[list[int]], length: int, bos: bool = False) -> torch.Tensor:
    """A canvas of ``length`` per row: optional BOS, the row's tokens (mask ids where to generate),
    then masks up to ``length``. Rows may have different prompt lengths."""
    if not rows:
        raise SamplingError("nothing to sample: the batch is empty")
    canvas = torch.full((len(rows), length), tokenizer.mask_id, dtype=torch.long)
    for r, ids in enumerate(rows):
        prefix = ([tokenizer.bos_id] if bos else []) + list(ids)
        if len(prefix) > length:
            raise SamplingError(f"a prompt of {len(prefix)} tokens does not fit a canvas of {length}")
        if len(prefix) == length and tokenizer.mask_id not in prefix:
            raise SamplingError(f"a prompt of {len(prefix)} tokens leaves nothing to generate in a canvas "
                                f"of {length}")
        canvas[r, :len(prefix)] = torch.tensor(prefix, dtype=torch.long)
    return canvas


@dataclass
class Generation:
    """Samples of one request: per-row texts and ids, and the totals behind the throughput."""

    texts: list[str]
    ids: list[list[int]]
    row_nfe: list[int]
    nfe: int
    seconds: float
    generated: int

    def summary(self) -> dict:
        return {"samples": len(self.texts), "generated_tokens": self.generated, "seconds": self.seconds,
                "generated_tokens_per_second": self.generated / self.seconds if self.seconds else None,
                "nfe": self.nfe, "mean_row_nfe": sum(self.row_nfe) / max(len(self.row_nfe), 1)}


def generate(model, objective, tokenizer: Tokenizer, cfg: SampleConfig, length: int, model_length: int,
             prompts: list[str] | None = None, template: str | None = None, bos: bool = False,
             device: torch.device | str = "cpu", autocast=None) -> Generation:
    """``cfg.num_samples`` samples per prompt (or per template, or unconditional), canvases of
    ``length``, row ``i`` seeded by ``(cfg.seed, i)``. A template's canvas is the template itself (and
    BOS): only its masks are generated; an insertion model may grow it up to ``length``.

    ``autocast`` is an optional context-manager factory for the network's precision.
    """
    sampler = make_sampler(cfg, objective, tokenizer, model_length)
    if prompts and template:
        raise SamplingError("give prompts or a template, not both")
    if template is not None:
        if isinstance(sampler, AutoregressiveSampler):
            raise SamplingError("a template ([MASK] infilling) needs a masked diffusion or insertion model; "
                                "an autoregressive model only continues a prompt")
        requests = [encode_template(tokenizer, template)]
        if isinstance(sampler, InsertionSampler):
            length = max(length, len(requests[0]) + int(bos))
        else:
            length = len(requests[0]) + int(bos)
    else:
        requests = [encode_fixed(tokenizer, p) for p in prompts] if prompts else [[]]
    if length > model_length and not cfg.window:
        raise SamplingError(f"a canvas of {length} tokens (sample.length) exceeds the model's maximum length "
                            f"{model_length}; set sample.window (semi-autoregressive) for longer outputs")
    rows = [ids for ids in requests for _ in range(cfg.num_samples)]
    seeds = row_seeds(cfg.seed, len(rows))
    out = Generation([], [], [], 0, 0.0, 0)
    for start in range(0, len(rows), cfg.batch_size):
        canvas = make_canvas(tokenizer, rows[start:start + cfg.batch_size], length, bos).to(device)
        if template is not None and isinstance(sampler, InsertionSampler):  # infill only the template's gaps
            canvas[:, len(requests[0]) + int(bos):] = tokenizer.pad_id
        with (autocast() if autocast else _no_autocast()):
            result = sampler.sample(model, canvas, seeds[start:start + len(canvas)].to(device))
        for row, n in zip(result.tokens.cpu(), result.row_nfe.tolist()):
            out.texts.append(tokenizer.decode(row))
            out.ids.append(row.tolist())
            out.row_nfe.append(n)
        out.nfe += result.nfe
        out.seconds += result.seconds
        out.generated += result.generated
    return out


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()
