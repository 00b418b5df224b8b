"""Model families: one registry entry per family."""

from __future__ import annotations

import torch

from .config import ConfigError, RunConfig
from .data.tokenization import Tokenizer
from .models.classifier import build_classifier
from .models.dit import DiT
from .models.insertion import build_insertion_model
from .objectives.ar import Autoregressive
from .objectives.ilm import InsertionObjective
from .objectives.mdlm import MaskedDiffusion
from .objectives.schedules import make_schedule
from .runtime import memory_bytes


def build_model(cfg: RunConfig, tokenizer: Tokenizer) -> torch.nn.Module:
    """The network for ``cfg.family``: a bidirectional DiT for mdlm, a causal one for ar, a
    :class:`~unmask.models.classifier.SequenceClassifier` on a bidirectional DiT for classifier, an
    :class:`~unmask.models.insertion.InsertionLM` (bidirectional DiT + stop head) for ilm. It is first built
    on the meta device (no memory) and refused when its fp32 weights alone exceed this machine's
    memory, so a typo such as ``model.hidden=1000000`` is an error, not an out-of-memory kill. (The
    meta build costs seconds once per process, so it is skipped when a generous bound on the size of
    a transformer of this width, depth and vocabulary is far below the machine's memory.)"""
    m = cfg.model
    bound = 4 * (16 * m.blocks * m.hidden * (m.hidden + m.cond_dim) + 2 * tokenizer.vocab_size * m.hidden
                 + 4 * m.length * m.hidden)
    if bound < memory_bytes() // 8:
        return _build_model(cfg, tokenizer)
    with torch.device("meta"):
        shape = _build_model(cfg, tokenizer)
    needed = sum(t.numel() * 4 for t in (*shape.parameters(), *shape.buffers()))
    if needed > memory_bytes():
        raise ConfigError(f"a {cfg.family} model of this shape (model.hidden={cfg.model.hidden}, "
                          f"model.blocks={cfg.model.blocks}, vocabulary {tokenizer.vocab_size}) needs "
                          f"{needed / 2**30:,.1f} GiB for its fp32 weights alone; this machine has "
                          f"{memory_bytes() / 2**30:,.1f} GiB")
    return _build_model(cfg, tokenizer)


def _build_model(cfg: RunConfig, tokenizer: Tokenizer) -> torch.nn.Module:
    if cfg.family == "classifier":

        return build_classifier(cfg, tokenizer)
    if cfg.family == "ilm":

        return build_insertion_model(cfg, tokenizer)
    return DiT(cfg.model, tokenizer.vocab_size, causal=cfg.family == "ar", mask_id=tokenizer.mask_id)


def build_objective(cfg: RunConfig, tokenizer: Tokenizer) -> MaskedDiffusion | Autoregressive | None:
    """The training objective of ``cfg.family`` (None for classifiers, trained by cross-entropy)."""
    if cfg.family == "classifier":
        return None
    if cfg.family == "ar":
        return Autoregressive(tokenizer.bos_id, tokenizer.mask_id)
    if cfg.family == "ilm":

        return InsertionObjective(tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.mask_id,
                                  tokenizer.special_ids, tokenizer.vocab_size)
    d = cfg.diffusion
    return MaskedDiffusion(make_schedule(d), tokenizer.mask_id, d.t_min, d.discrete_steps, d.antithetic,
                           soft_mask_top_k=cfg.model.soft_mask_top_k, soft_mask_prob=d.soft_mask_prob)
