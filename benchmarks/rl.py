"""GRPO on the model, on the schedule, and Co-GRPO (both, alternating), from the same masked diffusion
model at equal rollout budgets, on a verifiable task (star-graph paths by default).

    python benchmarks/rl.py --model runs/insertion/nano/easy-mdlm --data runs/insertion/nano/data-easy --tag star-easy
    python benchmarks/rl.py --smoke          # seconds: the test suite runs this

Every method gets the same iterations x prompts x group rollouts; the held-out reward (exact match of
one rollout per test prompt, the schedule at its means) is measured before training and every
``--eval-every`` iterations. Writes ``benchmarks/results/rl-<tag>.json`` (the curves, the learned
schedules, the command and machine), ``rl-<tag>.png`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from unmask.checkpoints.checkpoint import load_model
from unmask.checkpoints.pretrained import open_source
from unmask.config import config_from_dict, merge_trees, parse_overrides, to_dict
from unmask.data.tasks import write_star_graph_task
from unmask.train.rl import rl_train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import SMOKE_OVERRIDES, pyplot, run_header, trained  # noqa: E402

METHODS = {"GRPO, model only": "model", "GRPO, schedule only": "schedule", "Co-GRPO (alternating)": "co"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an MDLM run trained on the task")
    parser.add_argument("--data", help="the task folder (train.jsonl, test.jsonl)")
    parser.add_argument("--tag")
    parser.add_argument("--runs", default="runs/rl")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="K, denoising steps per rollout")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-prompts", type=int, default=300)
    parser.add_argument("--reward", default="exact_match")
    parser.add_argument("--lr", type=float, default=2e-4, help="the model's learning rate")
    parser.add_argument("--schedule-lr", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=1.0, help="the starting schedule's token temperature")
    parser.add_argument("--extra", nargs="*", default=[], help="more rl.* / sample.* overrides for every method")
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape; nothing is recorded")
    args = parser.parse_args()
    missing = [f"--{name}" for name in ("model", "data", "tag") if getattr(args, name) is None]
    if missing and not args.smoke:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if not args.smoke:
        benchmark(args, ROOT / "benchmarks" / "results")
        return
    with tempfile.TemporaryDirectory() as tmp:  # a two-step MDLM on a small star-graph task; runs and record go there
        data = Path(tmp) / "data"
        write_star_graph_task(data, "tiny", train=64, valid=8, test=8)
        trained(Path(tmp) / "mdlm", [*SMOKE_OVERRIDES, "family=mdlm", f"data.path={data / 'train.jsonl'}",
                                     f"data.valid_path={data / 'valid.jsonl'}", f"data.test_path={data / 'test.jsonl'}",
                                     f"data.cache_dir={Path(tmp) / 'cache'}"], "star-graph")
        args.model, args.data, args.tag, args.runs = str(Path(tmp) / "mdlm"), str(data), "smoke", str(Path(tmp) / "rl")
        args.iterations, args.prompts_per_step, args.group, args.steps, args.eval_every, args.eval_prompts = (
            1, 2, 2, 2, 1, 4)
        benchmark(args, Path(tmp))


def benchmark(args, out_dir: Path) -> None:
    """Every method from ``args.model``, run folders in ``args.runs``; the record and its plot go to ``out_dir``."""
    source = open_source(args.model)
    data = Path(args.data)
    held_out = Path(args.runs) / args.tag / "eval.jsonl"
    held_out.parent.mkdir(parents=True, exist_ok=True)
    held_out.write_text("".join((data / "test.jsonl").read_text().splitlines(keepends=True)[:args.eval_prompts]))
    result = {**run_header(args.tag, ceilings=not args.smoke), "model": args.model, "data": str(data), "methods": {}}
    for name, mode in METHODS.items():
        overrides = [f"run_dir={Path(args.runs) / args.tag / mode}", f"rl.prompts={data / 'train.jsonl'}",
                     f"rl.eval_prompts={held_out}", f"rl.mode={mode}", f"rl.iterations={args.iterations}",
                     f"rl.prompts_per_step={args.prompts_per_step}", f"rl.group_size={args.group}",
                     f"rl.sample_steps={args.steps}", f"rl.eval_every={args.eval_every}", f"rl.reward={args.reward}",
                     f"rl.lr={args.lr}", f"rl.schedule_lr={args.schedule_lr}", f"sample.temperature={args.temperature}",
                     *args.extra]
        cfg = config_from_dict(merge_trees(to_dict(source.config), parse_overrides(overrides)))
        model, objective = load_model(source)
        rl_train(cfg, model, objective, source.tokenizer)
        records = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
        evals = [(r["iteration"], r["reward"]) for r in records if r.get("event") == "eval"]
        train = [r for r in records if r.get("event") != "eval"]
        result["methods"][name] = {"mode": mode, "eval": evals, "rollout_reward": [r["reward"] for r in train],
                                   "schedule": train[-1]["schedule"], "seconds": train[-1]["elapsed_seconds"],
                                   "config": to_dict(cfg.rl)}
        print(f"{name}: held-out reward {evals[0][1]:.3f} -> {evals[-1][1]:.3f}", flush=True)
    out = out_dir / f"rl-{args.tag}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    rollouts = args.iterations * args.prompts_per_step * args.group
    print(f"\n| method ({rollouts} rollouts each) | held-out exact match before | after | best |\n|---|---|---|---|")
    for name, m in result["methods"].items():
        rewards = [r for _, r in m["eval"]]
        print(f"| {name} | {rewards[0]:.3f} | {rewards[-1]:.3f} | {max(rewards):.3f} |")
    print(f"\nwrote {out}")


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, m in result["methods"].items():
        ax.plot([i for i, _ in m["eval"]], [r for _, r in m["eval"]], "o-", label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out exact match")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
