"""Accuracy under parallelism: a teacher, its distilled students and AR + KV cache on a verifiable task.

Every diffusion model is swept over the decoders of a prompt/answer task (``unmask task arithmetic``): greedy
**fixed steps** (the confidence sampler, ``steps`` network calls for the whole answer), MDLM's **ancestral**
sampler (greedy tokens, ``steps`` steps of the schedule; what SDTT trains), and LLaDA's decoding over one block
with Fast-dLLM's **threshold** rule (every position whose confidence exceeds the threshold is revealed, at least
one per call) and **factor** rule, and the threshold rule in semi-autoregressive **blocks** of 4 and 8, the latter
also with Fast-dLLM's **prefix and dual caches** (:data:`BLOCKED`). Each setting records exact-match accuracy
(batched), tokens per forward (each row's answer tokens over its network calls: mean and quartiles) and tokens/s
at batch 1 on the first ``--speed-prompts`` prompts (answer tokens only), the AR model decoding the same prompts
with its KV cache in the same run. Per model and decoder family: d3LLM's AUP (:mod:`unmask.eval.aup`) against
the best accuracy of the run, its standard error over :data:`BOOTSTRAP_DRAWS` resamples of the test prompts, and
for a student its AUP minus the teacher's on the same decoder with the paired standard error (the same
resampled prompts for both); per setting ``accuracy_gap_to_teacher`` (the teacher's accuracy at its best
setting, whichever decoder, minus the setting's, as a fraction; its accuracy decoding one token per call is
recorded beside it); for each model's most parallel setting within one point of that teacher accuracy,
``speed_vs_ar_at_equal_accuracy`` (its tokens/s over AR + KV's, side by side) with both accuracies.

    python benchmarks/parallelism.py --task runs/arithmetic-data --teacher runs/arithmetic \\
        --student trajectory=runs/arith-trajectory --student certainty=runs/arith-certainty \\
        --ar runs/arithmetic-ar --tag arithmetic
    python benchmarks/parallelism.py --smoke     # seconds: the test suite runs this

``--text`` measures the same models on unconditional text instead, with gen-PPL and entropy in place of
accuracy: every model samples ``--samples`` rows of its training length with **MDLM's ancestral sampler** at
``L / k`` steps (``k`` in :data:`TEXT_PARALLEL`, the cached variant: a step whose draws reveal nothing costs no
call), **first-hitting** one token per call (the teacher's exact decoding: the reference) and LLaDA's
**threshold** rule at temperature 1; gen-PPL is scored by the AR model (``--ar``, required), which also samples
at temperature 1 with its KV cache (and at :data:`AR_TEMPERATURES`, to show what a change of entropy does to
gen-PPL). Per setting: gen-PPL (bootstrap standard error), mean per-sample unigram
entropy, tokens per forward, tokens/s at batch 1 on ``--speed-samples`` rows, ``gen_ppl_ratio_to_teacher``
(over the teacher's first-hitting gen-PPL) and ``at_ar_entropy`` (entropy within :data:`ENTROPY_TOLERANCE`
nats of the AR model's: decoders that buy gen-PPL by repeating themselves are not at AR's entropy). Per model:
its most parallel setting at AR's entropy within 25 % of the teacher's gen-PPL, with its speed over AR + KV.

    python benchmarks/parallelism.py --text --teacher runs/quickstart --student sdtt=runs/quickstart-sdtt \
        --ar runs/quickstart-ar --tag text-quickstart

Writes ``benchmarks/results/parallelism-<tag>.json`` and ``parallelism-<tag>.png`` (accuracy, or gen-PPL, against
tokens per forward, the AR point beside the curves; on a task ``parallelism-<tag>-blocks.png`` draws the block and
cache decoders beside the one-block threshold rule) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from unmask.cli import main as unmask  # noqa: E402
from unmask.config import SampleConfig  # noqa: E402
from unmask.data.tasks import read_pairs  # noqa: E402
from unmask.eval.aup import aup  # noqa: E402
from unmask.eval.exact_match import exact_match  # noqa: E402
from unmask.eval.generation import CheckpointEvaluator  # noqa: E402
from unmask.pipeline import checkpoint_config, encode_fixed, from_pretrained, generate_rows  # noqa: E402

from common import SMOKE_OVERRIDES, measure, pyplot, run_header, smoke_run  # noqa: E402

STEPS = (16, 8, 5, 4, 3, 2, 1)  # fixed-steps and ancestral settings (capped at the generated positions)
# The one-block grids run from about the teacher's most careful setting to one call per answer, finest where
# accuracy leaves the AUP's 5-point window: a coarse grid or one stopping short ends a curve early and moves its AUP.
THRESHOLDS = (0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.4, 0.3)
FACTORS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # Fast-dLLM's factor rule
BLOCK_THRESHOLDS = (0.99, 0.9, 0.7, 0.5)  # the threshold rule in semi-autoregressive blocks, with and without caches
BLOCKED = (("blocks of 4", 4, "none"), ("blocks of 8", 8, "none"), ("blocks of 8, prefix cache", 8, "prefix"),
           ("blocks of 8, dual cache", 8, "dual"))
BOOTSTRAP_DRAWS = 1000  # resamples of the test prompts for the AUPs' standard errors
TEXT_PARALLEL = (1, 2, 3, 4, 8, 16, 32)  # text: the ancestral settings' tokens per step, T = L / k
TEXT_THRESHOLDS = (0.9, 0.1)
ENTROPY_TOLERANCE = 0.05  # nats: a setting within this of the AR model's sample entropy is "at AR's entropy"
AR_TEMPERATURES = (1.0, 1.25)  # the AR's first is the reference; the others show what entropy costs in gen-PPL
GEN_PPL_SLACK = 1.25  # the bar: gen-PPL within 25 % of the undistilled teacher's
ONE_BLOCK_STYLES = {"fixed steps": "-o", "ancestral": ":v", "threshold": "--s", "factor": "-.d"}
BLOCK_STYLES = {"threshold": "--s", "blocks of 4": ":^", "blocks of 8": "-.d", "blocks of 8, prefix cache": "-x",
                "blocks of 8, dual cache": ":+"}


def settings(generated: int, thin: bool = False) -> list[tuple[str, str, list[str]]]:
    """(family, label, sample.* overrides) of every diffusion decoder setting for ``generated`` positions: greedy
    confidence decoding and MDLM's ancestral sampler (greedy tokens) in a fixed number of steps, LLaDA's decoding
    over one block with Fast-dLLM's threshold and factor rules, and the threshold rule in blocks (:data:`BLOCKED`,
    with Fast-dLLM's prefix and dual caches). ``thin``: each family's first and last setting only (the smoke run)."""
    steps = sorted({min(s, generated) for s in STEPS}, reverse=True)
    one_block = ["sampler=llada", f"steps={generated}", f"block_length={generated}", "temperature=0"]
    out = [("fixed steps", str(s), ["sampler=confidence", f"steps={s}", "temperature=0"]) for s in steps]
    out += [("ancestral", str(s), ["sampler=ancestral", f"steps={s}", "temperature=0"]) for s in steps]
    out += [("threshold", f"{t:g}", [*one_block, f"threshold={t}"]) for t in THRESHOLDS]
    out += [("factor", f"{f:g}", [*one_block, f"factor={f}"]) for f in FACTORS]
    out += [(family, f"{t:g}", ["sampler=llada", f"steps={generated}", f"block_length={block}",
                                f"block_cache={cache}", f"threshold={t}", "temperature=0"])
            for family, block, cache in BLOCKED for t in BLOCK_THRESHOLDS]
    if thin:
        ends = {}
        for setting in out:
            ends.setdefault(setting[0], []).append(setting)
        out = [s for family in ends.values() for s in (family if len(family) < 3 else [family[0], family[-1]])]
    return out


def run_setting(loaded, overrides: list[str], pairs, speed_pairs, length: int) -> dict:
    """Accuracy and tokens per forward on ``pairs`` (batched), tokens/s at batch 1 on ``speed_pairs`` (after one
    warm-up decoding)."""
    cfg = checkpoint_config(loaded.source, [f"sample.{o}" for o in overrides]).sample
    single = checkpoint_config(loaded.source, [f"sample.{o}" for o in [*overrides, "batch_size=1"]]).sample
    model_length = loaded.config.model.length
    result = exact_match(loaded.model, loaded.objective, loaded.tokenizer, cfg, pairs, length, model_length, "cpu",
                         per_row=True)
    with torch.no_grad():
        def decode(prompts):
            return generate_rows(loaded.model, loaded.objective, loaded.tokenizer, single, length, model_length,
                                 prompts=prompts, bos=True, device="cpu")
        decode([speed_pairs[0][0]])
        timed = decode([p for p, _ in speed_pairs])
    return {"accuracy": result["exact_match"], "accuracy_stderr": result["stderr"], "n": result["n"],
            "tokens_per_forward": result["tokens_per_forward"],
            "tokens_per_forward_quartiles": result["tokens_per_forward_quartiles"],
            "mean_row_nfe": result["mean_row_nfe"], "row_hits": result["row_hits"],
            "row_tokens_per_forward": result["row_tokens_per_forward"],
            "tokens_per_second": timed.summary()["answer_tokens"] / timed.seconds if timed.seconds else None}


def sweep(args) -> dict:
    pairs = read_pairs(Path(args.task) / "test.jsonl")[:args.prompts]
    speed_pairs = pairs[:args.speed_prompts]
    teacher = from_pretrained(args.teacher)
    length = teacher.config.data.length
    generated = length - 1 - max(len(encode_fixed(teacher.tokenizer, p)) for p, _ in pairs)
    models = {"teacher": args.teacher, **dict(s.split("=", 1) for s in args.student)}
    records = []
    for name, path in models.items():
        loaded = teacher if name == "teacher" else from_pretrained(path)
        for family, label, overrides in settings(generated, thin=args.thin):
            record = {"model": name, "path": path, "decoder": family, "setting": label, "sample": overrides,
                      **run_setting(loaded, overrides, pairs, speed_pairs, length)}
            records.append(record)
            print(json.dumps({k: record[k] for k in ("model", "decoder", "setting", "accuracy", "tokens_per_forward",
                                                     "tokens_per_second")}), flush=True)
    ar = None
    if args.ar:
        loaded = from_pretrained(args.ar)
        ar = {"model": "ar", "path": args.ar, "decoder": "ar + kv", "setting": "1",
              **run_setting(loaded, ["sampler=ar", "temperature=0"], pairs, speed_pairs, length)}
        records.append(ar)
    return summarize(records, ar)


def curve_aups(points: dict[tuple[str, str], list[int]], accuracy: list[float], tpf: list[float]) -> dict:
    """AUP of every curve (``points``: (model, decoder) -> indices into ``accuracy`` and ``tpf``, fractions and
    tokens per forward of the settings) against the best accuracy of them all."""
    y_max = 100 * max(accuracy)
    return {key: aup([tpf[i] for i in idx], [100 * accuracy[i] for i in idx], y_max)
            for key, idx in points.items() if y_max > 0}


def bootstrap_aups(records: list[dict], points: dict[tuple[str, str], list[int]], draws: int,
                   seed: int = 0) -> dict[tuple[str, str], torch.Tensor]:
    """Every curve's AUP on ``draws`` resamples of the test prompts (the same rows for every setting: paired),
    from each record's ``row_hits`` and ``row_tokens_per_forward``: (draws,) per curve."""
    hits = torch.tensor([r["row_hits"] for r in records], dtype=torch.float64)  # (settings, rows)
    tpf = torch.tensor([r["row_tokens_per_forward"] for r in records], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    out = {key: torch.empty(draws, dtype=torch.float64) for key in points}
    for d in range(draws):
        rows = torch.randint(hits.shape[1], (hits.shape[1],), generator=generator)
        for key, value in curve_aups(points, hits[:, rows].mean(1).tolist(), tpf[:, rows].mean(1).tolist()).items():
            out[key][d] = value
    return out


def summarize(records: list[dict], ar: dict | None, draws: int = BOOTSTRAP_DRAWS) -> dict:
    """AUP per model and decoder family with its bootstrap standard error over the test prompts, each student's
    AUP minus its teacher's on the same decoder (paired: the same resampled prompts), the gaps to the teacher, the
    best students' speed against AR + KV. The per-row lists leave the records."""
    fixed = [r for r in records if r["model"] == "teacher" and r["decoder"] == "fixed steps"]
    one_per_call = max(fixed, key=lambda r: r["mean_row_nfe"])["accuracy"]  # the most calls: one per token
    teacher_best = max((r for r in records if r["model"] == "teacher"), key=lambda r: r["accuracy"])
    reference = teacher_best["accuracy"]  # the teacher at its best setting, whichever decoder that is
    for r in records:
        r["accuracy_gap_to_teacher"] = reference - r["accuracy"]
    points: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(records):
        if r["decoder"] != "ar + kv" and r["tokens_per_forward"] > 0:
            points.setdefault((r["model"], r["decoder"]), []).append(i)
    values = curve_aups(points, [r["accuracy"] for r in records], [r["tokens_per_forward"] for r in records])
    draws_of = bootstrap_aups(records, points, draws) if draws else {}
    curves = []
    for (model, decoder), value in values.items():
        curve = {"model": model, "decoder": decoder, "aup": value}
        if draws:
            curve["aup_stderr"] = draws_of[model, decoder].std().item()
        if model != "teacher" and ("teacher", decoder) in values:
            curve["aup_minus_teacher"] = value - values["teacher", decoder]
            if draws:
                paired = draws_of[model, decoder] - draws_of["teacher", decoder]
                curve["aup_minus_teacher_stderr"] = paired.std().item()
        curves.append(curve)
    for model in dict.fromkeys(r["model"] for r in records if r["model"] != "ar"):
        close = [r for r in records if r["model"] == model and r["accuracy"] >= reference - 0.01]
        if close and ar is not None and ar["tokens_per_second"]:
            best = max(close, key=lambda r: r["tokens_per_forward"])
            best["speed_vs_ar_at_equal_accuracy"] = best["tokens_per_second"] / ar["tokens_per_second"]
            best["ar_accuracy"] = ar["accuracy"]
    for r in records:
        r.pop("row_hits")
        r.pop("row_tokens_per_forward")
    return {"teacher_accuracy": reference, "teacher_best_setting": [teacher_best["decoder"], teacher_best["setting"]],
            "teacher_accuracy_one_token_per_call": one_per_call, "y_max": 100 * max(r["accuracy"] for r in records),
            "bootstrap_draws": draws, "aup": curves, "records": records}


def report(result: dict, out: Path | None) -> None:
    print("| model | decoder | setting | accuracy | tokens/forward | tokens/s (batch 1) | gap to teacher |")
    print("|---|---|---|---|---|---|---|")
    for r in result["records"]:
        tps = f"{r['tokens_per_second']:.0f}" if r["tokens_per_second"] else "-"
        print(f"| {r['model']} | {r['decoder']} | {r['setting']} | {r['accuracy']:.3f} | {r['tokens_per_forward']:.2f} "
              f"| {tps} | {r['accuracy_gap_to_teacher']:+.3f} |")
    for c in result["aup"]:
        se = f" ± {c['aup_stderr']:.1f}" if "aup_stderr" in c else ""
        diff = f", {c['aup_minus_teacher']:+.1f}" if "aup_minus_teacher" in c else ""
        diff += f" ± {c['aup_minus_teacher_stderr']:.1f}" if "aup_minus_teacher_stderr" in c else ""
        print(f"AUP {c['model']} ({c['decoder']}): {c['aup']:.1f}{se}{diff and f' (minus the teacher{diff})'}")
    plot_curves(result["records"], lambda r: 100 * r["accuracy"], "exact match (%)", ONE_BLOCK_STYLES, out)
    plot_curves(result["records"], lambda r: 100 * r["accuracy"], "exact match (%)", BLOCK_STYLES,
                out and out.with_name(out.stem + "-blocks.png"))


def plot_curves(records: list[dict], value, ylabel: str, styles: dict[str, str], out: Path | None,
                line: tuple[float, str] | None = None, log: bool = False) -> None:
    """``value(record)`` against tokens per forward: one colour per model, one line style per decoder (``styles``),
    AR + KV as a star; ``line`` (y, label) a horizontal reference; log-log axes with ``log``."""
    plt = pyplot()
    if plt is None or out is None:
        return
    import matplotlib.ticker
    styles = {**styles, "ar + kv": "*"}
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, model in enumerate(dict.fromkeys(r["model"] for r in records)):
        labelled = False
        for decoder, style in styles.items():
            points = sorted((r["tokens_per_forward"], value(r)) for r in records
                            if r["model"] == model and r["decoder"] == decoder)
            if points:
                ax.plot(*zip(*points), style, color=f"C{i}", markersize=12 if decoder == "ar + kv" else 5,
                        label=None if labelled else model)
                labelled = True
    for decoder, style in styles.items():
        if decoder != "ar + kv":
            ax.plot([], [], style, color="gray", label=decoder)
    if line is not None:
        ax.axhline(line[0], color="gray", ls=":", lw=1, label=line[1])
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yticks([5, 10, 20, 40, 80])
        ax.set_xticks([1, 2, 4, 8, 16, 32])
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def text_settings(length: int) -> list[tuple[str, str, dict]]:
    """(decoder, label, SampleConfig keys) of every text setting for rows of ``length`` tokens."""
    out = [("first-hitting", "k=1", dict(sampler="first_hitting", tokens_per_step=1))]
    out += [("ancestral", f"T={steps}", dict(sampler="ancestral", steps=steps))
            for steps in sorted({max(length // k, 1) for k in TEXT_PARALLEL}, reverse=True)]
    out += [("threshold", f"{t:g}", dict(sampler="llada", steps=length, block_length=length, threshold=t,
                                         temperature=1.0)) for t in TEXT_THRESHOLDS]
    return out


def text_setting(loaded, keys: dict, evaluator, samples: int, speed_samples: int) -> dict:
    """gen-PPL, entropy and tokens per forward of ``samples`` unconditional rows (batches of 32), tokens/s at
    batch 1 on ``speed_samples`` other rows (after one warm-up row)."""
    length, model_length = loaded.config.data.length, loaded.config.model.length
    quality = SampleConfig(num_samples=samples, batch_size=32, seed=1, **keys)
    record = measure(loaded.model, loaded.objective, loaded.tokenizer, quality, length, model_length, evaluator,
                     "cpu")
    with torch.no_grad():
        for n in (1, speed_samples):
            single = SampleConfig(num_samples=n, batch_size=1, seed=2, **keys)
            timed = generate_rows(loaded.model, loaded.objective, loaded.tokenizer, single, length, model_length,
                                  device="cpu")
    record["tokens_per_second"] = timed.summary()["answer_tokens"] / timed.seconds if timed.seconds else None
    return record


def text_sweep(args) -> dict:
    evaluator = CheckpointEvaluator(args.ar)
    models = {"teacher": args.teacher, **dict(s.split("=", 1) for s in args.student)}
    records = []
    for name, path in models.items():
        loaded = from_pretrained(path)
        for decoder, label, keys in text_settings(loaded.config.data.length):
            record = {"model": name, "path": path, "decoder": decoder, "setting": label, "sample": keys,
                      **text_setting(loaded, keys, evaluator, args.samples, args.speed_samples)}
            records.append(record)
            print(json.dumps({k: record[k] for k in ("model", "decoder", "setting", "gen_ppl", "entropy",
                                                     "tokens_per_forward", "tokens_per_second")}), flush=True)
    ar_model = from_pretrained(args.ar)
    for temperature in AR_TEMPERATURES:
        keys = dict(sampler="ar", temperature=temperature, kv_cache=True)
        records.append({"model": "ar", "path": args.ar, "decoder": "ar + kv", "setting": f"t={temperature:g}",
                        "sample": keys, **text_setting(ar_model, keys, evaluator, args.samples, args.speed_samples)})
    return summarize_text(records, next(r for r in records if r["model"] == "ar"))


def summarize_text(records: list[dict], ar: dict) -> dict:
    """The teacher's reference gen-PPL (first-hitting, one token per call), each setting's ratio to it and whether
    it is at AR's entropy, and per model the most parallel setting at AR's entropy within
    :data:`GEN_PPL_SLACK` of the reference, with its tokens/s over AR + KV's."""
    reference = next(r for r in records if r["model"] == "teacher" and r["decoder"] == "first-hitting")
    for r in records:
        r["gen_ppl_ratio_to_teacher"] = r["gen_ppl"] / reference["gen_ppl"]
        r["entropy_gap_to_ar"] = r["entropy"] - ar["entropy"]
        r["at_ar_entropy"] = abs(r["entropy_gap_to_ar"]) <= ENTROPY_TOLERANCE
    best = {}
    for model in dict.fromkeys(r["model"] for r in records if r["model"] != "ar"):
        good = [r for r in records if r["model"] == model and r["at_ar_entropy"]
                and r["gen_ppl_ratio_to_teacher"] <= GEN_PPL_SLACK]
        if good:
            top = max(good, key=lambda r: r["tokens_per_forward"])
            if ar["tokens_per_second"]:
                top["speed_vs_ar"] = top["tokens_per_second"] / ar["tokens_per_second"]
            best[model] = {"decoder": top["decoder"], "setting": top["setting"],
                           "tokens_per_forward": top["tokens_per_forward"], "gen_ppl": top["gen_ppl"],
                           "gen_ppl_ratio_to_teacher": top["gen_ppl_ratio_to_teacher"], "entropy": top["entropy"],
                           "speed_vs_ar": top.get("speed_vs_ar")}
    return {"workload": "text", "teacher_gen_ppl": reference["gen_ppl"], "ar_gen_ppl": ar["gen_ppl"],
            "ar_entropy": ar["entropy"], "entropy_tolerance": ENTROPY_TOLERANCE, "gen_ppl_slack": GEN_PPL_SLACK,
            "most_parallel_within_slack": best, "records": records}


def report_text(result: dict, out: Path | None) -> None:
    print("| model | decoder | setting | gen-PPL | / teacher | entropy | tokens/forward | tokens/s (batch 1) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["records"]:
        tps = f"{r['tokens_per_second']:.0f}" if r["tokens_per_second"] else "-"
        print(f"| {r['model']} | {r['decoder']} | {r['setting']} | {r['gen_ppl']:.2f} ± {r['gen_ppl_se']:.2f} "
              f"| {r['gen_ppl_ratio_to_teacher']:.2f} | {r['entropy']:.3f} | {r['tokens_per_forward']:.2f} | {tps} |")
    for model, b in result["most_parallel_within_slack"].items():
        speed = f", {b['speed_vs_ar']:.2f}x AR + KV" if b["speed_vs_ar"] else ""
        print(f"most parallel within {GEN_PPL_SLACK:g}x the teacher at AR's entropy, {model}: {b['decoder']} "
              f"{b['setting']}, {b['tokens_per_forward']:.2f} tokens/forward, gen-PPL {b['gen_ppl']:.2f}{speed}")
    plot_curves(result["records"], lambda r: r["gen_ppl"], "gen-PPL under the AR model",
                {"ancestral": "-o", "threshold": "--s", "first-hitting": "^"}, out,
                line=(GEN_PPL_SLACK * result["teacher_gen_ppl"], f"{GEN_PPL_SLACK:g}x the teacher's gen-PPL"), log=True)


def smoke(folder: Path) -> argparse.Namespace:
    """A tiny task, teacher, student and AR model (two training steps each)."""
    data = folder / "task"
    assert unmask(["task", "arithmetic", "--operands", "2", "--digits", "2", "--out", str(data), "--train", "40",
                   "--valid", "4", "--test", "6"]) == 0
    common = [*SMOKE_OVERRIDES, f"data.path={data}/train.jsonl", f"data.valid_path={data}/valid.jsonl",
              f"data.test_path={data}/test.jsonl", f"data.cache_dir={folder}/cache", "train.progress=false"]
    for name, extra in (("teacher", []), ("ar", ["family=ar"]),
                        ("student", ["distill.method=trajectory", f"distill.teacher={folder}/teacher"])):
        assert unmask(["train", "arithmetic", f"run_dir={folder}/{name}", *common, *extra]) == 0
    return argparse.Namespace(task=str(data), teacher=str(folder / "teacher"), student=[f"trajectory={folder}/student"],
                              ar=str(folder / "ar"), prompts=6, speed_prompts=2, tag="smoke",
                              thin=True)


def smoke_text(folder: Path) -> argparse.Namespace:
    """A two-step text teacher, its SDTT student and AR model on the packaged corpus."""
    teacher, ar = smoke_run(folder, "mdlm"), smoke_run(folder, "ar")
    student = smoke_run(folder / "sdtt", "mdlm", ("distill.method=sdtt", f"distill.teacher={teacher}",
                                                  "distill.student_steps=4"))
    return argparse.Namespace(teacher=str(teacher), student=[f"sdtt={student}"], ar=str(ar), samples=2,
                              speed_samples=1, tag="smoke-text")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", help="the task folder (test.jsonl)")
    parser.add_argument("--teacher", help="the teacher's run folder")
    parser.add_argument("--student", action="append", default=[], help="NAME=RUN of a distilled student (repeat)")
    parser.add_argument("--ar", help="an AR model trained on the same rows (decoded with its KV cache)")
    parser.add_argument("--prompts", type=int, default=500, help="test prompts scored per setting")
    parser.add_argument("--speed-prompts", type=int, default=20, help="prompts timed at batch 1 per setting")
    parser.add_argument("--text", action="store_true", help="unconditional text: gen-PPL and entropy, no --task")
    parser.add_argument("--samples", type=int, default=128, help="text: rows sampled per setting")
    parser.add_argument("--speed-samples", type=int, default=8, help="text: rows timed at batch 1 per setting")
    parser.add_argument("--tag", default="arithmetic")
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape (both workloads); "
                        "nothing is recorded")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot of --tag from its saved JSON")
    parser.set_defaults(thin=False)  # every setting of each decoder family (the smoke run takes the ends)
    return parser.parse_args()


if __name__ == "__main__":
    args = parse_args()
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            report(sweep(smoke(Path(tmp) / "task")), None)
            report_text(text_sweep(smoke_text(Path(tmp) / "text")), None)
    elif args.replot:
        out = ROOT / "benchmarks" / "results" / f"parallelism-{args.tag}.json"
        result = json.loads(out.read_text())
        (report_text if result.get("workload") == "text" else report)(result, out.with_suffix(".png"))
    else:
        if not args.teacher or not (args.ar if args.text else args.task):
            sys.exit("give --teacher and --task, or --text --teacher and --ar (or --smoke)")
        result = {**run_header(args.tag), **(text_sweep(args) if args.text else sweep(args))}
        out = ROOT / "benchmarks" / "results" / f"parallelism-{args.tag}.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
        (report_text if args.text else report)(result, out.with_suffix(".png"))
