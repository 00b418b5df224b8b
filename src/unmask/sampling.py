"""Sampling: one float64 categorical primitive and the ancestral (MDLM ``ddpm``) sampler.

Every sampler takes a batch of canvases (B, L): masked positions are generated, every other
position is given and never overwritten (prompts, suffixes, infilling). It returns tokens, the
number of network evaluations (NFE) and the wall time.

The categorical primitive draws in float64 by inverse CDF (exact to float64 rounding). The
``float32`` option reproduces MDLM's exponential race ``argmax(p / -log u)`` with float32
uniforms, whose truncated noise lowers the effective temperature (Zheng et al. 2024, section 5);
it exists for research comparisons only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .config import SampleConfig
from .diffusion import MaskedDiffusion
from .model import bucketed_positions
from .schedules import NoiseSchedule
from .tokenization import Tokenizer

ROWS_PER_CHUNK_ELEMENTS = 1 << 24


def categorical_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      exclude: int | None = None) -> torch.Tensor:
    """float64 probabilities (N, V) from logits (N, V): temperature, then top-k, then top-p
    (the smallest set of most likely tokens whose mass reaches ``top_p``); ``exclude`` gets 0."""
    logits = logits.to(torch.float64) / temperature
    if exclude is not None:
        logits[:, exclude] = float("-inf")
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


def sample_categorical(weights: torch.Tensor, generator: torch.Generator | None = None,
                       precision: str = "float64") -> torch.Tensor:
    """One draw per row of nonnegative, not necessarily normalised ``weights`` (N, V) -> (N,)."""
    if precision == "float32":
        w = weights.to(torch.float32)
        u = torch.rand(w.shape, generator=generator, dtype=torch.float32, device=w.device)
        return (w / -torch.log(u)).argmax(dim=-1)
    if precision != "float64":
        raise ValueError(f"unknown sampling precision {precision!r} (float64 or float32)")
    n, v = weights.shape
    out = torch.empty(n, dtype=torch.long, device=weights.device)
    rows = max(1, ROWS_PER_CHUNK_ELEMENTS // max(v, 1))
    for start in range(0, n, rows):
        cdf = weights[start:start + rows].to(torch.float64).cumsum(dim=-1)
        u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=torch.float64, device=cdf.device)
        idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
        out[start:start + rows] = idx[:, 0].clamp_max(v - 1)
    return out


@dataclass
class SampleResult:
    tokens: torch.Tensor  # (B, L)
    nfe: int
    seconds: float
    generated: int  # number of positions that were masked in the input canvas


class Sampler:
    """Interface: ``sample(model, canvas, generator)``; masked positions of ``canvas`` are generated."""

    def sample(self, model, canvas: torch.Tensor, generator: torch.Generator | None = None) -> SampleResult:
        raise NotImplementedError


class AncestralSampler(Sampler):
    """MDLM's ``ddpm`` update on a uniform grid ``t_i = i/T``, from ``t = 1`` down to ``t = 0``.

    At a masked position the step from ``t`` to ``s = t - 1/T`` stays masked with weight
    ``(1 - alpha_s)/(1 - alpha_t)`` and becomes token ``v`` with weight
    ``p_theta(v | x_t) (alpha_s - alpha_t)/(1 - alpha_t)``; the last step (``alpha_0 = 1``) unmasks
    everything. The network only sees the masked positions' outputs (SUBS carries the rest).
    """

    def __init__(self, diffusion: MaskedDiffusion, steps: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, precision: str = "float64"):
        self.diffusion, self.schedule = diffusion, diffusion.schedule
        self.steps, self.temperature, self.top_k, self.top_p = steps, temperature, top_k, top_p
        self.precision = precision

    @staticmethod
    def transition(schedule: NoiseSchedule, t: float, s: float) -> tuple[float, float]:
        """(weight of unmasking, weight of staying masked) for one step ``t -> s``."""
        a_t = float(schedule.alpha(torch.tensor(t, dtype=torch.float64)))
        a_s = float(schedule.alpha(torch.tensor(s, dtype=torch.float64)))
        return (a_s - a_t) / (1 - a_t), (1 - a_s) / (1 - a_t)

    @torch.no_grad()
    def sample(self, model, canvas: torch.Tensor, generator: torch.Generator | None = None) -> SampleResult:
        mask_id = self.diffusion.mask_id
        x = canvas.clone()
        generated = int((x == mask_id).sum())
        start, nfe = time.perf_counter(), 0
        for i in range(self.steps, 0, -1):
            masked = x == mask_id
            if not masked.any():
                break
            t, s = i / self.steps, (i - 1) / self.steps
            sigma = self.diffusion.model_sigma(torch.full((x.shape[0],), t, device=x.device))
            index, n = bucketed_positions(masked)
            logits = model(x, sigma, positions=index)[:n]
            nfe += 1
            probs = categorical_probs(logits, self.temperature, self.top_k, self.top_p, exclude=mask_id)
            unmask, stay = self.transition(self.schedule, t, s)
            weights = probs * unmask
            weights[:, mask_id] = stay
            x.view(-1)[index[:n]] = sample_categorical(weights, generator, self.precision)
        return SampleResult(x, nfe, time.perf_counter() - start, generated)


class AutoregressiveSampler(Sampler):
    """Left-to-right sampling for the causal baseline: each masked position, in order, is drawn
    from the model's next-token distribution given everything before it (no KV cache)."""

    def __init__(self, bos_id: int, mask_id: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, precision: str = "float64"):
        self.bos_id, self.mask_id = bos_id, mask_id
        self.temperature, self.top_k, self.top_p, self.precision = temperature, top_k, top_p, precision

    @torch.no_grad()
    def sample(self, model, canvas: torch.Tensor, generator: torch.Generator | None = None) -> SampleResult:
        x = canvas.clone()
        generated = int((x == self.mask_id).sum())
        start, nfe = time.perf_counter(), 0
        for j in range(x.shape[1]):
            rows = x[:, j] == self.mask_id
            if not rows.any():
                continue
            inputs = torch.cat([torch.full_like(x[rows, :1], self.bos_id), x[rows, :j]], dim=1)
            logits = model(inputs)[:, -1]
            nfe += 1
            probs = categorical_probs(logits, self.temperature, self.top_k, self.top_p, exclude=self.mask_id)
            x[rows, j] = sample_categorical(probs, generator, self.precision)
        return SampleResult(x, nfe, time.perf_counter() - start, generated)


def make_sampler(cfg: SampleConfig, objective, tokenizer: Tokenizer) -> Sampler:
    """The sampler for a family: ancestral for mdlm, left-to-right for ar."""
    if isinstance(objective, MaskedDiffusion):
        return AncestralSampler(objective, cfg.steps, cfg.temperature, cfg.top_k, cfg.top_p, cfg.precision)
    return AutoregressiveSampler(tokenizer.bos_id, tokenizer.mask_id, cfg.temperature, cfg.top_k,
                                 cfg.top_p, cfg.precision)


def make_canvas(tokenizer: Tokenizer, n: int, length: int, prompt: str | None = None,
                bos: bool = False) -> torch.Tensor:
    """``n`` rows of ``length`` masks, optionally starting with BOS and a prompt (kept fixed)."""
    canvas = torch.full((n, length), tokenizer.mask_id, dtype=torch.long)
    prefix = [tokenizer.bos_id] if bos else []
    if prompt:
        prefix += tokenizer.encode(prompt).tolist()
    if len(prefix) >= length:
        raise ValueError(f"prompt takes {len(prefix)} tokens, leaving nothing to generate in a canvas "
                         f"of {length}")
    if prefix:
        canvas[:, :len(prefix)] = torch.tensor(prefix)
    return canvas
