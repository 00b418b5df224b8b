"""``torch.compile`` per path: eager against compiled decoding and training, side by side in one process.

The nano preset (character vocabulary unless ``--vocab``), L = ``--length``, weights moved off MDLM's zero
initialisation. Decoding paths (``--batch`` rows, ``sample.compile``'s ``torch.compile(model, dynamic=True)``):
first-hitting, ancestral with its cache at T = 4L, the AR sampler with its KV cache, LLaDA's sampler with
Fast-dLLM's dual cache (blocks of L/4). Training: the MDLM and AR steps (``train.compile``). Per path: the
first compiled call's wall time (compilation included), the median CPU time of ``--rounds`` interleaved
eager and compiled calls, their ratio, and whether the compiled decoding gave the eager tokens.

    python benchmarks/compile.py --rounds 3 --threads 1
    python benchmarks/compile.py --smoke      # seconds: the test suite runs this

Appends a record to ``benchmarks/results/compile.jsonl``.
"""

from __future__ import annotations

import argparse
import statistics
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
from common import append_record, draw_modulations, run_header  # noqa: E402

DECODING = {"first_hitting": ("mdlm", dict(sampler="first_hitting")),
            "ancestral cached T=4L": ("mdlm", dict(sampler="ancestral", steps=-4)),
            "ar (KV cache)": ("ar", dict(sampler="ar")),
            "llada + dual cache": ("mdlm", dict(sampler="llada", steps=-1, block_length=-4, block_cache="dual"))}


def network(family: str, args, tokenizer):
    cfg = load_config(None, [f"model.preset={args.preset}", f"model.length={args.length}", f"data.length={args.length}",
                             "model.dropout=0.0", f"family={family}"])
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    draw_modulations(model)
    return model, build_objective(cfg, tokenizer)


def settings(knobs: dict, length: int) -> dict:
    """Negative steps and block lengths are multiples (-4: 4L) or fractions (block -4: L/4) of the length."""
    out = dict(knobs)
    if out.get("steps", 0) < 0:
        out["steps"] = -out["steps"] * length
    if out.get("block_length", 0) < 0:
        out["block_length"] = length // -out["block_length"]
    return out


def timed(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def compare(eager, compiled, rounds: int) -> dict:
    """Compile afresh (no graph or recompilation count left by another path), then time both."""
    torch._dynamo.reset()
    start = time.perf_counter()
    first = compiled()
    compile_seconds = time.perf_counter() - start
    reference = eager()
    times = {"eager": [], "compiled": []}
    for _ in range(rounds):
        times["eager"].append(timed(eager))
        times["compiled"].append(timed(compiled))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"first_compiled_call_seconds": compile_seconds, "eager_seconds": med["eager"],
            "compiled_seconds": med["compiled"], "speedup": med["eager"] / med["compiled"],
            "same_result": bool(torch.equal(first, reference)) if first is not None else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--vocab", type=int, default=66)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="decoding rows")
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend (the smoke mode: eager, "
                        "which traces without generating code)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape; nothing is recorded")
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    if args.smoke:
        args.length, args.batch, args.train_batch, args.rounds, args.backend = 16, 2, 2, 1, "eager"
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = CharTokenizer("".join(chr(0x100 + i) for i in range(args.vocab - 4)))
    record = {**run_header(args.tag, ceilings=not args.smoke), "args": vars(args), "paths": {}}
    paths = ["first_hitting"] if args.smoke else list(DECODING)
    for name in paths:
        family, knobs = DECODING[name]
        model, objective = network(family, args, tokenizer)
        model.eval()
        sampler = make_sampler(SampleConfig(**settings(knobs, args.length)), objective, tokenizer, args.length)
        canvas = make_canvas(tokenizer, [[]] * args.batch, args.length)
        compiled_model = torch.compile(model, dynamic=True, backend=args.backend)
        with torch.no_grad():
            result = compare(lambda: sampler.sample(model, canvas, row_seeds(0, args.batch)).tokens,
                             lambda: sampler.sample(compiled_model, canvas, row_seeds(0, args.batch)).tokens,
                             args.rounds)
        record["paths"][name] = result
    for family in ("mdlm", "ar"):
        model, objective = network(family, args, tokenizer)
        model.train()
        x0 = torch.randint(0, args.vocab - 4, (args.train_batch, args.length),
                           generator=torch.Generator().manual_seed(1))
        counted = torch.ones_like(x0, dtype=torch.bool)
        batch = Batch(x0, counted, draw_noise(args.train_batch, args.length, torch.Generator().manual_seed(2)),
                      float(counted.sum()))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        eager_state = TrainState(model, objective, optimizer, grad_clip=1.0)
        compiled_network = torch.compile(model, dynamic=True, backend=args.backend)
        compiled_state = TrainState(model, objective, optimizer, compiled_network, grad_clip=1.0)
        record["paths"][f"train {family}"] = compare(lambda: train_step(eager_state, batch) and None,
                                                      lambda: train_step(compiled_state, batch) and None, args.rounds)
    print("| path | first compiled call s | eager s | compiled s | eager / compiled | same tokens |")
    print("|---|---|---|---|---|---|")
    for name, r in record["paths"].items():
        print(f"| {name} | {r['first_compiled_call_seconds']:.1f} | {r['eager_seconds']:.3f} | "
              f"{r['compiled_seconds']:.3f} | {r['speedup']:.2f}x | {r['same_result']} |")
    if not args.smoke:
        append_record("compile", record)


if __name__ == "__main__":
    main()
