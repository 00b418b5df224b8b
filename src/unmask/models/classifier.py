"""Sequence classification on the DiT backbone (MDLM's downstream fine-tuning), for DNA and for text.

``family: classifier`` runs put a head on the bidirectional backbone: the last block's hidden states,
pooled (``mean`` over non-padding positions, or ``cls``: the BOS position), a layer norm, dropout and a
linear layer to the classes. Rows are ``[BOS] sequence [EOS] [PAD]...`` of ``data.length`` (longer
sequences are truncated), read from CSV/TSV/JSONL files with ``data.text_field`` and
``data.label_field`` (``data.path`` train, ``data.valid_path``, ``data.test_path``; ``unmask.data.labelled``).
The backbone starts from a pretrained MDLM (``train.init_from``) or from scratch; the input is the clean
sequence (no masks). The training loop (``unmask.train.loop``) trains it with the cross-entropy objective
(``unmask.objectives.classification``), scores the validation file every ``train.eval_every`` steps (a
tenth of the run by default), keeps the checkpoint with the best validation score (ROC AUC for two
classes, accuracy otherwise) as ``best/`` and scores it on the test file at the end
(``test_metrics.json``). One process; no EMA.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError, RunConfig
from ..data.tokenization import Tokenizer
from .dit import DiT


class SequenceClassifier(nn.Module):
    """``backbone`` (a DiT) -> pooled hidden state -> LayerNorm -> dropout -> Linear: logits (B, C)."""

    def __init__(self, backbone: DiT, num_labels: int, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_labels}")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be mean or cls, got {pooling!r}")
        self.backbone, self.pooling = backbone, pooling
        hidden = backbone.cfg.hidden
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """ids (B, L), keep (B, L) bool: the positions mean pooling averages (not padding)."""
        x, _ = self.backbone.features(ids)
        if self.pooling == "mean":
            weights = keep.to(x.dtype)[..., None]
            pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1)
        else:
            pooled = x[:, 0]
        return self.head(self.dropout(self.norm(pooled.float())))


def build_classifier(cfg: RunConfig, tokenizer: Tokenizer) -> SequenceClassifier:
    """The :class:`SequenceClassifier` of ``cfg``: a bidirectional DiT backbone and a head with one output per class
    of ``classifier.labels``."""
    if not cfg.classifier.labels:
        raise ConfigError("the classifier's classes are unknown: set classifier.labels or train on labelled data")
    backbone = DiT(cfg.model, tokenizer.vocab_size, causal=False, mask_id=tokenizer.mask_id)
    return SequenceClassifier(backbone, len(cfg.classifier.labels), cfg.classifier.pooling, cfg.classifier.dropout)
