"""Block diffusion interpolates between AR and MDLM: likelihood bounds and training cost of BD3-LM at block
sizes 1, 4, 8, 16 and L next to AR and MDLM, all trained with one recipe (the quickstart's: nano backbone,
same data, steps, batch, learning rate and EMA) and scored on the same test rows with the same draws;
the cost of a training step (one batch of the recipe's shape) timed in interleaved rounds in one process.

BD3-LM's claim (Arriola et al. 2025): the bound improves as the block shrinks, from MDLM's (block L; the
same objective, tested) to the AR model's exact likelihood (block 1: each block term is then an
importance-weighted -log p(x_l | x_<l), whose expectation is the AR loss).

    python benchmarks/block_diffusion.py --corpus tinyshakespeare --runs runs/frontier-ts --tag tinyshakespeare
    python benchmarks/block_diffusion.py --smoke          # seconds: the test suite runs this

Writes ``benchmarks/results/block_diffusion-<tag>.json`` and a Markdown table on stdout. The run folders
are reused by ``benchmarks/sampler_frontier.py`` (``--bd3``) for the speed/quality frontier.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from unmask.checkpoints.checkpoint import Checkpoint, load_model
from unmask.data.dataset import Data
from unmask.eval.likelihood import likelihood_of_rows
from unmask.objectives.base import draw_noise
from unmask.train.step import Batch, TrainState, train_step

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import CORPORA, SMOKE_OVERRIDES, run_header, seconds_per_step, trained  # noqa: E402


def models(length: int) -> dict[str, list[str]]:
    """Run name -> family overrides."""
    out = {"ar": ["family=ar"], "mdlm": ["family=mdlm"]}
    for block in (1, 4, 8, 16, length):
        out[f"bd3-{block}"] = ["family=bd3lm", f"model.block_size={block}"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="tinyshakespeare")
    parser.add_argument("--runs", help="folder of the run folders (default runs/block-diffusion-<corpus>)")
    parser.add_argument("--tag")
    parser.add_argument("--eval-sequences", type=int, default=256)
    parser.add_argument("--mc-samples", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape; nothing is recorded")
    args = parser.parse_args()
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            overrides = [*SMOKE_OVERRIDES, f"data.cache_dir={tmp}/cache"]
            compare(Path(tmp), overrides, "quickstart", 32, "smoke", 8, 2, Path(tmp), rounds=1)
        return
    if not args.tag:
        parser.error("--tag is required")
    runs = Path(args.runs or ROOT / "runs" / f"block-diffusion-{args.corpus}")
    length = int(next(o for o in CORPORA[args.corpus] if o.startswith("data.length=")).split("=")[1])
    compare(runs, CORPORA[args.corpus], "quickstart", length, args.tag, args.eval_sequences, args.mc_samples,
            ROOT / "benchmarks" / "results")


def training_step(model, objective, ids, device: torch.device):
    """A function timing one training step (forward, loss, backward, AdamW) of ``model`` on the rows ``ids``."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    x0 = torch.as_tensor(ids, device=device)
    counted = torch.ones_like(x0, dtype=torch.bool)
    blocks = objective.time_blocks(x0.shape[1])
    noise = draw_noise(*x0.shape, torch.Generator().manual_seed(0), blocks=blocks).to(device)

    state = TrainState(model, objective, optimizer, device=device)

    def step() -> float:
        start = time.perf_counter()
        for _ in range(3):
            train_step(state, Batch(x0, counted, noise, x0.numel()))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / 3

    return step


def compare(runs: Path, overrides: list[str], config: str, length: int, tag: str, eval_sequences: int,
            mc_samples: int, out_dir: Path, rounds: int = 5) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results, steppers = [], {}
    for name, family in models(length).items():
        path, records = trained(runs / name, [*overrides, *family], config)
        ckpt = Checkpoint(path)
        model, objective = load_model(ckpt, device=device)
        rows = Data(ckpt.config.data, tokenizer=ckpt.tokenizer).rows("test")
        e = likelihood_of_rows(model, objective, rows, ckpt.config.data, ckpt.tokenizer, mc_samples=mc_samples,
                               batch_size=32, max_sequences=eval_sequences, seed=0, device=device)
        tokens = ckpt.config.train.batch_size * ckpt.config.data.length
        results.append(dict(model=name, family=ckpt.config.family, block_size=ckpt.config.model.block_size,
                            bound=objective.bound, nll=e["nll"], stderr=e["stderr"],
                            bits_per_char=e["bits_per_char"], run_seconds_per_step=seconds_per_step(records, tokens),
                            steps=ckpt.step))
        steppers[name] = training_step(model, objective, rows.get(list(range(ckpt.config.train.batch_size)))[0],
                                       device)
        print(f"{name:10s} test {'NELBO' if objective.bound == 'nelbo' else 'NLL'} {e['nll']:.4f} +- "
              f"{e['stderr']:.4f} nats/token", flush=True)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(rounds):  # interleaved, so drift of the machine spreads over every model
        for name, step in steppers.items():
            times[name].append(step())
    for r in results:
        r["seconds_per_step"] = statistics.median(times[r["model"]])
    record = {**run_header(tag, ceilings=False), "runs": str(runs), "length": length,
              "eval_sequences": eval_sequences, "mc_samples": mc_samples, "results": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"block_diffusion-{tag}.json").write_text(json.dumps(record, indent=1))
    ar = next(r for r in results if r["model"] == "ar")
    print(f"\n{record['date']} {record['machine']['cpu']}, commit {record['commit']}; test rows {eval_sequences}, "
          f"{mc_samples} draws each (the same for every model)")
    print("| model | block size | test NLL (nats/token) | bits/char | training s/step | over AR |")
    print("|---|---|---|---|---|---|")
    for r in results:
        kind = "≤ " if r["bound"] == "nelbo" else "= "
        print(f"| {r['model']} | {r['block_size'] or '-'} | {kind}{r['nll']:.4f} ± {r['stderr']:.4f} | "
              f"{r['bits_per_char']:.4f} | {r['seconds_per_step']:.3f} | "
              f"{r['seconds_per_step'] / ar['seconds_per_step']:.2f} |")


if __name__ == "__main__":
    main()
