"""Optimization pieces of training: the learning-rate schedule, parameter groups, the EMA."""

from __future__ import annotations

import math

import torch

from ..config import RunConfig


class EMA:
    """Exponential moving average of the trained parameters, decay ``min(decay, (1 + n) / (10 + n))``
    (MDLM); frozen ones (an adapter run's base) are their own average."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.trained(model)]

    @staticmethod
    def trained(model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The parameters of ``model`` that train (``requires_grad``), in order."""
        return [p for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move each average towards its parameter with the decay ``min(decay, (1 + n) / (10 + n))`` of update ``n``."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.trained(model)], 1 - decay)

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Full model state with parameters replaced by their averages (buffers as in ``model``); a tied
        parameter's every name gets its one average."""
        average = {id(p): s for p, s in zip(self.trained(model), self.shadow)}
        return {k: average.get(id(v), v.detach()) for k, v in model.state_dict(keep_vars=True).items()}

    def load(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """Restore the averages from a saved EMA state (by parameter name) and the number of ``updates`` made."""
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(state[name])
        self.updates = updates


def learning_rate(cfg: RunConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then constant (MDLM) or cosine decay to ``min_lr_ratio * lr``."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - 1 - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def parameter_groups(model: torch.nn.Module, cfg: RunConfig) -> list[dict]:
    """AdamW groups of the trained parameters: the backbone (or its adapters) at ``train.lr`` with
    ``train.weight_decay``; the soft-mask scalars
    (when present) at ``train.soft_mask_lr`` without weight decay. ``lr_scale`` is each group's rate
    relative to ``train.lr``, so warm-up and decay apply to both."""
    t = cfg.train
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    soft = [p for name, p in trained if name.startswith("soft_mask.")]
    rest = [p for name, p in trained if not name.startswith("soft_mask.")]
    groups = [{"params": rest, "lr": t.lr, "lr_scale": 1.0, "weight_decay": t.weight_decay}]
    if soft:
        groups.append({"params": soft, "lr": t.soft_mask_lr, "lr_scale": t.soft_mask_lr / t.lr, "weight_decay": 0.0})
    return groups
