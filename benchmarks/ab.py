"""Two commits of unmask side by side on the same work: training steps and samplers, interleaved.

The base commit is checked out in a temporary git worktree; each round runs every workload once on
the base and once on the working tree, each in its own process (``PYTHONPATH`` picks the tree: every
module this script imports must exist in both), in
alternating order, so machine drift cancels. Weights, data and seeds are the same on both sides, so
the workloads also say whether the two trees compute the same numbers (``same_result``).

Workloads (nano preset, character vocabulary unless ``--vocab``):
  train-mdlm, train-ar, train-bd3: forward, loss, backward, clipping, AdamW and EMA on a (B, L) batch
  (train-bd3: block diffusion, blocks of L/8);
  sample-ancestral (T = L), sample-ancestral-cached (T = 4L), sample-first-hitting, sample-ar (KV cache),
  sample-llada-dual (LLaDA's sampler, T = L, blocks of L/4, Fast-dLLM's dual cache),
  sample-bd3 (block diffusion, blocks of L/8, ancestral T = 16 inside each block, exact KV cache);
  loop-ar: sample-ar on a network that returns fixed logits without computing: the decoding loop's own cost.

    python benchmarks/ab.py --base 81ace10 --rounds 3
    python benchmarks/ab.py --base 81ace10 --threads 1 --clock cpu   # steadier on a shared machine
    python benchmarks/ab.py --smoke            # seconds: the test suite runs this

Appends a record to ``benchmarks/results/ab.jsonl``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from unmask.config import SampleConfig, load_config
from unmask.data.tokenization import CharTokenizer
from unmask.families import build_model, build_objective
from unmask.objectives.base import draw_noise
from unmask.pipeline import make_canvas
from unmask.samplers.base import row_seeds
from unmask.samplers.registry import make_sampler
from unmask.train.optim import EMA

try:  # the real training step; a base commit older than it runs the same computation written out
    from unmask.train.step import Batch, TrainState, train_step
except ImportError:
    train_step = None

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import append_record, run_header  # noqa: E402

WORKLOADS = ("train-mdlm", "train-ar", "train-bd3", "sample-ancestral", "sample-ancestral-cached",
             "sample-first-hitting", "sample-ar", "sample-llada-dual", "sample-bd3", "loop-ar")


class FreeNetwork(torch.nn.Module):
    """A causal network's stand-in that returns fixed logits at once (its KV cache is the real one's)."""

    def __init__(self, model: torch.nn.Module, vocab: int):
        super().__init__()
        self.model, self.logits = model, torch.zeros(1, 1, vocab)

    def new_cache(self, *args, **kwargs):
        return self.model.new_cache(*args, **kwargs)

    def forward(self, ids: torch.Tensor, cache=None) -> torch.Tensor:
        return self.logits.expand(ids.shape[0], ids.shape[1], -1)


def sampling(workload: str, length: int) -> tuple[str, dict]:
    """The family and the ``sample.*`` settings of a sampling workload."""
    return {"sample-ancestral": ("mdlm", dict(sampler="ancestral", steps=length, cache=False)),
            "sample-ancestral-cached": ("mdlm", dict(sampler="ancestral", steps=4 * length, cache=True)),
            "sample-first-hitting": ("mdlm", dict(sampler="first_hitting")),
            "sample-ar": ("ar", dict(sampler="ar")),
            "loop-ar": ("ar", dict(sampler="ar")),
            "sample-llada-dual": ("mdlm", dict(sampler="llada", steps=length, block_length=length // 4,
                                               block_cache="dual")),
            "sample-bd3": ("bd3lm", dict(sampler="ancestral", steps=16))}[workload]


def worker(workload: str, args) -> dict:
    """Run one workload in this process (whichever unmask ``PYTHONPATH`` gives) and time it."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    family = {"train-ar": "ar", "train-bd3": "bd3lm"}.get(workload, "mdlm") if workload.startswith("train") else \
        sampling(workload, args.length)[0]
    tokenizer = CharTokenizer("".join(chr(0x100 + i) for i in range(args.vocab - 4)))
    blocks = [f"model.block_size={max(1, args.length // 8)}"] if family == "bd3lm" else []
    cfg = load_config(None, [f"model.preset={args.preset}", f"model.length={args.length}", f"data.length={args.length}",
                             "model.dropout=0.0", f"family={family}", *blocks])
    model = build_model(cfg, tokenizer)
    with torch.no_grad():  # away from the zero init, the same on both sides
        for name, p in model.named_parameters():
            if "adaLN" in name or name.startswith("output_layer.linear"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
    objective = build_objective(cfg, tokenizer)
    times, digest = [], hashlib.sha256()
    if workload.startswith("train"):
        x0 = torch.randint(0, args.vocab - 4, (args.batch, args.length), generator=torch.Generator().manual_seed(1))
        counted = torch.ones_like(x0, dtype=torch.bool)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ema = EMA(model, 0.9999)
        model.train()
        for step in range(args.steps + 1):
            noise = draw_noise(args.batch, args.length, torch.Generator().manual_seed(step))
            start = clock()
            if train_step is not None:
                metrics = train_step(TrainState(model, objective, optimizer, ema=ema, grad_clip=1.0),
                                     Batch(x0, counted, noise, float(counted.sum())))
                loss = metrics.loss_sum / counted.sum()
            else:  # a base older than train_step: the same computation written out
                loss = objective.loss(model, x0, counted, noise).sum() / counted.sum()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                ema.update(model)
            times.append(clock() - start)
            digest.update(f"{float(loss):.5e}".encode())
        tokens = args.batch * args.length
    else:
        sampler = make_sampler(SampleConfig(**sampling(workload, args.length)[1]), objective, tokenizer, args.length)
        canvas = make_canvas(tokenizer, [[]] * args.sample_batch, args.length)
        model.eval()
        if workload == "loop-ar":
            model = FreeNetwork(model, tokenizer.vocab_size)
        with torch.no_grad():
            for _ in range(args.sample_repeats + 1):
                start = clock()
                result = sampler.sample(model, canvas, row_seeds(0, args.sample_batch))
                times.append(clock() - start)
        digest.update(result.tokens.numpy().tobytes())
        tokens = result.generated
    seconds = statistics.median(times[1:])  # the first is the warm-up
    return {"seconds": seconds, "tokens_per_second": tokens / seconds, "result": digest.hexdigest()[:16]}


def run_side(tree: Path, workload: str, args, extra_env: dict[str, str] | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), **(extra_env or {}))
    cmd = [sys.executable, __file__, "--worker", workload, *(f"--{k.replace('_', '-')}={v}" for k, v in
           (("preset", args.preset), ("vocab", args.vocab), ("length", args.length), ("batch", args.batch),
            ("steps", args.steps), ("sample_batch", args.sample_batch), ("sample_repeats", args.sample_repeats),
            ("threads", args.threads), ("clock", args.clock)))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{workload} on {tree} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="the commit to compare the working tree with")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--vocab", type=int, default=66)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="training rows")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per process")
    parser.add_argument("--sample-batch", type=int, default=8)
    parser.add_argument("--sample-repeats", type=int, default=2, help="timed sampling calls per process")
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape; nothing is recorded")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--base-env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the base side's processes only (e.g. MKL_CBWR=AUTO with "
                             "--base HEAD: the same code under another BLAS mode)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time by the wall clock, or by the process's CPU time (steadier on a shared machine "
                             "at one thread)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    if args.smoke:
        args.length, args.batch, args.steps, args.sample_batch, args.sample_repeats, args.rounds = 16, 2, 1, 2, 1, 1
        args.workloads = "train-mdlm,sample-ar"
    workloads = args.workloads.split(",")
    if any("=" not in pair for pair in args.base_env):
        parser.error("--base-env takes KEY=VALUE")
    base_env = dict(pair.split("=", 1) for pair in args.base_env)
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    record = {**run_header(args.tag, ceilings=not args.smoke), "args": vars(args), "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.base], cwd=ROOT, check=True)
        record["base_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=base, capture_output=True,
                                               text=True).stdout.strip()
        try:
            for workload in workloads:
                sides = {"base": [], "tree": []}
                for r in range(args.rounds):
                    order = (("base", base), ("tree", ROOT)) if r % 2 == 0 else (("tree", ROOT), ("base", base))
                    for name, tree in order:
                        sides[name].append(run_side(tree, workload, args, base_env if name == "base" else None))
                speed = {k: statistics.median(x["tokens_per_second"] for x in v) for k, v in sides.items()}
                same = len({x["result"] for v in sides.values() for x in v}) == 1
                record["workloads"][workload] = {**{f"{k}_tokens_per_second": [x["tokens_per_second"] for x in v]
                                                    for k, v in sides.items()},
                                                 "ratio": speed["tree"] / speed["base"], "same_result": same}
                print(f"{workload:24s} base {speed['base']:9.0f} tok/s  tree {speed['tree']:9.0f} tok/s  "
                      f"{speed['tree'] / speed['base']:.2f}x  same result: {same}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    if not args.smoke:
        append_record("ab", record)


if __name__ == "__main__":
    main()
