"""Soft-masking (Hersche et al. 2025, arXiv 2510.17206): still-masked positions get an input
embedding that blends the mask embedding with the top-k predictions of the previous forward pass.

For every masked position ``l`` with previous logits ``logits^l`` (the mask class excluded)::

    p      = softmax(logits^l)                       full vocabulary, float32
    H      = -sum p log p                            nats
    lambda = w_s * sigmoid(w_a * (-H - w_b))         confident (low H) -> larger lambda
    pi     = softmax(logits^l[top-k ids])            p renormalized over its top k
    e^l    = (1 - lambda) E[mask] + lambda * sum_j pi_j E[i_j]

Unmasked positions keep ``E[x^l]`` (lambda = 0), and so does every position without a previous pass
(the first step). The three scalars are parameterized as ``w_s = sigmoid(a)`` (initialized near 0,
so a binary MDLM is the starting point), ``w_a = softplus(b)`` (initialized 6.66) and
``w_b = -softplus(c)`` (initialized -0.75).

A previous pass enters only through ``H`` and the top-k ``(ids, pi)`` of each position, so the
feedback is kept as :class:`SoftFeedback`, a few numbers per position, not (B, L, V) logits. It is
computed without gradient (training's first pass; sampling's previous step): gradients reach the
backbone through the embedding rows and ``(a, b, c)`` through ``lambda`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

OMEGA_S_INIT = 1e-3


OMEGA_A_INIT = 6.66


OMEGA_B_INIT = -0.75


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


def _without_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    return logits.float().index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))


def entropy_without_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """``H`` (...,) in nats of softmax(logits (..., V)) over the vocabulary with the mask class excluded."""
    log_p = _without_mask(logits, mask_id).log_softmax(-1)
    return -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1)


@dataclass
class SoftFeedback:
    """Per-position summary of a previous pass: ``entropy`` (B, L), ``top_ids`` and ``top_probs``
    (B, L, k) (probabilities renormalized over the top k), and ``valid`` (B, L), the positions that
    have feedback. Everything else is ignored."""

    entropy: torch.Tensor
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def empty(cls, batch: int, length: int, top_k: int, device: torch.device | str = "cpu") -> "SoftFeedback":
        """Feedback of shape (``batch``, ``length``) with no valid position (what the first step sees)."""
        return cls(torch.zeros(batch, length, device=device),
                   torch.zeros(batch, length, top_k, dtype=torch.long, device=device),
                   torch.zeros(batch, length, top_k, device=device),
                   torch.zeros(batch, length, dtype=torch.bool, device=device))

    @classmethod
    @torch.no_grad()
    def from_logits(cls, logits: torch.Tensor, where: torch.Tensor, mask_id: int, top_k: int) -> "SoftFeedback":
        """Feedback at the ``True`` positions of ``where`` (B, L) from their logits (N, V), row-major."""
        out = cls.empty(*where.shape, top_k, device=logits.device)
        out.store(torch.arange(where.shape[0], device=where.device), where, logits, mask_id)
        return out

    @torch.no_grad()
    def store(self, rows: torch.Tensor, where: torch.Tensor, logits: torch.Tensor, mask_id: int) -> None:
        """Replace the feedback of ``rows`` (R,): positions ``where`` (R, L) get the summary of their
        ``logits`` (N, V) (row-major); every other position of those rows loses its feedback."""
        k = self.top_ids.shape[-1]
        logits = _without_mask(logits, mask_id)
        top_logits, top_ids = logits.topk(k, dim=-1)
        for name, value in (("entropy", entropy_without_mask(logits, mask_id)), ("top_ids", top_ids),
                            ("top_probs", top_logits.softmax(-1))):
            block = getattr(self, name)[rows]
            block[where] = value.to(block.dtype)
            getattr(self, name)[rows] = block
        self.valid[rows] = where

    def select(self, rows: torch.Tensor) -> "SoftFeedback":
        """The feedback of ``rows`` (R,) (indices may repeat)."""
        return SoftFeedback(self.entropy[rows], self.top_ids[rows], self.top_probs[rows], self.valid[rows])


class SoftMask(nn.Module):
    """The feedback module: ``forward(embedding, ids, feedback, mask_id)`` -> input embeddings (B, L, H).

    ``embedding`` is the backbone's (V, H) input table, ``ids`` (B, L) the current canvas and
    ``feedback`` the previous pass (:class:`SoftFeedback`, or None on the first step). Computed densely
    (no data-dependent shapes): lambda is 0 wherever the position is not masked or has no feedback.
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

    def mixing_weight(self, entropy: torch.Tensor) -> torch.Tensor:
        """lambda = w_s sigmoid(w_a (-H - w_b)), elementwise in ``entropy``."""
        w_s, w_a, w_b = self.omegas
        return w_s * torch.sigmoid(w_a * (-entropy - w_b))

    def forward(self, embedding: torch.Tensor, ids: torch.Tensor, feedback: SoftFeedback | None,
                mask_id: int) -> torch.Tensor:
        """Input embeddings (B, L, H) of ``ids`` (B, L): masked positions with feedback get
        ``(1 - lambda) E[mask] + lambda sum_j pi_j E[i_j]`` (Hersche et al., 2025; module docstring), others
        ``E[x]``."""
        clean = embedding[ids]
        if feedback is None:
            return clean
        active = feedback.valid & (ids == mask_id)
        lam = self.mixing_weight(feedback.entropy) * active
        mixture = torch.einsum("blk,blkh->blh", feedback.top_probs.to(embedding.dtype), embedding[feedback.top_ids])
        lam = lam[..., None].to(embedding.dtype)
        # masked positions: (1 - lam) E[mask] + lam * mixture; elsewhere lam = 0 leaves E[x] unchanged
        return torch.where(active[..., None], (1 - lam) * embedding[mask_id] + lam * mixture, clean)


def soft_mask_for(top_k: int, causal: bool, mask_id: int | None, vocab_size: int) -> SoftMask | None:
    """The soft-mask module of a backbone with ``model.soft_mask_top_k = top_k`` (None when 0)."""
    if not top_k:
        return None
    if causal or mask_id is None:
        raise ValueError("soft-masking needs a bidirectional model and its mask id")
    if not 1 <= top_k < vocab_size:
        raise ValueError(f"soft_mask_top_k={top_k} must lie in [1, {vocab_size - 1}]")
    return SoftMask(top_k)


def input_embeddings(embedding: torch.Tensor, soft_mask: SoftMask | None, mask_id: int | None,
                     ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                     feedback: SoftFeedback | None) -> torch.Tensor:
    """A backbone's input (B, L, H): the rows of ``embedding`` (V, H) for ``ids``, ``inputs_embeds`` as
    given, or, with ``feedback``, the soft-masked embeddings of ``ids``."""
    if (ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of ids and inputs_embeds")
    if feedback is not None:
        if soft_mask is None or ids is None:
            raise ValueError("soft-mask feedback needs a soft-mask model (model.soft_mask_top_k > 0) and ids")
        return soft_mask(embedding, ids, feedback, mask_id)
    return embedding[ids] if ids is not None else inputs_embeds
