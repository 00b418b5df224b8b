"""The autoregressive baseline's objective: exact next-token NLL on the same rows."""

from __future__ import annotations

import torch

from ..models.common import bucketed_positions
from .base import Noise, Objective, masked_cross_entropy, per_sequence_sums


class Autoregressive(Objective):
    """Next-token prediction on the same rows: input ``[BOS, x_0 .. x_{L-2}]``, targets ``x``.

    Prepending BOS lets the AR model score every position of the row, the first included, so its
    NLL and the diffusion NELBO cover exactly the same tokens.
    """

    family = "ar"
    per_sequence = False
    bound = "exact"

    def __init__(self, bos_id: int, mask_id: int):
        self.bos_id, self.mask_id = bos_id, mask_id

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The model's input for rows ``x`` (B, L): ``[BOS, x_0 .. x_{L-2}]`` (B, L)."""
        return torch.cat([torch.full_like(x[:, :1], self.bos_id), x[:, :-1]], dim=1)

    def loss(self, model, x0: torch.Tensor, counted: torch.Tensor, noise: Noise | None = None,
             exact: bool = False) -> torch.Tensor:
        """Per-sequence exact NLL (B,) over counted positions."""
        index, n = bucketed_positions(counted)
        # the output layer at the gathered positions, also when every position counts: its (N, V) logits are
        # then a tensor of their own, and the loss's in-place fill of the mask column does not make autograd
        # replay a view of the (B, L, V) output in the backward pass (a copy and a fill of the whole logits)
        logits = model(self.inputs(x0), positions=index)
        return per_sequence_sums(masked_cross_entropy(logits, x0.reshape(-1)[index], self.mask_id, n), index,
                                 x0.shape)
