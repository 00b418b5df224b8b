"""Quantized inference: int8 weight-only and int8-dynamic against fp32 and bf16: memory, speed and quality.

Two models:

* a random LLaDA-shaped model (``llada_samplers.released_folder``: hidden 512, 4 blocks, 8 heads, MLP 1536,
  vocabulary 32,000) loaded through the public loader four ways: fp32, bf16 autocast
  (``sample.model_precision=bf16``), ``quantize=int8`` and ``quantize=int8-dynamic``. Per way: the bytes its
  weights hold, LLaDA's sampler (temperature 0, ``--gen`` tokens after a ``--prompt``-token prompt, blocks of
  ``--block``, one token per step) at batch 1 and 8 in interleaved rounds, and its logits' RMS error against
  fp32;
* a trained run (``--run``, the quickstart's by default): the test-set NELBO of ``unmask eval`` (same rows,
  same draws) and the sampler's tokens/s, fp32 against both int8 schemes.

    python benchmarks/quantize.py --run runs/quickstart --rounds 3
    python benchmarks/quantize.py --smoke       # seconds: the test suite runs this

Appends a record to ``benchmarks/results/quantize.jsonl``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from unmask.checkpoints.checkpoint import Checkpoint
from unmask.config import load_config
from unmask.eval.runs import evaluate
from unmask.models.quantize import weight_bytes
from unmask.pipeline import from_pretrained
from unmask.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from llada_samplers import released_folder, shape_arguments, smoke_shape  # noqa: E402

from common import append_record, run_header  # noqa: E402

WAYS = {"fp32": dict(quantize="none"), "bf16": dict(quantize="none"), "int8": dict(quantize="int8"),
        "int8-dynamic": dict(quantize="int8-dynamic")}
SCHEMES = ("none", "int8", "int8-dynamic")


def rms_error(logits: torch.Tensor, exact: torch.Tensor) -> float:
    return float((logits.float() - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt())


def llada_table(args, folder: Path) -> list[dict]:
    """Weight bytes, logits error and tokens/s of each way on the LLaDA-shaped model."""
    models = {way: from_pretrained(folder, **knobs) for way, knobs in WAYS.items()}
    prompt = " ".join(f"w{i % (args.vocab - 3)}" for i in range(args.prompt))
    ids = torch.randint(0, args.vocab - 3, (2, args.prompt + args.gen), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = models["fp32"].model(ids)
        logits = {way: models[way].model(ids) for way in WAYS if way != "bf16"}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits["bf16"] = models["bf16"].model(ids)
    rows = {way: {"way": way, "weight_bytes": weight_bytes(models[way].model), "logits_rms_error": rms_error(
        logits[way], exact)} for way in WAYS}
    for batch in map(int, args.batches.split(",")):
        times: dict[str, list[float]] = {way: [] for way in WAYS}
        tokens = {}
        for _ in range(args.rounds + 1):  # the first round warms up
            for way, lm in models.items():
                out = lm.generate([prompt], num_samples=batch, batch_size=batch, length=args.prompt + 1 + args.gen,
                                  sampler="llada", steps=args.gen, block_length=args.block, temperature=0.0,
                                  model_precision="bf16" if way == "bf16" else "fp32")
                times[way].append(out.seconds)
                tokens[way] = out.generated
        for way in WAYS:
            seconds = statistics.median(times[way][1:])
            rows[way][f"tokens_per_second_b{batch}"] = tokens[way] / seconds
            rows[way][f"spread_b{batch}"] = [tokens[way] / t for t in (max(times[way][1:]), min(times[way][1:]))]
    return list(rows.values())


def trained_table(args, run: Path) -> list[dict]:
    """NELBO (same rows and draws) and sampling tokens/s of a trained run, fp32 and each int8 scheme."""
    rows = []
    for quantize in SCHEMES:
        start = time.perf_counter()
        result = evaluate(run, [f"eval.quantize={quantize}"], max_sequences=args.eval_rows, mc_samples=args.mc,
                          batch_size=32)
        score_seconds = time.perf_counter() - start
        lm = from_pretrained(run, quantize=quantize)
        out = [lm.generate(num_samples=args.samples, batch_size=args.samples, seed=r) for r in range(args.rounds + 1)]
        seconds = statistics.median(o.seconds for o in out[1:])
        rows.append({"quantize": quantize, "nll": result["nll"], "stderr": result["stderr"],
                     "bits_per_char": result.get("bits_per_char"), "score_seconds": score_seconds,
                     "weight_bytes": weight_bytes(lm.model), "sample_tokens_per_second": out[0].generated / seconds,
                     "sample_nfe": out[0].nfe})
    for row in rows[1:]:
        row["nll_over_fp32"] = row["nll"] / rows[0]["nll"]
    return rows


def smoke_run(root: Path) -> Path:
    cfg = load_config("quickstart", [f"run_dir={root / 'run'}", "model.hidden=32", "model.blocks=1", "model.heads=2",
                                     "model.cond_dim=16", "data.length=32", "model.length=32", "train.steps=2",
                                     "train.batch_size=4", "train.progress=false", "train.log_every=1"])
    train(cfg)
    return Path(cfg.run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/quickstart", help="a trained run (the quickstart's by default)")
    shape_arguments(parser, blocks=4, prompt=16, batches="1,8")
    parser.add_argument("--eval-rows", type=int, default=256)
    parser.add_argument("--mc", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8, help="rows per sampling call of the trained run")
    args = parser.parse_args()
    if args.smoke:
        smoke_shape(args)
        args.eval_rows, args.mc, args.samples = 4, 2, 2
    record = {**run_header(args.tag, ceilings=not args.smoke), "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = released_folder(Path(tmp) / "llada", args.hidden, args.blocks, args.heads, args.mlp, args.vocab,
                              args.prompt + args.gen + 8)
        record["llada_shaped"] = llada_table(args, folder)
        run = smoke_run(Path(tmp)) if args.smoke else Path(args.run)
        record["trained_run"] = {"run": str(run), "step": Checkpoint(run).step, "rows": trained_table(args, run)}
    fp32 = record["llada_shaped"][0]
    print(f"LLaDA-shaped model ({args.hidden} hidden, {args.blocks} blocks, vocabulary {args.vocab}), LLaDA's sampler, "
          f"{args.gen} tokens:")
    print("| way | weight MB | / fp32 | logits RMS error | " +
          " | ".join(f"tok/s B{b} | / fp32" for b in args.batches.split(",")) + " |")
    for row in record["llada_shaped"]:
        speeds = " | ".join(f"{row[f'tokens_per_second_b{b}']:.1f} | "
                            f"{row[f'tokens_per_second_b{b}'] / fp32[f'tokens_per_second_b{b}']:.2f}"
                            for b in args.batches.split(","))
        print(f"| {row['way']} | {row['weight_bytes'] / 1e6:.1f} | {row['weight_bytes'] / fp32['weight_bytes']:.3f} | "
              f"{row['logits_rms_error']:.2e} | {speeds} |")
    print(f"trained run {record['trained_run']['run']} (step {record['trained_run']['step']}):")
    for row in record["trained_run"]["rows"]:
        print(f"  {row['quantize']}: NELBO {row['nll']:.4f} ± {row['stderr']:.4f} nats/token, "
              f"{row['sample_tokens_per_second']:.1f} tok/s sampling, weights {row['weight_bytes'] / 1e6:.2f} MB")
    for row in record["trained_run"]["rows"][1:]:
        print(f"  {row['quantize']} NELBO / fp32: {row['nll_over_fp32']:.4f}")
    if not args.smoke:
        append_record("quantize", record)


if __name__ == "__main__":
    main()
