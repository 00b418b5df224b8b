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

A sharded checkpoint (``train.parallel=fsdp``; ``trainer_state.json`` says ``"shards": W``) has, in
place of each of the three tensor files, one file per process, ``model-00000-of-0000W.safetensors``
...: process ``r`` writes its rows of every sharded tensor (FSDP2 cuts dim 0 into ``ceil(n / W)``-row
pieces) and the tensors it holds whole (buffers, optimizer step counts); each file's safetensors
header metadata ``offsets`` (JSON) gives, per sharded key, the first row of its piece and the full
row count. Readers get full tensors (:meth:`Checkpoint.tensors` puts the pieces together and checks
that they tile every tensor exactly), so evaluation, sampling and ``unmask export`` read either kind;
a run resumed with the same number of processes reads only its own files. Like every file here they
are safetensors and JSON: nothing is unpickled.

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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, Shard

from ..config import RunConfig, dump_config, load_config
from ..data.tokenization import Tokenizer, load_tokenizer
from ..families import build_model, build_objective
from ..files import CheckpointError, member, read_json, sha256_file
from ..models.quantize import quantize_weights

STEP_DIR = re.compile(r"^step_(\d+)$")


def shard_name(kind: str, rank: int, world: int) -> str:
    """The file of process ``rank``'s share of ``kind`` (model, ema or optimizer) in a sharded checkpoint."""
    return f"{kind}-{rank:05d}-of-{world:05d}.safetensors"


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


def check_header(path: Path) -> None:
    """A safetensors file's header length must fit both the file and :data:`SAFETENSORS_HEADER_LIMIT`,
    checked before the header is parsed."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    header = struct.unpack("<Q", head)[0] if len(head) == 8 else None
    if header is None or header > min(SAFETENSORS_HEADER_LIMIT, size - 8):
        raise CheckpointError(f"corrupt weights file {path}: its header length "
                              f"({header if header is not None else 'missing'}) does not fit the file of {size:,} "
                              f"bytes")


def load_tensors(path: Path, with_metadata: bool = False):
    """The tensors of a safetensors file, whose header size is checked before anything is parsed
    (and, ``with_metadata``, its header's metadata dict)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    check_header(path)
    try:
        if not with_metadata:
            return load_file(str(path))
        with safe_open(str(path), "pt") as f:  # one read for the tensors and the header's metadata
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt checkpoint file {path}: {exc}") from None


def local_shards(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """This process's share of ``tensors``: the rows it holds of each DTensor sharded on dim 0 (FSDP2)
    with ``{key: [first row, full rows]}``, and every other tensor whole."""
    local, offsets = {}, {}
    for key, value in tensors.items():
        if not isinstance(value, DTensor):
            local[key] = value
            continue
        if tuple(value.placements) != (Shard(0),):
            raise CheckpointError(f"cannot save '{key}': sharded as {value.placements}, not by rows")
        rows, world, rank = value.shape[0], value.device_mesh.size(), value.device_mesh.get_local_rank()
        per = -(-rows // world)
        start = min(rank * per, rows)
        local[key] = value.to_local()
        if local[key].shape[0] != min(per, rows - start):
            raise CheckpointError(f"cannot save '{key}': {local[key].shape[0]} of {rows} rows on process {rank} "
                                  f"is not FSDP's even split")
        offsets[key] = [start, rows]
    return local, offsets


def join_shards(pieces: list[tuple[dict[str, torch.Tensor], dict]], source: str) -> dict[str, torch.Tensor]:
    """Full tensors from every process's ``(tensors, offsets)`` (:func:`local_shards`), checking that the
    pieces of each sharded tensor follow each other and cover all its rows."""
    first, first_offsets = pieces[0]
    out = {}
    for key, value in first.items():
        if key not in first_offsets:
            out[key] = value
            continue
        rows, parts, at = first_offsets[key][1], [], 0
        for tensors, offsets in pieces:
            if key not in tensors or list(offsets.get(key, ())) != [at, rows]:
                raise CheckpointError(f"corrupt sharded checkpoint {source}: the pieces of '{key}' do not tile its "
                                      f"{rows} rows")
            parts.append(tensors[key])
            at += tensors[key].shape[0]
        if at != rows:
            raise CheckpointError(f"corrupt sharded checkpoint {source}: '{key}' has {at} of its {rows} rows")
        out[key] = torch.cat(parts)
    return out


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
    if checksums and expected is None and path.is_file():
        raise CheckpointError(f"{path} was not written with the checkpoint (it is not in its {CHECKSUMS}); "
                              f"refusing to read it")
    if expected is not None and not path.is_file():
        raise CheckpointError(f"corrupt checkpoint: {path}, recorded in {CHECKSUMS} when it was written, is missing")
    if expected is not None and sha256_file(path) != expected:
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
    """An optimizer ``state_dict`` again from :func:`flatten_optimizer`'s tensors and JSON-able rest."""
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
                    keep: int = 0, group=None) -> Path:
    """Write ``root/step_{step:08d}`` atomically; keep the newest ``keep`` checkpoints (0 = all).

    ``group`` (a :class:`unmask.runtime.Distributed`): a state holding sharded tensors (FSDP) is written
    by every process of the group, each its own files (module docstring), the rest by the main process
    once every shard is on disk; any other state by the main process alone (the only one to call)."""
    sharded = group is not None and any(isinstance(v, DTensor) for v in model_state.values())
    main = group is None or group.main
    final = root / f"step_{step:08d}"
    tmp = root / (f".tmp-{final.name}" if sharded else f".tmp-{final.name}-{os.getpid()}")
    if main:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
    state = dict(trainer_state or {}, step=step)
    tensors = {"model": model_state, "ema": ema_state}
    if optimizer_state is not None:
        tensors["optimizer"], state["optimizer"] = flatten_optimizer(optimizer_state)
    meta = {"format": "unmask", "step": str(step)}
    if sharded:
        group.barrier()
        for kind, values in tensors.items():
            if values is not None:
                local, offsets = local_shards(values)
                _save_tensors(local, tmp / shard_name(kind, group.rank, group.world),
                              {**meta, "offsets": json.dumps(offsets)})
        group.barrier()
        state["shards"] = group.world
    elif main:
        for kind, values in tensors.items():
            if values is not None:
                _save_tensors(values, tmp / f"{kind}.safetensors", meta)
    if main:
        _finish_checkpoint(tmp, final, root, cfg, tokenizer, state, keep)
    if sharded:
        group.barrier()
    return final


def _finish_checkpoint(tmp: Path, final: Path, root: Path, cfg: RunConfig, tokenizer: Tokenizer, state: dict,
                       keep: int) -> None:
    """Write the config, tokenizer, trainer state and checksums into ``tmp`` beside its tensor files,
    then rename it to ``final`` and prune old checkpoints."""
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
        """The state dict of the network: the EMA weights when ``ema`` and the source has them, else the raw ones."""
        raise NotImplementedError

    @property
    def has_ema(self) -> bool:
        """Whether ``weights(ema=True)`` gives EMA weights (else the raw ones)."""
        return False

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
        for name in self.checksums:  # a file written with the checkpoint and gone is corruption, never a fallback
            if not (self.path / name).is_file():
                self.file(name)
        self.config = load_config(self.file("config.yaml"))
        for name in self.checksums:
            if name.startswith("tokenizer/"):
                self.file(name)
        self.tokenizer = load_tokenizer(self.file("tokenizer"))

    def file(self, name: str) -> Path:
        """The verified path of a file of this checkpoint."""
        return verified(self.path, name, self.checksums)

    @property
    def shards(self) -> int:
        """The number of processes whose shard files hold the tensors (0: whole files)."""
        shards = self.state.get("shards", 0)
        if not isinstance(shards, int) or shards < 0:
            raise CheckpointError(f"corrupt checkpoint {self.path}: shards={shards!r}")
        return shards

    @property
    def has_ema(self) -> bool:
        """Whether the checkpoint holds EMA weights."""
        return self.has("ema")

    def has(self, kind: str) -> bool:
        """Whether the checkpoint holds ``kind``'s tensors: written with it (listed in ``checksums.json``;
        a file put there since is not part of it), or present in a checkpoint from before checksums."""
        name = shard_name(kind, 0, self.shards) if self.shards else f"{kind}.safetensors"
        return name in self.checksums if self.checksums else (self.path / name).is_file()

    def tensors(self, kind: str, rank: int | None = None) -> dict[str, torch.Tensor]:
        """The tensors of ``kind`` (model, ema or optimizer), full; or, of a sharded checkpoint, only
        process ``rank``'s share."""
        if not self.shards:
            return load_tensors(self.file(f"{kind}.safetensors"))
        ranks = range(self.shards) if rank is None else [rank]
        pieces = []
        for r in ranks:
            path = self.file(shard_name(kind, r, self.shards))
            tensors, metadata = load_tensors(path, with_metadata=True)
            try:
                offsets = json.loads(metadata.get("offsets", "{}"))
            except ValueError:
                raise CheckpointError(f"corrupt checkpoint file {path}: unreadable offsets") from None
            if not isinstance(offsets, dict):
                raise CheckpointError(f"corrupt checkpoint file {path}: unreadable offsets")
            pieces.append((tensors, offsets))
        return pieces[0][0] if rank is not None else join_shards(pieces, str(self.path))

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        """The full EMA weights when ``ema`` and the checkpoint has them, else the raw model weights."""
        return self.tensors("ema" if ema and self.has("ema") else "model")

    def optimizer_state(self, rank: int | None = None) -> dict | None:
        """The optimizer ``state_dict`` (None: saved without one); of a sharded checkpoint, process ``rank``'s share
        when ``rank`` is given."""
        if "optimizer" not in self.state:
            return None
        try:
            return unflatten_optimizer(self.tensors("optimizer", rank), self.state["optimizer"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"corrupt optimizer state in {self.path}: {exc}") from None

    def ema_state(self, rank: int | None = None) -> dict[str, torch.Tensor] | None:
        """The EMA tensors (None: saved without EMA); of a sharded checkpoint, process ``rank``'s share when ``rank``
        is given."""
        return self.tensors("ema", rank) if self.has("ema") else None

    def verify(self) -> None:
        """Read and check every file (checksums, finite weights), as a resume will use them."""
        for name in self.checksums:
            self.file(name)
        for rank in range(self.shards) if self.shards else [None]:
            for tensors in (self.tensors("model", rank), self.ema_state(rank) or {}):
                check_finite(tensors, str(self.path))
            self.optimizer_state(rank)


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


WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # what a weight may be stored as


def check_dtype(key: str, tensor: torch.Tensor, expected: torch.dtype, source: str) -> None:
    """A stored tensor must have a type the model's ``expected`` one can take without losing its meaning:
    a floating weight one of :data:`WEIGHT_DTYPES` (integers or booleans would load as numbers that mean
    nothing; 8-bit floats need scales unmask does not read), anything else its own type."""
    fits = tensor.dtype in WEIGHT_DTYPES if expected.is_floating_point else tensor.dtype == expected
    if not fits:
        wanted = "float32, bfloat16 or float16" if expected.is_floating_point else str(expected)
        raise CheckpointError(f"{source}: tensor '{key}' is stored as {tensor.dtype}, not {wanted}"
                              + (" (8-bit float weights are not supported)" if "float8" in str(tensor.dtype) else ""))


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise a :class:`CheckpointError` naming the first floating tensor with NaN or infinite values."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: tensor '{key}' holds NaN or infinite values (a corrupt file or a "
                                  f"diverged run)")


def with_aliases(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with the names of tied parameters filled in (a checkpoint stores one of them)."""
    first: dict[int, str] = {}
    tensors = dict(tensors)
    for key, value in model.state_dict(keep_vars=True).items():
        alias = first.setdefault(id(value), key)
        if alias != key and key not in tensors and alias in tensors:
            tensors[key] = tensors[alias]
    return tensors


def check_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> dict:
    """``tensors`` with tied names filled in, when they are exactly what ``model`` (any device, meta
    included) holds: every name, each shape, a type it can take and finite values; otherwise a
    :class:`CheckpointError` naming the first tensor that is not."""
    expected = model.state_dict()
    tensors = with_aliases(model, tensors)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model: missing {missing[:3]}"
                              f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                              f"{'...' if len(unexpected) > 3 else ''}")
    for key, value in expected.items():
        check_dtype(key, tensors[key], value.dtype, source)
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{source} tensor '{key}' has shape {tuple(tensors[key].shape)} but the "
                                  f"model expects {tuple(value.shape)}: it was saved from a model of a "
                                  f"different shape")
    check_finite(tensors, source)
    return tensors


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy ``tensors`` into ``model`` after :func:`check_weights`."""
    model.load_state_dict(check_weights(model, tensors, source), strict=True)


def load_model(ckpt: WeightSource, ema: bool = True, device: torch.device | str = "cpu", quantize: str = "none"):
    """(model in eval mode, objective) of any model source, with EMA weights by default; ``quantize``: its
    weights for inference (``int8``, see :mod:`unmask.models.quantize`)."""
    model = quantize_weights(ckpt.build(ema=ema, device=device).eval(), quantize)
    return model, build_objective(ckpt.config, ckpt.tokenizer)
