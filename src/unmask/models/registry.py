"""The backbones: one entry per network architecture (``model.backbone``).

Every backbone takes ``(ModelConfig, vocab_size, causal, mask_id)`` and has the same forward interface
(``forward(ids, sigma, positions=, cache=, keep=)`` -> logits), so every family, objective and sampler
works on each.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig, register_choices
from .dit import DiT
from .gpt2 import GPT2
from .llama import Transformer

BACKBONES = {"dit": DiT, "llama": Transformer, "gpt2": GPT2}
register_choices("model.backbone", tuple(BACKBONES))


def build_backbone(cfg: ModelConfig, vocab_size: int, causal: bool, mask_id: int | None) -> torch.nn.Module:
    """The network ``cfg.backbone`` names."""
    return BACKBONES[cfg.backbone](cfg, vocab_size, causal=causal, mask_id=mask_id)
