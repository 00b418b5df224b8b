"""unmask's DiffusionGemma decoding against ``transformers``' own (``DiffusionGemmaForBlockDiffusion.generate``, its
reference) on the same weights, side by side.

A random DiffusionGemma of the shape below is built and saved by ``transformers`` (its vision tower included, and
ignored by unmask); unmask loads the folder. Both decode the same prompts into ``--gen`` new tokens, ``--steps``
denoising steps per canvas of ``--canvas``, the entropy bound and temperature schedule of ``transformers``'
defaults, without adaptive stopping (so both make ``steps`` decoder calls per canvas, up to a row's EOS). Their
draws differ (each its own random streams); that the two give the same tokens under the same draws is proven by
``tests/test_diffusiongemma.py``. Both NFEs are reported with the seconds per decoder call. Rounds interleave the
two (A, B, A, B, ...) in one process; the ratio is transformers' median time over unmask's (above 1: unmask is
faster), generated tokens per second, NFE (decoder calls) and tokens per forward for each.

    python benchmarks/diffusiongemma_peer.py --rounds 3
    python benchmarks/diffusiongemma_peer.py --smoke          # seconds: the test suite runs this

Appends a record to ``benchmarks/results/diffusiongemma_peer.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from unmask import from_pretrained
from unmask.config import SampleConfig
from unmask.samplers.base import row_seeds
from unmask.samplers.registry import make_sampler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from llada_samplers import word_tokenizer  # noqa: E402

from common import append_record, run_header  # noqa: E402


def reference_model(folder: Path, args):
    """A random DiffusionGemma (weights of std 0.05 away from the init, so that the outputs depend on the
    inputs) saved by ``transformers`` with a word-level tokenizer of its ids (and a mask beyond them, which a
    uniform-noise model never sees); returns the model."""
    import transformers

    full = args.blocks // 2
    text = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_attention_heads=args.heads,
                head_dim=args.hidden // args.heads, num_key_value_heads=max(1, args.heads // 2),
                num_hidden_layers=args.blocks,
                layer_types=["full_attention" if (i + 1) % (args.blocks // full) == 0 else "sliding_attention"
                             for i in range(args.blocks)],
                sliding_window=args.window, global_head_dim=2 * args.hidden // args.heads,
                num_global_key_value_heads=1, intermediate_size=args.mlp, num_experts=args.experts, top_k_experts=2,
                moe_intermediate_size=args.mlp // 4,
                pad_token_id=args.vocab - 3, eos_token_id=args.vocab - 3, bos_token_id=args.vocab - 2,
                max_position_embeddings=4096)
    vision = {"model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8}
    cfg = transformers.DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=args.canvas)
    torch.manual_seed(0)
    model = transformers.DiffusionGemmaForBlockDiffusion(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" not in name and p.dim() > 1:
                p.normal_(0, 0.05)
    model.save_pretrained(folder)
    word_tokenizer(args.vocab).tk.save(str(folder / "tokenizer.json"))  # its ids, and the mask at id vocab
    return model, transformers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--mlp", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--canvas", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="the larger batch size (the smaller is 1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    if args.smoke:
        args.hidden, args.blocks, args.heads, args.mlp, args.experts, args.vocab = 32, 2, 2, 64, 4, 64
        args.window, args.canvas, args.prompt, args.gen, args.steps, args.batch, args.rounds = 4, 4, 3, 8, 2, 2, 1
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        reference, transformers = reference_model(Path(tmp) / "dg", args)
        lm = from_pretrained(Path(tmp) / "dg")
    bound, t_min, t_max = 0.1, 0.4, 0.8  # transformers' defaults
    generation = transformers.DiffusionGemmaGenerationConfig(
        max_new_tokens=args.gen, eos_token_id=args.vocab - 3, pad_token_id=args.vocab - 3,
        max_denoising_steps=args.steps, t_min=t_min,
        t_max=t_max, stability_threshold=None, confidence_threshold=None)
    sampler_config = transformers.EntropyBoundSamplerConfig(entropy_bound=bound)
    sampler = make_sampler(SampleConfig(sampler="entropy_bound", steps=args.steps, entropy_bound=bound,
                                        temperature_max=t_max, temperature_min=t_min, stop_entropy=0.0),
                           lm.objective, lm.tokenizer, lm.config.model.length)
    record = {**run_header(args.tag), "args": vars(args), "rows": []}
    for batch in (1, args.batch):
        g = torch.Generator().manual_seed(batch)
        prompt = torch.randint(3, args.vocab, (batch, args.prompt), generator=g)
        canvas = torch.cat([prompt, torch.full((batch, args.gen), lm.tokenizer.mask_id)], dim=1)
        seeds = row_seeds(0, batch)
        calls = []
        hook = reference.model.decoder.register_forward_pre_hook(lambda *a: calls.append(1))
        times = {"unmask": [], "transformers": []}
        for _ in range(args.rounds + 1):  # the first round warms up both
            start = time.perf_counter()
            ours = sampler.sample(lm.model, canvas, seeds)
            times["unmask"].append(time.perf_counter() - start)
            calls.clear()
            start = time.perf_counter()
            theirs = reference.generate(prompt, generation_config=generation, sampler_config=sampler_config,
                                        return_dict_in_generate=True)
            times["transformers"].append(time.perf_counter() - start)
        hook.remove()
        median = {side: statistics.median(t[1:]) for side, t in times.items()}
        generated = batch * args.gen
        per_call = {"unmask": median["unmask"] / ours.nfe, "transformers": median["transformers"] / len(calls)}
        row = {"batch": batch, "ratio": median["transformers"] / median["unmask"],
               "ratio_per_call": per_call["transformers"] / per_call["unmask"],
               "unmask": {"seconds": median["unmask"], "tokens_per_second": generated / median["unmask"],
                          "nfe": ours.nfe, "tokens_per_forward": float(ours.tokens_per_forward.mean())},
               "transformers": {"seconds": median["transformers"],
                                "tokens_per_second": generated / median["transformers"], "nfe": len(calls),
                                "tokens_per_forward": float(theirs.tokens_per_forward.float().mean())}}
        record["rows"].append(row)
        print(json.dumps(row))
    if not args.smoke:
        append_record("diffusiongemma_peer", record)


if __name__ == "__main__":
    main()
