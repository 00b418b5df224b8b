"""Which sampler a config asks for."""

from __future__ import annotations

from ..config import SampleConfig
from ..data.tokenization import Tokenizer
from ..objectives.mdlm import MaskedDiffusion
from .ancestral import AncestralSampler
from .ar import AutoregressiveSampler
from .base import Sampler, SamplingError
from .confidence import ConfidenceSampler
from .first_hitting import FirstHittingSampler
from .insertion import InsertionSampler
from .semi_ar import SemiAutoregressiveSampler


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
