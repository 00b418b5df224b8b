"""Checkpoints: safetensors weights, atomic writes, loading that never unpickles.

A checkpoint is a self-contained folder::

    step_00001000/
        model.safetensors       raw weights (MDLM key layout)
        ema.safetensors         EMA weights, same keys (absent when EMA is off)
        optimizer.safetensors   optimizer tensors, flattened as state.<param index>.<name>
        trainer_state.json      step, optimizer hyper-parameters, EMA counters, data position
        config.yaml             the resolved run config
        tokenizer/              the tokenizer (unmask_tokenizer.json [+ tokenizer.json])

It is written into ``.tmp-step_...`` and renamed into place once complete (``os.replace`` is
atomic), so a process killed during a save leaves the previous checkpoint intact; leftover temporary
folders are ignored and removed by the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import RunConfig, dump_config, load_config
from .tokenization import Tokenizer, load_tokenizer

STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """Missing, corrupt or incompatible checkpoint."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt checkpoint file {path}: {exc}") from None


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer ``state_dict`` into tensors (for safetensors) and JSON-able rest."""
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in rest.get("scalars", {}).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(root: Path, step: int, model_state: dict[str, torch.Tensor], cfg: RunConfig,
                    tokenizer: Tokenizer, optimizer_state: dict | None = None,
                    ema_state: dict[str, torch.Tensor] | None = None, trainer_state: dict | None = None,
                    keep: int = 0) -> Path:
    """Write ``root/step_{step:08d}`` atomically; keep the newest ``keep`` checkpoints (0 = all)."""
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    meta = {"format": "unmask", "step": str(step)}
    _save_tensors(model_state, tmp / "model.safetensors", meta)
    if ema_state is not None:
        _save_tensors(ema_state, tmp / "ema.safetensors", meta)
    state = dict(trainer_state or {}, step=step)
    if optimizer_state is not None:
        tensors, rest = flatten_optimizer(optimizer_state)
        _save_tensors(tensors, tmp / "optimizer.safetensors", meta)
        state["optimizer"] = rest
    dump_config(cfg, tmp / "config.yaml")
    tokenizer.save(tmp / "tokenizer")
    with open(tmp / "trainer_state.json", "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    replaced = None
    if final.exists():  # move the old one aside first: a kill now leaves the earlier checkpoints
        replaced = root / f".tmp-replaced-{final.name}-{os.getpid()}"
        os.replace(final, replaced)
    os.replace(tmp, final)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    _fsync_dir(root)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder / ``checkpoints`` folder (-> its newest checkpoint)."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    raise CheckpointError(f"no complete checkpoint in {path}")


class Checkpoint:
    """A loaded checkpoint folder: config, tokenizer, trainer state, and lazy tensor access."""

    def __init__(self, path: str | Path):
        self.path = resolve_checkpoint(path)
        try:
            self.state = json.loads((self.path / "trainer_state.json").read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"corrupt {self.path / 'trainer_state.json'}: {exc}") from None
        self.config = load_config(self.path / "config.yaml")
        self.tokenizer = load_tokenizer(self.path / "tokenizer")
        self.step = int(self.state["step"])

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        if ema and (self.path / "ema.safetensors").is_file():
            return load_tensors(self.path / "ema.safetensors")
        return load_tensors(self.path / "model.safetensors")

    def optimizer_state(self) -> dict | None:
        if "optimizer" not in self.state:
            return None
        return unflatten_optimizer(load_tensors(self.path / "optimizer.safetensors"), self.state["optimizer"])

    def ema_state(self) -> dict[str, torch.Tensor] | None:
        path = self.path / "ema.safetensors"
        return load_tensors(path) if path.is_file() else None


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy ``tensors`` into ``model``; any missing, unexpected or mis-shaped tensor is an error
    that names it."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model: missing {missing[:3]}"
                              f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                              f"{'...' if len(unexpected) > 3 else ''}")
    for key, value in expected.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{source} tensor '{key}' has shape {tuple(tensors[key].shape)} but the "
                                  f"model expects {tuple(value.shape)}: it was saved from a model of a "
                                  f"different shape")
    model.load_state_dict(tensors, strict=True)


def load_model(ckpt: Checkpoint, ema: bool = True, device: torch.device | str = "cpu"):
    """(model in eval mode, objective) of a checkpoint, with EMA weights by default."""
    from .runtime import build_model, build_objective

    model = build_model(ckpt.config, ckpt.tokenizer)
    load_weights(model, ckpt.weights(ema=ema), str(ckpt.path))
    return model.to(device).eval(), build_objective(ckpt.config, ckpt.tokenizer)
