"""The insertion LM network: the bidirectional DiT with a key padding mask and a stop head."""

from __future__ import annotations

import torch
import torch.nn as nn

from .dit import DiT


class InsertionLM(nn.Module):
    """The bidirectional DiT with a stop head: ``forward(ids, keep)`` -> (insertion logits (B, L, V),
    stop logits (B,)). ``keep`` (B, L) marks the positions of each row's sequence (a left-aligned
    prefix of the row); the rest is padding that no position attends to."""

    def __init__(self, backbone: DiT):
        super().__init__()
        if backbone.causal:
            raise ValueError("an insertion model needs a bidirectional backbone")
        self.backbone = backbone
        self.stop_head = nn.Linear(backbone.cfg.hidden, 1)

    @property
    def cfg(self):
        return self.backbone.cfg

    def forward(self, ids: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, final = self.backbone.features(ids, keep=keep)
        return self.backbone.output_layer(x, final), self.stop_head(x[:, 0].float())[:, 0]


def build_insertion_model(cfg, tokenizer) -> InsertionLM:
    return InsertionLM(DiT(cfg.model, tokenizer.vocab_size, causal=False))
