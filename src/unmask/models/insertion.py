"""The insertion LM network: the bidirectional DiT with a key padding mask and a stop head."""

from __future__ import annotations

import torch
import torch.nn as nn

from .dit import DiT

STOP_HEADS = ("binary", "count")  # P(stop) as one logit, or P(n missing) over n = 0..L-1


class InsertionLM(nn.Module):
    """The bidirectional DiT with a stop head: ``forward(ids, keep)`` -> (insertion logits (B, L, V),
    stop scores (B, K)). ``keep`` (B, L) marks the positions of each row's sequence (a left-aligned
    prefix of the row); the rest is padding that no position attends to.

    The stop head reads the BOS position. ``binary`` (K = 1): the logit of ``P(stop | x)``.
    ``count`` (K = L): logits of ``P(n | x)``, the number ``n`` of tokens still missing from ``x``;
    the model stops with ``P(n = 0 | x)``, the same hazard (``stop_log_odds``)."""

    def __init__(self, backbone: DiT, stop_head: str = "binary"):
        super().__init__()
        if backbone.causal:
            raise ValueError("an insertion model needs a bidirectional backbone")
        if stop_head not in STOP_HEADS:
            raise ValueError(f"stop head must be {' or '.join(STOP_HEADS)}, got {stop_head!r}")
        self.backbone = backbone
        self.stop_head = nn.Linear(backbone.cfg.hidden, 1 if stop_head == "binary" else backbone.cfg.length)

    @property
    def cfg(self):
        """The backbone's model config."""
        return self.backbone.cfg

    def forward(self, ids: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L), keep (B, L) bool -> insertion logits (B, L, V) and stop scores (B, K)."""
        x, final = self.backbone.features(ids, keep=keep)
        return self.backbone.output_layer(x, final), self.stop_head(x[:, 0].float())


def stop_log_odds(scores: torch.Tensor) -> torch.Tensor:
    """(B,) ``log P(stop) - log(1 - P(stop))`` from stop scores (B, K): the binary head's logit, or
    for a count head ``log p(0) - log sum_{n>0} p(n)`` (computed from the logits, stable in float32)."""
    if scores.shape[1] == 1:
        return scores[:, 0]
    return scores[:, 0] - scores[:, 1:].logsumexp(1)


def build_insertion_model(cfg, tokenizer) -> InsertionLM:
    """The :class:`InsertionLM` of a run config: a bidirectional DiT and the ``diffusion.ilm_stop_head`` head."""
    return InsertionLM(DiT(cfg.model, tokenizer.vocab_size, causal=False), cfg.diffusion.ilm_stop_head)
