"""What every objective shares: the :class:`Objective` interface, the noise of a step, per-sequence
sums, model unwrapping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


@dataclass
class Noise:
    """The randomness of one loss evaluation: a uniform per sequence (time) and per token (mask), per
    sequence whether it gets the soft-mask input (``soft_u < soft_mask_prob``; None: every row), and a
    second uniform per token for training-only augmentations (the ILM's stop-head copies; None: none)."""

    time_u: torch.Tensor  # (B,)
    mask_u: torch.Tensor  # (B, L)
    soft_u: torch.Tensor | None = None  # (B,)
    extra_u: torch.Tensor | None = None  # (B, L)

    def slice(self, start: int, stop: int) -> "Noise":
        """The noise of rows ``start:stop``."""
        return Noise(*(None if u is None else u[start:stop] for u in self.parts()))

    def to(self, device) -> "Noise":
        """The noise with every tensor on ``device``."""
        return Noise(*(None if u is None else u.to(device) for u in self.parts()))

    def parts(self) -> tuple:
        """``(time_u, mask_u, soft_u, extra_u)``, in field order."""
        return self.time_u, self.mask_u, self.soft_u, self.extra_u


class Objective:
    """A training objective of a family (:mod:`unmask.families`).

    ``loss`` returns per-sequence sums (B,) of nats over the counted positions of ``x0`` (B, L): the
    training loop divides them by the global number of counted tokens, or of rows when
    ``per_sequence``. ``exact`` selects the evaluation estimator. ``bound`` says what the evaluated
    number is: an upper bound on the NLL (``nelbo``), the NLL itself (``exact``) or neither (``none``).
    The noise of a step (:func:`draw_noise`) has ``time_blocks(L)`` times per row and, with
    ``extra_noise``, a second uniform per token.
    """

    family: str
    per_sequence: bool
    bound: Literal["nelbo", "exact", "none"]
    extra_noise: bool = False

    def loss(self, model, x0: torch.Tensor, counted: torch.Tensor, noise: Noise,
             exact: bool = False) -> torch.Tensor:
        """Per-sequence sums (B,) of nats over the ``counted`` (B, L) positions of ``x0`` (B, L) under ``noise``;
        ``exact``: the evaluation estimator instead of the training one."""
        raise NotImplementedError

    def time_blocks(self, length: int) -> int:
        """Diffusion times per training row of ``length`` tokens: one, unless the objective draws more."""
        return 1


def stratified_uniform(n: int, generator: torch.Generator | None = None, antithetic: bool = True) -> torch.Tensor:
    """``n`` uniforms on [0, 1); with ``antithetic`` the i-th lies in ``[i/n, (i+1)/n)`` (MDLM's
    low-discrepancy sampler), so the batch covers [0, 1) evenly."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if antithetic:
        u = (u + torch.arange(n, dtype=torch.float64)) / n
    return u


def draw_noise(batch: int, length: int, generator: torch.Generator, antithetic: bool = True,
               blocks: int = 1, extra: bool = False) -> Noise:
    """Noise for a whole (global) batch; data-parallel ranks slice their share so a run on any
    number of processes sees the same draws. ``blocks`` > 1: a time per block (B, blocks) (block
    diffusion), stratified over all ``batch * blocks`` of them. ``extra``: also ``extra_u``, drawn
    last, so the other draws do not depend on it."""
    time_u = stratified_uniform(batch * blocks, generator, antithetic)
    time_u = time_u.view(batch, blocks) if blocks > 1 else time_u
    mask_u = torch.rand(batch, length, generator=generator)
    soft_u = torch.rand(batch, generator=generator)
    extra_u = torch.rand(batch, length, generator=generator) if extra else None
    return Noise(time_u, mask_u, soft_u, extra_u)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask_id: int,
                         valid: int | None = None) -> torch.Tensor:
    """``-log p(target)`` under softmax(logits) with the mask class excluded; logits (N, V), targets (N,).

    With ``valid``, only the first ``valid`` rows are scored; the rest (the padding of
    :func:`~unmask.models.common.bucketed_positions`) give 0 and no gradient, so the padded logits are
    never sliced (a slice's backward writes a zero tensor of the whole (N, V) and copies into it).

    The mask column is set to -inf in place, outside autograd: its gradient is exactly zero either way
    (softmax gives it probability 0 and it is never a target), and an out-of-place fill would copy
    the (N, V) logits forward and their gradient backward. ``logits`` are overwritten there when they
    are already float32; a caller that saved them for its backward gets autograd's in-place error."""
    logits = logits.float()
    logits.detach().index_fill_(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))
    if valid is not None and valid < len(targets):
        targets = torch.cat([targets[:valid], targets.new_full((len(targets) - valid,), IGNORED)])
    if logits.device.type == "cpu" and not torch.compiler.is_compiling():
        return SoftmaxCrossEntropy.apply(logits, targets)
    return F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORED)


IGNORED = -100  # a target that scores 0 and gets no gradient (F.cross_entropy's ignore_index)
CROSS_ENTROPY_CHUNK = 1 << 18  # elements of logits per chunk of rows (1 MiB of float32: stays in cache)


class SoftmaxCrossEntropy(torch.autograd.Function):
    """``-log softmax(logits)[target]`` per row (N,), logits (N, V), targets (N,) with :data:`IGNORED` rows
    scoring 0: :func:`F.cross_entropy` with ``reduction="none"``, to float rounding (tested), cheaper on a CPU.

    The forward computes ``p = softmax(logits)`` chunk by chunk of rows (each chunk in cache) and saves it;
    the backward of ``g`` (N,) is ``(p - onehot(target)) * g`` written into ``p`` itself. Against
    ``log_softmax`` + ``nll_loss`` (which save the log-probabilities, fill a zero (N, V) gradient, scatter
    into it and run ``log_softmax``'s backward) it saves the same (N, V) tensor and makes half the passes
    over it: 1.9x faster forward + backward at (2048, 50257) on one CPU thread (docs/results/performance-peers.md).
    Used on CPU outside ``torch.compile`` (inductor fuses ``F.cross_entropy`` itself; on GPUs its fused
    kernels are used). The backward consumes ``p``, so it runs once: a second backward (``retain_graph``)
    is refused, never answered with wrong numbers."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``-log softmax(logits)[target]`` (N,) of logits (N, V) and targets (N,); saves the softmax for the
        backward."""
        n, v = logits.shape
        p, lse = torch.empty_like(logits), logits.new_empty(n)
        rows = max(1, CROSS_ENTROPY_CHUNK // max(v, 1))
        for start in range(0, n, rows):
            chunk = logits[start:start + rows]
            peak = chunk.amax(-1, keepdim=True)
            e = torch.sub(chunk, peak, out=p[start:start + rows]).exp_()
            total = e.sum(-1, keepdim=True)
            e.div_(total)
            lse[start:start + rows] = total.log_().add_(peak)[:, 0]
        keep = targets != IGNORED
        picked = logits.gather(1, targets.clamp_min(0)[:, None])[:, 0]
        ctx.save_for_backward(p, targets, keep)
        ctx.consumed = False
        return torch.where(keep, lse - picked, 0.0)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        """The logits' gradient ``(p - onehot(target)) * g`` (N, V), written into the saved softmax ``p``."""
        if ctx.consumed:
            raise RuntimeError("SoftmaxCrossEntropy's backward reuses its saved softmax and runs once; a second "
                               "backward through the same graph (retain_graph) is not supported")
        ctx.consumed = True
        p, targets, keep = ctx.saved_tensors
        g = torch.where(keep, g, 0.0)
        grad = p.mul_(g[:, None])
        grad.scatter_add_(1, targets.clamp_min(0)[:, None], -g[:, None])
        return grad, None


def per_sequence_sums(values: torch.Tensor, flat_index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum per-position ``values`` at flat indices into B*L back into per-sequence totals (B,)."""
    out = torch.zeros(shape[0], device=values.device, dtype=torch.float32)
    return out.index_add_(0, flat_index // shape[1], values.float())


def unwrap(model):
    """The module inside ``torch.compile`` and ``DistributedDataParallel`` wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
