"""Training and sampling throughput against the machine's measured limits, in one run.

1. Ceilings: dense matmul throughput (fp32, bf16), each the best of three timings, at 2048^3 (``--square``)
   and at each preset's three MLP shapes of a training step; measured before and again after training.
   Memory bandwidth (a large copy).
2. Training, per preset: ``unmask train`` in its own process on the shipped corpus (real data path,
   optimizer, EMA); tokens/s after warm-up, achieved GFLOP/s, and model FLOPs utilization against the
   best timing of any shape of that precision in the run (before or after), peak memory. Model FLOPs per token:
   ``6 N + 12 n_layers L H`` (N = parameters of every matmul, the output layer included; the
   attention term counts QK^T and AV, forward and backward).
3. Sampling: exact first-hitting at one length (default 1024), batch 8, random weights: generated
   tokens/s, NFE, and the share of wall time spent inside the network (the rest is sampling
   overhead: categorical draws, bookkeeping).
4. Scaling: training-step time (forward + backward + AdamW) and exact first-hitting time against
   sequence length 128..2048 and batch size, with the growth exponent fitted on a log-log scale.

    python benchmarks/perf.py                        # defaults: presets nano,micro,mini,tiny
    python benchmarks/perf.py --presets small --vocab gpt2 --batch 4 --train-steps 6
    python benchmarks/perf.py --smoke          # seconds: the test suite runs this

Writes ``benchmarks/results/perf-<tag>.json`` and, with matplotlib, ``perf-<tag>-scaling.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from unmask.config import MODEL_PRESETS, SampleConfig, load_config
from unmask.data.tokenization import CharTokenizer, HFTokenizer, load_tokenizer
from unmask.families import build_model, build_objective
from unmask.models.common import count_parameters
from unmask.objectives.base import draw_noise
from unmask.pipeline import make_canvas
from unmask.runtime import autocast, resolve_precision
from unmask.samplers.base import row_seeds
from unmask.samplers.registry import make_sampler
from unmask.train.step import Batch, TrainState, train_step

ROOT = Path(__file__).resolve().parents[1]
GPT2_DIR = ROOT.parent / "shared" / "data" / "gpt2-tokenizer"
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine, native_bf16, pyplot  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, min_seconds: float = 1.0, min_reps: int = 3) -> float:
    """Seconds per call of ``fn`` after one warm-up call."""
    fn()
    sync(device)
    reps, start = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < min_seconds:
        fn()
        reps += 1
    sync(device)
    return (time.perf_counter() - start) / reps


def matmul_ceiling(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, tries: int = 3,
                   seconds: float = 1.0) -> float:
    """GFLOP/s of ``(m, k) @ (k, n)``, the best of ``tries`` timings (a ceiling, so noise only lowers it)."""
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    return max(2 * m * k * n / timed(lambda: a @ b, device, seconds) / 1e9 for _ in range(tries))


def bandwidth(device: torch.device, mbytes: int = 256, seconds: float = 1.0) -> float:
    src = torch.empty(mbytes * 2**20 // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), device, seconds) / 1e9


def flops_per_token(cfg, vocab: int, length: int) -> float:
    m = cfg.model
    with torch.device("meta"):
        model = build_model(cfg, types.SimpleNamespace(vocab_size=vocab, mask_id=vocab - 1))
    matmul_params = count_parameters(model) - vocab * m.hidden  # the embedding is a lookup
    return 6 * matmul_params + 12 * m.blocks * length * m.hidden


def tokenizer_for(vocab: str):
    if vocab == "gpt2":
        return HFTokenizer.gpt2_from_files(GPT2_DIR)
    return CharTokenizer("".join(chr(32 + i) for i in range(62)))


def run_config(preset: str, vocab: str, length: int, batch: int, precision: str, extra: list[str]):
    tokenizer = ["data.tokenizer=gpt2", f"data.tokenizer_path={GPT2_DIR}"] if vocab == "gpt2" else []
    return load_config(None, [f"model.preset={preset}", f"model.length={max(length, 128)}", f"data.length={length}",
                              f"train.batch_size={batch}", f"train.precision={precision}", "model.dropout=0.0",
                              *tokenizer, *extra])


# --- training ----------------------------------------------------------------------------------------

def train_preset(preset: str, args, compile: bool = False) -> dict:
    """``unmask train`` in its own process; tokens/s from its log after the first (warm-up) window."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"model.preset={preset}", f"model.length={args.length}", f"data.length={args.length}",
                     f"train.batch_size={args.batch}", f"train.steps={args.train_steps}", "train.log_every=2",
                     f"train.precision={args.precision}", "train.progress=false", "train.warmup_steps=0",
                     "model.dropout=0.0", f"train.compile={str(compile).lower()}", f"run_dir={tmp}/run",
                     f"data.cache_dir={tmp}/cache", "train.keep_checkpoints=1"]
        if args.vocab == "gpt2":
            overrides += ["data.tokenizer=gpt2", f"data.tokenizer_path={GPT2_DIR}"]
        subprocess.run([sys.executable, "-m", "unmask", "train", *overrides], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        vocab = load_tokenizer(Path(tmp) / "run" / "tokenizer").vocab_size
    start = next(r for r in records if r.get("event") == "start")
    windows = [r for r in records if "tokens_per_second" in r][1:]  # the first window holds the warm-up
    end = next(r for r in records if r.get("event") == "end")
    tok_s = sum(r["tokens_per_second"] for r in windows) / len(windows)
    cfg = run_config(preset, args.vocab, args.length, args.batch, args.precision, [])
    fpt = flops_per_token(cfg, vocab, args.length)
    return {"preset": preset, "compile": compile, "parameters": start["parameters"], "precision": start["precision"],
            "tokens_per_second": tok_s, "flops_per_token": fpt, "achieved_gflops": tok_s * fpt / 1e9,
            "peak_memory_mb": end["peak_memory_mb"]}


def measure_ceilings(presets: list[str], args, device, seconds: float) -> dict[str, float]:
    """GFLOP/s of dense matmuls in fp32 and (with native bf16 hardware) bf16, each the best of three
    timings: the --square cube and,
    per preset, the training step's MLP shapes (tokens x H x 4H forward, tokens x 4H x H and its
    transpose backward)."""
    n, tokens = args.square, args.batch * args.length
    shapes = {f"square_{n}": (n, n, n)}
    for preset in presets:
        h = MODEL_PRESETS[preset]["hidden"]
        shapes |= {f"{preset}_up": (tokens, h, 4 * h), f"{preset}_down": (tokens, 4 * h, h),
                   f"{preset}_weight_grad": (4 * h, tokens, h)}
    dtypes = (("fp32", torch.float32), ("bf16", torch.bfloat16)) if native_bf16() else (("fp32", torch.float32),)
    return {f"{name}_{label}": matmul_ceiling(*shape, dtype, device, seconds=seconds)
            for name, shape in shapes.items() for label, dtype in dtypes}


# --- sampling ----------------------------------------------------------------------------------------

class NetworkTimer:
    """Wraps ``model.forward`` to add up the time spent inside the network."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.seconds, self.device, forward = 0.0, device, model.forward

        def timed_forward(*a, **k):
            start = time.perf_counter()
            out = forward(*a, **k)
            sync(device)
            self.seconds += time.perf_counter() - start
            return out

        model.forward = timed_forward


def sample_once(model, objective, tokenizer, length: int, batch: int, device, precision: str,
                sampler: str = "first_hitting", **knobs) -> dict:
    cfg = SampleConfig(sampler=sampler, **knobs)
    sampler = make_sampler(cfg, objective, tokenizer, length)
    canvas = make_canvas(tokenizer, [[]] * batch, length).to(device)
    timer = NetworkTimer(model, device)
    start = time.perf_counter()
    with autocast(device, precision):
        result = sampler.sample(model, canvas, row_seeds(0, batch).to(device))
    sync(device)
    wall = time.perf_counter() - start
    del model.forward  # the NetworkTimer's wrapper
    return {"length": length, "batch": batch, "seconds": wall, "network_seconds": timer.seconds,
            "network_share": timer.seconds / wall, "nfe": result.nfe, "generated": result.generated,
            "generated_tokens_per_second": result.generated / wall}


def sampling_model(preset: str, args, length: int, device):
    cfg = run_config(preset, args.vocab, length, 1, args.precision, ["model.length=2048"])
    tokenizer = tokenizer_for(args.vocab)
    model = build_model(cfg, tokenizer).to(device).eval()
    with torch.no_grad():  # random, non-degenerate outputs (MDLM zero-initializes the output layer)
        model.output_layer.linear.weight.normal_(0, 0.02)
    return model, build_objective(cfg, tokenizer), tokenizer


# --- scaling -----------------------------------------------------------------------------------------

def train_step_seconds(preset: str, args, length: int, batch: int, device, seconds: float = 2.0) -> float:
    cfg = run_config(preset, args.vocab, length, batch, args.precision, ["model.length=2048"])
    tokenizer = tokenizer_for(args.vocab)
    model = build_model(cfg, tokenizer).to(device).train()
    objective = build_objective(cfg, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randint(0, tokenizer.vocab_size - 1, (batch, length), device=device)
    counted = torch.ones_like(x0, dtype=torch.bool)
    noise = draw_noise(batch, length, torch.Generator().manual_seed(0)).to(device)
    precision = resolve_precision(args.precision, device)

    state = TrainState(model, objective, optimizer, device=device, precision=precision)
    return timed(lambda: train_step(state, Batch(x0, counted, noise, x0.numel())), device, min_seconds=seconds)


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="nano,micro,mini,tiny")
    parser.add_argument("--vocab", default="char", choices=("char", "gpt2"))
    parser.add_argument("--length", type=int, default=256, help="training rows")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--square", type=int, default=2048, help="the size n of the n^3 matmul ceiling")
    parser.add_argument("--compile", action="store_true",
                        help="also train each preset with torch.compile, side by side")
    parser.add_argument("--sample-preset", default="nano")
    parser.add_argument("--sample-length", type=int, default=1024)
    parser.add_argument("--sample-batch", type=int, default=8)
    parser.add_argument("--sample-precisions", default="", help="e.g. fp32,bf16: network precisions compared "
                        "side by side (default: the resolved --precision)")
    parser.add_argument("--ancestral", default="", help="also time the cached ancestral sampler at these numbers of "
                        "steps, as multiples of the length (e.g. 0.25,1,4 for T = L/4, L, 4L)")
    parser.add_argument("--scaling-preset", default="nano")
    parser.add_argument("--scaling-lengths", default="128,256,512,1024,2048")
    parser.add_argument("--scaling-batches", default="1,2,4,8,16,32")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: train,sample,scaling")
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--replot", action="store_true", help="only redraw the scaling plot from the saved JSON")
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape; nothing is recorded")
    args = parser.parse_args()
    out = ROOT / "benchmarks" / "results" / f"perf-{args.tag}.json"
    if args.replot:
        plot(json.loads(out.read_text()), out.with_name(f"perf-{args.tag}-scaling.png"))
        return
    if not args.smoke:
        benchmark(args, out)
        return
    # every section at a tiny shape (the ancestral sampler too); the record and the plot go to a temporary folder
    args.presets, args.length, args.batch, args.train_steps, args.square = "nano", 16, 2, 4, 64
    args.sample_length, args.sample_batch, args.ancestral = 16, 2, "1"
    args.scaling_lengths, args.scaling_batches, args.tag = "16,32", "1,2", "smoke"
    with tempfile.TemporaryDirectory() as tmp:
        benchmark(args, Path(tmp) / "perf-smoke.json")


def benchmark(args, out: Path) -> None:
    # the smoke mode: an 8 MB copy, timings a hundredth as long, a tiny fixed side of the scaling sweeps
    seconds, mbytes = (0.01, 8) if args.smoke else (1.0, 256)
    sweep_length, sweep_batch = (16, 2) if args.smoke else (256, 4)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    skip = set(filter(None, args.skip.split(",")))
    presets = args.presets.split(",")
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "tag": args.tag,
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine(ceilings=not args.smoke),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip(), "args": vars(args)}

    # the ceilings are measured before and after training, and MFU taken against the best of every timing of
    # every shape of that precision in this run: a ceiling is a best case, so machine noise can only lower it
    ceilings = measure_ceilings(presets, args, device, seconds)
    record["memory_bandwidth_gbs"] = bandwidth(device, mbytes, seconds)
    print(json.dumps(ceilings), flush=True)

    if "train" not in skip:
        record["training"] = []
        runs = [(p, c) for p in presets for c in ((False, True) if args.compile else (False,))]
        for preset, compile in runs:
            record["training"].append(train_preset(preset, args, compile))
        after = measure_ceilings(presets, args, device, seconds)
        record["ceilings_gflops_after"] = after
        best = {label: max(v for c in (ceilings, after) for k, v in c.items() if k.endswith(f"_{label}"))
                for label in ("fp32", "bf16") if f"square_{args.square}_{label}" in ceilings}
        record["ceiling_gflops"] = best
        for r in record["training"]:
            if r["precision"] not in best:  # emulated bf16: no ceiling of its own, the fp32 one bounds it
                r["precision_note"] = "bf16 without native hardware support: MFU against the fp32 ceiling"
            r["ceiling_gflops"] = best.get(r["precision"], best["fp32"])
            r["mfu"] = r["achieved_gflops"] / r["ceiling_gflops"]
            print(f"train {r['preset']:6s}{' compiled' if r['compile'] else ''} {r['parameters']:>11,} params "
                  f"{r['precision']} {r['tokens_per_second']:9.0f} tok/s {r['achieved_gflops']:7.1f} GFLOP/s of "
                  f"{r['ceiling_gflops']:.0f}: MFU {100 * r['mfu']:.1f}% peak {r['peak_memory_mb']:.0f} MB", flush=True)

    precision = resolve_precision(args.precision, device)
    if "sample" not in skip:
        model, objective, tokenizer = sampling_model(args.sample_preset, args, args.sample_length, device)
        for sample_precision in (args.sample_precisions.split(",") if args.sample_precisions else [precision]):
            r = sample_once(model, objective, tokenizer, args.sample_length, args.sample_batch, device,
                            sample_precision)
            r = dict(r, preset=args.sample_preset, sampler="first_hitting", precision=sample_precision)
            record.setdefault("sampling_by_precision", []).append(r)
            record["sampling"] = r
            print(f"sample first-hitting {sample_precision} L={r['length']} B={r['batch']}: {r['seconds']:.2f}s, "
                  f"NFE {r['nfe']}, {r['generated_tokens_per_second']:.0f} tok/s, network "
                  f"{100 * r['network_share']:.1f}% of wall time", flush=True)
        for multiple in filter(None, args.ancestral.split(",")):
            steps = max(1, round(float(multiple) * args.sample_length))
            r = sample_once(model, objective, tokenizer, args.sample_length, args.sample_batch, device, precision,
                            sampler="ancestral", steps=steps)
            record.setdefault("sampling_ancestral_cached", []).append(
                dict(r, preset=args.sample_preset, steps=steps, precision=precision))
            print(f"sample cached ancestral T={steps} L={r['length']} B={r['batch']}: {r['seconds']:.2f}s, NFE "
                  f"{r['nfe']}, {r['generated_tokens_per_second']:.0f} tok/s, network "
                  f"{100 * r['network_share']:.1f}% of wall time", flush=True)

    if "scaling" not in skip:
        lengths = [int(x) for x in args.scaling_lengths.split(",")]
        batches = [int(x) for x in args.scaling_batches.split(",")]
        scaling = {"preset": args.scaling_preset, "train_vs_length": [], "train_vs_batch": [],
                   "sample_vs_length": [], "sample_vs_batch": []}
        for length in lengths:
            s = train_step_seconds(args.scaling_preset, args, length, sweep_batch, device, 2 * seconds)
            scaling["train_vs_length"].append({"length": length, "batch": sweep_batch, "seconds": s})
            print(f"train step L={length} B={sweep_batch}: {s * 1e3:.1f} ms", flush=True)
        for batch in batches:
            s = train_step_seconds(args.scaling_preset, args, sweep_length, batch, device, 2 * seconds)
            scaling["train_vs_batch"].append({"length": sweep_length, "batch": batch, "seconds": s})
            print(f"train step L={sweep_length} B={batch}: {s * 1e3:.1f} ms", flush=True)
        model, objective, tokenizer = sampling_model(args.scaling_preset, args, max(lengths), device)
        for length in lengths:
            r = sample_once(model, objective, tokenizer, length, 1, device, precision)
            scaling["sample_vs_length"].append(r)
            print(f"first-hitting L={length} B=1: {r['seconds']:.2f}s, network {100 * r['network_share']:.1f}%",
                  flush=True)
        for batch in batches:
            r = sample_once(model, objective, tokenizer, sweep_length, batch, device, precision)
            scaling["sample_vs_batch"].append(r)
            print(f"first-hitting L={sweep_length} B={batch}: {r['seconds']:.2f}s, network "
                  f"{100 * r['network_share']:.1f}%", flush=True)
        for key, x in (("train_vs_length", "length"), ("train_vs_batch", "batch"), ("sample_vs_length", "length"),
                       ("sample_vs_batch", "batch")):
            points = scaling[key]
            scaling[f"{key}_exponent"] = fit_exponent([p[x] for p in points], [p["seconds"] for p in points])
            print(f"{key}: time ~ {x}^{scaling[f'{key}_exponent']:.2f}", flush=True)
        record["scaling"] = scaling

    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    if "scaling" in record:
        plot(record, out.with_name(f"perf-{args.tag}-scaling.png"))


def plot(record: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    import matplotlib.ticker

    s = record["scaling"]
    batch, length = s["train_vs_length"][0]["batch"], s["train_vs_batch"][0]["length"]  # the fixed sides
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label in (("train_vs_length", f"training step (B={batch})"),
                       ("sample_vs_length", "first-hitting sampling (B=1)")):
        xs = [p["length"] for p in s[key]]
        axes[0].loglog(xs, [p["seconds"] for p in s[key]], "o-", label=f"{label}: ~L^{s[key + '_exponent']:.2f}")
    for key, label in (("train_vs_batch", f"training step (L={length})"),
                       ("sample_vs_batch", f"first-hitting sampling (L={length})")):
        xs = [p["batch"] for p in s[key]]
        axes[1].loglog(xs, [p["seconds"] for p in s[key]], "o-", label=f"{label}: ~B^{s[key + '_exponent']:.2f}")
    for ax, key in ((axes[0], "train_vs_length"), (axes[1], "train_vs_batch")):
        ticks = [p["length" if "length" in key else "batch"] for p in s[key]]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].set_xlabel("sequence length L")
    axes[1].set_xlabel("batch size B")
    for ax in axes:
        ax.set_ylabel("seconds")
        ax.legend(fontsize=8)
    fig.suptitle(f"{s['preset']} preset, {record['machine']['cpu']}, {record['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
