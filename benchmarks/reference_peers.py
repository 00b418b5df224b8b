"""unmask against the reference implementations, on identical weights: decoding speed side by side.

A random LLaDA-shaped model (hidden 512, 4 blocks, 8 heads, MLP 1536, vocabulary 32,000) and a
Dream/Qwen2-shaped one (the same with grouped-query attention 8/2, q/k/v biases, the logit shift) are
written by unmask in the released layouts; each side loads them with its own code: the reference's
model classes (the copies Fast-dLLM vendors, as the reference vectors used) and samplers read from local
checkouts given by flags (fetched by the user, never vendored), unmask through ``from_pretrained``.

Cases (temperature 0, ``--prompt`` prompt tokens, ``--gen`` generated, blocks of ``--block``, one token per
step unless a threshold reveals more):

* ``llada`` (ML-GSAI/LLaDA ``generate.py``), batch 1 and ``--batch``;
* ``fast-dllm`` / ``fast-dllm-prefix`` / ``fast-dllm-dual`` (NVlabs/Fast-dLLM ``llada/generate.py``: ``generate``,
  ``generate_with_prefix_cache``, ``generate_with_dual_cache``), each without and with ``threshold=0.9``;
  batch 1 only (those functions build a canvas of one row);
* ``dream`` (Fast-dLLM's ``dream/model/generation_utils.py``, Dream's ``diffusion_generate``, ``alg=entropy``),
  batch 1 and ``--batch``;
* ``dream-block-prefix`` / ``dream-block-dual`` (Fast-dLLM's ``generation_utils_block.py``, bound onto the
  model as its ``dream/eval.py`` does; ``alg=confidence_threshold``, ``threshold=0.9``), batch 1 only: it
  reveals tokens in row 0 alone (``transfer_index[0, ...]``), so at two rows it never finishes a block;
* ``bd3lm`` / ``mdlm`` (kuleshov-group/bd3lms ``diffusion.py``, ``Diffusion._semi_ar_sampler`` with its default
  sampling settings: first-hitting, no KV cache; ``algo=bd3lm`` in blocks of ``--block``, ``algo=mdlm`` one
  block) on a random MDLM-style DiT of the same width (MLP 4x), unmask's ``first_hitting`` sampler
  (``kv_cache=false`` for BD3-LM). The reference starts every row with BOS and generates the ``--gen`` - 1
  positions after it, one token per call; batch 1 only (it reads the masked count with ``.item()``, and its
  KV cache is allocated on CUDA in bfloat16, so it is not run here). It has no temperature-0 mode and draws
  from the global generator: these cases are *sampled*, checked by NFE and by every position being revealed
  instead of equal tokens (the forward itself is proven equal to bd3lms' by the ``bd3lm_loss`` vectors).

Each round runs every case once per side, each side in a fresh process (the reference under
``--reference-python``: Fast-dLLM pins transformers 4.49), in alternating order; a process times
``--repeats`` calls after a warm-up by its CPU time at one thread. The tokens (and NFE) of the two sides
are compared first: a case whose tokens differ gets no ratio. Reported: median tokens/s per side and the
ratio unmask / reference with its spread over rounds.

    python benchmarks/reference_peers.py --fast-dllm ~/src/Fast-dLLM --llada ~/src/LLaDA --bd3lms ~/src/bd3lms \\
        --reference-python ~/venvs/fast-dllm/bin/python --rounds 5
    python benchmarks/reference_peers.py --smoke     # seconds, against a stand-in reference (the test suite)

``--smoke`` without checkouts runs the whole harness against a stand-in: a "reference" whose functions
decode with unmask's own samplers (equal tokens by construction), so that the harness is tested, not the
references. Appends a record to ``benchmarks/results/reference_peers.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from unmask.config import SampleConfig
from unmask.pipeline import from_pretrained
from unmask.samplers.base import row_seeds
from unmask.samplers.registry import make_sampler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from llada_samplers import dit_folder, released_folder  # noqa: E402
from reference_worker import timed  # noqa: E402

from common import append_record, run_header  # noqa: E402

# case -> (model layout, the reference's function, its keywords, unmask's sample settings, batch sizes)
CASES: dict[str, tuple[str, str, dict, dict, str]] = {}
SAMPLED = ("bd3lm", "mdlm")  # the layouts of the sampled cases (a BOS-only prompt; no equal tokens to check)


def add_cases(gen: int, block: int) -> None:
    steps = dict(steps=gen)
    CASES["llada"] = ("llada", "llada:generate", dict(**steps, gen_length=gen, block_length=block, temperature=0.0,
                                                     cfg_scale=0.0, remasking="low_confidence"),
                      dict(sampler="llada", **steps, block_length=block, temperature=0.0), "both")
    for name, function, cache in (("fast-dllm", "generate", "none"), ("fast-dllm-prefix", "generate_with_prefix_cache",
                                                                    "prefix"),
                                  ("fast-dllm-dual", "generate_with_dual_cache", "dual")):
        for threshold in (None, 0.9):
            CASES[name + ("" if threshold is None else "-thr0.9")] = (
                "llada", f"fast-dllm:{function}", dict(**steps, gen_length=gen, block_length=block, temperature=0.0,
                                                       remasking="low_confidence", threshold=threshold),
                dict(sampler="llada", **steps, block_length=block, temperature=0.0, threshold=threshold or 0.0,
                     block_cache=cache), "one")
    CASES["dream"] = ("dream", "dream:diffusion_generate", dict(**steps, max_new_tokens=gen, alg="entropy",
                                                               alg_temp=None, eps=1e-3, temperature=0.0),
                      dict(sampler="dream", **steps, score="entropy", temperature=0.0), "both")
    for cache in ("prefix", "dual"):
        CASES[f"dream-block-{cache}"] = (
            "dream", "dream-block:diffusion_generate",
            dict(**steps, max_new_tokens=gen, alg="confidence_threshold", alg_temp=None, eps=1e-3, temperature=0.0,
                 threshold=0.9, block_length=block, dual_cache=cache == "dual"),
            dict(sampler="dream", **steps, score="confidence", temperature=0.0, threshold=0.9, block_length=block,
                 block_cache=cache), "one")
    CASES["bd3lm"] = ("bd3lm", "bd3lms:_semi_ar_sampler", dict(algo="bd3lm"),
                      dict(sampler="first_hitting", kv_cache=False), "one")
    CASES["mdlm"] = ("mdlm", "bd3lms:_semi_ar_sampler", dict(algo="mdlm"), dict(sampler="first_hitting"), "one")


def write_models(root: Path, args) -> dict[str, Path]:
    """The random models in LLaDA's and Dream's released layouts (float32) and the DiTs of BD3-LM (blocks of
    ``--block``) and MDLM of ``--gen`` positions, written by unmask."""
    folders = {layout: released_folder(root / layout, args.hidden, args.blocks, args.heads, args.mlp, args.vocab,
                                       args.prompt + args.gen + 8, layout) for layout in ("llada", "dream")}
    for layout in SAMPLED:
        folders[layout] = dit_folder(root / layout, args.hidden, args.blocks, args.heads, args.vocab, args.gen,
                                     args.block if layout == "bd3lm" else 0)
    return folders


def prompt_ids(case: str, batch: int, args) -> torch.Tensor:
    """The prompt rows of ``case``: ``--prompt`` random tokens, or BOS alone (id vocab - 2 of the word tokenizer)
    for the sampled cases, whose reference starts every row with BOS."""
    if CASES[case][0] in SAMPLED:
        return torch.full((batch, 1), args.vocab - 2)
    return torch.randint(0, args.vocab - 3, (batch, args.prompt), generator=torch.Generator().manual_seed(7))


def generated(case: str, args) -> int:
    return args.gen - 1 if CASES[case][0] in SAMPLED else args.gen


def unmask_call(case: str, folder: Path, prompt: torch.Tensor, gen: int):
    """A function decoding ``prompt`` with unmask's sampler for ``case`` -> (generated tokens, nfe)."""
    lm = from_pretrained(folder)
    settings = CASES[case][3]
    sampler = make_sampler(SampleConfig(**settings), lm.objective, lm.tokenizer, prompt.shape[1] + gen)
    canvas = torch.cat([prompt, torch.full((prompt.shape[0], gen), lm.tokenizer.mask_id)], dim=1)

    def call():
        out = sampler.sample(lm.model, canvas, row_seeds(0, len(canvas)))
        return out.tokens[:, prompt.shape[1]:], out.nfe
    return call


def run_side(args, side: str, case: str, batch: int, folder: Path) -> dict:
    """One process of ``side`` decoding ``case`` at ``batch`` rows: the reference's worker under its Python
    (``reference_worker.py``; with ``--stand-in``, unmask's worker plays it), or unmask's."""
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1")
    prompt = prompt_ids(case, batch, args)
    if side == "reference" and not args.stand_in:
        layout, function, kwargs = CASES[case][:3]
        cmd = [args.reference_python or sys.executable, str(ROOT / "benchmarks" / "reference_worker.py"),
               "--fast-dllm", args.fast_dllm, "--llada", args.llada, "--folder", str(folder), "--repeats",
               str(args.repeats), *(["--bd3lms", args.bd3lms] if args.bd3lms else []),
               "--case", json.dumps(dict(layout=layout, function=function, kwargs=kwargs)),
               "--prompt", json.dumps(prompt.tolist())]
    else:
        flags = [f"--{k}={getattr(args, k)}" for k in ("prompt", "gen", "block", "vocab", "repeats")]
        cmd = [sys.executable, __file__, "--worker", case, "--worker-batch", str(batch), "--folder", str(folder),
               *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{side} {case} (batch {batch}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast-dllm", help="a checkout of NVlabs/Fast-dLLM (its llada/ and dream/ folders)")
    parser.add_argument("--llada", help="a checkout of ML-GSAI/LLaDA (its generate.py)")
    parser.add_argument("--bd3lms", help="a checkout of kuleshov-group/bd3lms (the bd3lm and mdlm cases; its "
                        "environment needs lightning, hydra-core and omegaconf)")
    parser.add_argument("--reference-python", help="the Python of the references' environment (transformers 4.49); "
                        "default: this one")
    parser.add_argument("--cases", help="comma-separated cases (default: every case the checkouts given allow)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--mlp", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="the larger batch size (the smaller is 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per process after its warm-up")
    parser.add_argument("--smoke", action="store_true", help="seconds at a tiny shape against the stand-in")
    parser.add_argument("--stand-in", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.hidden, args.blocks, args.heads, args.mlp, args.vocab = 32, 1, 4, 64, 64
        args.prompt, args.gen, args.block, args.batch, args.rounds, args.repeats = 4, 8, 4, 2, 1, 1
        args.stand_in = not (args.fast_dllm and args.llada)
        args.cases = args.cases or "llada,dream-block-dual,bd3lm"
    add_cases(args.gen, args.block)
    if args.worker:  # unmask's side of one case
        torch.set_num_threads(1)
        prompt = prompt_ids(args.worker, args.worker_batch, args)
        call = unmask_call(args.worker, Path(args.folder), prompt, generated(args.worker, args))
        print(json.dumps(timed(call, args.repeats)))
        return
    if not args.stand_in and not (args.fast_dllm and args.llada):
        parser.error("give --fast-dllm and --llada (local checkouts of the references), or --smoke")
    cases = args.cases.split(",") if args.cases else [c for c in CASES if args.bd3lms or CASES[c][0] not in SAMPLED]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    record = {**run_header(args.tag, ceilings=not args.smoke), "args": vars(args), "cases": {},
              "reference_commits": {name: commit_of(getattr(args, name)) for name in ("fast_dllm", "llada", "bd3lms")}}
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_models(Path(tmp), args)
        runs = [(case, batch) for case in cases for batch in ((1, args.batch) if CASES[case][4] == "both" else (1,))]
        results: dict[tuple[str, int], dict[str, list[dict]]] = {run: {"reference": [], "unmask": []} for run in runs}
        for r in range(args.rounds):
            for case, batch in runs:
                folder = folders[CASES[case][0]]
                for side in (("reference", "unmask") if r % 2 == 0 else ("unmask", "reference")):
                    results[(case, batch)][side].append(run_side(args, side, case, batch, folder))
    print("| case | batch | same work | NFE ref / unmask | ref tok/s | unmask tok/s | unmask / ref | spread |")
    print("|---|---|---|---|---|---|---|---|")
    for (case, batch), sides in results.items():
        ref, ours = sides["reference"], sides["unmask"]
        same, label = agreement(case, ref + ours, args.vocab - 1)
        ratios = sorted(r["seconds"] / u["seconds"] for r, u in zip(ref, ours))
        row = {"batch": batch, "agreement": label, "nfe_reference": ref[0]["nfe"], "nfe_unmask": ours[0]["nfe"],
               "reference_tokens_per_second": ref[0]["generated"] / statistics.median(x["seconds"] for x in ref),
               "unmask_tokens_per_second": ours[0]["generated"] / statistics.median(x["seconds"] for x in ours),
               "ratio": statistics.median(ratios) if same else None, "ratio_spread": [ratios[0], ratios[-1]]}
        record["cases"][f"{case} B{batch}"] = row
        print(f"| {case} | {batch} | {label} | {row['nfe_reference']} / {row['nfe_unmask']} | "
              f"{row['reference_tokens_per_second']:.1f} | {row['unmask_tokens_per_second']:.1f} | "
              f"{'-' if row['ratio'] is None else format(row['ratio'], '.2f') + 'x'} | "
              f"{ratios[0]:.2f} - {ratios[-1]:.2f} |")
    if not args.smoke:
        append_record("reference_peers", record)


def agreement(case: str, runs: list[dict], mask_id: int) -> tuple[bool, str]:
    """Whether every run of ``case`` (both sides) did the same work: equal tokens, or for a sampled case equal
    NFE and generated counts with no position left masked (``sampled``); with its label for the table."""
    if CASES[case][0] not in SAMPLED:
        same = all(r["tokens"] == runs[0]["tokens"] for r in runs)
        return same, "tokens equal" if same else "tokens DIFFER"
    same = all((r["nfe"], r["generated"]) == (runs[0]["nfe"], runs[0]["generated"]) and
               mask_id not in sum(r["tokens"], []) for r in runs)
    return same, "sampled, NFE equal" if same else "sampled, NFE DIFFER"


def commit_of(checkout: str | None) -> str | None:
    """The checkout's commit (a git work tree), or None when it is not one."""
    if not checkout:
        return None
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True)
    return proc.stdout.strip() or None


if __name__ == "__main__":
    main()
