"""Quality/speed frontier of every sampler, measured in one run on one machine.

For an MDLM checkpoint and an AR checkpoint trained on the same corpus (the AR model is both the
evaluator for generative perplexity and the baseline with a KV cache), and optionally block diffusion
(BD3-LM) checkpoints of the same recipe, every sampler setting generates the same number of
unconditional samples of the training length; reported: gen-PPL under the AR model (bootstrap standard
error), mean per-sample unigram entropy (standard error), NFE (network calls and per-row evaluations),
wall time and generated tokens per second. The held-out rows give the reference gen-PPL and entropy.
``--fast-dllm`` adds Fast-dLLM's decoding of the MDLM (the llada sampler in blocks with the threshold or
factor rule, without cache and with the prefix and dual caches). At the end: every diffusion setting
whose gen-PPL and entropy are within two standard errors of an AR setting ("equal quality") and its
speed relative to the AR model with its KV cache, all side by side in this one run.

    python benchmarks/sampler_frontier.py --mdlm runs/bench-text8/mdlm --ar runs/bench-text8/ar --tag text8-prefix
    python benchmarks/sampler_frontier.py --mdlm runs/frontier-ts/mdlm --ar runs/frontier-ts/ar --fast-dllm \
        --bd3 runs/frontier-ts/bd3-4,runs/frontier-ts/bd3-8,runs/frontier-ts/bd3-16 --tag tinyshakespeare-bd3
    python benchmarks/sampler_frontier.py --smoke          # seconds: the test suite runs this

Writes ``benchmarks/results/sampler_frontier-<tag>.json``, a Markdown table on stdout and, when
matplotlib is installed, ``benchmarks/results/sampler_frontier-<tag>.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from unmask.checkpoints.checkpoint import Checkpoint, load_model
from unmask.config import SampleConfig
from unmask.eval.generation import CheckpointEvaluator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import held_out_reference, measure, pyplot, run_header, smoke_run  # noqa: E402


def settings(length: int) -> list[tuple[str, dict]]:
    """(label, SampleConfig overrides) for every point of the frontier."""
    out = []
    for steps in (length // 4, length // 2, length, 4 * length):
        out.append((f"ancestral T={steps}", dict(sampler="ancestral", steps=steps, cache=False)))
    for steps in (length, 4 * length):
        out.append((f"ancestral cached T={steps}", dict(sampler="ancestral", steps=steps)))
    out.append((f"ancestral float32 T={4 * length}", dict(sampler="ancestral", steps=4 * length, precision="float32")))
    for k in (1, 2, 4, 8):
        out.append((f"first-hitting k={k}", dict(sampler="first_hitting", tokens_per_step=k)))
    for steps in (length // 4, length // 2, length):
        out.append((f"confidence T={steps}", dict(sampler="confidence", steps=steps)))
    out.append((f"margin T={length // 2}", dict(sampler="confidence", steps=length // 2, score="margin")))
    return out


def fast_dllm_settings(length: int) -> list[tuple[str, dict]]:
    """Fast-dLLM's decoding of a bidirectional model: semi-AR blocks, threshold or factor rule, caches."""
    out = []
    for block in (16, 32):
        for cache in ("none", "prefix", "dual"):
            out.append((f"fast-dllm block {block} {cache} threshold 0.9",
                        dict(sampler="llada", block_length=block, steps=length, threshold=0.9, block_cache=cache)))
    for threshold in (0.7, 0.5):
        out.append((f"fast-dllm block 16 dual threshold {threshold}",
                    dict(sampler="llada", block_length=16, steps=length, threshold=threshold, block_cache="dual")))
    out.append(("fast-dllm block 16 dual factor 1.0",
                dict(sampler="llada", block_length=16, steps=length, factor=1.0, block_cache="dual")))
    return out


def bd3_settings(block: int) -> list[tuple[str, dict]]:
    """Samplers inside the blocks of a block diffusion model (the exact KV cache on)."""
    out = [("first-hitting k=1", dict(sampler="first_hitting")),
           (f"ancestral cached T={block}", dict(sampler="ancestral", steps=block))]
    for threshold in (0.9, 0.7, 0.5):
        out.append((f"threshold {threshold}", dict(sampler="llada", block_length=block, steps=block,
                                                     threshold=threshold)))
    return out


def equal_quality(results: list[dict], sigmas: float = 2.0) -> list[dict]:
    """Diffusion settings whose gen-PPL and entropy are both within ``sigmas`` combined standard errors of
    some AR setting, with their speed over the AR model's with its KV cache (same run, same batch)."""
    ar = [r for r in results if r["model"] == "ar" and r.get("kv_cache")]
    out = []
    for r in results:
        if r["model"] == "ar":
            continue
        for a in ar:
            close_ppl = abs(r["gen_ppl"] - a["gen_ppl"]) <= sigmas * math.hypot(r["gen_ppl_se"], a["gen_ppl_se"])
            close_h = abs(r["entropy"] - a["entropy"]) <= sigmas * math.hypot(r["entropy_se"], a["entropy_se"])
            if close_ppl and close_h:
                out.append(dict(model=r["model"], sampler=r["sampler"], ar=a["sampler"], gen_ppl=r["gen_ppl"],
                                ar_gen_ppl=a["gen_ppl"], speed_over_ar=r["generated_tokens_per_second"]
                                / a["generated_tokens_per_second"], mean_row_nfe=r["mean_row_nfe"]))
                break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mdlm")
    parser.add_argument("--ar")
    parser.add_argument("--tag")
    parser.add_argument("--bd3", default="", help="comma-separated block diffusion run folders")
    parser.add_argument("--fast-dllm", action="store_true", help="add Fast-dLLM's decoding of the MDLM")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ar-temperatures", default="1.0,1.25,1.5,1.75,2.0,2.25,2.5,3.0")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from the saved JSON")
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape; nothing is recorded")
    args = parser.parse_args()
    missing = [f"--{name}" for name in ("mdlm", "ar", "tag") if getattr(args, name) is None]
    if missing and not args.smoke:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    out_dir = ROOT / "benchmarks" / "results"
    if args.replot:
        plot(json.loads((out_dir / f"sampler_frontier-{args.tag}.json").read_text()),
             out_dir / f"sampler_frontier-{args.tag}.png")
        return
    if not args.smoke:
        frontier(args, out_dir)
        return
    with tempfile.TemporaryDirectory() as tmp:  # two-step models of 16 tokens; the record and the plot go there too
        tiny = ("model.length=16", "data.length=16")
        args.mdlm, args.ar = str(smoke_run(Path(tmp), "mdlm", tiny)), str(smoke_run(Path(tmp), "ar", tiny))
        args.bd3 = str(smoke_run(Path(tmp), "bd3lm", (*tiny, "model.block_size=4")))
        args.tag, args.samples, args.batch_size, args.ar_temperatures = "smoke", 2, 2, "1.0,1.5"
        args.fast_dllm = True
        frontier(args, Path(tmp))


def frontier(args, out_dir: Path) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpt, ar_ckpt = Checkpoint(args.mdlm), Checkpoint(args.ar)
    model, objective = load_model(ckpt, device=device)
    ar_model, ar_objective = load_model(ar_ckpt, device=device)
    evaluator = CheckpointEvaluator(ar_ckpt.path, device)
    length = ckpt.config.data.length
    base = SampleConfig(num_samples=args.samples, batch_size=args.batch_size, seed=1)

    reference = held_out_reference(ckpt, evaluator, args.samples)

    runs = [("mdlm", model, objective, ckpt, settings(length) + (fast_dllm_settings(length) if args.fast_dllm
                                                                 else []))]
    for folder in filter(None, args.bd3.split(",")):
        bd3 = Checkpoint(folder)
        bd3_model, bd3_objective = load_model(bd3, device=device)
        block = bd3.config.model.block_size
        runs.append((f"bd3lm block {block}", bd3_model, bd3_objective, bd3, bd3_settings(block)))
    results = []
    for name, net, net_objective, net_ckpt, points in runs:
        for label, overrides in points:
            cfg = dataclasses.replace(base, **overrides)
            r = measure(net, net_objective, net_ckpt.tokenizer, cfg, length, net_ckpt.config.model.length, evaluator,
                        device)
            label = label if name == "mdlm" else f"{name} {label}"
            results.append(dict(model=name, sampler=label, **r))
            print(f"{label:44s} gen-ppl {r['gen_ppl']:8.3f} entropy {r['entropy']:.3f} row-NFE "
                  f"{r['mean_row_nfe']:7.1f} {r['seconds']:7.2f}s {r['generated_tokens_per_second']:9.1f} tok/s",
                  flush=True)
    for temperature in [float(t) for t in args.ar_temperatures.split(",")]:
        for kv in (True, False) if temperature == 1.0 else (True,):
            cfg = dataclasses.replace(base, sampler="ar", temperature=temperature, kv_cache=kv)
            r = measure(ar_model, ar_objective, ar_ckpt.tokenizer, cfg, length, ar_ckpt.config.model.length, evaluator,
                        device)
            label = f"AR {'KV cache' if kv else 'no cache'} temperature {temperature}"
            results.append(dict(model="ar", sampler=label, temperature=temperature, kv_cache=kv, **r))
            print(f"{label:28s} gen-ppl {r['gen_ppl']:8.3f} entropy {r['entropy']:.3f} "
                  f"{r['seconds']:7.2f}s {r['generated_tokens_per_second']:9.1f} tok/s", flush=True)

    matched = equal_quality(results)
    record = {**run_header(args.tag, ceilings=not args.smoke), "mdlm": str(ckpt.path), "ar": str(ar_ckpt.path),
              "bd3": args.bd3, "length": length, "samples": args.samples, "batch_size": args.batch_size,
              "reference": reference, "results": results, "equal_quality": matched}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"sampler_frontier-{args.tag}.json").write_text(json.dumps(record, indent=1))
    print(f"\n{record['date']} {record['machine']['cpu']} ({record['machine']['cores']} cores), commit "
          f"{record['commit']}; {args.samples} samples of {length} tokens; held-out: gen-ppl "
          f"{reference['gen_ppl']:.3f}, entropy {reference['entropy']:.3f}")
    print("| sampler | gen-PPL | entropy | NFE per row | seconds | generated tok/s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['sampler']} | {r['gen_ppl']:.3f} ± {r['gen_ppl_se']:.3f} | {r['entropy']:.3f} ± "
              f"{r['entropy_se']:.3f} | {r['mean_row_nfe']:.1f} | {r['seconds']:.2f} | "
              f"{r['generated_tokens_per_second']:.1f} |")
    print("\nequal quality (gen-PPL and entropy within 2 standard errors of an AR setting):")
    print("| diffusion setting | its gen-PPL | matched AR setting | AR gen-PPL | NFE per row | speed / AR+KV |")
    print("|---|---|---|---|---|---|")
    for m in sorted(matched, key=lambda m: -m["speed_over_ar"]):
        print(f"| {m['sampler']} | {m['gen_ppl']:.3f} | {m['ar']} | {m['ar_gen_ppl']:.3f} | {m['mean_row_nfe']:.1f} | "
              f"{m['speed_over_ar']:.2f}x |")
    plot(record, out_dir / f"sampler_frontier-{args.tag}.png")


def plot(record: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    import matplotlib.ticker
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    families = {}
    for r in record["results"]:
        family = r["sampler"].split(" T=")[0].split(" k=")[0].split(" temperature")[0].split(" threshold")[0]
        families.setdefault(family, []).append(r)
    for family, rs in families.items():
        x_nfe = [r["mean_row_nfe"] for r in rs]
        x_time = [r["seconds"] for r in rs]
        y = [r["gen_ppl"] for r in rs]
        axes[0].plot(x_nfe, y, "o-", label=family)
        axes[1].plot(x_time, y, "o-", label=family)
        axes[2].plot([r["entropy"] for r in rs], y, "o", label=family)
    ref = record["reference"]
    for ax in axes:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in axes[:2]:
        ax.axhline(ref["gen_ppl"], color="gray", ls="--", lw=1, label="held-out data")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel("gen-PPL under the AR model")
    axes[2].axvline(ref["entropy"], color="gray", ls="--", lw=1)
    axes[2].axhline(ref["gen_ppl"], color="gray", ls="--", lw=1)
    axes[0].set_xlabel("network evaluations per sample")
    axes[1].set_xlabel(f"wall time for {record['samples']} samples (s)")
    axes[2].set_xlabel("mean per-sample unigram entropy (nats)")
    axes[2].set_ylabel("gen-PPL")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Sampler frontier, {record['tag']} ({record['length']} tokens, {record['machine']['cpu']}, "
                 f"{record['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
