"""One training step: the same function for the training loop (:mod:`unmask.train.loop`) and for every
benchmark that times training.

``train_step(state, batch)``: the objective's per-sequence loss sums over micro-batches of this process's
rows (gradient synchronization on the last), each scaled by ``world / tokens`` (the global number of
counted tokens, or of rows for per-sequence objectives, so the gradient is the global mean whatever the
number of processes and micro-batches); then gradient-norm clipping, the optimizer step and the EMA.
Setting the learning rate, drawing the batch, logging, evaluation and saving stay around it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..objectives.base import Noise, Objective
from ..runtime import autocast
from .optim import EMA
from .parallel import full_value


@dataclass
class TrainState:
    """What a step updates and how: ``model`` (whose parameters are clipped and averaged), ``forward`` (what
    the objective calls: the data-parallel and compiled wrapper of the model, or the model itself), the
    optimizer and EMA, the compute ``precision`` on ``device``, ``micro`` rows per micro-batch (0: one
    micro-batch), ``grad_clip`` (0: none), the number of processes ``world`` and ``sync(last)``, the context
    that lets gradients synchronize only on a step's last micro-batch."""

    model: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    forward: torch.nn.Module | None = None
    ema: EMA | None = None
    device: torch.device | str = "cpu"
    precision: str = "fp32"
    micro: int = 0
    grad_clip: float = 0.0
    world: int = 1
    sync: Callable[[bool], contextlib.AbstractContextManager] = lambda last: contextlib.nullcontext()


@dataclass
class Batch:
    """This process's rows of a step: ``x0`` (B, L), ``counted`` (B, L) bool, their ``noise`` (None for
    objectives that draw none), the global number of units the loss is averaged over (``tokens``) and, for
    classifiers, ``labels`` (B,); ``targets``: more per-row tensors (B, ...) the objective's ``loss`` takes by
    name (distillation's teacher reveal steps and training progress)."""

    x0: torch.Tensor
    counted: torch.Tensor
    noise: Noise | None
    tokens: float
    labels: torch.Tensor | None = None
    targets: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StepMetrics:
    """This process's loss sum (float64), the gradient norm before clipping, and whether both are finite
    (device tensors: reading them synchronizes, so the loop reads them only when it logs)."""

    loss_sum: torch.Tensor
    grad_norm: torch.Tensor
    finite: torch.Tensor


def train_step(state: TrainState, batch: Batch) -> StepMetrics:
    """One optimizer step on ``batch`` (module docstring)."""
    forward = state.model if state.forward is None else state.forward
    rows = len(batch.x0)
    micro = state.micro or rows
    parts = -(-rows // micro)
    loss = torch.zeros((), device=batch.x0.device, dtype=torch.float64)
    for m in range(parts):
        part = slice(m * micro, (m + 1) * micro)
        with state.sync(m == parts - 1):
            with autocast(state.device, state.precision):
                targets = {name: value[part] for name, value in batch.targets.items()}
                if batch.labels is not None:
                    targets["labels"] = batch.labels[part]
                noise = None if batch.noise is None else batch.noise.slice(m * micro, (m + 1) * micro)
                loss_sum = state.objective.loss(forward, batch.x0[part], batch.counted[part], noise, **targets).sum()
            (loss_sum * state.world / max(batch.tokens, 1.0)).backward()
        loss += loss_sum.detach().double()
    clip = state.grad_clip if state.grad_clip > 0 else float("inf")
    grad_norm = full_value(torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip))
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.update(state.model)
    return StepMetrics(loss, grad_norm, finite)
