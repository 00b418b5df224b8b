"""The sampler registry: one :class:`SamplerSpec` per sampler, read by the config's choices and keys, the
server's schema, the command line's help and the tests.

Each sampler lives in its own module with its settings dataclass (the ``sample.*`` keys it reads: types,
defaults, help, ranges and choices); its entry here says which models it drives (a family's
``decoding``), its settings and how to build it from them. :func:`make_sampler` resolves
``sample.sampler=auto`` to the family's default, checks that the sampler fits the model, reads its
settings from the :class:`SampleConfig` and wraps it: in block diffusion for block families, in
semi-autoregressive windows when ``sample.window`` is set. Adding a sampler is one new module plus one
:func:`register_sampler` call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from ..config import SAMPLE_KEYS, SampleConfig, forget_sample_settings, register_choices, register_sample_settings
from ..data.tokenization import Tokenizer
from ..families import FAMILIES, family_of
from ..objectives.base import Objective
from .ancestral import AncestralSampler, AncestralSettings
from .ar import AutoregressiveSampler, AutoregressiveSettings
from .base import SamplingError
from .block_diffusion import BlockDiffusionSampler, BlockSettings
from .confidence import ConfidenceSampler, ConfidenceSettings
from .dream import DreamSampler, DreamSettings
from .engine import Sampler
from .entropy_bound import EntropyBoundSampler, EntropyBoundSettings
from .first_hitting import FirstHittingSampler, FirstHittingSettings
from .insertion import InsertionSampler, InsertionSettings
from .llada import LLaDASampler, LLaDASettings
from .llada2 import LLaDA2Sampler, LLaDA2Settings
from .llada2_pipeline import LLaDA2PipelineSampler, LLaDA2PipelineSettings
from .sdar import SDARSampler, SDARSettings
from .semi_ar import SemiAutoregressiveSampler, WindowSettings

# the wrappers' keys, read around a diffusion sampler: semi-autoregressive windows, block diffusion
WINDOWS, BLOCKS = "semi-autoregressive windows", "block diffusion"


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler: what it drives, its settings (the ``sample.*`` keys it reads), how to build it from
    them, one line about it."""

    name: str
    decoding: str  # the family decoding it generates for: diffusion, ar, insertion
    settings: type
    build: Callable[[Any, Objective, Tokenizer], Sampler]  # (settings, objective, tokenizer) -> sampler
    summary: str
    whole_canvas: bool = False  # it cuts the canvas into blocks itself: never wrapped (block diffusion, windows)

    @property
    def keys(self) -> tuple[str, ...]:
        """The names of the sampler's settings (its ``sample.*`` keys without the prefix)."""
        return tuple(f.name for f in dataclasses.fields(self.settings))


def values(settings) -> dict:
    """A settings dataclass as keyword arguments."""
    return dataclasses.asdict(settings)


SAMPLERS: dict[str, SamplerSpec] = {}


def register_sampler(spec: SamplerSpec) -> None:
    """Add a sampler: ``sample.sampler`` accepts its name, its settings' keys become ``sample.*`` keys, and
    the help, the server's request schema (when built after it) and :func:`samplers_for` list it."""
    if spec.name in SAMPLERS or spec.name == "auto":
        raise ValueError(f"a sampler named {spec.name!r} is already registered")
    register_sample_settings(spec.name, spec.settings)
    SAMPLERS[spec.name] = spec
    register_choices("sample.sampler", ("auto", *SAMPLERS))


def unregister_sampler(name: str) -> None:
    """Remove a sampler and the keys only it reads."""
    SAMPLERS.pop(name)
    forget_sample_settings(name)
    register_choices("sample.sampler", ("auto", *SAMPLERS))


for _spec in (
    SamplerSpec("ancestral", "diffusion", AncestralSettings,
                lambda s, objective, tok: AncestralSampler(objective, **values(s)),
                "MDLM's ancestral update on sample.steps steps of the schedule (cache: reuse unchanged rows)"),
    SamplerSpec("first_hitting", "diffusion", FirstHittingSettings,
                lambda s, objective, tok: FirstHittingSampler(objective, **values(s)),
                "exact first-hitting sampling (one token per network call; tokens_per_step > 1 is parallel)"),
    SamplerSpec("confidence", "diffusion", ConfidenceSettings,
                lambda s, objective, tok: ConfidenceSampler(objective, **values(s)),
                "reveal the most confident positions on a linear or cosine schedule, optionally remasking"),
    SamplerSpec("llada", "diffusion", LLaDASettings,
                lambda s, objective, tok: LLaDASampler(objective, **values(s)),
                "LLaDA's decoding: low-confidence (or random) remasking in semi-autoregressive blocks; "
                "threshold, factor: Fast-dLLM's rules"),
    SamplerSpec("dream", "diffusion", DreamSettings,
                lambda s, objective, tok: DreamSampler(objective, **dict(
                    values(s), block_length=s.block_length if s.block_cache != "none" else 0)),
                "Dream's decoding: origin, confidence, margin or entropy order; threshold: Fast-dLLM's rule"),
    SamplerSpec("sdar", "diffusion", SDARSettings,
                lambda s, objective, tok: SDARSampler(objective, **values(s)),
                "SDAR's decoding in each block: multinomial draws, dynamic/static low-confidence or sequential "
                "commits on a fixed schedule"),
    SamplerSpec("llada2", "diffusion", LLaDA2Settings,
                lambda s, objective, tok: LLaDA2Sampler(objective, **values(s)),
                "LLaDA2.1's decoding in each block: threshold commits and token-to-token edits, then verification"),
    SamplerSpec("llada2_pipeline", "diffusion", LLaDA2PipelineSettings,
                lambda s, objective, tok: LLaDA2PipelineSampler(objective, eos_id=tok.eos_id, **values(s)),
                "diffusers' LLaDA2 pipeline call for call (bidirectional windows; rows decoded together: not "
                "batch-invariant)", whole_canvas=True),
    SamplerSpec("entropy_bound", "canvas", EntropyBoundSettings,
                lambda s, objective, tok: EntropyBoundSampler(tok.mask_id, objective.vocab, objective.block_size,
                                                              tok.eos_id, tok.pad_id, **values(s)),
                "DiffusionGemma's decoding: canvases of uniform noise, entropy-bounded acceptance, renoising, "
                "self-conditioning, adaptive stopping"),
    SamplerSpec("ar", "ar", AutoregressiveSettings,
                lambda s, objective, tok: AutoregressiveSampler(tok.bos_id, tok.mask_id, **values(s)),
                "left to right with a KV cache (autoregressive models)"),
    SamplerSpec("insertion", "insertion", InsertionSettings,
                lambda s, objective, tok: InsertionSampler(tok.mask_id, tok.pad_id, tok.special_ids, **values(s)),
                "one insertion per step until the stop head says stop (insertion models)"),
):
    register_sampler(_spec)
register_sample_settings(WINDOWS, WindowSettings)
register_sample_settings(BLOCKS, BlockSettings)
assert all(spec.default_sampler in SAMPLERS for spec in FAMILIES.values() if spec.default_sampler)


def read_settings(settings: type, cfg: SampleConfig, reader: str):
    """``reader``'s settings from a :class:`SampleConfig`: the keys it was given, defaults for the rest;
    a value outside the reader's own choices (``sample.score`` differs between samplers) is refused."""
    given = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(settings)}
    for name, value in given.items():
        allowed = SAMPLE_KEYS[name].choices.get(reader)
        if allowed and value not in allowed:
            raise SamplingError(f"sample.{name}={value!r} is not one of {', '.join(allowed)} for {reader}")
    return settings(**given)


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
    """The sampler a :class:`SampleConfig` describes for ``objective``'s family, wrapped in block diffusion
    for block families and in semi-autoregressive windows when ``window`` > 0. A key that asks for a
    behaviour (:attr:`~unmask.config.SampleKey.switch`: guidance, windows, Fast-dLLM's factor) is refused
    where it does not apply; other keys of other samplers are ignored (a saved config keeps them)."""
    family = family_of(objective.family)
    name = sampler_name(cfg, family.name)
    if name not in SAMPLERS:
        raise SamplingError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")
    spec = SAMPLERS[name]
    if spec.decoding != family.decoding:
        serves = " or ".join(f.description for f in FAMILIES.values() if f.decoding == spec.decoding)
        raise SamplingError(f"sampler '{name}' is for {serves} models; this {family.description} model uses "
                            f"{' or '.join(samplers_for(family.decoding))} (or auto)")
    unknown = [key for key in cfg.settings if key not in SAMPLE_KEYS]
    if unknown:
        raise SamplingError(f"unknown key sample.{unknown[0]}")
    wrapper, wrapper_settings = (BLOCKS, BlockSettings) if family.blocks else (WINDOWS, WindowSettings)
    read = set(spec.keys)
    if spec.decoding == "diffusion" and not spec.whole_canvas:
        read |= {f.name for f in dataclasses.fields(wrapper_settings)}
    unused = [key for key, value in cfg.settings.items() if SAMPLE_KEYS[key].switch and key not in read
              and value != SAMPLE_KEYS[key].default]
    if unused:
        where = f"a {family.description} model" if family.blocks else f"the '{name}' sampler"
        raise SamplingError(f"sample.{unused[0]} does not apply to {where} (its keys: {', '.join(sorted(read))})")
    inner = spec.build(read_settings(spec.settings, cfg, name), objective, tokenizer)
    if spec.decoding != "diffusion" or spec.whole_canvas:
        return inner
    outer = read_settings(wrapper_settings, cfg, wrapper)
    if outer.stop_ids and not outer.stop_at_eos:
        raise SamplingError("sample.stop_ids are stop tokens beside EOS: they need sample.stop_at_eos=true")
    outside = [i for i in outer.stop_ids if not 0 <= i < tokenizer.vocab_size]
    if outside:
        raise SamplingError(f"sample.stop_ids: {outside[0]} is not a token id (the vocabulary has "
                            f"{tokenizer.vocab_size})")
    eos = (tokenizer.eos_id, *outer.stop_ids) if outer.stop_at_eos else None
    if family.blocks:
        if getattr(inner, "guidance", 0):
            raise SamplingError("a block diffusion model generates block by block: sample.guidance does not apply")
        if getattr(inner, "block_cache", "none") != "none":
            raise SamplingError("sample.block_cache is Fast-dLLM's approximate cache for full-sequence models; a "
                                "block diffusion model has its exact cache (sample.kv_cache)")
        return BlockDiffusionSampler(inner, outer.block_size or objective.block_size, outer.kv_cache, eos,
                                     tokenizer.pad_id, outer.commit_calls, outer.after_stop)
    if not outer.window:
        if outer.stop_at_eos:
            raise SamplingError("sample.stop_at_eos needs semi-autoregressive windows (sample.window > 0)")
        return inner
    if outer.window > model_length:
        raise SamplingError(f"sample.window={outer.window} exceeds the model's maximum length {model_length}")
    stride = outer.stride or max(1, outer.window // 2)
    return SemiAutoregressiveSampler(inner, outer.window, stride, eos, tokenizer.pad_id)
