"""Peak memory per process and throughput of the ways to train a model too big for one device: DDP,
FSDP (2 processes), FSDP with activation checkpointing, and LoRA, next to the memory planner's plan.

Every setting is a real ``torchrun --nproc_per_node 2 -m unmask train`` on the CPU (gloo, one thread
per process), all in one run so the throughputs compare side by side. Peak memory is the operating
system's (peak resident set of each process: the Python and PyTorch runtime, measured alone with a tiny
model, and what the allocator keeps after freeing) and that of live tensors (``train.track_memory``:
what a GPU would hold, which the plan predicts); throughput counts training tokens (rows x length)
per second over the run's steps after the first, with the memory tracking off (a separate run).

    python benchmarks/memory.py --tag cpu
    python benchmarks/memory.py --smoke        # seconds: the test suite runs this
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from unmask.config import load_config  # noqa: E402
from unmask.train.memory import model_shape, plan_memory, planning_inputs  # noqa: E402

from common import run_header  # noqa: E402

MODELS = {  # the MDLM `small` preset (DiT) and a 100M Llama-style network, on characters
    "small (DiT, 92M)": ["model.preset=small", "model.dropout=0"],
    "Llama-style 100M": ["model.backbone=llama", "model.hidden=768", "model.blocks=12", "model.heads=12",
                         "model.intermediate=2048", "model.dropout=0"],
}
SETTINGS = {
    "DDP": [],
    "FSDP": ["train.parallel=fsdp"],
    "FSDP + activation checkpointing": ["train.parallel=fsdp", "train.activation_checkpointing=true"],
    "LoRA r=16 attention (DDP)": ["adapter.kind=lora", "adapter.rank=16", "adapter.targets=[attention]"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(overrides: list[str], processes: int = 2) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "unmask", "train", *overrides]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    if proc.returncode:
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line or "error:" in line]
        raise SystemExit(f"{' '.join(cmd)} failed:\n" + "\n".join(errors[:20]))


def run_records(run_dir: Path, overrides: list[str]) -> list[dict]:
    torchrun([f"run_dir={run_dir}", *overrides, "--fresh"])
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def measure(run_dir: Path, overrides: list[str], timed_apart: bool = True) -> dict:
    """Memory of a run with live-tensor tracking; throughput of the same run without it (``timed_apart``)
    or of the tracked run itself."""
    records = run_records(run_dir, [*overrides, "train.track_memory=true"])
    end = [r for r in records if r.get("event") == "end"][-1]
    timed = run_records(run_dir, [*overrides, "train.track_memory=false"]) if timed_apart else records
    steps = [r for r in timed if "tokens_per_second" in r][1:]  # after the first (start-up) step
    return {"peak_mb_per_process": end["peak_memory_mb_per_process"],
            "tensor_peak_mb_per_process": end["peak_tensor_mb_per_process"],
            "tokens_per_second": sum(r["tokens_per_second"] for r in steps) / max(1, len(steps)),
            "parameters": records[0]["parameters"], "trainable": records[0]["trainable_parameters"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag")
    parser.add_argument("--runs", default="runs/memory")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="rows per step over both processes")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:  # the sharded, recomputing and adapter paths, once each
            models = {"tiny": ["model.hidden=32", "model.blocks=2", "model.heads=2", "model.cond_dim=16"]}
            settings = {k: v for k, v in SETTINGS.items() if k.startswith(("FSDP +", "LoRA"))}
            benchmark(args, Path(tmp), models, steps=2, batch=4, length=32, out=None, settings=settings)
        return
    if not args.tag:
        parser.error("--tag is required")
    benchmark(args, Path(args.runs) / args.tag, MODELS, args.steps, args.batch, args.length,
              ROOT / "benchmarks" / "results" / f"memory-{args.tag}.json")


def benchmark(args, runs: Path, models: dict, steps: int, batch: int, length: int, out: Path | None,
              settings: dict = SETTINGS) -> None:
    common = ["data.dataset=tinyshakespeare", f"data.length={length}", f"model.length={length}",
              f"train.batch_size={batch}", f"train.steps={steps}", "train.log_every=1", "train.progress=false",
              "train.threads=1", "train.precision=fp32", "train.ema=0.9999", "train.warmup_steps=0",
              f"data.cache_dir={runs / 'cache'}"]
    result = {**run_header(args.tag or "smoke", ceilings=out is not None), "steps": steps, "batch": batch,
              "length": length, "processes": 2, "models": {}}
    result["runtime"] = measure(runs / "runtime", [*common, "train.steps=2", "model.hidden=32", "model.blocks=1",
                                                   "model.heads=2", "model.cond_dim=16"], timed_apart=out is not None)
    for model, model_overrides in models.items():
        base = runs / f"{len(result['models'])}-base"
        torchrun([f"run_dir={base}", *common, *model_overrides, "train.steps=1", "--fresh"], processes=1)
        rows = {}
        for name, setting in settings.items():
            overrides = [*common, *model_overrides, *setting]
            if "adapter.kind=lora" in setting:
                overrides.append(f"train.init_from={base}")
            cfg, tokenizer = planning_inputs(load_config(None, overrides))
            plan = plan_memory(cfg, model_shape(cfg, tokenizer), tokenizer.vocab_size, world=2, device="cpu")
            rows[name] = {**measure(runs / f"{len(result['models'])}-{len(rows)}", overrides, out is not None),
                          "plan_mb": plan.total / 2**20, "plan": {k: v / 2**20 for k, v in plan.parts().items()}}
            r = rows[name]
            print(f"{model} | {name}: OS peak {max(r['peak_mb_per_process']):.0f} MB per process, live tensors "
                  f"{max(r['tensor_peak_mb_per_process']):.0f} MB, plan {r['plan_mb']:.0f} MB, "
                  f"{r['tokens_per_second']:.0f} tokens/s", flush=True)
        result["models"][model] = rows
    print(table(result))
    if out is not None:
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {out}")


def table(result: dict) -> str:
    runtime = max(result["runtime"]["peak_mb_per_process"])
    lines = [f"runtime alone (tiny model): {runtime:.0f} MB per process\n",
             "| model | setting | trained parameters | OS peak per process (MB) | live tensors, peak (MB) | "
             "plan (MB) | tokens/s | vs the first |", "|---|---|---|---|---|---|---|---|"]
    for model, rows in result["models"].items():
        ddp = next(iter(rows.values()))["tokens_per_second"]
        for name, r in rows.items():
            peak, tensors = max(r["peak_mb_per_process"]), max(r["tensor_peak_mb_per_process"])
            lines.append(f"| {model} | {name} | {r['trainable'] / 1e6:.1f}M | {peak:.0f} | {tensors:.0f} | "
                         f"{r['plan_mb']:.0f} | {r['tokens_per_second']:.0f} | {r['tokens_per_second'] / ddp:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
