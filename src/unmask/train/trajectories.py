"""Teacher trajectories as data: what a teacher's decoding did, recorded once and read by every student.

A teacher decodes each prompt (``[BOS] prompt`` then masks up to the canvas length, or the prompt alone for
models whose rows do not begin with BOS; an empty prompt is an unconditional row; row ``i`` with
``row_seeds(seed, N)[i]``) through the decoding engine with its sampler; for every row the trajectory keeps

* ``tokens`` (N, L) int32: the final canvas (the teacher's answer, the distillation target);
* ``reveal_step`` (N, L) int16: the step (from 0) after which each generated position holds its final token
  (a token that a remasking or editing sampler changes later counts from its last change); -1 where the
  position was fixed (BOS, prompt). The positions revealed at step ``s`` are the teacher's parallel decision
  at that step: the states along the trajectory are ``x_s = tokens where reveal_step < s, else mask``;
* ``row_nfe`` (N,) int32: the network calls the row took;
* ``prompt_lengths`` (N,) int32: the fixed positions at the start of each row.

The arrays are NumPy files memory-mapped from ``<cache_dir>/trajectories-<key>/``, ``key`` a SHA-256 of the
teacher's identity (the digest of its weights), its tokenizer, the sampler's settings, the canvas length, whether
rows begin with BOS, the prompts and the seed: a student of the same teacher and settings reads the same folder,
any change writes a new one. Recording is resumable: rows are written batch by batch and ``progress.json``
(replaced atomically after the arrays are flushed) says how many are final, so a killed recording continues where
it stopped and gives the same arrays (each row has its own seed). One process records a folder at a time (a
lock).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..checkpoints.runfolder import RunLock
from ..config import SampleConfig
from ..data.tokenization import Tokenizer
from ..pipeline import encode_fixed, make_canvas
from ..samplers.base import SamplingError, row_seeds
from ..samplers.engine import Sampler

TRAJECTORY_VERSION = 2  # 2: the key holds whether rows begin with BOS
ARRAYS = {"tokens": np.int32, "reveal_step": np.int16, "row_nfe": np.int32, "prompt_lengths": np.int32}
UNSEEN = -1  # reveal_step of a fixed position


class TrajectoryError(ValueError):
    """A trajectory folder that cannot be used (another recording's, incomplete, corrupt)."""


@dataclasses.dataclass
class Trajectories:
    """A recorded set (module docstring): ``tokens``, ``reveal_step`` (N, L), ``row_nfe``, ``prompt_lengths`` (N,),
    memory-mapped read-only, and ``meta`` (what was recorded, how)."""

    directory: Path
    meta: dict
    tokens: np.ndarray
    reveal_step: np.ndarray
    row_nfe: np.ndarray
    prompt_lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def open(cls, directory: str | Path) -> Trajectories:
        """A complete recording in ``directory``; a :class:`TrajectoryError` for anything else."""
        directory = Path(directory)
        meta, done = _read_state(directory)
        if done != meta["rows"]:
            raise TrajectoryError(f"{directory} holds {done} of {meta['rows']} trajectories: the recording did not "
                                  f"finish (record again with the same settings to continue it)")
        arrays = {name: _array(directory, name, meta, "r") for name in ARRAYS}
        return cls(directory, meta, **arrays)


def trajectory_key(teacher: str, tokenizer: Tokenizer, sample: SampleConfig, length: int, prompts: list[str],
                   seed: int, bos: bool = True) -> str:
    """The folder key of a recording: SHA-256 over the teacher's identity, tokenizer, the sampler's settings (those
    that change a row's decoding: not the batch size), the canvas length, ``bos``, the prompts and the seed."""
    settings = {f.name: getattr(sample, f.name) for f in dataclasses.fields(sample)
                if f.name not in ("settings", "batch_size", "num_samples", "seed")} | sample.resolved()
    digest = hashlib.sha256()
    digest.update(json.dumps([TRAJECTORY_VERSION, teacher, tokenizer.fingerprint(), settings, length, seed, bos],
                             sort_keys=True, default=str).encode())
    for prompt in prompts:
        digest.update(prompt.encode() + b"\0")
    return digest.hexdigest()[:20]


def trajectory_directory(cache_dir: str | Path, teacher: str, tokenizer: Tokenizer, sample: SampleConfig, length: int,
                         prompts: list[str], seed: int, bos: bool = True) -> Path:
    """The folder of a recording in ``cache_dir`` (see :func:`trajectory_key`)."""
    key = trajectory_key(teacher, tokenizer, sample, length, prompts, seed, bos)
    return Path(cache_dir) / f"trajectories-{key}"


class RevealSteps:
    """The ``on_step`` of a decoding of a canvas (B, L): after step ``s`` (from 0) every generated position that holds
    a token and had none (or another) gets ``s``, every one masked again loses it."""

    def __init__(self, canvas: torch.Tensor, mask_id: int):
        self.mask_id, self.free = mask_id, (canvas == mask_id).cpu()
        self.last = canvas.cpu().clone()
        self.steps = torch.full(canvas.shape, UNSEEN, dtype=torch.int16)
        self.step = 0

    def __call__(self, x: torch.Tensor) -> None:
        """Take the canvas (B, L) after the next step."""
        x = x.cpu()
        changed = self.free & (x != self.last)
        self.steps[changed & (x != self.mask_id)] = self.step
        self.steps[self.free & (x == self.mask_id)] = UNSEEN
        self.last.copy_(x)
        self.step += 1

    def final(self, tokens: torch.Tensor) -> torch.Tensor:
        """The reveal steps once the decoding returned ``tokens`` (B, L): a generated position its sampler filled
        without a step of its own (a last fill after the final frame) counts as the last step."""
        late = self.free & (self.steps == UNSEEN) & (tokens.cpu() != self.mask_id)
        self.steps[late] = self.step
        return self.steps


def record_trajectories(model, sampler: Sampler, tokenizer: Tokenizer, sample: SampleConfig, prompts: list[str],
                        length: int, teacher: str, cache_dir: str | Path, seed: int = 0, batch_size: int = 64,
                        on_batch: Callable[[int, int], None] | None = None, bos: bool = True) -> Trajectories:
    """Record (or finish recording, or just open) the trajectories of ``sampler`` decoding ``prompts`` with ``model``
    (the teacher, identified by ``teacher``: the digest of its weights) on canvases of ``length``, each beginning
    with BOS when ``bos`` (module docstring). ``on_batch(done, total)`` after every batch written."""
    if not prompts:
        raise TrajectoryError("no prompts to record trajectories of")
    if batch_size < 1:
        raise TrajectoryError(f"batch_size must be >= 1, got {batch_size}")
    rows = [encode_fixed(tokenizer, p) for p in prompts]
    longest = max(len(r) for r in rows)
    if int(bos) + longest + 1 > length:  # BOS, the prompt, at least one generated position
        raise SamplingError(f"a prompt of {longest} tokens leaves nothing to generate in a canvas of {length}")
    directory = trajectory_directory(cache_dir, teacher, tokenizer, sample, length, prompts, seed, bos)
    key = directory.name.removeprefix("trajectories-")
    lock = RunLock(directory).acquire()
    try:
        if not (directory / "meta.json").exists():
            meta = {"version": TRAJECTORY_VERSION, "key": key, "teacher": teacher, "rows": len(prompts),
                    "length": length, "seed": seed, "sampler": sample.sampler, "mask_id": tokenizer.mask_id}
            for name, dtype in ARRAYS.items():
                shape = (len(prompts), length) if name in ("tokens", "reveal_step") else (len(prompts),)
                np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
            _write_json(directory / "meta.json", meta)
            _write_json(directory / "progress.json", {"done": 0})
        meta, done = _read_state(directory)
        if meta["key"] != key:
            raise TrajectoryError(f"{directory} belongs to another recording")
        arrays = {name: _array(directory, name, meta, "r+") for name in ARRAYS}
        seeds = row_seeds(seed, len(prompts))
        device = next(model.parameters()).device
        while done < len(prompts):
            end = min(done + batch_size, len(prompts))
            canvas = make_canvas(tokenizer, rows[done:end], length, bos=bos).to(device)
            reveals = RevealSteps(canvas, tokenizer.mask_id)
            result = sampler.sample(model, canvas, seeds[done:end].to(device), reveals)
            arrays["tokens"][done:end] = result.tokens.cpu().numpy()
            arrays["reveal_step"][done:end] = reveals.final(result.tokens).numpy()
            arrays["row_nfe"][done:end] = result.row_nfe.cpu().numpy()
            arrays["prompt_lengths"][done:end] = [int(bos) + len(r) for r in rows[done:end]]
            for array in arrays.values():
                array.flush()
            done = end
            _write_json(directory / "progress.json", {"done": done})
            if on_batch is not None:
                on_batch(done, len(prompts))
    finally:
        lock.release()
    return Trajectories.open(directory)


def _read_state(directory: Path) -> tuple[dict, int]:
    try:
        meta = json.loads((directory / "meta.json").read_text())
        done = json.loads((directory / "progress.json").read_text())["done"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrajectoryError(f"{directory} is not a trajectory recording ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("version") != TRAJECTORY_VERSION or not isinstance(done, int):
        raise TrajectoryError(f"{directory} is not a trajectory recording of this version")
    if not 0 <= done <= meta["rows"]:
        raise TrajectoryError(f"{directory}: progress {done} outside 0..{meta['rows']}")
    return meta, done


def _array(directory: Path, name: str, meta: dict, mode: str) -> np.ndarray:
    shape = (meta["rows"], meta["length"]) if name in ("tokens", "reveal_step") else (meta["rows"],)
    try:
        array = np.load(directory / f"{name}.npy", mmap_mode=mode, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise TrajectoryError(f"{directory / name}.npy cannot be read ({exc})") from None
    if array.shape != shape or array.dtype != ARRAYS[name]:
        raise TrajectoryError(f"{directory / name}.npy holds {array.dtype} {array.shape}, not {np.dtype(ARRAYS[name])} "
                              f"{shape}")
    return array


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value) + "\n")
    os.replace(tmp, path)
