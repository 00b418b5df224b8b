"""The backbones: one :class:`BackboneSpec` per network architecture (``model.backbone``), the only place
that tells them apart.

Every backbone takes ``(ModelConfig, vocab_size, causal, mask_id)`` and has the same forward interface
(``forward(ids, sigma, positions=, cache=, keep=)`` -> logits), so every family, objective and sampler
works on each. Adding a backbone is its module plus one entry in :data:`BACKBONES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig, register_choices
from . import diffusiongemma, gpt2, llama
from .dit import DDiTBlock, DiT


@dataclass(frozen=True)
class BackboneSpec:
    """A network architecture: its class, its repeated transformer block (the unit that FSDP shards and
    activation checkpointing recomputes), the adapter targets by group (regexes over module names for the
    linear layers of attention (q, k, v, o) and of each block's MLP, not, e.g., the DiT's time-embedding
    MLP), and the activations a training step keeps per token, block and hidden unit (floats, measured:
    the memory planner's constant)."""

    name: str
    network: type[torch.nn.Module]
    block: type[torch.nn.Module]
    adapter_targets: dict[str, list[str]]
    activation_floats: float
    families: tuple[str, ...] | None = None  # the only families it serves (None: every family of one token stream)


BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    BackboneSpec("dit", DiT, DDiTBlock,
                 {"attention": [r"blocks\.\d+\.attn_(qkv|out)"], "mlp": [r"blocks\.\d+\.mlp\.[02]"]}, 21.0),
    BackboneSpec("llama", llama.Transformer, llama.Block,
                 {"attention": [r".*\.self_attn\.[qkvo]_proj"],
                  "mlp": [r".*\.mlp\.((experts\.\d+|shared_experts)\.)?(gate|up|down)_proj"]}, 25.0),
    BackboneSpec("gpt2", gpt2.GPT2, gpt2.Block,
                 {"attention": [r".*\.attn\.c_(attn|proj)"], "mlp": [r".*\.mlp\.c_(fc|proj)"]}, 19.0),
    BackboneSpec("diffusiongemma", diffusiongemma.DiffusionGemma, diffusiongemma.Layer,
                 {"attention": [r"layers\.\d+\.self_attn\.[qkvo]_proj"],
                  "mlp": [r"layers\.\d+\.mlp\.(gate|up|down)_proj"]}, 32.1, families=("udlm",)),
)}
register_choices("model.backbone", tuple(BACKBONES))


def build_backbone(cfg: ModelConfig, vocab_size: int, causal: bool, mask_id: int | None) -> torch.nn.Module:
    """The network ``cfg.backbone`` names."""
    return BACKBONES[cfg.backbone].network(cfg, vocab_size, causal=causal, mask_id=mask_id)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of any network built on a backbone (the units that FSDP shards and
    activation checkpointing recomputes), in order."""
    blocks = tuple(spec.block for spec in BACKBONES.values())
    return [m for m in model.modules() if isinstance(m, blocks)]
