"""The classifier's objective: cross-entropy of a label per sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Noise, Objective


class ClassificationObjective(Objective):
    """``-log p(label | sequence)`` per row (B,), the model pooling over the counted positions; rows
    are averaged (``per_sequence``), and the number is a loss, not a bound on a likelihood."""

    family = "classifier"
    per_sequence = True
    bound = "none"

    def loss(self, model, x0: torch.Tensor, counted: torch.Tensor, noise: Noise | None = None,
             exact: bool = False, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy (B,) of ``labels`` (B,) under the model's class logits for rows ``x0`` (B, L), pooled over
        ``counted``; ``noise`` and ``exact`` are unused."""
        if labels is None:
            raise ValueError("the classification objective needs the rows' labels")
        return F.cross_entropy(model(x0, counted).float(), labels, reduction="none")
