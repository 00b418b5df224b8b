"""MDLM vs an autoregressive model of the same size, trained for the same wall-clock budget on
text8-prefix; test bits per character (MDLM: the NELBO bound; AR: exact), training tokens per
second and peak memory.

    python benchmarks/text8_mdlm_vs_ar.py --minutes 15 --tag run1
    python benchmarks/text8_mdlm_vs_ar.py --smoke          # seconds: the test suite runs this (tiny-shakespeare)

Each model trains and is evaluated in its own process (``python -m unmask``), so peak memory is
per model. Results are appended to ``benchmarks/results/text8_mdlm_vs_ar.jsonl`` and a Markdown
table is printed; see ``docs/results/mdlm-vs-ar.md`` for the committed figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from unmask.data.corpora import shipped_corpus_path

from common import SMOKE_OVERRIDES, machine

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "text8" / "text8_first12500000chars.xz"
RESULTS = ROOT / "benchmarks" / "results" / "text8_mdlm_vs_ar.jsonl"


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def train_and_eval(family: str, args, run_root: Path) -> dict:
    run_dir = run_root / family
    overrides = [f"family={family}", f"run_dir={run_dir}", f"data.path={args.data}",
                 f"train.max_minutes={args.minutes}", f"model.preset={args.preset}", f"train.seed={args.seed}",
                 "train.progress=false"] + args.overrides
    run([sys.executable, "-m", "unmask", "train", "text8-prefix", "--fresh", *overrides])
    result_file = run_root / f"{family}-eval.json"
    run([sys.executable, "-m", "unmask", "eval", str(run_dir), f"eval.mc_samples={args.mc_samples}",
         f"eval.max_sequences={args.eval_sequences}", "--json", str(result_file)])
    result = json.loads(result_file.read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    end = next(r for r in reversed(records) if r.get("event") == "end")
    steps = [r for r in records if "loss" in r]
    return {
        "family": family, "parameters": start["parameters"], "precision": start["precision"],
        "steps": end["step"], "train_seconds": end["elapsed_seconds"],
        "train_tokens_per_second": sum(r["tokens_per_second"] for r in steps[-10:]) / len(steps[-10:]),
        "final_train_loss": steps[-1]["loss"], "peak_memory_mb": end["peak_memory_mb"],
        "test_bits_per_char": result["bits_per_char"], "test_nll": result["nll"], "test_stderr": result["stderr"],
        "test_sequences": result["sequences"], "bound": result["bound"], "eval_seconds": result["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget per model")
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="text8 prefix file (12.5M characters)")
    parser.add_argument("--mc-samples", type=int, default=2, help="Monte-Carlo draws per test sequence (MDLM)")
    parser.add_argument("--eval-sequences", type=int, default=0, help="0 = the whole test split")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tag", default="")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bench-text8"))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for both models")
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape; nothing is recorded")
    args = parser.parse_args()
    if not args.smoke:
        benchmark(args, Path(args.runs))
        return
    with tempfile.TemporaryDirectory() as tmp:  # tiny models, two steps each, on the packaged tiny-shakespeare
        args.data, args.eval_sequences = str(shipped_corpus_path()), 8
        args.overrides = [*SMOKE_OVERRIDES, "data.dataset=tinyshakespeare", "data.tokenizer=char",
                          f"data.cache_dir={Path(tmp) / 'cache'}", *args.overrides]
        benchmark(args, Path(tmp))


def benchmark(args, runs: Path) -> None:
    """Both models in ``runs``; the record is appended to the results unless in the smoke mode."""
    if not Path(args.data).is_file():
        sys.exit(f"text8 prefix not found at {args.data}; pass --data")
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "tag": args.tag,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(),
            "machine": machine(ceilings=not args.smoke)}
    families = ("mdlm", "ar")
    if args.smoke:  # both models at once: the smoke mode's times mean nothing
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda family: train_and_eval(family, args, runs), families))
    else:
        results = [train_and_eval(family, args, runs) for family in families]
    record = dict(info, results=results,
                  bpc_ratio_mdlm_over_ar=results[0]["test_bits_per_char"] / results[1]["test_bits_per_char"])
    if not args.smoke:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(record) + "\n")
    print(f"\n{info['date']} {info['machine']['cpu']} ({info['machine']['cores']} cores), torch "
          f"{info['machine']['torch']}, commit {info['commit']}")
    print("| model | params | steps | train tok/s | peak MB | test BPC | ± (MC) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        bound = "<= " if r["bound"] == "nelbo" else ""
        err = f"{r['test_stderr'] / 0.6931471805599453:.4f}" if r["test_stderr"] else "exact"
        print(f"| {r['family']} | {r['parameters']:,} | {r['steps']} | {r['train_tokens_per_second']:.0f} | "
              f"{r['peak_memory_mb']:.0f} | {bound}{r['test_bits_per_char']:.4f} | {err} |")
    print(f"MDLM/AR BPC ratio: {record['bpc_ratio_mdlm_over_ar']:.3f}")


if __name__ == "__main__":
    main()
