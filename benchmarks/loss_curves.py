"""Training curves: families trained on one config with the same data order, validated as they train.

Each family trains from scratch with the same config and overrides (same rows, same learning-rate
schedule), scores ``train.eval_sequences`` validation rows every ``--eval-every`` steps (MDLM and BD3-LM:
the NELBO bound, ``eval.mc_samples`` draws per row; AR: the exact NLL), and the curves of training loss
and validation NLL per token go to one plot:

    python benchmarks/loss_curves.py --tag quickstart                      # mdlm, ar, bd3lm on the quickstart
    python benchmarks/loss_curves.py --smoke                               # seconds: the test suite runs this

Writes ``benchmarks/results/loss_curves-<tag>.json`` (with the command, commit and machine) and
``benchmarks/results/loss_curves-<tag>.png``; run folders go to ``--runs`` and are resumed when present.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import SMOKE_OVERRIDES, pyplot, run_header, trained  # noqa: E402


def curves(records: list[dict]) -> dict:
    """(step, value) lists of the training loss and the validation NLL per counted token."""
    return {"train": [[r["step"], r["loss"]] for r in records if "loss" in r and "event" not in r],
            "valid": [[r["step"], r["nll"]] for r in records if r.get("event") == "eval"]}


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for family, curve in result["curves"].items():
        for ax, key in zip(axes, ("train", "valid")):
            steps, values = zip(*curve[key]) if curve[key] else ((), ())
            ax.plot(steps, values, label=family, marker="o" if key == "valid" else None, markersize=3)
    axes[0].set_title("training loss (per counted token)")
    axes[1].set_title("validation NLL (diffusion: NELBO bound)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("nats per token")
    axes[1].legend()
    fig.suptitle(f"{result['config']}: {', '.join(result['overrides']) or 'as configured'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="quickstart", help="packaged config name or YAML path")
    parser.add_argument("--families", default="mdlm,ar,bd3lm")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--runs", default="runs/loss_curves", help="folder for the run folders")
    parser.add_argument("--tag")
    parser.add_argument("--smoke", action="store_true", help="tiny models in a temporary folder")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every family")
    args = parser.parse_args()
    if not args.smoke and not args.tag:
        parser.error("--tag names the result files (or use --smoke)")
    with tempfile.TemporaryDirectory() as scratch:
        runs = Path(scratch) if args.smoke else Path(args.runs)
        overrides = [*args.overrides, *(SMOKE_OVERRIDES + [f"data.cache_dir={scratch}/cache", "train.eval_sequences=4"]
                                        if args.smoke else [])]
        eval_every = 1 if args.smoke else args.eval_every
        result = {**run_header(args.tag or "smoke", ceilings=False), "config": args.config, "overrides": args.overrides,
                  "eval_every": eval_every, "curves": {}}
        for family in args.families.split(","):
            blocks = family == "bd3lm" and not any("block_size" in o for o in overrides)
            extra = ["model.block_size=4"] if blocks else []
            _, records = trained(runs / family, [f"family={family}", *extra, *overrides,
                                                 f"train.eval_every={eval_every}"], args.config)
            result["curves"][family] = curves(records)
            valid = result["curves"][family]["valid"]
            print(f"{family}: final validation NLL {valid[-1][1]:.4f} nats/token at step {valid[-1][0]}"
                  if valid else f"{family}: no validation records")
        if args.smoke:
            assert all(c["train"] and c["valid"] for c in result["curves"].values()), result["curves"]
            return
    out = ROOT / "benchmarks" / "results" / f"loss_curves-{args.tag}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
