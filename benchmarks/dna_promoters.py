"""DNA on the human core promoter set (GUE prom_core_all, 70 bp): likelihood, generation and
classification, in one run.

1. MDLM and AR models of the same size pretrained on the training sequences (one sequence per row,
   ``[BOS] seq [EOS]``, only bases counted), then bits per base on the test split (MDLM: NELBO bound;
   AR: exact NLL).
2. Unconditional generation with several samplers and the AR model: bits per base of the samples under
   the AR model, and k-mer spectrum distances (k = 3, 4, 6) to held-out test sequences.
3. Promoter classification: the same classifier fine-tuned from the pretrained MDLM and trained from
   scratch with the same steps, batch and learning-rate schedule; test AUC, accuracy and MCC of the
   checkpoint with the best validation AUC.

    python benchmarks/dna_promoters.py --tag prom-core-nano
    python benchmarks/dna_promoters.py --smoke          # seconds: the test suite runs this (random sequences)

Writes ``benchmarks/results/dna_promoters-<tag>.json`` and Markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import tempfile
from pathlib import Path

import torch

from unmask.checkpoints.checkpoint import Checkpoint, list_checkpoints, load_model
from unmask.config import SampleConfig, load_config
from unmask.data.dataset import Data
from unmask.eval.generation import CheckpointEvaluator, kmer_spectrum_distance
from unmask.eval.likelihood import likelihood_of_rows
from unmask.pipeline import generate_rows
from unmask.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import SMOKE_OVERRIDES, run_header  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "dna_gue_prom_core_all"


def data_overrides(data: Path) -> list[str]:
    return ["data.dataset=text", f"data.path={data / 'train.csv'}", f"data.valid_path={data / 'dev.csv'}",
            f"data.test_path={data / 'test.csv'}", "data.text_field=sequence", "data.tokenizer=dna",
            "data.length=72", "data.layout=pad", "data.count_bos=false", "data.count_eos=false"]


def write_random_data(folder: Path) -> None:
    """Random 70-bp sequences with alternating labels, as the GUE files lay them out: the smoke mode's data."""
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for split, rows in (("train", 64), ("dev", 16), ("test", 24)):
        lines = ["sequence,label", *(f"{''.join(rng.choices('ACGT', k=70))},{i % 2}" for i in range(rows))]
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")


def finished(run_dir: Path, steps: int) -> bool:
    found = list_checkpoints(run_dir / "checkpoints")
    return bool(found) and Checkpoint(found[-1]).step >= steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--runs", default="runs/dna")
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--finetune-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--mc-samples", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape; nothing is recorded")
    args = parser.parse_args()
    if args.tag is None and not args.smoke:
        parser.error("the following arguments are required: --tag")
    if not args.smoke:
        benchmark(args, Path(args.runs) / args.tag, ROOT / "benchmarks" / "results")
        return
    with tempfile.TemporaryDirectory() as tmp:  # tiny models, two steps each, random data; runs and record go there
        args.tag, args.data, args.pretrain_steps, args.finetune_steps = "smoke", Path(tmp) / "data", 2, 2
        args.batch_size, args.samples, args.mc_samples = 4, 4, 2
        write_random_data(args.data)
        benchmark(args, Path(tmp), Path(tmp), (*SMOKE_OVERRIDES, f"data.cache_dir={Path(tmp) / 'cache'}"))


def benchmark(args, runs: Path, out_dir: Path, smoke: tuple[str, ...] = ()) -> None:
    """Train (or find) the runs in ``runs``, measure them, write the record to ``out_dir`` and print the tables;
    ``smoke``: overrides that come first in every run (the script's own keys win)."""
    common = [*smoke, *data_overrides(args.data), f"model.preset={args.preset}", "model.length=72",
              f"train.batch_size={args.batch_size}", "train.lr=2e-3", "train.warmup_steps=100",
              "train.lr_schedule=cosine", "train.ema=0.999", "train.log_every=50", "train.progress=false"]

    pretrained = {}
    for family in ("mdlm", "ar"):
        run_dir = runs / family
        cfg = load_config(None, [*common, f"family={family}", f"run_dir={run_dir}",
                                 f"train.steps={args.pretrain_steps}"])
        if not finished(run_dir, args.pretrain_steps):
            print(f"pretraining {family} ({args.pretrain_steps} steps)", flush=True)
            train(cfg)
        pretrained[family] = Checkpoint(run_dir)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    likelihood = {}
    for family, ckpt in pretrained.items():
        model, objective = load_model(ckpt, device=device)
        rows = Data(ckpt.config.data, tokenizer=ckpt.tokenizer).rows("test")
        r = likelihood_of_rows(model, objective, rows, ckpt.config.data, ckpt.tokenizer,
                               mc_samples=args.mc_samples, batch_size=256, seed=0, device=device)
        likelihood[family] = {"bits_per_base": r["bits_per_token"], "stderr_bits": r["stderr"] / math.log(2),
                              "sequences": r.get("sequences"), "tokens": r.get("tokens")}
        print(f"{family}: {r['bits_per_token']:.4f} bits/base (test)", flush=True)

    evaluator = CheckpointEvaluator(pretrained["ar"].path, device, batch_size=256)
    mdlm, objective = load_model(pretrained["mdlm"], device=device)
    ar, ar_objective = load_model(pretrained["ar"], device=device)
    tok = pretrained["mdlm"].tokenizer
    test_rows = Data(pretrained["mdlm"].config.data, tokenizer=tok).rows("test")
    ids, kinds = test_rows.get(torch.arange(min(args.samples * 4, len(test_rows))).numpy())
    references = [tok.decode(row[k == 0]) for row, k in zip(ids, kinds)]
    generation = []
    base = SampleConfig(num_samples=args.samples, batch_size=args.samples, seed=3)
    settings = [("ancestral T=70", mdlm, objective, dict(sampler="ancestral", steps=70)),
                ("ancestral T=18", mdlm, objective, dict(sampler="ancestral", steps=18)),
                ("first-hitting", mdlm, objective, dict(sampler="first_hitting")),
                ("first-hitting k=4", mdlm, objective, dict(sampler="first_hitting", tokens_per_step=4)),
                ("confidence T=35", mdlm, objective, dict(sampler="confidence", steps=35)),
                ("AR", ar, ar_objective, dict(sampler="ar"))]
    ref_totals, ref_counts = evaluator.nll(references)
    reference = {"bits_per_base_under_ar": float(ref_totals.sum() / ref_counts.sum() / math.log(2))}
    for label, model, obj, knobs in settings:
        cfg = dataclasses.replace(base, **knobs)
        gen = generate_rows(model, obj, tok, cfg, 71, 72, bos=True, device=device)
        texts = [t[:70] for t in gen.texts]
        totals, counts = evaluator.nll(texts)
        row = {"sampler": label, "bits_per_base_under_ar": float(totals.sum() / counts.sum() / math.log(2)),
               "mean_length": sum(map(len, texts)) / len(texts), "seconds": gen.seconds,
               **{f"kmer{k}_distance": kmer_spectrum_distance(texts, references, k) for k in (3, 4, 6)}}
        generation.append(row)
        print(f"{label:20s} {row['bits_per_base_under_ar']:.4f} bits/base under AR, k-mer distances "
              f"{row['kmer3_distance']:.4f} / {row['kmer4_distance']:.4f} / {row['kmer6_distance']:.4f}", flush=True)
    # the floor of the distances: another held-out set of as many sequences as the samples
    extra_ids, extra_kinds = test_rows.get(torch.arange(len(references), len(references) + args.samples).numpy())
    held_out = [tok.decode(row[k == 0]) for row, k in zip(extra_ids, extra_kinds)]
    reference.update({f"kmer{k}_distance": kmer_spectrum_distance(held_out, references, k) for k in (3, 4, 6)})

    classification = {}
    finetune = [*smoke, *data_overrides(args.data), f"model.preset={args.preset}", "model.length=72",
                "family=classifier", f"train.steps={args.finetune_steps}", f"train.batch_size={args.batch_size}",
                "train.lr=5e-4", "train.warmup_steps=50", "train.lr_schedule=cosine", "train.eval_every=100",
                "train.log_every=50", "train.weight_decay=0.01", "classifier.pooling=mean", "classifier.dropout=0.1"]
    for name, init in (("fine-tuned from the MDLM", [f"train.init_from={pretrained['mdlm'].path}"]),
                       ("from scratch", [])):
        run_dir = runs / ("clf-pretrained" if init else "clf-scratch")
        if not (run_dir / "test_metrics.json").is_file():
            print(f"classifier {name} ({args.finetune_steps} steps)", flush=True)
            train(load_config(None, [*finetune, f"run_dir={run_dir}", *init]))
        classification[name] = json.loads((run_dir / "test_metrics.json").read_text())
        t = classification[name]["test"]
        print(f"{name:26s} test AUC {t['auc']:.4f} accuracy {t['accuracy']:.4f} MCC {t['mcc']:.4f}", flush=True)

    record = {**run_header(args.tag, ceilings=not args.smoke), "preset": args.preset,
              "parameters": sum(p.numel() for p in mdlm.parameters()), "pretrain_steps": args.pretrain_steps,
              "finetune_steps": args.finetune_steps, "batch_size": args.batch_size, "likelihood": likelihood,
              "generation": generation, "reference": reference, "classification": classification}
    out = out_dir / f"dna_promoters-{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"\n{record['date']} {record['machine']['cpu']} ({record['machine']['cores']} cores), commit "
          f"{record['commit']}; preset {args.preset} ({record['parameters']:,} parameters)")
    print("| model | test bits per base |\n|---|---|")
    for family, r in likelihood.items():
        bound = " (NELBO bound)" if family == "mdlm" else " (exact)"
        print(f"| {family}{bound} | {r['bits_per_base']:.4f} ± {r['stderr_bits']:.4f} |")
    print("\n| sampler | bits/base under AR | 3-mer | 4-mer | 6-mer distance |\n|---|---|---|---|---|")
    for r in generation:
        print(f"| {r['sampler']} | {r['bits_per_base_under_ar']:.4f} | {r['kmer3_distance']:.4f} | "
              f"{r['kmer4_distance']:.4f} | {r['kmer6_distance']:.4f} |")
    print(f"| held-out test sequences ({args.samples} others) | {reference['bits_per_base_under_ar']:.4f} | "
          f"{reference['kmer3_distance']:.4f} | {reference['kmer4_distance']:.4f} | "
          f"{reference['kmer6_distance']:.4f} |")
    print("\n| classifier | test AUC | accuracy | MCC | best valid step |\n|---|---|---|---|---|")
    for name, r in classification.items():
        t = r["test"]
        print(f"| {name} | {t['auc']:.4f} | {t['accuracy']:.4f} | {t['mcc']:.4f} | {r['best_step']} |")


if __name__ == "__main__":
    main()
