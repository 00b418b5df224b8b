"""Model families: one :class:`FamilySpec` per family, the only place that tells them apart.

A family is a network (``build_model``), its training objective (``build_objective``) and what the rest
of unmask needs to know to train, score, sample, serve and export it. Everything else asks the spec
(``family_of(cfg)``), never compares family names. Adding a family is one new entry here (plus its
model and objective modules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .config import ConfigError, ModelConfig, RunConfig, register_choices, register_rule
from .data.dataset import Data
from .data.labelled import LabelledData
from .data.tokenization import Tokenizer
from .models.classifier import build_classifier
from .models.insertion import STOP_HEADS, build_insertion_model
from .models.registry import BACKBONES, build_backbone
from .objectives.ar import Autoregressive
from .objectives.base import Objective
from .objectives.block_diffusion import BlockDiffusion
from .objectives.classification import ClassificationObjective
from .objectives.ilm import ROW_WEIGHTINGS, InsertionObjective
from .objectives.mdlm import MaskedDiffusion
from .objectives.schedules import make_schedule
from .objectives.uniform import UniformDiffusion
from .runtime import memory_bytes


@dataclass(frozen=True)
class FamilySpec:
    """What unmask needs to know about a model family."""

    name: str
    description: str  # "masked diffusion (MDLM) language": model cards and help texts
    card_tag: str  # the model card's tag on the hub
    network: Callable[[RunConfig, Tokenizer], torch.nn.Module]
    objective: Callable[[RunConfig, Tokenizer], Objective]
    decoding: Literal["diffusion", "ar", "insertion", "canvas"] | None  # its samplers' kind (None: it makes no text)
    default_sampler: str | None  # what sample.sampler=auto means
    infills: bool  # generates into [MASK] gaps of a template
    likelihood: bool  # its evaluation is a likelihood (a bound or exact), usable in scaling sweeps
    exports: tuple[str, ...] = ("unmask",)  # formats `unmask export --to` writes
    servable: bool = False  # `unmask serve` serves it
    labels: bool = False  # it learns a label per sequence (classification): labelled data, validation picks best/
    ema: bool = True  # training keeps an EMA of the weights (train.ema)
    starts_from: str | None = None  # train.init_from fills its `backbone` from a model of this family (None: same)
    data: Callable[[RunConfig, Tokenizer | None, bool], Data | LabelledData] = \
        lambda cfg, tokenizer, progress: Data(cfg.data, tokenizer, progress)  # the run's splits
    blocks: bool = False  # trains and decodes block by block (model.block_size; two input streams in training)
    soft_mask: bool = False  # takes a soft-mask module (model.soft_mask_top_k)
    reinforce: bool = False  # `unmask rl` fine-tunes it
    loss_floats: float = 1.7  # memory plan: floats its loss keeps per token and vocabulary entry (measured)
    rules: Callable[[RunConfig], None] | None = None  # checks of the keys a config of this family must set


def _diffusion(cfg: RunConfig, tokenizer: Tokenizer) -> MaskedDiffusion:
    d = cfg.diffusion
    return MaskedDiffusion(make_schedule(d), tokenizer.mask_id, d.t_min, d.discrete_steps, d.antithetic,
                           soft_mask_top_k=cfg.model.soft_mask_top_k, soft_mask_prob=d.soft_mask_prob, t_max=d.t_max)


def _block_diffusion(cfg: RunConfig, tokenizer: Tokenizer) -> BlockDiffusion:
    d = cfg.diffusion
    return BlockDiffusion(make_schedule(d), tokenizer.mask_id, cfg.model.block_size, d.t_min, d.t_max,
                          d.discrete_steps, d.antithetic)


def canvas_vocab(cfg: RunConfig, tokenizer: Tokenizer) -> int:
    """The token ids of a uniform-noise model (what noise draws from and the network predicts):
    ``model.vocab`` when set (a released model's), else the tokenizer's ids without its mask when the mask is
    the last id (a uniform-noise model never sees a mask), else all of them."""
    if cfg.model.vocab:
        return cfg.model.vocab
    last = tokenizer.mask_id == tokenizer.vocab_size - 1
    return tokenizer.vocab_size - 1 if last else tokenizer.vocab_size


def _uniform(cfg: RunConfig, tokenizer: Tokenizer) -> UniformDiffusion:
    d = cfg.diffusion
    return UniformDiffusion(make_schedule(d), canvas_vocab(cfg, tokenizer), cfg.model.block_size, d.t_min, d.t_max,
                            d.antithetic, d.self_conditioning, tokenizer.mask_id)


def _labelled_files(cfg: RunConfig) -> None:
    if cfg.data.dataset != "text" or not cfg.data.path or not cfg.data.valid_path:
        raise ConfigError("family classifier reads labelled files: data.dataset=text with data.path (train) and "
                          "data.valid_path (and data.test_path for the final figures)")


def _one_document_per_row(cfg: RunConfig) -> None:
    if cfg.data.layout != "pad":
        raise ConfigError("family ilm learns where sequences end: it needs data.layout=pad (one document per row)")


def _a_time_per_block(cfg: RunConfig) -> None:
    if cfg.model.time_conditioning:
        raise ConfigError("block diffusion draws a time per block; the network's conditioning is one per row, so "
                          "model.time_conditioning must be false for family bd3lm")


def _insertion_objective(cfg: RunConfig, tokenizer: Tokenizer) -> InsertionObjective:
    return InsertionObjective(tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.mask_id,
                              tokenizer.special_ids, tokenizer.vocab_size, cfg.diffusion.ilm_weighting,
                              cfg.diffusion.ilm_stop_noise)


FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (
    FamilySpec("mdlm", "masked diffusion (MDLM) language", "masked-diffusion",
               lambda cfg, tok: build_backbone(cfg.model, tok.vocab_size, False, tok.mask_id), _diffusion,
               decoding="diffusion", default_sampler="ancestral", infills=True, likelihood=True,
               exports=("unmask", "mdlm-hf", "mdlm-ckpt"), servable=True, soft_mask=True, reinforce=True),
    FamilySpec("ar", "autoregressive language", "causal-lm",
               lambda cfg, tok: build_backbone(cfg.model, tok.vocab_size, True, tok.mask_id),
               lambda cfg, tok: Autoregressive(tok.bos_id, tok.mask_id),
               decoding="ar", default_sampler="ar", infills=False, likelihood=True, servable=True, loss_floats=3.2),
    FamilySpec("bd3lm", "block diffusion (BD3-LM) language", "block-diffusion",
               lambda cfg, tok: build_backbone(cfg.model, tok.vocab_size, False, tok.mask_id), _block_diffusion,
               decoding="diffusion", default_sampler="ancestral", infills=False, likelihood=True, servable=True,
               blocks=True, rules=_a_time_per_block),
    FamilySpec("udlm", "uniform-noise canvas diffusion (DiffusionGemma) language", "uniform-diffusion",
               lambda cfg, tok: build_backbone(cfg.model, canvas_vocab(cfg, tok), False, None), _uniform,
               decoding="canvas", default_sampler="entropy_bound", infills=False, likelihood=True, blocks=True,
               servable=True, loss_floats=18.6),
    FamilySpec("ilm", "insertion (ILM) language", "insertion-lm", build_insertion_model, _insertion_objective,
               decoding="insertion", default_sampler="insertion", infills=True, likelihood=False, loss_floats=3.2,
               rules=_one_document_per_row),
    FamilySpec("classifier", "sequence classification", "text-classification", build_classifier,
               lambda cfg, tok: ClassificationObjective(), decoding=None, default_sampler=None, infills=False,
               likelihood=False, labels=True, ema=False, starts_from="mdlm",
               data=lambda cfg, tokenizer, progress: LabelledData(cfg, tokenizer), rules=_labelled_files),
)}
register_choices("family", tuple(FAMILIES))


def fits(family: str, backbone: str) -> bool:
    """Whether ``backbone`` serves ``family``: a backbone that names its families serves those alone; the others
    serve every family no such backbone is named for."""
    named = BACKBONES[backbone].families
    if named is not None:
        return family in named
    return not any(family in (spec.families or ()) for spec in BACKBONES.values())


def _family_rules(cfg: RunConfig) -> None:
    """The keys that belong to some families: set for the others, they are errors."""
    spec = FAMILIES[cfg.family]
    adopted = cfg.train.init_from and cfg.model.backbone == ModelConfig.backbone  # the source's backbone, later
    if not fits(cfg.family, cfg.model.backbone) and not adopted:
        usable = [name for name in BACKBONES if fits(cfg.family, name)]
        raise ConfigError(f"family {cfg.family} does not run on model.backbone={cfg.model.backbone} "
                          f"(it runs on {' or '.join(usable)})")
    blocked = " or ".join(f.name for f in FAMILIES.values() if f.blocks)
    if spec.blocks and cfg.model.block_size < 1 and not cfg.train.init_from:  # (else the source's, checked then)
        raise ConfigError(f"family {spec.name} needs model.block_size >= 1 (tokens per block)")
    if not spec.blocks and cfg.model.block_size:
        raise ConfigError(f"model.block_size is for block diffusion models (family {blocked})")
    if cfg.model.soft_mask_top_k and not spec.soft_mask:
        soft = " or ".join(f.name for f in FAMILIES.values() if f.soft_mask)
        raise ConfigError(f"model.soft_mask_top_k is for masked diffusion models (family {soft})")
    if spec.rules is not None:
        spec.rules(cfg)


register_rule(_family_rules)
register_choices("diffusion.ilm_weighting", ROW_WEIGHTINGS)
register_choices("diffusion.ilm_stop_head", STOP_HEADS)


def family_of(cfg: RunConfig | str) -> FamilySpec:
    """The spec of a config's family (or of a family name)."""
    name = cfg if isinstance(cfg, str) else cfg.family
    if name not in FAMILIES:
        raise ConfigError(f"unknown family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def refuse_beyond_memory(cfg: RunConfig, vocab: int, dtype: torch.dtype = torch.float32) -> None:
    """A ConfigError when a bound from below on the weights of ``cfg``'s network (the query and output
    projections and the norms of every block, and the embedding) in ``dtype`` exceeds this machine's
    memory: O(1), before anything of that size, even on the meta device, is built."""
    m = cfg.model
    at_least = dtype.itemsize * (m.blocks * (2 * m.hidden * m.hidden + 2 * m.hidden) + vocab * m.hidden)
    if at_least > memory_bytes():
        raise ConfigError(f"a {cfg.family} model of this shape (model.hidden={m.hidden}, model.blocks={m.blocks}, "
                          f"vocabulary {vocab}) needs at least {at_least / 2**30:,.1f} GiB for its {dtype} weights "
                          f"alone; this machine has {memory_bytes() / 2**30:,.1f} GiB")


def build_model(cfg: RunConfig, tokenizer: Tokenizer) -> torch.nn.Module:
    """The network of ``cfg``'s family. It is first built on the meta device (no memory) and refused
    when its fp32 weights alone exceed this machine's memory, so a typo such as
    ``model.hidden=1000000`` is an error, not an out-of-memory kill. (The meta build costs seconds once
    per process, so it is skipped when a generous bound on the size of a transformer of this width,
    depth and vocabulary is far below the machine's memory; and it is not even tried when a bound from
    below, the query and output projections and norms of every block and the embedding, is already beyond
    it: ``model.blocks=1000000000`` is refused at once instead of building a billion meta modules.)"""
    network = family_of(cfg).network
    m = cfg.model
    vocab = max(tokenizer.vocab_size, m.vocab)
    bound = 4 * (m.blocks * m.hidden * (16 * (m.hidden + m.cond_dim) + 3 * m.intermediate)
                 + 2 * vocab * m.hidden + 4 * m.length * m.hidden)
    if bound < memory_bytes() // 8:
        return network(cfg, tokenizer)
    refuse_beyond_memory(cfg, vocab)
    with torch.device("meta"):
        shape = network(cfg, tokenizer)
    needed = sum(t.numel() * 4 for t in (*shape.parameters(), *shape.buffers()))
    if needed > memory_bytes():
        raise ConfigError(f"a {cfg.family} model of this shape (model.hidden={cfg.model.hidden}, "
                          f"model.blocks={cfg.model.blocks}, vocabulary {tokenizer.vocab_size}) needs "
                          f"{needed / 2**30:,.1f} GiB for its fp32 weights alone; this machine has "
                          f"{memory_bytes() / 2**30:,.1f} GiB")
    return network(cfg, tokenizer)


def build_objective(cfg: RunConfig, tokenizer: Tokenizer) -> Objective:
    """The training objective of ``cfg``'s family."""
    return family_of(cfg).objective(cfg, tokenizer)
