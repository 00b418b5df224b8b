"""Run folders of tiny training runs, shared by the training, sharding and adapter tests: configs,
metrics records, final tensors, and ``unmask train`` under ``torchrun``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from unmask.checkpoints.checkpoint import Checkpoint, list_checkpoints, load_tensors
from unmask.config import load_config

from toys import TINY

# exact comparisons: fp32 everywhere, no dropout
EXACT = ["train.precision=fp32", "model.dropout=0.0"]
SOFT_MASK = ["model.soft_mask_top_k=2", "diffusion.soft_mask_prob=0.5", "train.soft_mask_lr=0.05"]


def overrides(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, "data.dataset=text", f"data.path={corpus}", f"run_dir={run_dir}", *extra]


def config(corpus: Path, run_dir: Path, *extra: str):
    return load_config(None, overrides(corpus, run_dir, *extra))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def step_records(run_dir: Path) -> dict[int, dict]:
    """The loss record of every step."""
    out = {}
    for r in records(run_dir):
        if "loss" in r:
            out[r["step"]] = r
    return out


def final_tensors(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_tensors(list_checkpoints(Path(run_dir) / "checkpoints")[-1] / name)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(run_dir: Path, *extra: str, processes: int = 2, wait: bool = True, corpus: Path):
    """``unmask train`` under ``torchrun`` with ``processes`` CPU processes (one thread each)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "unmask", "train", *overrides(corpus, run_dir, *extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from Linux's /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command name)"
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def weights(run_dir: Path, kind: str) -> dict[str, torch.Tensor]:
    return Checkpoint(list_checkpoints(run_dir / "checkpoints")[-1]).tensors(kind)
