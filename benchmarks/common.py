"""Shared by the benchmark scripts: the machine's description and measured matmul ceilings,
generation quality (gen-PPL under an AR evaluator, unigram entropy) and matplotlib when it is
installed."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from unmask.checkpoints.checkpoint import Checkpoint, list_checkpoints
from unmask.config import load_config
from unmask.data.dataset import Data
from unmask.data.layouts import TOKEN
from unmask.eval.generation import unigram_entropy
from unmask.eval.likelihood import select_rows
from unmask.pipeline import generate_rows
from unmask.runtime import cpu_has_bf16
from unmask.train.loop import train


def matmul_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


def native_bf16() -> bool:
    return torch.cuda.is_available() or cpu_has_bf16()


def machine(ceilings: bool = True) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    record = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
              "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    if ceilings:  # 4 seconds: skipped by the smoke modes
        record["matmul_gflops_fp32"] = round(matmul_gflops(torch.float32), 1)
        # without native bf16 (AVX-512 BF16, AMX, CUDA) a bf16 matmul is emulated, 10-100x slower: not a ceiling
        record["matmul_gflops_bf16"] = round(matmul_gflops(torch.bfloat16), 1) if native_bf16() else None
    record["native_bf16"] = native_bf16()
    return record


def threads_record() -> dict:
    """The thread settings a run measured under: torch's intra-op threads and the OpenMP/MKL variables."""
    names = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")
    return {"torch_threads": torch.get_num_threads(), **{name: os.environ.get(name) for name in names}}


def run_header(tag: str, ceilings: bool = True) -> dict:
    """Date, tag, the command line, the commit, the machine and the thread settings: the head of every
    result record."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, check=False).stdout.strip()
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "tag": tag,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "commit": commit,
            "machine": machine(ceilings),
            "threads": threads_record()}


def draw_modulations(model: torch.nn.Module, std: float = 0.02) -> None:
    """Draws a DiT's adaLN modulations and output layer from N(0, std^2) (from the global generator): MDLM's
    zero init makes every block the identity, so a random benchmark model would not use its blocks."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or name.startswith("output_layer.linear"):
                p.normal_(0, std)


def append_record(name: str, record: dict) -> None:
    """Append ``record`` as one JSON line to ``benchmarks/results/<name>.jsonl``."""
    out = Path(__file__).resolve().parent / "results" / f"{name}.jsonl"
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"appended to {out}")


def pyplot():
    """``matplotlib.pyplot`` with the file backend, or None (and a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt


def pooled_ppl(totals, counts, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """``exp(sum NLL / sum tokens)`` over samples, and its bootstrap standard error (samples resampled
    with replacement)."""
    import numpy as np

    totals, counts = np.asarray(totals, dtype=float), np.asarray(counts, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(totals), size=(resamples, len(totals)))
    boot = np.exp(totals[idx].sum(1) / counts[idx].sum(1))
    return math.exp(totals.sum() / counts.sum()), float(boot.std())


def measure(model, objective, tokenizer, cfg, length: int, model_length: int, evaluator, device) -> dict:
    """Generate ``cfg.num_samples`` unconditional samples of ``length`` and score them: gen-PPL under
    ``evaluator`` (with its bootstrap standard error), mean per-sample unigram entropy (with its
    standard error), NFE, tokens per forward (mean over rows), wall time, generated tokens per second."""
    gen = generate_rows(model, objective, tokenizer, cfg, length, model_length, device=device)
    totals, counts = evaluator.nll(gen.texts)
    ids = [[t for t in row if t not in tokenizer.special_ids] for row in gen.ids]
    gen_ppl, gen_ppl_se = pooled_ppl(totals, counts)
    entropies = [unigram_entropy(r) for r in ids]
    return {"gen_ppl": gen_ppl, "gen_ppl_se": gen_ppl_se,
            "entropy": sum(entropies) / len(ids),
            "entropy_se": float(torch.tensor(entropies, dtype=torch.float64).std() / math.sqrt(len(ids))),
            "nfe": gen.nfe, "mean_row_nfe": sum(gen.row_nfe) / len(gen.row_nfe),
            "tokens_per_forward": gen.summary()["tokens_per_forward"], "seconds": gen.seconds,
            "generated_tokens_per_second": gen.generated / gen.seconds, "example": gen.texts[0][:120]}


def held_out_reference(ckpt, evaluator, samples: int) -> dict:
    """gen-PPL and entropy of ``samples`` test rows of the checkpoint's data, cut to its row length."""
    tokenizer, length = ckpt.tokenizer, ckpt.config.data.length
    rows = Data(ckpt.config.data, tokenizer=tokenizer).rows("test")
    ids, kinds = rows.get(select_rows(len(rows), samples, 0))
    ref_ids = [row[k == TOKEN][:length].tolist() for row, k in zip(ids, kinds)]
    totals, counts = evaluator.nll([tokenizer.decode(r) for r in ref_ids])
    return {"gen_ppl": math.exp(totals.sum() / counts.sum()),
            "entropy": sum(unigram_entropy(r) for r in ref_ids) / len(ref_ids)}


CORPORA = {  # the CPU-sized corpora of the comparisons: data keys and the backbone
    "tinyshakespeare": ["data.dataset=tinyshakespeare", "data.tokenizer=char", "data.length=128", "data.frame=false",
                        "model.preset=nano"],
    "text8-prefix": ["data.dataset=text8-prefix", "data.tokenizer=text8", "data.length=256", "model.preset=nano"],
}


SMOKE_OVERRIDES = ["model.preset=nano", "model.hidden=32", "model.blocks=1", "model.heads=2", "model.cond_dim=16",
                   "model.length=32", "data.length=32", "train.batch_size=4", "train.steps=2", "train.log_every=1",
                   "train.warmup_steps=0", "train.save_every=0", "train.eval_every=0", "train.threads=1"]
"""A tiny model trained for two steps on the packaged corpus: what a smoke mode trains instead."""


def smoke_run(folder: Path, family: str = "mdlm", overrides: tuple[str, ...] = ()) -> Path:
    """A run folder in ``folder`` with a two-step model of ``family`` (:data:`SMOKE_OVERRIDES`)."""
    trained(folder / family, [f"family={family}", f"data.cache_dir={folder / 'cache'}", *SMOKE_OVERRIDES,
                              *overrides])
    return folder / family


def seconds_per_step(records: list[dict], tokens_per_step: int) -> float:
    """Median over the logged windows (the first, with its warm-up, left out) of the training time per step."""
    rates = sorted([r["tokens_per_second"] for r in records if "loss" in r][1:]) or [float("nan")]
    return tokens_per_step / rates[len(rates) // 2]


def trained(run_dir: Path, overrides: list[str], config: str | None = None) -> tuple[Path, list[dict]]:
    """Train (or resume, or find finished) a run from ``config`` (a packaged name or a path) with
    ``overrides``; returns its final checkpoint and its metrics records."""
    cfg = load_config(config, [f"run_dir={run_dir}", "train.progress=false", *overrides])
    done = list_checkpoints(run_dir / "checkpoints")
    if not done or Checkpoint(done[-1]).step < cfg.train.steps:
        print(f"training {run_dir.name} ({cfg.train.steps} steps)", flush=True)
        train(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return list_checkpoints(run_dir / "checkpoints")[-1], records
