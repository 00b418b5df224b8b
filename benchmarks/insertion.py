"""Insertion LM vs masked diffusion vs autoregressive, same backbone size and training budget.

1. Star-graph path finding (``unmask.tasks``): for each variant, ILM, MDLM and AR models of the
   same preset are trained on the same prompt/answer rows for the same number of steps and batch size,
   then scored by exact match on held-out graphs: ILM greedy (largest gap marginal, argmax token,
   stop when P(stop) >= 0.5); MDLM with two greedy orders (ancestral at temperature 0 over as many
   steps as positions, and confidence order, one position per step); AR greedy.
2. Unconditional text: tiny-shakespeare speeches (documents split at blank lines, ``data.layout=pad``,
   rows of 128 characters, so 35 % of the speeches are cut to 126), the three families again, then
   samples at temperature 1 scored by an AR evaluator trained on the running text (NLL per
   character, gen-PPL), their lengths (characters before the model's end: EOS for MDLM/AR, the stop
   head for ILM) against the held-out speeches' (after the same cut), and unigram entropy.

    python benchmarks/insertion.py --tag nano
    python benchmarks/insertion.py --smoke          # seconds: the test suite runs this

Each stage resumes or is skipped when its run folder is complete. Writes
``benchmarks/results/insertion-<tag>.json`` and Markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from unmask.checkpoints.checkpoint import Checkpoint, load_model
from unmask.config import SampleConfig
from unmask.data.dataset import Data
from unmask.data.tasks import read_pairs, star_graph_path_checks, write_star_graph_task
from unmask.eval.exact_match import exact_match
from unmask.eval.generation import CheckpointEvaluator, unigram_entropy
from unmask.eval.likelihood import select_rows
from unmask.pipeline import generate_rows

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import SMOKE_OVERRIDES, pooled_ppl, run_header, trained  # noqa: E402

FAMILIES = ("ilm", "mdlm", "ar")
SHAKESPEARE = ROOT / "src" / "unmask" / "assets" / "tinyshakespeare.txt.xz"


def star_graph(args, runs: Path, smoke: tuple[str, ...]) -> dict:
    out = {}
    seeds = [int(x) for x in args.seeds.split(",")]
    for variant in args.variants.split(","):
        data = runs / f"data-{variant}"
        if not (data / "task.json").exists():
            write_star_graph_task(data, variant, args.star_train, 200, args.star_test, seed=0)
        meta = json.loads((data / "task.json").read_text())
        length = meta["suggested_length"]
        common = [*smoke, f"data.path={data}/train.jsonl", f"data.valid_path={data}/valid.jsonl",
                  f"data.test_path={data}/test.jsonl", f"data.length={length}", f"model.preset={args.preset}",
                  f"model.length={length}", f"train.steps={args.star_steps}", f"train.batch_size={args.batch}",
                  f"train.lr={args.lr}", f"train.lr_schedule={args.lr_schedule}", "train.ema=0.99",
                  f"train.threads={args.threads}", f"train.log_every={max(1, args.star_steps // 60)}",
                  "train.save_every=500", "train.keep_checkpoints=1",  # a stopped run keeps its progress
                  f"data.cache_dir={runs / 'cache'}"]
        pairs = read_pairs(data / "test.jsonl")
        rows, curves = {}, {}
        for seed in seeds:  # every family's first seed before any second one
            for family in FAMILIES:
                run = runs / f"{variant}-{family}-s{seed}"
                path, records = trained(run, [f"family={family}", f"train.seed={seed}", *common], "star-graph")
                curves[run.name] = [[r["step"], r["loss"]] for r in records if "loss" in r]
                ckpt = Checkpoint(path)
                model, objective = load_model(ckpt)
                greedy = SampleConfig(temperature=0.0, batch_size=250, stop="threshold", stop_threshold=0.5)
                samplers = {"ilm": {"insertion, greedy": greedy},
                            "ar": {"left to right, greedy": greedy},
                            "mdlm": {"ancestral, T=L, temperature 0": dataclasses.replace(
                                         greedy, sampler="ancestral", steps=length),
                                     "confidence order, greedy": dataclasses.replace(
                                         greedy, sampler="confidence", steps=length)}}[family]
                train_seconds = [r for r in records if r.get("event") == "end"][-1]["elapsed_seconds"]
                for name, cfg in samplers.items():
                    r = exact_match(model, objective, ckpt.tokenizer, cfg, pairs, length, length, "cpu", examples=-1)
                    checks = [star_graph_path_checks(e["prompt"], e["generated"]) for e in r["examples"]]
                    entry = rows.setdefault(f"{family}: {name}", {"seeds": {}})
                    entry["seeds"][seed] = {
                        "exact_match": r["exact_match"], "stderr": r["stderr"], "n": r["n"], "nfe": r["nfe"],
                        **{k: float(np.mean([c[k] for c in checks])) for k in checks[0]},
                        "examples": r["examples"][:3], "train_seconds": train_seconds,
                        "final_train_loss": curves[run.name][-1][1]}
                    print(f"{variant} {family} seed {seed} {name}: exact match {r['exact_match']:.3f} "
                          f"± {r['stderr']:.3f}, follows edges {entry['seeds'][seed]['follows_edges']:.3f}",
                          flush=True)
        for entry in rows.values():  # pooled over seeds: the binomial error of all answers together
            runs_ = list(entry["seeds"].values())
            n = sum(x["n"] for x in runs_)
            p = sum(x["exact_match"] * x["n"] for x in runs_) / n
            entry.update(exact_match=p, stderr=math.sqrt(p * (1 - p) / n), n=n, nfe=runs_[0]["nfe"],
                         follows_edges=float(np.mean([x["follows_edges"] for x in runs_])))
        out[variant] = {"spec": meta["spec"], "length": length, "train_rows": args.star_train, "seeds": seeds,
                        "steps": args.star_steps, "batch": args.batch, "lr": args.lr, "results": rows,
                        "loss_curves": curves}
    return out


def lengths_summary(lengths) -> dict:
    x = np.asarray(lengths, dtype=float)
    return {"mean": float(x.mean()), "median": float(np.median(x)), "p10": float(np.percentile(x, 10)),
            "p90": float(np.percentile(x, 90)), "share_at_max": float((x >= x.max()).mean())}


def text_of(ids: list[int], tokenizer) -> str:
    """A generated row's text: after BOS, up to the first EOS or PAD (the model's end); other special
    tokens (a BOS that an MDLM or AR model drew mid-row) are left out."""
    out = []
    for token in ids[1:]:
        if token in (tokenizer.eos_id, tokenizer.pad_id):
            break
        if token not in tokenizer.special_ids:
            out.append(token)
    return tokenizer.decode(out)


def text(args, runs: Path, smoke: tuple[str, ...], previous: dict | None = None) -> dict:
    evaluator_run = args.evaluator
    if not evaluator_run:
        evaluator_run, _ = trained(runs / "text-evaluator", [
            *smoke, "family=ar", "data.dataset=tinyshakespeare", "data.tokenizer=char", "data.length=128",
            "data.frame=false", f"model.preset={args.preset}", f"train.steps={args.evaluator_steps}",
            "train.batch_size=32", "train.lr=2e-3", "train.warmup_steps=50", "train.lr_schedule=cosine",
            "train.ema=0.995", f"train.threads={args.threads}"], None)
    evaluator = CheckpointEvaluator(evaluator_run, "cpu")
    data = [*smoke, f"data.path={SHAKESPEARE}", "data.dataset=text", "data.documents=blank_line", "data.layout=pad",
            "data.pad_with_eos=true", "data.length=128", "data.tokenizer=char", f"model.preset={args.preset}",
            "model.length=128", f"train.steps={args.text_steps}", "train.batch_size=32", "train.lr=2e-3",
            "train.warmup_steps=50", "train.lr_schedule=cosine", "train.ema=0.995", f"train.threads={args.threads}",
            f"data.cache_dir={runs / 'cache'}"]
    results = dict((previous or {}).get("results", {}))
    reference = None
    for family in args.text_families.split(","):
        path, _ = trained(runs / f"text-{family}", [f"family={family}", *data], None)
        ckpt = Checkpoint(path)
        tok = ckpt.tokenizer
        if reference is None:  # held-out speeches, cut as the rows are
            rows = Data(ckpt.config.data, tokenizer=tok).rows("test")
            ids, kinds = rows.get(select_rows(len(rows), args.samples, 0))
            texts = [text_of(row.tolist(), tok) for row in ids]
            totals, counts = evaluator.nll(texts)
            reference = {"nll_per_char": float(totals.sum() / counts.sum()),
                         "entropy": float(np.mean([unigram_entropy(tok.encode(t).tolist()) for t in texts])),
                         "lengths": lengths_summary([len(t) for t in texts])}
        model, objective = load_model(ckpt)
        base = SampleConfig(num_samples=args.samples, batch_size=64, steps=128, seed=1)
        configs = {"ilm": {"joint sampling (gap, token and stop drawn), t=1": dataclasses.replace(base, gap="sample"),
                           "released settings (greedy gap, top-p 0.2, stop 0.9)": dataclasses.replace(
                               base, gap="greedy", top_p=0.2, stop="threshold", stop_threshold=0.9)},
                   "mdlm": {"ancestral, T=128, t=1": base},
                   "ar": {"left to right, t=1": base}}[family]
        for name, cfg in configs.items():
            gen = generate_rows(model, objective, tok, cfg, 128, 128, bos=True)
            texts = [text_of(ids, tok) for ids in gen.ids]
            scored = [t for t in texts if t]
            totals, counts = evaluator.nll(scored)
            ppl, ppl_se = pooled_ppl(totals, counts)
            results[f"{family}: {name}"] = {
                "nll_per_char": float(totals.sum() / counts.sum()), "gen_ppl": ppl, "gen_ppl_se": ppl_se,
                "entropy": float(np.mean([unigram_entropy(tok.encode(t).tolist()) for t in texts])),
                "lengths": lengths_summary([len(t) for t in texts]), "empty": len(texts) - len(scored),
                "nfe": gen.nfe, "seconds": gen.seconds, "example": texts[0][:200]}
            r = results[f"{family}: {name}"]
            print(f"text {family} {name}: nll/char {r['nll_per_char']:.3f}, mean length {r['lengths']['mean']:.1f}, "
                  f"entropy {r['entropy']:.3f}", flush=True)
    return {"reference": reference, "results": results, "evaluator": str(evaluator_run)}


def table(result: dict) -> str:
    lines = []
    for variant, v in result.get("star_graph", {}).items():
        lines += [f"\nStar graph, {variant} ({v['train_rows']} training graphs, {v['steps']} steps of {v['batch']}, "
                  f"seeds {v['seeds']})\n",
                  "| model: decoding | exact match (pooled) | per seed | follows edges | NFE |",
                  "|---|---|---|---|---|"]
        for k, r in v["results"].items():
            per_seed = " / ".join(f"{x['exact_match']:.3f}" for x in r["seeds"].values())
            lines.append(f"| {k} | {r['exact_match']:.3f} ± {r['stderr']:.3f} | {per_seed} | {r['follows_edges']:.3f} "
                         f"| {r['nfe']} |")
    if "text" in result:
        t = result["text"]
        ref = t["reference"]
        lines += ["\nUnconditional tiny-shakespeare speeches\n",
                  "| model: sampling | NLL/char (evaluator) | mean length | median | p10-p90 | entropy |",
                  "|---|---|---|---|---|---|",
                  f"| held-out speeches | {ref['nll_per_char']:.3f} | {ref['lengths']['mean']:.1f} | "
                  f"{ref['lengths']['median']:.0f} | {ref['lengths']['p10']:.0f}-{ref['lengths']['p90']:.0f} | "
                  f"{ref['entropy']:.3f} |"]
        for k, r in t["results"].items():
            lines.append(f"| {k} | {r['nll_per_char']:.3f} | {r['lengths']['mean']:.1f} | {r['lengths']['median']:.0f} "
                         f"| {r['lengths']['p10']:.0f}-{r['lengths']['p90']:.0f} | {r['entropy']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag")
    parser.add_argument("--runs", default="runs/insertion")
    parser.add_argument("--stages", default="star,text")
    parser.add_argument("--variants", default="tiny")
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--star-steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3, help="star-graph learning rate")
    parser.add_argument("--lr-schedule", default="constant", help="star-graph learning-rate schedule")
    parser.add_argument("--seeds", default="1,2", help="star-graph training seeds (a run per family and seed)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: all cores)")
    parser.add_argument("--star-train", type=int, default=500_000)
    parser.add_argument("--star-test", type=int, default=1000)
    parser.add_argument("--text-steps", type=int, default=1000)
    parser.add_argument("--text-families", default=",".join(FAMILIES), help="families whose text results are "
                        "(re)measured; the others' results are kept from the JSON")
    parser.add_argument("--evaluator-steps", type=int, default=1500)
    parser.add_argument("--evaluator", help="an AR run to score text samples (default: train one on the running "
                        "text, nano, 1,500 steps: the recipe of benchmarks/softmask.py's AR model)")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape; nothing is recorded")
    args = parser.parse_args()
    if args.tag is None and not args.smoke:
        parser.error("the following arguments are required: --tag")
    torch.manual_seed(0)
    if not args.smoke:
        benchmark(args, Path(args.runs) / args.tag, ROOT / "benchmarks" / "results")
        return
    with tempfile.TemporaryDirectory() as tmp:  # tiny models, two steps each, a few rows; runs and record go there
        args.tag, args.variants, args.star_train, args.star_test, args.samples = "smoke", "tiny", 64, 8, 4
        args.seeds = "1"
        args.batch, args.star_steps, args.text_steps, args.evaluator_steps, args.threads = 4, 2, 2, 2, 1
        # the tiny model at the script's own lengths (the text evaluator's model.length is the preset's)
        tiny = [o for o in SMOKE_OVERRIDES if not o.startswith(("model.length=", "data.length="))]
        benchmark(args, Path(tmp), Path(tmp), (*tiny, f"data.cache_dir={Path(tmp) / 'cache'}"))


def benchmark(args, runs: Path, out_dir: Path, smoke: tuple[str, ...] = ()) -> None:
    """The stages in ``runs``, the record in ``out_dir``; ``smoke``: overrides that come first in every run (the
    script's own keys win)."""
    path = out_dir / f"insertion-{args.tag}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update(run_header(args.tag, ceilings=not args.smoke))
    stages = args.stages.split(",")
    if "star" in stages:
        result["star_graph"] = star_graph(args, runs, smoke)
        path.write_text(json.dumps(result, indent=1) + "\n")
    if "text" in stages:
        result["text"] = text(args, runs, smoke, result.get("text"))
        path.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
