"""Torch threads and the OpenMP wait policy, on an idle machine and on a busy one.

Every combination of torch threads (``--threads``), OpenMP wait policy (``--policies``: ``default`` =
the variables unset, a value of ``OMP_WAIT_POLICY``, or ``NAME=value`` such as ``GOMP_SPINCOUNT=10000``,
libgomp's spin count before a waiting thread sleeps) and machine load (``idle``, or ``busy``: one
process spinning on a core, as another user's job would) runs in its own process (OpenMP reads the
policy once, at start) and times two workloads of the nano model:

* ``decode``: a KV-cached autoregressive sample, 64 tokens at batch 1 (many small operations: where
  spinning threads help most on an idle machine and hurt most on a busy one);
* ``train``: training steps (forward, backward, AdamW) at batch 8, length 256.

Reported: median and 90th percentile seconds per call; the policy a run inherits is recorded too.

    python benchmarks/threads.py --tag cpu
    python benchmarks/threads.py --smoke       # seconds: the test suite runs this

Appends a record to ``benchmarks/results/threads.jsonl``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
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
from unmask.train.step import Batch, TrainState, train_step

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import append_record, run_header  # noqa: E402

SPINNER = "while True:\n    pass\n"
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def worker(workload: str, repeats: int, length: int, batch: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``workload`` (after one warm-up call)."""
    torch.manual_seed(0)
    tokenizer = CharTokenizer("".join(chr(32 + i) for i in range(62)))
    family = "ar" if workload == "decode" else "mdlm"
    cfg = load_config(None, ["model.preset=nano", f"model.length={max(length, 80)}", f"data.length={length}",
                             f"family={family}"])
    model, objective = build_model(cfg, tokenizer), build_objective(cfg, tokenizer)
    if workload == "decode":
        sampler = make_sampler(SampleConfig(sampler="ar"), objective, tokenizer, cfg.model.length)
        canvas = make_canvas(tokenizer, [[0] * 16], 80)
        model.eval()

        def call():
            with torch.no_grad():
                sampler.sample(model, canvas, row_seeds(0, 1))
    else:
        x0 = torch.randint(0, 62, (batch, length), generator=torch.Generator().manual_seed(1))
        counted = torch.ones_like(x0, dtype=torch.bool)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        noise = draw_noise(batch, length, torch.Generator().manual_seed(2))

        state = TrainState(model, objective, optimizer)

        def call():
            train_step(state, Batch(x0, counted, noise, 1.0))
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def measure(workload: str, threads: int, policy: str, load: str, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    if policy != "default":
        name, _, value = policy.rpartition("=")
        env[name or "OMP_WAIT_POLICY"] = value
    spinner = subprocess.Popen([sys.executable, "-c", SPINNER]) if load == "busy" else None
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", workload, "--threads", str(threads),
                               "--repeats", str(args.repeats), "--length", str(args.length), "--batch",
                               str(args.batch)], env=env, capture_output=True, text=True)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if proc.returncode:
        raise SystemExit(f"{workload} with {threads} threads, {policy}, {load} failed:\n{proc.stderr[-2000:]}")
    times = sorted(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"workload": workload, "threads": threads, "policy": policy, "load": load,
            "median_seconds": statistics.median(times), "p90_seconds": times[int(0.9 * (len(times) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--policies", default="default,PASSIVE,ACTIVE")
    parser.add_argument("--loads", default="idle,busy")
    parser.add_argument("--workloads", default="decode,train")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--length", type=int, default=256, help="training rows")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape; nothing is recorded")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(int(args.threads))
        print(json.dumps(worker(args.worker, args.repeats, args.length, args.batch)))
        return
    if args.smoke:
        args.threads, args.policies, args.loads, args.repeats, args.length, args.batch = "1", "PASSIVE", "busy", \
            1, 16, 2
    record = {**run_header(args.tag, ceilings=not args.smoke), "args": vars(args), "results": []}
    for workload, threads, policy, load in itertools.product(args.workloads.split(","), args.threads.split(","),
                                                             args.policies.split(","), args.loads.split(",")):
        r = measure(workload, int(threads), policy, load, args)
        record["results"].append(r)
        print(f"{workload:6s} threads {threads} {policy:20s} {load:4s}: median {1e3 * r['median_seconds']:8.1f} ms, "
              f"p90 {1e3 * r['p90_seconds']:8.1f} ms", flush=True)
    if not args.smoke:
        append_record("threads", record)


if __name__ == "__main__":
    main()
