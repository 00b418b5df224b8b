"""The backbones: one entry per network architecture (``model.backbone``).

Every backbone takes ``(ModelConfig, vocab_size, causal, mask_id)`` and has the same forward interface
(``forward(ids, sigma, positions=, cache=, keep=)`` -> logits), so every family, objective and sampler
works on each.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig, register_choices
from . import gpt2, llama
from .dit import DDiTBlock, DiT

BACKBONES = {"dit": DiT, "llama": llama.Transformer, "gpt2": gpt2.GPT2}
BLOCKS = (DDiTBlock, llama.Block, gpt2.Block)  # the repeated transformer blocks of the backbones
# adapter targets by group: regexes over module names for the linear layers of attention (q, k, v, o) and
# of each block's MLP (not, e.g., the DiT's time-embedding MLP)
ADAPTER_TARGETS = {
    "dit": {"attention": [r"blocks\.\d+\.attn_(qkv|out)"], "mlp": [r"blocks\.\d+\.mlp\.[02]"]},
    "llama": {"attention": [r".*\.self_attn\.[qkvo]_proj"], "mlp": [r".*\.mlp\.(gate|up|down)_proj"]},
    "gpt2": {"attention": [r".*\.attn\.c_(attn|proj)"], "mlp": [r".*\.mlp\.c_(fc|proj)"]},
}
register_choices("model.backbone", tuple(BACKBONES))


def build_backbone(cfg: ModelConfig, vocab_size: int, causal: bool, mask_id: int | None) -> torch.nn.Module:
    """The network ``cfg.backbone`` names."""
    return BACKBONES[cfg.backbone](cfg, vocab_size, causal=causal, mask_id=mask_id)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of any network built on a backbone (the units that FSDP shards and
    activation checkpointing recomputes), in order."""
    return [m for m in model.modules() if isinstance(m, BLOCKS)]
