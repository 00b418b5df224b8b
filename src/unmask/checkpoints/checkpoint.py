"""Checkpoints: safetensors weights, atomic writes, loading that never unpickles.

A checkpoint is a self-contained folder::

    step_00001000/
        model.safetensors       raw weights (MDLM key layout)
        ema.safetensors         EMA weights, same keys (absent when EMA is off)
        optimizer.safetensors   optimizer tensors, flattened as state.<param index>.<name>
        trainer_state.json      step, optimizer hyper-parameters, EMA counters, data position
        config.yaml             the resolved run config
        tokenizer/              the tokenizer (unmask_tokenizer.json [+ tokenizer.json])
        checksums.json          SHA-256 of every other file

It is written into ``.tmp-step_...`` and renamed into place once complete (``os.replace`` is
atomic), so a process killed during a save leaves the previous checkpoint intact; leftover temporary
folders are ignored and removed by the next save.

Reading verifies: each file is checked against ``checksums.json`` when it is read (a mismatch is an
error naming the file), must lie inside the checkpoint folder (:func:`unmask.files.member`), and
weights must be finite. :func:`resume_point` picks the newest intact checkpoint, reporting the
corrupt newer ones it skips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import RunConfig, dump_config, load_config
from ..data.tokenization import Tokenizer, load_tokenizer
from ..families import build_model, build_objective
from ..files import CheckpointError, member, read_json, sha256_file

STEP_DIR = re.compile(r"^step_(\d+)$")


CHECKSUMS = "checksums.json"


SAFETENSORS_HEADER_LIMIT = 100_000_000  # the safetensors format's own bound on its JSON header


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


def unique_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` without the keys whose tensor is the same as an earlier key's (a tied output layer),
    detached, contiguous and on the CPU: what safetensors stores (it refuses shared tensors). Loading puts
    the aliases back (:func:`load_weights`)."""
    out, seen = {}, set()
    for key, value in tensors.items():
        ident = (value.data_ptr(), tuple(value.shape), value.dtype) if value.numel() else (key,)
        if ident not in seen:
            seen.add(ident)
            out[key] = value.detach().contiguous().cpu()
    return out


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file(unique_tensors(tensors), str(path), metadata=metadata)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, whose header size is checked before anything is parsed."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    header = struct.unpack("<Q", head)[0] if len(head) == 8 else None
    if header is None or header > min(SAFETENSORS_HEADER_LIMIT, size - 8):
        raise CheckpointError(f"corrupt checkpoint file {path}: its header length "
                              f"({header if header is not None else 'missing'}) does not fit the file of {size:,} "
                              f"bytes")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt checkpoint file {path}: {exc}") from None


def record_checksums(folder: Path) -> None:
    """Write ``folder/checksums.json``: the SHA-256 of every other file below ``folder``."""
    sums = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != CHECKSUMS}
    with open(folder / CHECKSUMS, "w") as f:
        json.dump(sums, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verified(folder: Path, name: str, checksums: dict[str, str]) -> Path:
    """``folder/name`` after checking that it lies in ``folder`` and matches its recorded checksum."""
    path = member(folder, name)
    expected = checksums.get(name)
    if expected is not None and path.is_file() and sha256_file(path) != expected:
        raise CheckpointError(f"corrupt checkpoint file {path}: its SHA-256 differs from the one recorded when "
                              f"it was written")
    return path


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
    record_checksums(tmp)
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


class WeightSource:
    """A model source whose weights come as one state dict (``weights(ema)``) in the layout of
    ``build_model(config, tokenizer)``; :meth:`build` makes the network."""

    config: RunConfig
    tokenizer: Tokenizer
    path: Path

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def build(self, ema: bool = True, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The network with this source's weights (EMA weights by default, where there are)."""
        model = build_model(self.config, self.tokenizer)
        load_weights(model, self.weights(ema=ema), str(self.path))
        return model.to(device)


class Checkpoint(WeightSource):
    """A loaded checkpoint folder: config, tokenizer, trainer state, and lazy tensor access; every
    file is verified against ``checksums.json`` as it is read (checkpoints written before checksums
    existed are read unverified)."""

    def __init__(self, path: str | Path):
        self.path = resolve_checkpoint(path)
        try:
            sums = member(self.path, CHECKSUMS)
            self.checksums = read_json(sums) if sums.is_file() else {}
            self.state = read_json(self.file("trainer_state.json"))
            self.step = int(self.state["step"])
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"corrupt checkpoint {self.path}: {exc}") from None
        self.config = load_config(self.file("config.yaml"))
        for name in self.checksums:
            if name.startswith("tokenizer/"):
                self.file(name)
        self.tokenizer = load_tokenizer(self.file("tokenizer"))

    def file(self, name: str) -> Path:
        """The verified path of a file of this checkpoint."""
        return verified(self.path, name, self.checksums)

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        if ema and (self.path / "ema.safetensors").is_file():
            return load_tensors(self.file("ema.safetensors"))
        return load_tensors(self.file("model.safetensors"))

    def optimizer_state(self) -> dict | None:
        if "optimizer" not in self.state:
            return None
        try:
            return unflatten_optimizer(load_tensors(self.file("optimizer.safetensors")), self.state["optimizer"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"corrupt optimizer state in {self.path}: {exc}") from None

    def ema_state(self) -> dict[str, torch.Tensor] | None:
        return load_tensors(self.file("ema.safetensors")) if (self.path / "ema.safetensors").is_file() else None

    def verify(self) -> None:
        """Read and check every file (checksums, finite weights), as a resume will use them."""
        for name in self.checksums:
            self.file(name)
        for tensors in (self.weights(ema=False), self.ema_state() or {}):
            check_finite(tensors, str(self.path))
        self.optimizer_state()


def resume_point(root: Path, warn: Callable[[str], None]) -> Checkpoint | None:
    """The newest intact checkpoint under ``root`` (None when there is none at all); each corrupt
    newer one is reported through ``warn`` and skipped. Corrupt ones are left where they are."""
    found = list_checkpoints(root)
    problems = []
    for path in reversed(found):
        try:
            ckpt = Checkpoint(path)
            ckpt.verify()
            return ckpt
        except (CheckpointError, FileNotFoundError) as exc:
            problems.append(str(exc))
            warn(f"checkpoint {path} is unusable ({exc}); trying the one before it")
    if found:
        raise CheckpointError(f"no intact checkpoint in {root} to resume from: {'; '.join(problems)}")
    return None


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: tensor '{key}' holds NaN or infinite values (a corrupt file or a "
                                  f"diverged run)")


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy ``tensors`` into ``model``; any missing, unexpected or mis-shaped tensor is an error
    that names it."""
    expected = model.state_dict()
    first: dict[int, str] = {}
    tensors = dict(tensors)
    for key, value in model.state_dict(keep_vars=True).items():  # tied parameters: one key holds them
        alias = first.setdefault(id(value), key)
        if alias != key and key not in tensors and alias in tensors:
            tensors[key] = tensors[alias]
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
    check_finite(tensors, source)
    model.load_state_dict(tensors, strict=True)


def load_model(ckpt: WeightSource, ema: bool = True, device: torch.device | str = "cpu"):
    """(model in eval mode, objective) of any model source, with EMA weights by default."""
    return ckpt.build(ema=ema, device=device).eval(), build_objective(ckpt.config, ckpt.tokenizer)
