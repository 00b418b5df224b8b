"""The sampler registry: one :class:`SamplerSpec` per sampler, read by the config's choices, the server's
schema, the command line's help and the tests.

Each sampler lives in its own module; its entry here says which models it drives (a family's
``decoding``), which ``sample.*`` keys it reads and how to build it from a :class:`SampleConfig`.
``make_sampler`` resolves ``sample.sampler=auto`` to the family's default, checks that the sampler fits
the model and wraps diffusion samplers in semi-autoregressive windows when ``sample.window`` is set.
Adding a sampler is one new module plus one entry in :data:`SAMPLERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import SampleConfig, register_choices
from ..data.tokenization import Tokenizer
from ..families import FAMILIES, family_of
from ..objectives.base import Objective
from .ancestral import AncestralSampler
from .ar import AutoregressiveSampler
from .base import SamplingError
from .block_diffusion import BlockDiffusionSampler
from .confidence import CONFIDENCE_SCORES, REVEAL_SCHEDULES, ConfidenceSampler
from .denoiser import GUIDANCE_SCHEDULES
from .dream import DREAM_SCORES, DreamSampler
from .engine import Sampler
from .first_hitting import FirstHittingSampler
from .insertion import GAP_CHOICES, STOP_RULES, InsertionSampler
from .llada import LLaDASampler
from .semi_ar import SemiAutoregressiveSampler

COMMON = ("temperature", "top_k", "top_p", "precision")  # every sampler's draw
DIFFUSION = COMMON + ("soft_mask", "guidance", "guidance_schedule", "window", "stride", "stop_at_eos")


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler: what it drives, the ``sample.*`` keys it reads, how to build it, one line about it."""

    name: str
    decoding: str  # the family decoding it generates for: diffusion, ar, insertion
    knobs: tuple[str, ...]
    build: Callable[[SampleConfig, Objective, Tokenizer], Sampler]
    summary: str


def draw_knobs(cfg: SampleConfig) -> dict:
    """The categorical draw's settings (every sampler's)."""
    return dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, precision=cfg.precision)


def denoise_knobs(cfg: SampleConfig) -> dict:
    """A diffusion sampler's shared settings: the draw's, soft-mask feedback and guidance."""
    return dict(draw_knobs(cfg), soft_mask=cfg.soft_mask, guidance=cfg.guidance,
                guidance_schedule=cfg.guidance_schedule)


SAMPLERS: dict[str, SamplerSpec] = {}


def register_sampler(spec: SamplerSpec) -> None:
    """Add a sampler: ``sample.sampler`` accepts its name, and the help, the server's request schema (when
    built after it) and :func:`samplers_for` list it."""
    if spec.name in SAMPLERS or spec.name == "auto":
        raise ValueError(f"a sampler named {spec.name!r} is already registered")
    SAMPLERS[spec.name] = spec
    register_choices("sample.sampler", ("auto", *SAMPLERS))


for _spec in (
    SamplerSpec("ancestral", "diffusion", ("steps", "cache") + DIFFUSION,
                lambda cfg, objective, tok: AncestralSampler(objective, cfg.steps, cache=cfg.cache,
                                                             **denoise_knobs(cfg)),
                "MDLM's ancestral update on sample.steps steps of the schedule (cache: reuse unchanged rows)"),
    SamplerSpec("first_hitting", "diffusion", ("tokens_per_step",) + DIFFUSION,
                lambda cfg, objective, tok: FirstHittingSampler(objective, cfg.tokens_per_step, **denoise_knobs(cfg)),
                "exact first-hitting sampling (one token per network call; tokens_per_step > 1 is parallel)"),
    SamplerSpec("confidence", "diffusion", ("steps", "score", "reveal", "remask") + DIFFUSION,
                lambda cfg, objective, tok: ConfidenceSampler(objective, cfg.steps, cfg.score, cfg.reveal, cfg.remask,
                                                              **denoise_knobs(cfg)),
                "reveal the most confident positions on a linear or cosine schedule, optionally remasking"),
    SamplerSpec("llada", "diffusion", ("steps", "block_length", "score", "threshold", "factor", "block_cache")
                + DIFFUSION,
                lambda cfg, objective, tok: LLaDASampler(objective, cfg.steps, cfg.block_length, cfg.score,
                                                         cfg.threshold, cfg.block_cache, factor=cfg.factor,
                                                         **denoise_knobs(cfg)),
                "LLaDA's decoding: low-confidence (or random) remasking in semi-autoregressive blocks; "
                "threshold, factor: Fast-dLLM's rules"),
    SamplerSpec("dream", "diffusion", ("steps", "score", "alg_temp", "eps", "threshold", "block_cache",
                                       "block_length") + DIFFUSION,
                lambda cfg, objective, tok: DreamSampler(objective, cfg.steps, cfg.score, cfg.alg_temp, cfg.eps,
                                                         cfg.threshold, cfg.block_length if cfg.block_cache != "none"
                                                         else 0, cfg.block_cache, **denoise_knobs(cfg)),
                "Dream's decoding: origin, confidence, margin or entropy order; threshold: Fast-dLLM's rule"),
    SamplerSpec("ar", "ar", ("kv_cache",) + COMMON,
                lambda cfg, objective, tok: AutoregressiveSampler(tok.bos_id, tok.mask_id, kv_cache=cfg.kv_cache,
                                                                  **draw_knobs(cfg)),
                "left to right with a KV cache (autoregressive models)"),
    SamplerSpec("insertion", "insertion", ("stop", "stop_threshold", "gap") + COMMON,
                lambda cfg, objective, tok: InsertionSampler(tok.mask_id, tok.pad_id, tok.special_ids, cfg.stop,
                                                             cfg.stop_threshold, cfg.gap, **draw_knobs(cfg)),
                "one insertion per step until the stop head says stop (insertion models)"),
):
    register_sampler(_spec)
register_choices("sample.score", tuple(dict.fromkeys(CONFIDENCE_SCORES + DREAM_SCORES)))
register_choices("sample.reveal", REVEAL_SCHEDULES)
register_choices("sample.guidance_schedule", GUIDANCE_SCHEDULES)
register_choices("sample.gap", GAP_CHOICES)
register_choices("sample.stop", STOP_RULES)
register_choices("sample.block_cache", ("none", "prefix", "dual"))
assert all(spec.default_sampler in SAMPLERS for spec in FAMILIES.values() if spec.default_sampler)


def samplers_for(decoding: str | None) -> list[str]:
    """The names of the samplers that generate for a family of this ``decoding``."""
    return [name for name, spec in SAMPLERS.items() if spec.decoding == decoding]


def sampler_name(cfg: SampleConfig, family: str) -> str:
    """``sample.sampler`` with ``auto`` resolved to the family's default."""
    spec = family_of(family)
    if spec.decoding is None:
        raise SamplingError(f"a {family} model does not generate text")
    return spec.default_sampler if cfg.sampler == "auto" else cfg.sampler


def make_sampler(cfg: SampleConfig, objective: Objective, tokenizer: Tokenizer, model_length: int) -> Sampler:
    """The sampler a :class:`SampleConfig` describes for ``objective``'s family, wrapped in semi-AR
    windows when ``window`` > 0."""
    family = family_of(objective.family)
    name = sampler_name(cfg, family.name)
    if name not in SAMPLERS:
        raise SamplingError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")
    spec = SAMPLERS[name]
    if spec.decoding != family.decoding:
        serves = " or ".join(f.description for f in FAMILIES.values() if f.decoding == spec.decoding)
        raise SamplingError(f"sampler '{name}' is for {serves} models; this {family.description} model uses "
                            f"{' or '.join(samplers_for(family.decoding))} (or auto)")
    unused = [knob for knob in ("guidance", "window", "stop_at_eos", "factor") if getattr(cfg, knob)
              and knob not in spec.knobs]
    if unused:
        raise SamplingError(f"sample.{unused[0]} does not apply to the '{name}' sampler (its keys: "
                            f"{', '.join(spec.knobs)})")
    inner = spec.build(cfg, objective, tokenizer)
    if family.blocks:
        if cfg.window or cfg.guidance:
            raise SamplingError(f"a block diffusion model generates block by block: sample."
                                f"{'window' if cfg.window else 'guidance'} does not apply")
        if getattr(inner, "block_cache", "none") != "none":
            raise SamplingError("sample.block_cache is Fast-dLLM's approximate cache for full-sequence models; a "
                                "block diffusion model has its exact cache (sample.kv_cache)")
        eos = tokenizer.eos_id if cfg.stop_at_eos else None
        return BlockDiffusionSampler(inner, objective.block_size, cfg.kv_cache, eos, tokenizer.pad_id)
    if not cfg.window:
        if cfg.stop_at_eos:
            raise SamplingError("sample.stop_at_eos needs semi-autoregressive windows (sample.window > 0)")
        return inner
    if cfg.window > model_length:
        raise SamplingError(f"sample.window={cfg.window} exceeds the model's maximum length {model_length}")
    stride = cfg.stride or max(1, cfg.window // 2)
    eos = tokenizer.eos_id if cfg.stop_at_eos else None
    return SemiAutoregressiveSampler(inner, cfg.window, stride, eos, tokenizer.pad_id)
