"""Where the time of a training step and of a sampling forward pass goes, by operator
(``torch.profiler``): the share of matmuls (``addmm``/``mm``/``bmm``/``linear``), attention, and
everything else (norms, adaLN modulation, elementwise, optimizer).

    python benchmarks/profile_ops.py --preset micro --length 256 --batch 16
    python benchmarks/profile_ops.py --preset nano --length 1024 --batch 8 --inference
    python benchmarks/profile_ops.py --smoke          # seconds: the test suite runs this
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from unmask.families import build_model, build_objective
from unmask.objectives.base import draw_noise
from unmask.runtime import autocast, resolve_precision
from unmask.train.step import Batch, TrainState, train_step

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from perf import run_config, tokenizer_for  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_addmm_activation")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
             "aten::_scaled_dot_product_flash_attention", "aten::_flash_attention_backward",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", default="char", choices=("char", "gpt2"))
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--inference", action="store_true", help="a sampling forward (all positions masked)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape; nothing is recorded")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.length, args.batch, args.top = "nano", 16, 2, 5
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(args.precision, device)
    cfg = run_config(args.preset, args.vocab, args.length, args.batch, precision, ["model.length=2048"])
    tokenizer = tokenizer_for(args.vocab)
    model = build_model(cfg, tokenizer).to(device)
    objective = build_objective(cfg, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randint(0, tokenizer.vocab_size - 1, (args.batch, args.length), device=device)
    counted = torch.ones_like(x0, dtype=torch.bool)
    noise = draw_noise(args.batch, args.length, torch.Generator().manual_seed(0)).to(device)

    def work(inference: bool):
        if inference:
            model.eval()
            with torch.no_grad(), autocast(device, precision):
                masked = torch.full_like(x0, tokenizer.mask_id)
                model(masked, positions=torch.ones_like(x0, dtype=torch.bool))
            return
        model.train()
        train_step(TrainState(model, objective, optimizer, device=device, precision=precision),
                   Batch(x0, counted, noise, x0.numel()))

    for inference in (False, True) if args.smoke else (args.inference,):  # the smoke mode profiles both
        for _ in range(2):
            work(inference)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                work(inference)
        events = prof.key_averages()
        # self time per operator; group into matmul / attention / rest
        total = sum(e.self_cpu_time_total for e in events)
        groups = defaultdict(float)
        for e in events:
            kind = "matmul" if e.key in MATMUL else "attention" if "attention" in e.key else "other"
            groups[kind] += e.self_cpu_time_total
        print(f"{args.preset} L={args.length} B={args.batch} {precision} "
              f"{'inference forward' if inference else 'training step'}: "
              + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])))
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
            print(f"  {100 * e.self_cpu_time_total / total:5.1f}%  {e.count:6d}x  {e.key}")

if __name__ == "__main__":
    main()
