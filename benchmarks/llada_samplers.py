"""Sampler throughput on a LLaDA-shaped model: LLaDA's own decoding against unmask's samplers, side by side.

A random LLaDA-layout model (``model.backbone=llama``, no grouped-query attention, SwiGLU, RMSNorm,
rotary base 500,000; 60M parameters by default: hidden 512, 8 blocks, 8 heads, MLP 1536, vocabulary
32,000) written to a temporary folder in LLaDA's released layout (``save_released``) and loaded through
the public loader.
Each setting generates ``--gen`` tokens after a ``--prompt``-token prompt at each batch size; the
settings run interleaved, round by round, so machine drift spreads over all of them. Reported per
setting: median seconds, network calls (NFE) and generated tokens per second (generated tokens only).
Random weights: this measures speed, not quality.

* ``llada`` (LLaDA's ``generate``): low-confidence remasking, blocks of ``--block``, ``steps`` = gen (one
  token per step), gen/2 and gen/4; and at ``steps`` = gen with Fast-dLLM's prefix and dual caches (the
  same number of calls, each on the canvas from the block on, or on the block alone, after a full call per
  block);
* unmask's ``first_hitting`` (exact, one token per call), cached ``ancestral`` at T = gen and gen/4,
  ``confidence`` (margin) at gen/2, and ``dream`` (entropy) at gen/2.

    python benchmarks/llada_samplers.py --rounds 3
    python benchmarks/llada_samplers.py --smoke       # seconds: the test suite runs this

Appends a record to ``benchmarks/results/llada_samplers.jsonl``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from unmask.checkpoints.open_weights import save_released
from unmask.checkpoints.pretrained import Pretrained, save_pretrained
from unmask.config import load_config
from unmask.data.tokenization import HFTokenizer
from unmask.families import build_model
from unmask.pipeline import from_pretrained

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import append_record, draw_modulations, run_header  # noqa: E402


def word_tokenizer(vocab: int) -> HFTokenizer:
    """A word-level tokenizer ``w0 .. w{vocab-4}`` and three special tokens (EOS = PAD, BOS, the mask last)."""
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab - 3)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([AddedToken(t, special=True) for t in ("<|eot|>", "<|start|>", "<|mdm_mask|>")])
    return HFTokenizer(tk, "benchmark", ids={"eos": vocab - 3, "pad": vocab - 3, "bos": vocab - 2, "mask": vocab - 1})


# the config keys of each released layout's shape beyond the sizes: LLaDA's rotary base; Dream's (Qwen2's)
# grouped-query attention, q/k/v biases, logit shift and rotary base
LAYOUT_KEYS = {"llada": ["model.rope_base=500000"],
               "dream": ["model.kv_heads=2", "model.qkv_bias=true", "model.logit_shift=true",
                         "model.rope_base=1000000"]}


def released_folder(folder: Path, hidden: int, blocks: int, heads: int, mlp: int, vocab: int, length: int,
                 layout: str = "llada") -> Path:
    """A random model written in a released layout (LLaDA's, or Dream's: :data:`LAYOUT_KEYS`) by unmask's own
    writer (float32) with :func:`word_tokenizer`."""
    tokenizer = word_tokenizer(vocab)
    cfg = load_config(None, ["family=mdlm", "model.backbone=llama", f"model.hidden={hidden}", f"model.blocks={blocks}",
                             f"model.heads={heads}", f"model.intermediate={mlp}", f"model.length={length}",
                             "model.dropout=0", "data.tokenizer=hf", f"data.length={length}", *LAYOUT_KEYS[layout]])
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    with torch.no_grad():  # spread the logits so that confidences differ between positions
        model.lm_head.weight.normal_(0, 1.0 / hidden ** 0.5)
    return save_released(Pretrained(folder, cfg, tokenizer, 0, model.state_dict()), folder, layout)


def dit_folder(folder: Path, hidden: int, blocks: int, heads: int, vocab: int, length: int, block: int = 0) -> Path:
    """A random MDLM-style DiT (MLP 4x, conditioning width 128, no time conditioning) with
    :func:`word_tokenizer`, saved by ``save_pretrained``: family ``bd3lm`` with blocks of ``block`` positions, or
    ``mdlm`` when ``block`` is 0; its adaLN modulations drawn (:func:`common.draw_modulations`)."""
    tokenizer = word_tokenizer(vocab)
    family = ["family=bd3lm", f"model.block_size={block}"] if block else ["family=mdlm"]
    cfg = load_config(None, [*family, "model.backbone=dit", f"model.hidden={hidden}", f"model.blocks={blocks}",
                             f"model.heads={heads}", "model.cond_dim=128", f"model.length={length}", "model.dropout=0",
                             "data.tokenizer=hf", f"data.length={length}"])
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    draw_modulations(model)
    return save_pretrained(Pretrained(folder, cfg, tokenizer, 0, model.state_dict()), folder)


def settings(gen: int, block: int) -> list[tuple[str, dict]]:
    out = [(f"llada steps={s}", dict(sampler="llada", steps=s, block_length=block, temperature=0.0))
           for s in (gen, gen // 2, gen // 4)]
    out += [(f"llada steps={gen} + Fast-dLLM {mode} cache", dict(sampler="llada", steps=gen, block_length=block,
                                                                temperature=0.0, block_cache=mode))
            for mode in ("prefix", "dual")]
    return out + [("first_hitting (exact)", dict(sampler="first_hitting")),
                  (f"ancestral cached T={gen}", dict(sampler="ancestral", steps=gen)),
                  (f"ancestral cached T={gen // 4}", dict(sampler="ancestral", steps=gen // 4)),
                  (f"confidence margin steps={gen // 2}", dict(sampler="confidence", steps=gen // 2, score="margin")),
                  (f"dream entropy steps={gen // 2}", dict(sampler="dream", steps=gen // 2, score="entropy",
                                                           temperature=0.0))]


def shape_arguments(parser: argparse.ArgumentParser, blocks: int, prompt: int, batches: str) -> None:
    """The LLaDA-shaped model's and the decoding's flags (shared by the scripts that use :func:`released_folder`)."""
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=blocks)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--mlp", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, default=prompt)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--batches", default=batches)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape; nothing is recorded")
    parser.add_argument("--tag", default="cpu")


def smoke_shape(args: argparse.Namespace) -> None:
    """``--smoke``: the tiny model and decoding."""
    args.hidden, args.blocks, args.heads, args.mlp, args.vocab = 32, 1, 2, 64, 64
    args.prompt, args.gen, args.block, args.batches, args.rounds = 4, 8, 4, "2", 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shape_arguments(parser, blocks=8, prompt=32, batches="1,4")
    args = parser.parse_args()
    if args.smoke:
        smoke_shape(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = released_folder(Path(tmp) / "llada", args.hidden, args.blocks, args.heads, args.mlp, args.vocab,
                              args.prompt + args.gen + 8)
        lm = from_pretrained(folder)
    parameters = sum(p.numel() for p in lm.model.parameters())
    prompt = " ".join(f"w{i % (args.vocab - 3)}" for i in range(args.prompt))
    record = {**run_header(args.tag, ceilings=not args.smoke), "args": vars(args), "parameters": parameters,
              "results": []}
    print(f"LLaDA-shaped model, {parameters / 1e6:.1f}M parameters; prompt {args.prompt}, generating {args.gen}")
    for batch in map(int, args.batches.split(",")):
        times: dict[str, list[float]] = {}
        nfe: dict[str, int] = {}
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, knobs in settings(args.gen, args.block):
                out = lm.generate([prompt], num_samples=batch, batch_size=batch, length=args.prompt + 1 + args.gen,
                                  **knobs)
                times.setdefault(name, []).append(out.seconds)
                nfe[name] = out.nfe
                generated = out.generated
        for name, _ in settings(args.gen, args.block):
            seconds = statistics.median(times[name][1:] or times[name])
            r = {"batch": batch, "setting": name, "seconds": seconds, "nfe": nfe[name],
                 "generated_tokens_per_second": generated / seconds}
            record["results"].append(r)
            print(f"B={batch} {name:32s} {seconds:7.2f} s  NFE {nfe[name]:4d}  {generated / seconds:8.1f} tok/s",
                  flush=True)
    if not args.smoke:
        append_record("llada_samplers", record)


if __name__ == "__main__":
    main()
