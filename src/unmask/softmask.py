"""Soft-masking (Hersche et al. 2025; ``algorithms.md`` section 1): still-masked positions get an input
embedding that blends the mask embedding with the top-k predictions of the previous forward pass.

For every masked position ``l`` with previous logits ``logits^l`` (the mask class excluded)::

    p      = softmax(logits^l)                       full vocabulary, float32
    H      = -sum p log p                            nats
    lambda = w_s * sigmoid(w_a * (-H - w_b))         confident (low H) -> larger lambda
    pi     = softmax(logits^l[top-k ids])            p renormalized over its top k
    e^l    = (1 - lambda) E[mask] + lambda * sum_j pi_j E[i_j]

Unmasked positions keep ``E[x^l]`` (lambda = 0), and so does every position when there is no previous
pass (the first step). The three scalars are parameterized as ``w_s = sigmoid(a)`` (initialized near 0,
so a binary MDLM is the starting point), ``w_a = softplus(b)`` (initialized 6.66) and
``w_b = -softplus(c)`` (initialized -0.75).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

OMEGA_S_INIT = 1e-3
OMEGA_A_INIT = 6.66
OMEGA_B_INIT = -0.75


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


class SoftMask(nn.Module):
    """The feedback module: ``forward(embedding, ids, logits, mask_id)`` -> input embeddings (B, L, H).

    ``embedding`` is the backbone's (V, H) input table, ``ids`` (B, L) the current canvas, ``logits``
    (B, L, V) the previous pass's logits (or None on the first step).
    """

    def __init__(self, top_k: int = 3, omega_s: float = OMEGA_S_INIT, omega_a: float = OMEGA_A_INIT,
                 omega_b: float = OMEGA_B_INIT):
        super().__init__()
        if top_k < 1:
            raise ValueError(f"soft-mask top_k must be >= 1, got {top_k}")
        if not (0 <= omega_s < 1 and omega_a > 0 and omega_b < 0):
            raise ValueError(f"need 0 <= omega_s < 1, omega_a > 0, omega_b < 0; got {omega_s}, {omega_a}, {omega_b}")
        self.top_k = top_k
        self.a = nn.Parameter(torch.tensor(math.log(omega_s / (1 - omega_s)) if omega_s > 0 else -math.inf))
        self.b = nn.Parameter(torch.tensor(_inverse_softplus(omega_a)))
        self.c = nn.Parameter(torch.tensor(_inverse_softplus(-omega_b)))

    @property
    def omegas(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w_s, w_a, w_b)."""
        return torch.sigmoid(self.a), F.softplus(self.b), -F.softplus(self.c)

    def mixing_weight(self, logits: torch.Tensor, mask_id: int) -> torch.Tensor:
        """lambda (...,) from logits (..., V): entropy of the full softmax with the mask class excluded."""
        logits = logits.float().index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))
        log_p = logits.log_softmax(-1)
        entropy = -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1)
        w_s, w_a, w_b = self.omegas
        return w_s * torch.sigmoid(w_a * (-entropy - w_b))

    def forward(self, embedding: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor | None,
                mask_id: int) -> torch.Tensor:
        clean = embedding[ids]
        if logits is None:
            return clean
        masked = ids == mask_id
        if not masked.any():
            return clean
        prev = logits[masked].float().index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))
        lam = self.mixing_weight(prev, mask_id)
        top_logits, top_ids = prev.topk(min(self.top_k, prev.shape[-1] - 1), dim=-1)
        pi = top_logits.softmax(-1)
        mixture = torch.einsum("nk,nkh->nh", pi.to(embedding.dtype), embedding[top_ids])
        soft = (1 - lam)[:, None].to(embedding.dtype) * embedding[mask_id] + lam[:, None].to(embedding.dtype) * mixture
        out = clean.clone()
        out[masked] = soft
        return out
