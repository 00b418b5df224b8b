"""Insertion LM vs masked diffusion vs autoregressive, same backbone size and training budget.

1. Star-graph path finding (:mod:`unmask.data.tasks`): for each variant, ILM, MDLM and AR models of the
   same preset are trained on the same prompt/answer rows for the same number of steps and batch size,
   then scored by exact match on held-out graphs: ILM greedy (largest gap marginal, argmax token,
   stop when P(stop) >= 0.5); MDLM with two greedy orders (ancestral at temperature 0 over as many
   steps as positions, and confidence order, one position per step); AR greedy.
2. Unconditional text: tiny-shakespeare speeches (documents split at blank lines, ``data.layout=pad``,
   rows of 128 characters, so 35 % of the speeches are cut to 126), the three families again, then
   samples at temperature 1 scored by an AR evaluator trained on the running text (NLL per
   character, gen-PPL), their lengths (characters before the model's end: EOS for MDLM/AR, the stop
   head for ILM) against the held-out speeches' (after the same cut), and unigram entropy.
3. Infilling spans of unknown length with the stage-2 models: in held-out speeches one span of 8-24
   characters is cut out; the ILM fills the gap with as many characters as it chooses, the MDLM fills
   as many masks as it is given (the true length, half, twice); the filled speeches are scored by the
   evaluator, paired with the originals, and the chosen lengths against the true ones.

    python benchmarks/insertion.py --tag nano
    python benchmarks/insertion.py --smoke          # seconds: the test suite runs this

Each stage resumes or is skipped when its run folder is complete; a larger ``--star-steps`` continues
the star-graph runs (constant learning rate: the same as training that long from the start) and adds
an entry for that budget. Writes ``benchmarks/results/insertion-<tag>.json`` (every entry with the
command and commit that measured it), Markdown tables on stdout and, with matplotlib, the figures
``insertion-<tag>-star.png`` (star-graph training losses) and ``insertion-<tag>-lengths.png`` (text
lengths against the held-out speeches'); ``--replot`` redraws them from the JSON alone.
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
from unmask.data.layouts import TOKEN
from unmask.data.tasks import read_pairs, star_graph_path_checks, write_star_graph_task
from unmask.eval.exact_match import exact_match
from unmask.eval.generation import CheckpointEvaluator, unigram_entropy
from unmask.eval.likelihood import select_rows
from unmask.families import family_of
from unmask.models.insertion import STOP_HEADS, stop_log_odds
from unmask.pipeline import generate_rows
from unmask.samplers.base import row_seeds
from unmask.samplers.registry import make_sampler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import SMOKE_OVERRIDES, pooled_ppl, pyplot, run_header, trained  # noqa: E402

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
            for family in args.star_families.split(","):
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
        out[f"{variant}, {args.star_steps} steps"] = {
            "variant": variant, "spec": meta["spec"], "length": length, "train_rows": args.star_train,
            "steps": args.star_steps, "batch": args.batch, "lr": args.lr, "results": rows, "loss_curves": curves}
    return out


def pool_seeds(entry: dict) -> dict:
    """A star-graph row's figures pooled over its seeds (``entry["seeds"]``): the exact-match rate and
    the binomial error of all answers together, the mean share that follows edges."""
    runs_ = list(entry["seeds"].values())
    n = sum(x["n"] for x in runs_)
    p = sum(x["exact_match"] * x["n"] for x in runs_) / n
    entry.update(exact_match=p, stderr=math.sqrt(p * (1 - p) / n), n=n, nfe=runs_[0]["nfe"],
                 follows_edges=float(np.mean([x["follows_edges"] for x in runs_])))
    return entry


LENGTH_BINS = list(range(0, 129, 16))  # histogram edges, characters; the last bin holds 112-127
TEXT_LIMIT = 127  # the most characters a text row holds (128 tokens with BOS)


def lengths_summary(lengths) -> dict:
    x = np.asarray(lengths, dtype=float)
    return {"mean": float(x.mean()), "median": float(np.median(x)), "p10": float(np.percentile(x, 10)),
            "p90": float(np.percentile(x, 90)), "share_at_limit": float((x >= TEXT_LIMIT).mean()),
            "histogram": np.histogram(x, LENGTH_BINS)[0].tolist()}


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


def text_evaluator(args, runs: Path, smoke: tuple[str, ...]) -> CheckpointEvaluator:
    """The AR model that scores text (``--evaluator``, or one trained on the running text)."""
    run = args.evaluator
    if not run:
        run, _ = trained(runs / "text-evaluator", [
            *smoke, "family=ar", "data.dataset=tinyshakespeare", "data.tokenizer=char", "data.length=128",
            "data.frame=false", f"model.preset={args.preset}", f"train.steps={args.evaluator_steps}",
            "train.batch_size=32", "train.lr=2e-3", "train.warmup_steps=50", "train.lr_schedule=cosine",
            "train.ema=0.995", f"train.threads={args.threads}"], None)
    return CheckpointEvaluator(run, "cpu")


# the text ILM's departures from the shared recipe: config key, argument, name in records, in folder
# names, and the default (not named)
ILM_RECIPE = (("diffusion.ilm_stop_noise", "ilm_stop_noise", "stop noise", "stopnoise", 0.0),
              ("model.dropout", "ilm_dropout", "dropout", "dropout", 0.0),
              ("diffusion.ilm_stop_head", "ilm_stop_head", "stop head", "stophead", "binary"))


def ilm_recipe(args) -> list[tuple[str, str, str, str]]:
    """The text ILM's overrides that differ from the defaults (``--ilm-stop-noise``, ``--ilm-dropout``,
    ``--ilm-stop-head``): (key, value as text, name, folder name)."""
    return [(key, f"{getattr(args, arg):g}" if isinstance(default, float) else getattr(args, arg), name, short)
            for key, arg, name, short, default in ILM_RECIPE if getattr(args, arg) != default]


def ilm_label(args, name: str = "ilm") -> str:
    """The ILM's name in the records: ``ilm``, or with its recipe (``ilm, stop noise 0.25, dropout 0.1``)."""
    return ", ".join([name, *(f"{key} {value}" for _, value, key, _ in ilm_recipe(args))])


def text_model(args, runs: Path, smoke: tuple[str, ...], family: str) -> Checkpoint:
    """A family's model of the speeches: one document per row of 128 characters, EOS after it (the ILM
    with its recipe, :func:`ilm_recipe`, in a run folder named after it)."""
    recipe = ilm_recipe(args) if family == "ilm" else []
    seed = [f"seed{args.text_seed}"] if args.text_seed != 1 else []  # train.seed's default: no suffix
    folder = "-".join([f"text-{family}", *(f"{short}{value}" for _, value, _, short in recipe), *seed])
    path, _ = trained(runs / folder, [
        f"family={family}", *smoke, *(f"{key}={value}" for key, value, _, _ in recipe),
        f"data.path={SHAKESPEARE}", "data.dataset=text", "data.documents=blank_line",
        "data.layout=pad", "data.pad_with_eos=true", "data.length=128", "data.tokenizer=char",
        f"data.split_order={args.text_split}", f"train.seed={args.text_seed}",
        f"model.preset={args.preset}", "model.length=128", f"train.steps={args.text_steps}", "train.batch_size=32",
        "train.lr=2e-3", "train.warmup_steps=50", "train.lr_schedule=cosine", "train.ema=0.995",
        f"train.threads={args.threads}", f"data.cache_dir={runs / 'cache'}"], None)
    return Checkpoint(path)


# a count-head ILM's second stop rule, in the text and infilling rows
COUNT_RULE = "joint sampling, number of insertions drawn once from the count head (stop=count), t=1"
CALIBRATION_BINS = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]


@torch.no_grad()
def stop_calibration(ckpt: Checkpoint, rows, count: int, states: int = 8, seed: int = 0) -> dict:
    """Reliability of an ILM's stop head on held-out rows along their insertion paths. Per row: the
    complete state (weight 1) and ``states`` states with ``n ~ Uniform{1..n0}`` tokens dropped (weight
    ``n0 / states`` each), so every state of every row's path counts once, as sampling visits them.
    A calibrated hazard has, per bin of predicted P(stop), the weighted mean prediction equal to the
    weighted share of complete states."""
    model, objective = load_model(ckpt)
    ids, kinds = rows.get(select_rows(len(rows), count, 0))
    x0, counted = torch.from_numpy(ids), torch.from_numpy(kinds == TOKEN)
    n0 = counted.sum(1)
    gen = torch.Generator().manual_seed(seed)
    predicted, complete, weight = [], [], []
    for k in range(states + 1):
        n = torch.zeros_like(n0) if k == 0 else 1 + (torch.rand(len(n0), generator=gen) * n0).long().clamp(max=n0 - 1)
        for lo in range(0, len(x0), 64):
            part = slice(lo, lo + 64)
            time_u = (n[part] + 0.5) / (n0[part] + 1)  # drop() draws floor(u (n0 + 1)) = n tokens
            batch = objective.drop(x0[part], counted[part], time_u, torch.rand(x0[part].shape, generator=gen))
            predicted.append(torch.sigmoid(stop_log_odds(model(batch.ids, batch.keep)[1]).double()))
        complete.append(n == 0)
        weight.append(torch.ones(len(n0), dtype=torch.float64) if k == 0 else n0.double() / states)
    p, c, w = torch.cat(predicted), torch.cat(complete).double(), torch.cat(weight)
    bins = []
    for lo, hi in zip(CALIBRATION_BINS, CALIBRATION_BINS[1:]):
        inside = (p >= lo) & ((p < hi) if hi < 1 else (p <= hi))
        if inside.any():
            ws = w[inside]
            bins.append({"bin": [lo, hi], "weight": float(ws.sum() / w.sum()), "states": int(inside.sum()),
                         "predicted": float((p[inside] * ws).sum() / ws.sum()),
                         "complete": float((c[inside] * ws).sum() / ws.sum())})
    first = len(n0)  # the complete states come first; then each row's incomplete ones
    return {"rows": len(n0), "predicted": float((p * w).sum() / w.sum()), "complete": float((c * w).sum() / w.sum()),
            "mean_p_complete_rows": float(p[:first].mean()), "mean_p_incomplete_rows": float(p[first:].mean()),
            "bins": bins, "complete_with_substitutions": stop_after_substitutions(model, objective, x0, counted, gen)}


def stop_after_substitutions(model, objective, x0, counted, gen, substitutions=(0, 1, 3)) -> dict:
    """Mean and median P(stop) on complete rows after ``k`` of their characters are replaced by random
    ordinary ones: nothing is missing, but the text has the kind of defect a model's own samples have."""
    complete = objective.drop(x0, counted, 0.5 / (counted.sum(1) + 1), torch.rand(x0.shape, generator=gen))
    ordinary = (~objective.forbidden("cpu")).nonzero()[:, 0]
    out = {}
    for k in substitutions:
        ids = complete.ids.clone()
        for r in range(len(ids)):
            places = 1 + torch.randperm(int(counted[r].sum()), generator=gen)[:k]  # after BOS
            ids[r, places] = ordinary[torch.randint(len(ordinary), (len(places),), generator=gen)]
        p = torch.cat([torch.sigmoid(stop_log_odds(model(ids[lo:lo + 64], complete.keep[lo:lo + 64])[1]).double())
                       for lo in range(0, len(ids), 64)])
        out[k] = {"mean": float(p.mean()), "median": float(p.median())}
    return out


def text(args, runs: Path, smoke: tuple[str, ...], previous: dict | None = None) -> dict:
    evaluator = text_evaluator(args, runs, smoke)
    results = dict((previous or {}).get("results", {}))
    calibrations = dict((previous or {}).get("stop_calibrations", {}))
    reference = None
    for family in args.text_families.split(","):
        ckpt = text_model(args, runs, smoke, family)
        tok = ckpt.tokenizer
        if reference is None:  # held-out speeches, cut as the rows are
            rows = Data(ckpt.config.data, tokenizer=tok).rows("test")
            ids, kinds = rows.get(select_rows(len(rows), args.samples, 0))
            texts = [text_of(row.tolist(), tok) for row in ids]
            totals, counts = evaluator.nll(texts)
            train_rows = Data(ckpt.config.data, tokenizer=tok).rows("train")
            train, _ = train_rows.get(np.arange(len(train_rows)))
            reference = {"nll_per_char": float(totals.sum() / counts.sum()),
                         "entropy": float(np.mean([unigram_entropy(tok.encode(t).tolist()) for t in texts])),
                         "lengths": lengths_summary([len(t) for t in texts]),
                         "train_lengths": lengths_summary([len(text_of(row.tolist(), tok)) for row in train])}
        label = ilm_label(args) if family == "ilm" else family
        if family == "ilm":
            calibrations[label] = stop_calibration(ckpt, Data(ckpt.config.data, tokenizer=tok).rows("test"),
                                                   args.samples)
        model, objective = load_model(ckpt)
        base = SampleConfig(num_samples=args.samples, batch_size=64, steps=128, seed=1)
        configs = {"ilm": {"joint sampling (gap, token and stop drawn), t=1": dataclasses.replace(base, gap="sample"),
                           "joint sampling, top-p 0.9": dataclasses.replace(base, gap="sample", top_p=0.9),
                           "greedy gap, token and stop drawn, t=1": dataclasses.replace(base, gap="greedy"),
                           "released settings (greedy gap, top-p 0.2, stop 0.9)": dataclasses.replace(
                               base, gap="greedy", top_p=0.2, stop="threshold", stop_threshold=0.9)},
                   "mdlm": {"ancestral, T=128, t=1": base},
                   "ar": {"left to right, t=1": base}}[family]
        if family == "ilm" and ckpt.config.diffusion.ilm_stop_head == "count":
            configs[COUNT_RULE] = dataclasses.replace(base, gap="sample", stop="count")
        for name, cfg in configs.items():
            gen = generate_rows(model, objective, tok, cfg, 128, 128, bos=True)
            texts = [text_of(ids, tok) for ids in gen.ids]
            scored = [t for t in texts if t]
            totals, counts = evaluator.nll(scored)
            ppl, ppl_se = pooled_ppl(totals, counts)
            results[f"{label}: {name}"] = {
                "nll_per_char": float(totals.sum() / counts.sum()), "gen_ppl": ppl, "gen_ppl_se": ppl_se,
                "entropy": float(np.mean([unigram_entropy(tok.encode(t).tolist()) for t in texts])),
                "lengths": lengths_summary([len(t) for t in texts]), "empty": len(texts) - len(scored),
                "nfe": gen.nfe, "seconds": gen.seconds, "example": texts[0][:200]}
            r = results[f"{label}: {name}"]
            print(f"text {family} {name}: nll/char {r['nll_per_char']:.3f}, mean length {r['lengths']['mean']:.1f}, "
                  f"entropy {r['entropy']:.3f}", flush=True)
    return {"reference": reference, "results": results, "stop_calibrations": calibrations, "evaluator": evaluator.name,
            "split_order": args.text_split}


def infill_spans(rows, tokenizer, count: int, seed: int = 0) -> list[dict]:
    """Up to ``count`` held-out speeches of 24-100 characters (complete, and room for a span twice as
    long), each with one span cut out: 8-24 characters and at most a third of the speech, at a uniform
    place. Lists of ids: ``left`` (after BOS), ``span`` and ``right``."""
    ids, kinds = rows.get(np.arange(len(rows)))
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.permutation(len(rows)):
        doc = [t for t in ids[i, 1:].tolist() if t not in tokenizer.special_ids]
        if not 24 <= len(doc) <= 100:
            continue
        size = int(rng.integers(8, min(24, len(doc) // 3) + 1))
        start = int(rng.integers(0, len(doc) - size + 1))
        out.append({"left": doc[:start], "span": doc[start:start + size], "right": doc[start + size:]})
        if len(out) == count:
            break
    return out


def fill_spans(ckpt: Checkpoint, cases: list[dict], cfg: SampleConfig, lengths: list[int] | None = None
               ) -> tuple[list, dict]:
    """Each case's span as the model fills it (ids), and the sampling totals. An insertion model gets
    ``[BOS] left [MASK] right`` and chooses the length; a masked model gets the row as it was trained,
    ``[BOS] left [MASK]*k right [EOS]`` then EOS or PAD (``data.pad_with_eos``), with ``k = lengths[i]``, at
    most what the row has room for."""
    model, objective = load_model(ckpt)
    tok, width = ckpt.tokenizer, ckpt.config.model.length
    sampler = make_sampler(cfg, objective, tok, width)
    grows = family_of(objective.family).decoding == "insertion"
    spans, nfe, seconds = [], 0, 0.0
    for lo in range(0, len(cases), cfg.batch_size):
        batch = cases[lo:lo + cfg.batch_size]
        fill = tok.eos_id if not grows and ckpt.config.data.pad_with_eos else tok.pad_id  # as the rows were
        canvas = torch.full((len(batch), width), fill, dtype=torch.long)
        sizes = [1] * len(batch) if grows else [min(k, width - 2 - len(c["left"]) - len(c["right"]))
                                                for c, k in zip(batch, lengths[lo:lo + cfg.batch_size])]
        for r, (c, k) in enumerate(zip(batch, sizes)):
            row = [tok.bos_id, *c["left"], *[tok.mask_id] * k, *c["right"], *([] if grows else [tok.eos_id])]
            canvas[r, :len(row)] = torch.tensor(row)
        result = sampler.sample(model, canvas, row_seeds(cfg.seed, len(batch), lo))
        nfe, seconds = nfe + result.nfe, seconds + result.seconds
        for row, c, k in zip(result.tokens.tolist(), batch, sizes):
            if grows:  # the inserted tokens lie between the fixed left and right
                k = sum(t != tok.pad_id for t in row) - 1 - len(c["left"]) - len(c["right"])
            spans.append([t for t in row[1 + len(c["left"]):1 + len(c["left"]) + k] if t not in tok.special_ids])
    return spans, {"nfe": nfe, "seconds": seconds}


def infill(args, runs: Path, smoke: tuple[str, ...], previous: dict | None = None) -> dict:
    """Spans of unknown length: the ILM chooses the length, the MDLM is told the true one or a wrong one;
    the filled speeches are scored by the AR evaluator against the originals (paired per speech). Rows
    named after another ILM recipe (``--ilm-stop-noise``, ``--ilm-dropout``) in ``previous`` are kept."""
    evaluator = text_evaluator(args, runs, smoke)
    models = {family: text_model(args, runs, smoke, family) for family in ("ilm", "mdlm")}
    tok = models["ilm"].tokenizer
    cases = infill_spans(Data(models["ilm"].config.data, tokenizer=tok).rows("test"), tok, args.samples)
    original_totals, original_counts = evaluator.nll([tok.decode(c["left"] + c["span"] + c["right"]) for c in cases])
    base = SampleConfig(batch_size=64, steps=64, seed=1)
    true_lengths = np.array([len(c["span"]) for c in cases])
    # the MDLM's span lengths from the true ones and the ILM's choices (measured first)
    ilm = ilm_label(args, "ILM")
    methods = {f"{ilm}: length chosen by the model (joint sampling, drawn stop, t=1)":
               ("ilm", dataclasses.replace(base, gap="sample"), None),
               **({f"{ilm}: {COUNT_RULE}": ("ilm", dataclasses.replace(base, gap="sample", stop="count"), None)}
                  if models["ilm"].config.diffusion.ilm_stop_head == "count" else {}),
               "MDLM: told the true length (ancestral, T=64, t=1)": ("mdlm", base, lambda true, own: true),
               "MDLM: told half the true length": ("mdlm", base, lambda true, own: np.maximum(1, np.round(true / 2))),
               "MDLM: told twice the true length": ("mdlm", base, lambda true, own: 2 * true),
               f"MDLM: told the {ilm}'s length (at least 1)": ("mdlm", base, lambda true, own: np.maximum(1, own))}
    results, ilm_lengths = dict((previous or {}).get("results", {})), None
    for name, (family, cfg, told) in methods.items():
        told = None if told is None else told(true_lengths, ilm_lengths).astype(int).tolist()
        spans, totals = fill_spans(models[family], cases, cfg, told)
        filled = [tok.decode(c["left"] + s + c["right"]) for c, s in zip(cases, spans)]
        nll, counts = evaluator.nll(filled)
        excess = nll / counts - original_totals / original_counts  # per speech, paired
        lengths = np.array([len(s) for s in spans])
        if family == "ilm" and ilm_lengths is None:  # the first ILM row's
            ilm_lengths = lengths
        results[name] = {
            "nll_per_char": float(nll.sum() / counts.sum()),
            "excess_nll_per_char": float(excess.mean()),
            "excess_se": float(excess.std(ddof=1) / math.sqrt(len(excess))),
            "span_length": float(lengths.mean()), "length_error": float(np.abs(lengths - true_lengths).mean()),
            "length_exact": float((lengths == true_lengths).mean()),
            "length_correlation": float(np.corrcoef(lengths, true_lengths)[0, 1]) if lengths.std() > 0 else None,
            "span_exact": float(np.mean([s == c["span"] for c, s in zip(cases, spans)])), **totals,
            "examples": [{"left": tok.decode(c["left"]), "true": tok.decode(c["span"]), "filled": tok.decode(s),
                          "right": tok.decode(c["right"])} for c, s in list(zip(cases, spans))[:3]]}
        r = results[name]
        print(f"infill {name}: nll/char {r['nll_per_char']:.3f}, excess {r['excess_nll_per_char']:.3f} ± "
              f"{r['excess_se']:.3f}, span length {r['span_length']:.1f} (|error| {r['length_error']:.1f})",
              flush=True)
    return {"cases": len(cases), "true_span_length": float(np.mean([len(c["span"]) for c in cases])),
            "original_nll_per_char": float(original_totals.sum() / original_counts.sum()),
            "results": results, "evaluator": evaluator.name}


def table(result: dict) -> str:
    lines = []
    for key, v in result.get("star_graph", {}).items():
        lines += [f"\nStar graph, {key} ({v['train_rows']} training graphs, batches of {v['batch']})\n",
                  "| model: decoding | exact match (pooled) | per seed | follows edges | NFE |",
                  "|---|---|---|---|---|"]
        for k, r in v["results"].items():
            per_seed = " / ".join(f"s{seed} {x['exact_match']:.3f}" for seed, x in r["seeds"].items())
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
        bins = [f"{lo}-{hi - 1}" for lo, hi in zip(LENGTH_BINS, LENGTH_BINS[1:])]
        lines += ["\nLengths (characters; share of samples per bin)\n", f"| | {' | '.join(bins)} |",
                  "|---" * (len(bins) + 1) + "|"]
        for k, r in [("held-out speeches", ref), *t["results"].items()]:
            if "histogram" in r["lengths"]:
                h = np.asarray(r["lengths"]["histogram"], dtype=float)
                lines.append(f"| {k} | {' | '.join(f'{x:.2f}' for x in h / h.sum())} |")
        for label, c in t.get("stop_calibrations", {}).items():
            lines += [f"\n{label}: stop head on held-out insertion paths ({c['rows']} speeches, every state weighted "
                      f"as sampling visits it): mean P(stop) {c['predicted']:.4f}, share complete {c['complete']:.4f}; "
                      f"on complete speeches {c['mean_p_complete_rows']:.3f}, on incomplete states "
                      f"{c['mean_p_incomplete_rows']:.4f}\n",
                      "| predicted P(stop) | share of states | mean predicted | share complete |", "|---|---|---|---|"]
            lines += [f"| {b['bin'][0]}-{b['bin'][1]} | {b['weight']:.4f} | {b['predicted']:.4f} | "
                      f"{b['complete']:.4f} |" for b in c["bins"]]
            lines += ["\n| characters substituted in complete held-out speeches | " +
                      " | ".join(map(str, c["complete_with_substitutions"])) + " |",
                      "|---" * (1 + len(c["complete_with_substitutions"])) + "|",
                      "| P(stop), mean (median) | " + " | ".join(f"{x['mean']:.3f} ({x['median']:.3f})" for x in
                                                             c["complete_with_substitutions"].values()) + " |"]
    if "infill" in result:
        f = result["infill"]
        lines += [f"\nInfilling one span of {f['true_span_length']:.1f} characters on average in {f['cases']} held-out "
                  f"speeches (evaluator NLL/char of the originals {f['original_nll_per_char']:.3f})\n",
                  "| model: length | NLL/char | excess NLL/char over the original (paired) | span length "
                  "| mean abs length error | exact span | NFE |", "|---|---|---|---|---|---|---|"]
        for k, r in f["results"].items():
            lines.append(f"| {k} | {r['nll_per_char']:.3f} | {r['excess_nll_per_char']:+.3f} ± {r['excess_se']:.3f} | "
                         f"{r['span_length']:.1f} | {r['length_error']:.1f} | {r['span_exact']:.3f} | {r['nfe']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag")
    parser.add_argument("--runs", default="runs/insertion")
    parser.add_argument("--stages", default="star,text,infill")
    parser.add_argument("--variants", default="tiny")
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--star-steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3, help="star-graph learning rate")
    parser.add_argument("--lr-schedule", default="constant", help="star-graph learning-rate schedule")
    parser.add_argument("--seeds", default="1,2", help="star-graph training seeds (a run per family and seed)")
    parser.add_argument("--star-families", default=",".join(FAMILIES), help="families trained on the star graphs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: all cores)")
    parser.add_argument("--star-train", type=int, default=500_000)
    parser.add_argument("--star-test", type=int, default=1000)
    parser.add_argument("--text-steps", type=int, default=1000)
    parser.add_argument("--text-families", default=",".join(FAMILIES), help="families whose text results are "
                        "(re)measured; the others' results are kept from the JSON")
    parser.add_argument("--ilm-stop-noise", type=float, default=0.0, help="the text ILM's diffusion.ilm_stop_noise "
                        "(its results are recorded under 'ilm, stop noise F')")
    parser.add_argument("--ilm-dropout", type=float, default=0.0, help="the text ILM's model.dropout")
    parser.add_argument("--ilm-stop-head", default="binary", choices=STOP_HEADS,
                        help="the text ILM's diffusion.ilm_stop_head")
    parser.add_argument("--text-split", default="contiguous", choices=("contiguous", "shuffled"),
                        help="the text models' data.split_order: held-out speeches are the play's last ones, or "
                        "drawn at random (the same distribution as the training speeches)")
    parser.add_argument("--text-seed", type=int, default=1, help="the text models' train.seed")
    parser.add_argument("--evaluator-steps", type=int, default=1500)
    parser.add_argument("--evaluator", help="an AR run to score text samples (default: train one on the running "
                        "text, nano, 1,500 steps: the recipe of benchmarks/softmask.py's AR model)")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape; nothing is recorded")
    parser.add_argument("--replot", action="store_true", help="only redraw the figures of --tag's JSON")
    args = parser.parse_args()
    if args.tag is None and not args.smoke:
        parser.error("the following arguments are required: --tag")
    if args.replot:
        path = ROOT / "benchmarks" / "results" / f"insertion-{args.tag}.json"
        figures(json.loads(path.read_text()), path.with_suffix(""))
        return
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
    header = run_header(args.tag, ceilings=not args.smoke)
    result.update(header)
    stamp = {k: header[k] for k in ("date", "command", "commit")}  # each entry keeps the run that measured it
    stages = args.stages.split(",")
    if "star" in stages:  # one entry per variant and budget (a longer run adds one); rows per decoding
        for key, entry in star_graph(args, runs, smoke).items():
            old = result.setdefault("star_graph", {}).get(key, {})
            for name, row in entry["results"].items():  # seeds measured before keep their figures
                seeds = {str(seed): {**x, **stamp} for seed, x in row["seeds"].items()}
                row["seeds"] = {**old.get("results", {}).get(name, {}).get("seeds", {}), **seeds}
                pool_seeds(row).update(stamp)
            for part in ("results", "loss_curves"):  # families measured before keep their rows
                entry[part] = {**old.get(part, {}), **entry[part]}
            result["star_graph"][key] = {**entry, **stamp}
        path.write_text(json.dumps(result, indent=1) + "\n")
    if "text" in stages:
        result["text"] = {**text(args, runs, smoke, result.get("text")), **stamp}
        path.write_text(json.dumps(result, indent=1) + "\n")
    if "infill" in stages:
        result["infill"] = {**infill(args, runs, smoke, result.get("infill")), **stamp}
        path.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    figures(result, path.with_suffix(""))
    print(f"\nwrote {path}")


def figures(result: dict, stem: Path) -> None:
    """``<stem>-star.png``: the training loss of every star-graph run (per family and seed, the longest
    budget of each variant); ``<stem>-lengths.png``: each text sampler's lengths (p10-p90 bar, median
    tick, mean dot) against the held-out speeches'. Only the figures the record has data for."""
    plt = pyplot()
    if plt is None:
        return
    longest = {}  # variant -> its entry with the most runs' curves (the later budget on a tie)
    for key, entry in result.get("star_graph", {}).items():
        variant = key.split(",")[0]
        if len(entry.get("loss_curves", {})) >= len(longest.get(variant, {}).get("loss_curves", {})) > -1:
            longest[variant] = entry
    longest = {k: v for k, v in longest.items() if v.get("loss_curves")}
    if longest:
        fig, axes = plt.subplots(1, len(longest), figsize=(5.5 * len(longest), 4), squeeze=False)
        for ax, (variant, entry) in zip(axes[0], sorted(longest.items())):
            for name, curve in sorted(entry["loss_curves"].items()):
                steps, losses = zip(*curve)
                ax.plot(steps, losses, label=name.removeprefix(f"{variant}-"), linewidth=1)
            ax.set(title=f"star graphs, {variant}", xlabel="step", ylabel="training loss", yscale="log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{stem}-star.png", dpi=120)
        plt.close(fig)
        print(f"plot: {stem}-star.png")
    text_results = result.get("text", {}).get("results", {})
    rows = [(name, r["lengths"]) for name, r in text_results.items() if r.get("lengths")]
    if rows:
        reference = result["text"]["reference"]["lengths"]
        rows = [("held-out speeches", reference), *rows]
        fig, ax = plt.subplots(figsize=(11, 0.42 * len(rows) + 1.4))
        for y, (name, stats) in enumerate(rows):
            ax.plot([stats["p10"], stats["p90"]], [y, y], color="tab:gray" if y == 0 else "tab:blue", linewidth=6,
                    alpha=0.5)
            ax.plot(stats["median"], y, "|", color="black", markersize=14)
            ax.plot(stats["mean"], y, "o", color="tab:red", markersize=5)
        ax.set_yticks(range(len(rows)), [name[:70] for name, _ in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("characters before the model's end (bar: p10-p90, tick: median, dot: mean)")
        ax.set_title("unconditional text: lengths drawn from each model", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(f"{stem}-lengths.png", dpi=120)
        plt.close(fig)
        print(f"plot: {stem}-lengths.png")


if __name__ == "__main__":
    main()
