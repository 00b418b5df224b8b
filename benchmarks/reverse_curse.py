"""The reverse curse on fictitious facts: an MDLM and an AR model of the same size trained on the
forward statements only, then asked forward and in reverse (see ``unmask.reverse_curse``), the MDLM
with and without unsupervised classifier-free guidance.

    python benchmarks/reverse_curse.py --tag facts100-nano
    python benchmarks/reverse_curse.py --smoke          # seconds: the test suite runs this

Writes ``benchmarks/results/reverse_curse-<tag>.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from unmask.checkpoints.checkpoint import Checkpoint, list_checkpoints
from unmask.config import load_config
from unmask.experiments.reverse_curse import (
    evaluate_reverse_curse,
    make_facts,
    write_facts,
)
from unmask.pipeline import from_pretrained
from unmask.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import SMOKE_OVERRIDES, run_header  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag")
    parser.add_argument("--facts", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--guidance", type=float, default=0.8, help="SMDM's reverse-curse setting")
    parser.add_argument("--runs", default="runs/reverse-curse")
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape; nothing is recorded")
    args = parser.parse_args()
    if args.tag is None and not args.smoke:
        parser.error("the following arguments are required: --tag")
    if not args.smoke:
        reverse_curse(args, Path(args.runs) / args.tag, ROOT / "benchmarks" / "results")
        return
    with tempfile.TemporaryDirectory() as tmp:  # tiny models, two steps on a few facts; the record goes there too
        args.tag, args.facts, args.steps = "smoke", 4, 2
        reverse_curse(args, Path(tmp), Path(tmp), (*SMOKE_OVERRIDES, f"data.cache_dir={Path(tmp) / 'cache'}"))


def reverse_curse(args, runs: Path, out_dir: Path, smoke: tuple[str, ...] = ()) -> None:
    """Train (or find) both models in ``runs``, evaluate them, write the record to ``out_dir`` and print the
    table; ``smoke``: overrides that come first (the script's own keys win)."""
    facts = make_facts(args.facts, args.seed)
    path = write_facts(facts, runs / "data" / "train.txt")
    results = {}
    for family in ("mdlm", "ar"):
        run_dir = runs / family
        cfg = load_config(None, [*smoke, f"family={family}", f"run_dir={run_dir}", f"model.preset={args.preset}",
                                 "model.length=64", "data.dataset=text", f"data.path={path}", "data.documents=line",
                                 "data.layout=pad", "data.length=64", "data.valid_fraction=0",
                                 "data.test_fraction=0", f"train.steps={args.steps}", "train.batch_size=32",
                                 "train.lr=2e-3", "train.lr_schedule=cosine", "train.warmup_steps=100",
                                 "train.ema=0.995", "train.log_every=100", "train.progress=false"])
        done = list_checkpoints(run_dir / "checkpoints")
        if not done or Checkpoint(done[-1]).step < args.steps:
            print(f"training {family} ({args.steps} steps on {len(facts)} facts)", flush=True)
            train(cfg)
        loaded = from_pretrained(run_dir)
        results[family] = evaluate_reverse_curse(loaded, facts)
        print(family, results[family], flush=True)
        if family == "mdlm":
            results["mdlm, guided"] = evaluate_reverse_curse(loaded, facts, guidance=args.guidance)
            print("mdlm guided", results["mdlm, guided"], flush=True)
    record = {**run_header(args.tag, ceilings=not args.smoke), "facts": args.facts, "seed": args.seed,
              "steps": args.steps, "preset": args.preset, "guidance": args.guidance, "results": results,
              "examples": [f.statement for f in facts[:3]]}
    out = out_dir / f"reverse_curse-{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"\n{record['date']} {record['machine']['cpu']} ({record['machine']['cores']} cores), commit "
          f"{record['commit']}; {args.facts} facts, {args.steps} steps, preset {args.preset}")
    columns = ("forward", "reverse_same_sentence", "reverse_reversed_sentence", "reverse_ranking")
    print("| model | forward | reverse, name infilled | reverse, reversed sentence | reverse, ranking |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.2f}" if c in r else "n/a" for c in columns) + " |")


if __name__ == "__main__":
    main()
