"""Run folders: one process at a time, and nothing deleted that unmask did not write.

* :class:`RunLock` makes a run folder exclusive. ``RUN/.lock`` names its owner (pid and host); the
  lock itself is an ``flock`` on that file, which the operating system releases when the owner
  exits or is killed, so a lock left by a dead process never blocks (it is reported and taken over).
  ``flock`` is local to one machine: two machines sharing a network file system are not excluded.
* :func:`clear_run_folder` (``--fresh``) removes exactly the entries unmask writes into a run folder
  (:data:`RUN_LAYOUT`), and refuses, deleting nothing, when the folder holds anything else.
* :func:`replaceable` says whether an existing export target may be replaced.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
from pathlib import Path

from ..config import ConfigError

LOCK_FILE = ".lock"


FILE = None  # a leaf of a layout: a plain file


TOKENIZER_LAYOUT = {"unmask_tokenizer.json": FILE, "tokenizer.json": FILE}


CHECKPOINT_LAYOUT = {"model.safetensors": FILE, "ema.safetensors": FILE, "optimizer.safetensors": FILE,
                     re.compile(r"(model|ema|optimizer)-\d{5}-of-\d{5}\.safetensors"): FILE,  # sharded (FSDP)
                     "trainer_state.json": FILE, "config.yaml": FILE, "checksums.json": FILE,
                     "tokenizer": TOKENIZER_LAYOUT}


CHECKPOINT_NAME = re.compile(r"step_\d+|\.tmp-.*")


CHECKPOINTS_LAYOUT = {CHECKPOINT_NAME: CHECKPOINT_LAYOUT}


RUN_LAYOUT = {"config.yaml": FILE, "metrics.jsonl": FILE, "tokenizer": TOKENIZER_LAYOUT,
              "checkpoints": CHECKPOINTS_LAYOUT, "best": CHECKPOINTS_LAYOUT, "test_metrics.json": FILE,
              "schedule.json": FILE, "rewards.png": FILE, LOCK_FILE: FILE}


class RunFolderError(ConfigError):
    """A run folder that is in use, or holds files that unmask did not write."""


def _layout_for(layout: dict, name: str):
    for key, sub in layout.items():
        if key == name if isinstance(key, str) else key.fullmatch(name):
            return True, sub
    return False, None


def foreign_entries(folder: Path, layout: dict) -> list[Path]:
    """Entries below ``folder`` that ``layout`` does not name (symbolic links always count)."""
    out = []
    for entry in sorted(folder.iterdir()):
        known, sub = _layout_for(layout, entry.name)
        if not known or entry.is_symlink() or entry.is_dir() != (sub is not FILE):
            out.append(entry)
        elif sub is not FILE:
            out += foreign_entries(entry, sub)
    return out


def clear_run_folder(run_dir: Path) -> None:
    """Remove what unmask wrote in ``run_dir`` (its lock file excepted); refuse when anything else is
    there, before removing anything."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir() or run_dir.is_symlink():
        raise RunFolderError(f"--fresh: {run_dir} is not a run folder")
    foreign = foreign_entries(run_dir, RUN_LAYOUT)
    if foreign:
        shown = ", ".join(str(p.relative_to(run_dir)) for p in foreign[:4]) + (" ..." if len(foreign) > 4 else "")
        raise RunFolderError(f"--fresh would delete {run_dir}, but it holds what unmask did not write ({shown}); "
                             f"nothing was deleted: move those files or choose another run_dir")
    for entry in run_dir.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def replaceable(target: Path, layout: dict) -> bool:
    """True when ``target`` is absent, an empty folder, or a folder holding only ``layout``'s entries (never
    a symbolic link, even a dangling one: what it points to is not unmask's)."""
    if target.is_symlink():
        return False
    if not target.exists():
        return True
    return target.is_dir() and not foreign_entries(target, layout)


class RunLock:
    """Exclusive use of a run folder by this process (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.fd = Path(run_dir), None
        self.stale_owner: str | None = None  # the owner named by a lock whose process died holding it

    def acquire(self) -> "RunLock":
        """Take the run folder's lock (created if need be) and write this process as its owner; a
        :class:`RunFolderError` when another process holds it."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunFolderError(f"run_dir={self.run_dir} is a file; a run folder is a directory (choose another "
                                 f"run_dir)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise RunFolderError(f"{self.run_dir} is in use by {owner}; wait for it to finish or use another "
                                 f"run_dir") from None
        self.stale_owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        """Clear the owner and release the lock (nothing when not held)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # a clean exit leaves no owner behind
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
