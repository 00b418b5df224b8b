"""Unsupervised classifier-free guidance (SMDM, Nie et al. 2024, eq. 7): the
one place that says what the unconditional branch is and how the two branches combine. Samplers
(``samplers.denoiser``), likelihood scoring (``objectives.mdlm``) and RL rollouts (``train.rl``) use it."""

from __future__ import annotations

import torch


def unconditional_input(x: torch.Tensor, condition: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The unconditional branch's input: ``x`` (..., L) with the conditioning positions (bool, same
    shape) masked."""
    return torch.where(condition, torch.full_like(x, mask_id), x)


def guided_logits(conditional: torch.Tensor, unconditional: torch.Tensor, weight) -> torch.Tensor:
    """``l_u + (1 + w)(l_c - l_u)``: the rescaled conditional ``p(x|c)^(1+w) / p(x)^w`` in logits;
    ``weight`` broadcasts against the logits (``w = 0`` gives ``l_c``)."""
    return unconditional + (1 + weight) * (conditional - unconditional)
