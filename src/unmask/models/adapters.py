"""LoRA and DoRA adapters (Hu et al. 2021; Liu et al. 2024) through ``peft``, on any backbone.

``W x`` becomes ``W x + (alpha / r) B A x`` on the target linear layers (DoRA: the merged weight's
columns are renormalised and scaled by a learned magnitude vector). ``peft`` injects its layers into
the network in place (``inject_adapter_in_model``), so the model keeps its class and forward; the
base weights move to ``<layer>.base_layer.weight`` and the adapters sit at
``<layer>.lora_A.default.weight`` etc. Everything is frozen except the adapters and, when present,
the soft-mask scalars. Fine-tuning starts from ``train.init_from`` with the run's own tokenizer equal
to the base's, so there are no new embedding rows to train.

``peft`` is an optional dependency (``pip install 'unmask[lora]'``), imported when adapters are used.
"""

from __future__ import annotations

import contextlib
import re

import torch

from ..config import AdapterConfig, ConfigError
from .registry import BACKBONES

ALWAYS_TRAINED = ("soft_mask.",)  # parameter-name prefixes trained alongside the adapters


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("adapters need peft: pip install 'unmask[lora]'") from None
    return peft


def target_pattern(cfg: AdapterConfig, backbone: str) -> str:
    """One regex over module names for ``cfg.targets``: the groups ``attention`` and ``mlp`` of the
    backbone (:attr:`~unmask.models.registry.BackboneSpec.adapter_targets`) or patterns of their own."""
    parts = []
    for target in cfg.targets:
        parts += BACKBONES[backbone].adapter_targets.get(target, [target])
    pattern = "|".join(f"(?:{p})" for p in parts)
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"adapter.targets={cfg.targets} is not a valid pattern: {exc}") from None
    return pattern


def add_adapters(model: torch.nn.Module, cfg: AdapterConfig, backbone: str) -> torch.nn.Module:
    """Inject ``cfg``'s adapters into ``model`` (in place) and freeze everything else but the soft-mask
    scalars; returns ``model``."""
    peft = _peft()
    pattern = target_pattern(cfg, backbone)
    if not any(re.fullmatch(pattern, name) and isinstance(m, torch.nn.Linear) for name, m in model.named_modules()):
        raise ConfigError(f"adapter.targets={cfg.targets} names no linear layer of this {backbone} model")
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=pattern,
                             use_dora=cfg.kind == "dora")
    peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith(ALWAYS_TRAINED))
    return model


def trainable_names(model: torch.nn.Module) -> list[str]:
    """The names of the parameters that train (``requires_grad``): the adapters and the soft-mask scalars."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def adapter_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers of ``model`` that ``peft`` injected (its tuner layers)."""
    peft = _peft()
    return [m for m in model.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]


@torch.no_grad()
def merged_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter merged into its base weight (the model is
    changed: its adapters become part of the base)."""
    for layer in adapter_layers(model):
        layer.merge()
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Within the block the model computes as its frozen base (the adapters bypassed)."""
    layers = adapter_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
