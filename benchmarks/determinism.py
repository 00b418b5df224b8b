"""Does training reproduce bit for bit, and what do deterministic kernels cost?

For each setting of ``train.deterministic`` (true / false, interleaved round by round), trains the
same seed twice in separate processes and reports the first step at which the two loss curves
differ and the largest difference, plus the training time per step (ratios side by side in one run).

    python benchmarks/determinism.py --tag quickstart-nano --rounds 3 --steps 40
    python benchmarks/determinism.py --smoke          # seconds: the test suite runs this
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import SMOKE_OVERRIDES, run_header

RESULTS = Path(__file__).resolve().parent / "results"


def train_once(run_dir: Path, deterministic: bool, steps: int, threads: int,
               overrides: list[str]) -> tuple[list[float], float]:
    """(losses of every step, seconds per step) of one training process."""
    subprocess.run([sys.executable, "-m", "unmask", "train", "quickstart", f"run_dir={run_dir}", *overrides,
                    f"train.steps={steps}", "train.log_every=1", "train.progress=false", f"train.threads={threads}",
                    f"train.deterministic={str(deterministic).lower()}", "train.save_every=0", "--fresh"],
                   check=True, capture_output=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    end = next(r for r in records if r.get("event") == "end")
    return losses, end["elapsed_seconds"] / steps


def train_pair(tmp: Path, deterministic: bool, args, overrides: list[str]) -> list[tuple[list[float], float]]:
    """Runs ``a`` and ``b`` of one setting, one after the other (at once in the smoke mode, whose times mean
    nothing)."""
    def once(name: str) -> tuple[list[float], float]:
        return train_once(tmp / name, deterministic, args.steps, args.threads, overrides)

    if not args.smoke:
        return [once(name) for name in ("a", "b")]
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(once, ("a", "b")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0, help="train.threads (0: every core, the default)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape; nothing is recorded")
    args = parser.parse_args()
    if args.tag is None and not args.smoke:
        parser.error("the following arguments are required: --tag")
    if args.smoke:
        args.tag, args.rounds, args.steps, args.threads = "smoke", 1, 2, 1
    record = {**run_header(args.tag, ceilings=not args.smoke), "config": "quickstart", "steps": args.steps,
              "threads": args.threads, "rounds": []}
    with tempfile.TemporaryDirectory() as tmp:
        # the smoke mode trains a tiny model, its data cache in the temporary folder
        overrides = [*SMOKE_OVERRIDES, f"data.cache_dir={Path(tmp) / 'cache'}"] if args.smoke else []
        for r in range(args.rounds):
            for deterministic in (True, False):
                (a, seconds_a), (b, seconds_b) = train_pair(Path(tmp), deterministic, args, overrides)
                diffs = [abs(x - y) for x, y in zip(a, b)]
                first = next((i + 1 for i, d in enumerate(diffs) if d), None)
                row = {"round": r, "deterministic": deterministic, "first_differing_step": first,
                       "max_loss_difference": max(diffs), "seconds_per_step": [seconds_a, seconds_b]}
                record["rounds"].append(row)
                print(json.dumps(row), flush=True)
    times = {d: [s for row in record["rounds"] if row["deterministic"] == d for s in row["seconds_per_step"]]
             for d in (True, False)}
    record["time_ratio_deterministic"] = (sum(times[True]) / len(times[True])) / (sum(times[False]) / len(times[False]))
    record["identical_pairs"] = {str(d): sum(1 for row in record["rounds"] if row["deterministic"] == d
                                             and row["first_differing_step"] is None) for d in (True, False)}
    print(f"time per step, deterministic / default kernels: {record['time_ratio_deterministic']:.3f}; "
          f"identical pairs {record['identical_pairs']} of {args.rounds} each")
    if args.smoke:
        return
    out = RESULTS / f"determinism-{args.tag}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
