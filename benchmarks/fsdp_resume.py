"""How closely does one process continue a two-process FSDP run from its checkpoint?

For each seed and learning rate: a two-process FSDP run (``torchrun``, gloo on CPU, fp32) trains
``--steps`` steps and saves at the half; its half-way checkpoint is copied and continued by one process.
Reported per setting and overall: the largest relative difference of the losses and gradient norms of
the continued steps, and the largest absolute difference of the final weights, EMA and AdamW state (the
shards reduce in another order than one process does, so the two drift apart by float rounding).

    python benchmarks/fsdp_resume.py --seeds 0,1,2,3 --lrs 0.003,0.01
    python benchmarks/fsdp_resume.py --extra model.hidden=128 model.blocks=4 model.length=128 data.length=128
    python benchmarks/fsdp_resume.py --smoke          # one setting; nothing is recorded
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from unmask.checkpoints.checkpoint import Checkpoint, list_checkpoints

from common import append_record, run_header

SHAPE = ["model.preset=nano", "model.hidden=32", "model.blocks=2", "model.heads=2", "model.cond_dim=16",
         "model.length=32", "data.length=32", "train.batch_size=8", "train.progress=false", "train.threads=1",
         "train.log_every=1", "train.warmup_steps=0", "train.precision=fp32", "model.dropout=0.0",
         "train.parallel=fsdp", "train.ema=0.9", "train.keep_checkpoints=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(run_dir: Path, overrides: list[str], processes: int) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "unmask"] \
        if processes > 1 else [sys.executable, "-m", "unmask"]
    subprocess.run([*launcher, "train", "quickstart", f"run_dir={run_dir}", *SHAPE, *overrides], check=True,
                   capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def step_records(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def largest_difference(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def compare(tmp: Path, seed: int, lr: float, steps: int, extra: list[str]) -> dict:
    overrides = [*extra, f"train.seed={seed}", f"train.lr={lr}", f"train.steps={steps}",
                 f"train.save_every={steps // 2}"]
    two = tmp / f"two-{seed}-{lr}"
    train(two, overrides, processes=2)
    one = tmp / f"one-{seed}-{lr}"
    shutil.copytree(two, one)
    for later in list_checkpoints(one / "checkpoints")[1:]:
        shutil.rmtree(later)
    (one / "metrics.jsonl").unlink()  # only the continued steps
    train(one, overrides, processes=1)
    a, b = step_records(two), step_records(one)
    continued = sorted(b)
    relative = {key: max(abs(b[s][key] - a[s][key]) / abs(a[s][key]) for s in continued)
                for key in ("loss", "grad_norm")}
    final_two, final_one = Checkpoint(two), Checkpoint(one)
    weights = {kind: largest_difference(final_two.tensors(kind), final_one.tensors(kind))
               for kind in ("model", "ema", "optimizer")}
    return {"seed": seed, "lr": lr, "continued_steps": continued, "relative": relative, "absolute": weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--lrs", default="0.003,0.01")
    parser.add_argument("--steps", type=int, default=8, help="steps of the two-process run; saved at the half")
    parser.add_argument("--extra", nargs="*", default=[], help="more key=value overrides (another shape)")
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="one setting of 4 steps; nothing is recorded")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.lrs, args.steps = "0", "0.003", 4
    record = {**run_header(args.tag, ceilings=False), "settings": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in map(int, args.seeds.split(",")):
            for lr in map(float, args.lrs.split(",")):
                result = compare(Path(tmp), seed, lr, args.steps, args.extra)
                record["settings"].append(result)
                print(f"seed {seed} lr {lr:g}: loss {result['relative']['loss']:.2e}, grad norm "
                      f"{result['relative']['grad_norm']:.2e} (relative); weights {result['absolute']['model']:.2e}, "
                      f"EMA {result['absolute']['ema']:.2e}, AdamW {result['absolute']['optimizer']:.2e}", flush=True)
    worst = {"loss": max(r["relative"]["loss"] for r in record["settings"]),
             "grad_norm": max(r["relative"]["grad_norm"] for r in record["settings"]),
             **{kind: max(r["absolute"][kind] for r in record["settings"]) for kind in ("model", "ema", "optimizer")}}
    record["worst"] = worst
    print("worst: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    if not args.smoke:
        append_record("fsdp_resume", record)


if __name__ == "__main__":
    main()
