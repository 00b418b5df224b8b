"""unmask's autoregressive model against a Hugging Face ``transformers`` GPT-2 of the same shape, side by side.

Both models have the preset's width, depth, heads, vocabulary and maximum length; the weights that
the two architectures share (token embedding, fused q/k/v, attention output, MLP, layer-norm weights)
are copied from unmask's model into GPT-2 (untied output layer, as unmask's), its extra biases and
position table are zero. unmask's model differs where its design does (rotary positions, adaLN
modulation and gates, an output bias): the work per token is the same up to those few elementwise terms.

* Generation: unmask's ``ar`` sampler (KV cache, per-row random streams, float64 categorical draws)
  against ``GPT2LMHeadModel.generate`` (KV cache, ``do_sample=True, top_k=0``, exactly ``--new-tokens``
  tokens, no early stop), from the same prompt, at each batch size; generated tokens per second.
* Training: one optimizer step of each on the same batch of rows: forward, next-token loss, backward,
  gradient clipping at 1.0, AdamW, zero_grad: the same work (``train``), and unmask's step also updating
  its EMA as ``unmask train`` does (``train+ema``). Tokens per second.

Rounds interleave the two (A, B, A, B, ...) in one process so machine drift cancels; the ratio is
unmask / transformers of the medians (above 1: unmask is faster).

    python benchmarks/transformers_peer.py --preset nano --rounds 5
    python benchmarks/transformers_peer.py --smoke          # seconds: the test suite runs this

Appends a record to ``benchmarks/results/transformers_peer.jsonl``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from unmask.config import SampleConfig, load_config
from unmask.data.tokenization import CharTokenizer
from unmask.families import build_model, build_objective
from unmask.pipeline import make_canvas
from unmask.samplers.base import row_seeds
from unmask.samplers.registry import make_sampler
from unmask.train.optim import EMA
from unmask.train.step import Batch, TrainState, train_step

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import append_record, draw_modulations, run_header  # noqa: E402


def unmask_model(preset: str, length: int, vocab: int):
    tokenizer = CharTokenizer("".join(chr(0x100 + i) for i in range(vocab - 4)))  # 4 specials make up the rest
    cfg = load_config(None, [f"model.preset={preset}", f"model.length={length}", f"data.length={length}",
                             "model.dropout=0.0", "family=ar"])
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    draw_modulations(model)
    return cfg, tokenizer, model, build_objective(cfg, tokenizer)


def gpt2_twin(model, cfg):
    """A ``GPT2LMHeadModel`` of ``model``'s shape holding its shared weights (SDPA attention, no dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    vocab = model.vocab_embed.embedding.shape[0]
    config = GPT2Config(vocab_size=vocab, n_positions=m.length, n_embd=m.hidden, n_layer=m.blocks, n_head=m.heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_pytorch_tanh",
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False, attn_implementation="sdpa")
    twin = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
        twin.transformer.wte.weight.copy_(model.vocab_embed.embedding)
        for ours, theirs in zip(model.blocks, twin.transformer.h):
            theirs.ln_1.weight.copy_(ours.norm1.weight)
            theirs.ln_2.weight.copy_(ours.norm2.weight)
            theirs.attn.c_attn.weight.copy_(ours.attn_qkv.weight.T)  # Conv1D stores (in, out)
            theirs.attn.c_proj.weight.copy_(ours.attn_out.weight.T)
            theirs.mlp.c_fc.weight.copy_(ours.mlp[0].weight.T)
            theirs.mlp.c_proj.weight.copy_(ours.mlp[2].weight.T)
        twin.transformer.ln_f.weight.copy_(model.output_layer.norm_final.weight)
        twin.lm_head.weight.copy_(model.output_layer.linear.weight)
    return twin


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def generation(model, twin, objective, tokenizer, cfg, batch: int, prompt: int, new_tokens: int, rounds: int):
    length = prompt + new_tokens
    sampler = make_sampler(SampleConfig(sampler="ar"), objective, tokenizer, cfg.model.length)
    prompt_ids = torch.randint(0, tokenizer.vocab_size - 4, (prompt,), generator=torch.Generator().manual_seed(1))
    canvas = make_canvas(tokenizer, [prompt_ids.tolist()] * batch, length)
    seeds = row_seeds(0, batch)
    hf_inputs = torch.cat([torch.full((batch, 1), tokenizer.bos_id), prompt_ids.expand(batch, -1)], dim=1)

    def ours():
        result = sampler.sample(model, canvas, seeds)
        assert result.generated == batch * new_tokens

    def theirs():
        out = twin.generate(hf_inputs, attention_mask=torch.ones_like(hf_inputs), do_sample=True, top_k=0,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                            pad_token_id=tokenizer.pad_id)
        assert out.shape == (batch, 1 + prompt + new_tokens)

    return interleave(ours, theirs, rounds, batch * new_tokens)


def training(model, twin, objective, tokenizer, batch: int, length: int, rounds: int, steps: int, ema: bool):
    x0 = torch.randint(0, tokenizer.vocab_size - 4, (batch, length), generator=torch.Generator().manual_seed(2))
    counted = torch.ones_like(x0, dtype=torch.bool)
    hf_inputs = objective.inputs(x0)  # BOS, x_0 .. x_{L-2}: the same rows
    ours_opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    theirs_opt = torch.optim.AdamW(twin.parameters(), lr=1e-4)
    model.train()
    twin.train()

    state = TrainState(model, objective, ours_opt, ema=EMA(model, 0.9999) if ema else None, grad_clip=1.0)

    def ours():
        for _ in range(steps):
            train_step(state, Batch(x0, counted, None, float(counted.sum())))

    def theirs():
        for _ in range(steps):
            loss = twin(hf_inputs, labels=hf_inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
            theirs_opt.step()
            theirs_opt.zero_grad(set_to_none=True)

    result = interleave(ours, theirs, rounds, steps * batch * length)
    model.eval()
    twin.eval()
    return result


def interleave(ours, theirs, rounds: int, tokens: int) -> dict:
    """Warm both up, then ``rounds`` x (ours, theirs); tokens/s of each round and the ratio of medians."""
    ours()
    theirs()
    times = {"unmask": [], "transformers": []}
    for _ in range(rounds):
        for name, fn in (("unmask", ours), ("transformers", theirs)):
            times[name].append(median_seconds(fn, 1))
    speed = {k: [tokens / s for s in v] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in speed.items()}
    return {"tokens": tokens, "unmask_tokens_per_second": speed["unmask"],
            "transformers_tokens_per_second": speed["transformers"],
            "unmask_median": med["unmask"], "transformers_median": med["transformers"],
            "ratio": med["unmask"] / med["transformers"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--vocab", type=int, default=50257, help="vocabulary size (GPT-2's by default)")
    parser.add_argument("--length", type=int, default=1024, help="maximum length of both models")
    parser.add_argument("--batches", default="1,8", help="generation batch sizes")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-length", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=3, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: generate,train")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape; nothing is recorded")
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    if args.smoke:
        args.vocab, args.length, args.batches, args.new_tokens, args.rounds = 300, 64, "2", 4, 1
        args.train_batch, args.train_length, args.train_steps = 2, 32, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    cfg, tokenizer, model, objective = unmask_model(args.preset, args.length, args.vocab)
    twin = gpt2_twin(model, cfg)
    model.eval()
    twin.eval()
    record = {**run_header(args.tag, ceilings=not args.smoke), "args": vars(args),
              "parameters": {"unmask": sum(p.numel() for p in model.parameters()),
                             "transformers": sum(p.numel() for p in twin.parameters())}}
    with torch.no_grad():
        if "generate" not in skip:
            for batch in [int(b) for b in args.batches.split(",")]:
                r = generation(model, twin, objective, tokenizer, cfg, batch, args.prompt, args.new_tokens,
                               args.rounds)
                record[f"generate_batch{batch}"] = r
                print(f"generate B={batch}: unmask {r['unmask_median']:.0f} tok/s, transformers "
                      f"{r['transformers_median']:.0f} tok/s: {r['ratio']:.2f}x", flush=True)
    for name, ema in (("train", False), ("train+ema", True)):
        if "train" in skip:
            break
        r = training(model, twin, objective, tokenizer, args.train_batch, args.train_length, args.rounds,
                     args.train_steps, ema)
        record[name] = r
        print(f"{name} B={args.train_batch} L={args.train_length}: unmask {r['unmask_median']:.0f} tok/s, "
              f"transformers {r['transformers_median']:.0f} tok/s: {r['ratio']:.2f}x", flush=True)
    if not args.smoke:
        append_record("transformers_peer", record)


if __name__ == "__main__":
    main()
