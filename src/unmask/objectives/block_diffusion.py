"""Block diffusion (BD3-LM, Arriola et al. 2025, arXiv 2503.09573): autoregressive over blocks of
``block_size`` tokens, masked diffusion within a block.

``log p(x) = sum_b log p(x^b | x^{<b})`` and each term is bounded by an MDLM NELBO of block ``b`` given the
clean blocks before it, with its own time ``t_b``:
``-log p(x) <= sum_b E_{t_b} [ w(t_b) sum_{l in b masked} -log p_theta(x_0^l | x_t^b, x^{<b}) ]``.
A row whose length is not a multiple of ``block_size`` has a shorter last block (the same bound). All blocks
are scored in one pass over the two-stream input ``[x_t ; x_0]`` with the block-causal pattern of
:func:`~unmask.models.common.two_stream_layout`, attended tile by tile (no 2L x 2L mask); the loss is read
on the ``x_t`` half. The clean tokens of the last block are left out of the training input: no ``x_t``
token sees them, so the loss and its gradient are the same without their work. Block size 1 is an
autoregressive model, block size L is MDLM.

Times: one uniform per block (``Noise.time_u`` of shape (B, L / block_size), stratified over the global
batch's B * L / block_size blocks as BD3-LM's antithetic sampler); a (B,) ``time_u`` is spread over the
blocks of its row as ``frac(u + j / blocks)``. Training draws ``t = t_min + (t_max - t_min) u``: the clipped
schedule ``U[beta, omega]`` of the paper with ``diffusion.t_min`` = beta, ``diffusion.t_max`` = omega
(a variance reduction for training; the evaluation bound always integrates ``t`` over [0, 1], see
:meth:`~unmask.objectives.mdlm.MaskedDiffusion.times_and_weights`).

The network is not time-conditioned (its adaLN conditioning is one per row, and block times differ within
a row), as BD3-LM's released models; soft-masking and guidance are MDLM-only.
"""

from __future__ import annotations

import torch

from ..models.common import bucketed_positions, two_stream_layout
from .base import Noise, masked_cross_entropy, per_sequence_sums
from .mdlm import MaskedDiffusion
from .schedules import NoiseSchedule


class BlockDiffusion(MaskedDiffusion):
    """The BD3-LM objective."""

    family = "bd3lm"

    def __init__(self, schedule: NoiseSchedule, mask_id: int, block_size: int, t_min: float = 1e-3,
                 t_max: float = 1.0, discrete_steps: int = 0, antithetic: bool = True):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        super().__init__(schedule, mask_id, t_min, discrete_steps, antithetic, t_max=t_max)
        self.block_size = block_size

    def time_blocks(self, length: int) -> int:
        """A diffusion time per block of the row."""
        return -(-length // self.block_size)

    def block_uniforms(self, time_u: torch.Tensor, length: int) -> torch.Tensor:
        """(B, blocks) time uniforms: given per block, or per row ``u`` spread as ``frac(u + j / blocks)``."""
        blocks = self.time_blocks(length)
        if time_u.dim() == 2:
            if time_u.shape[1] != blocks:
                raise ValueError(f"need {blocks} block times per row, got {time_u.shape[1]}")
            return time_u
        offsets = torch.arange(blocks, dtype=torch.float64, device=time_u.device) / blocks
        return (time_u.to(torch.float64)[:, None] + offsets).remainder(1.0)

    def noised(self, x0: torch.Tensor, counted: torch.Tensor, noise: Noise,
               exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t`` (B, L) and the per-token weight ``w(t_b)`` (B, L) float64 of the block times."""
        length = x0.shape[1]
        u = self.block_uniforms(noise.time_u.to(x0.device), length)
        t, weight = self.times_and_weights(u, exact)
        t = t.repeat_interleave(self.block_size, 1)[:, :length]
        weight = weight.repeat_interleave(self.block_size, 1)[:, :length]
        p_mask = 1 - self.schedule.alpha(t).float()
        masked = (noise.mask_u.to(x0.device) < p_mask) & counted
        return torch.where(masked, torch.full_like(x0, self.mask_id), x0), weight

    def loss(self, model, x0: torch.Tensor, counted: torch.Tensor, noise: Noise, exact: bool = False,
             guidance: float = 0.0) -> torch.Tensor:
        """Per-sequence sums (B,) of ``w(t_b) * -log p_theta(x_0^l | x_t, x_0^{<b})`` over the masked tokens."""
        if guidance:
            raise ValueError("guidance applies to MDLM models, not to block diffusion")
        b, length = x0.shape
        xt, weight = self.noised(x0, counted, noise, exact)
        masked = (xt == self.mask_id) & counted
        clean = self.block_size * ((length - 1) // self.block_size)  # x_0 before the last block
        flat, n = bucketed_positions(masked)  # the model's outputs are the x_t half's (the layout reads it)
        logits = model(torch.cat([xt, x0[:, :clean]], dim=1), torch.zeros(b, device=x0.device), positions=flat,
                       layout=two_stream_layout(length, self.block_size, x0.device, clean))
        nll = masked_cross_entropy(logits, x0.reshape(-1)[flat], self.mask_id, n)
        return per_sequence_sums(nll * weight.reshape(-1)[flat].float(), flat, x0.shape)

    count_estimator = False  # the any-order count estimator is MDLM's (one masked set over the whole row)

    def loss_by_count(self, model, x0, counted, noise, guidance: float = 0.0) -> torch.Tensor:
        """Not available: the count estimator is MDLM's; always raises ``ValueError``."""
        raise ValueError("the count estimator is MDLM's; block diffusion is scored with the time estimator")

    def logits(self, model, xt: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) at ``x_t``, each block given the clean blocks of ``x0`` before it."""
        length = xt.shape[1]
        return model(torch.cat([xt, x0], dim=1), sigma, layout=two_stream_layout(length, self.block_size, xt.device))
