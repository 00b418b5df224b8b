"""The ``unmask`` command line::

    unmask train [CONFIG] [key=value ...] [--fresh]    train or resume (torchrun for several processes)
    unmask eval MODEL [key=value ...]                  NELBO / NLL on a split (JSON on stdout)
    unmask eval MODEL --zero-shot wikitext2 data.path=DIR   perplexity on another corpus, with and
                                                       without EOS between documents
    unmask sample MODEL [key=value ...]                print samples
    unmask export MODEL OUT [--to FORMAT]              unmask, mdlm-hf, mdlm-ckpt, llada, dream, qwen2, llama
    unmask convert HF_CAUSAL_LM OUT [--no-shift]       an autoregressive model made a diffusion model (A2D)
    unmask serve MODEL [--port 8000]                   HTTP completions API, streaming, web page
    unmask scaling CONFIG --sizes ... --budgets ... --out DIR   IsoFLOP sweep with fits (resumable)
    unmask task star-graph|sorting|arithmetic --out DIR  write a verifiable task (prompt/answer JSONL)
    unmask rl MODEL run_dir=DIR rl.prompts=F [...]     GRPO / Co-GRPO on a reward (rl.mode=model|schedule|co)
    unmask quickstart [key=value ...]                  train on the shipped corpus, evaluate, sample
    unmask configs                                     list the packaged configs

CONFIG is a YAML path or the name of a packaged config; MODEL a run folder (its newest checkpoint), a
checkpoint folder, a ``save_pretrained`` folder, a released MDLM folder or ``.ckpt``, or a hub id
(see :mod:`unmask.checkpoints.pretrained`). Overrides use dotted keys (``train.lr=1e-3``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from .checkpoints.checkpoint import Checkpoint, CheckpointError, load_model
from .checkpoints.conversion import to_diffusion
from .checkpoints.open_weights import WRITABLE, OpenWeights
from .checkpoints.pretrained import export, open_source, save_pretrained
from .config import (
    CONFIG_DIR,
    QUANTIZE_SCHEMES,
    ConfigError,
    config_from_dict,
    config_keys,
    load_config,
    merge_trees,
    packaged_configs,
    parse_overrides,
    to_dict,
)
from .data.readers import DataError
from .data.tasks import DIGIT_ORDERS, STAR_VARIANTS, write_arithmetic_task, write_sorting_task, write_star_graph_task
from .data.tokenization import OutOfVocabularyError, TokenizerFileError, with_oov_policy
from .eval.likelihood import EvaluationError, format_result
from .eval.runs import run_eval, run_sample, run_zero_shot
from .experiments.scaling import plot_sweep, run_sweep, summarize
from .families import family_of
from .files import OutputFileError, output_file, write_output
from .pipeline import Generation, checkpoint_config
from .runtime import device_for
from .samplers.base import SamplingError
from .samplers.block_diffusion import BlockSettings
from .samplers.registry import BLOCKS, SAMPLERS, WINDOWS
from .samplers.semi_ar import WindowSettings
from .train.loop import TrainingError, train
from .train.memory import compared_settings, model_shape, plan_memory, plan_table, planning_inputs
from .train.rl import rl_train

USER_ERRORS = (ConfigError, DataError, CheckpointError, OutOfVocabularyError, FileNotFoundError, SamplingError,
               TokenizerFileError, TrainingError, EvaluationError, OutputFileError)


def format_zero_shot(r: dict) -> str:
    """The lines of an ``unmask eval --zero-shot`` result: perplexity with and without EOS between documents."""
    lines = []
    for key, label in (("with_eos", "EOS between documents"), ("without_eos", "no EOS between documents")):
        x = r[key]
        bound = "<=" if x["bound"] == "nelbo" else "="
        err = f" ± {x['stderr']:.4f}" if x.get("stderr") else ""
        lines.append(f"{r['zero_shot']} {r['split']}, {label}: ppl {bound} {x['perplexity']:.3f} (nll {x['nll']:.4f}"
                     f"{err} nats/token, {x['tokens']} tokens, {x['sequences']} rows)")
    return "\n".join(lines)


def format_generation(r: dict) -> str:
    """The line of a generation-quality result (``eval.metric=generation``): gen-ppl, entropy, MAUVE, k-mer
    distances."""
    mauve = f", MAUVE {r['mauve']:.3f}" if r.get("mauve") is not None else ""
    kmers = "".join(f", {k.split('_')[0]} distance {v:.4f}" for k, v in r.items() if k.startswith("kmer"))
    return (f"gen-ppl {r['gen_ppl']:.3f} (held-out {r['reference_gen_ppl']:.3f}), entropy {r['entropy']:.3f} "
            f"(held-out {r['reference_entropy']:.3f}){mauve}{kmers}; {r['samples']} samples, "
            f"{r['generated_tokens_per_second'] or 0:.1f} generated tokens/s, {r['nfe']} network calls, "
            f"{r['tokens_per_forward']:.2f} tokens per forward")


def print_samples(gen: Generation) -> None:
    """Print each sample with its network calls and tokens per forward, then a summary line (tokens, seconds,
    throughput, network calls, mean tokens per forward)."""
    for i, (text, nfe, tpf) in enumerate(zip(gen.texts, gen.row_nfe, gen.tokens_per_forward)):
        print(f"--- sample {i} ({nfe} NFE, {tpf:.2f} tokens per forward)\n{text}")
    summary = gen.summary()
    print(f"--- {summary['samples']} samples, {summary['generated_tokens']} generated tokens in "
          f"{summary['seconds']:.2f}s ({summary['generated_tokens_per_second'] or 0:.1f} tokens/s), "
          f"{summary['nfe']} network calls, {summary['tokens_per_forward']:.2f} tokens per forward")


def cmd_train(args) -> int:
    """Run ``unmask train``."""
    cfg = load_config(args.config, args.overrides)
    final = train(cfg, fresh=args.fresh)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if family_of(cfg).labels:
        result = json.loads((Path(cfg.run_dir) / "test_metrics.json").read_text())
        for split in ("valid", "test"):
            if split in result:
                r = result[split]
                print(f"{split}: AUC {r['auc']:.4f}  accuracy {r['accuracy']:.4f}  MCC {r['mcc']:.4f}  "
                      f"({r['n']} rows, best step {result['best_step']})")
    print(f"checkpoint: {final}")
    return 0


def quantize_overrides(args, sections: tuple[str, ...]) -> None:
    """``--quantize X`` as the overrides ``SECTION.quantize=X``, after the others (the flag wins)."""
    if args.quantize:
        args.overrides = [*args.overrides, *(f"{section}.quantize={args.quantize}" for section in sections)]


def cmd_eval(args) -> int:
    """Run ``unmask eval``."""
    if args.json:
        output_file(args.json, "--json")
    quantize_overrides(args, ("eval", "sample"))
    ckpt = open_source(args.checkpoint, args.tokenizer)
    if args.zero_shot:
        cfg = checkpoint_config(ckpt, [o for o in args.overrides if not o.startswith("data.")])
        result = run_zero_shot(ckpt, cfg, args.zero_shot, [o for o in args.overrides if o.startswith("data.")],
                               device_for(args.device))
        line = format_zero_shot(result)
    else:
        cfg = checkpoint_config(ckpt, args.overrides)
        result = run_eval(ckpt, cfg, device_for(args.device))
        if family_of(cfg).labels:
            line = (f"{cfg.eval.split}: AUC {result['auc']:.4f}  accuracy {result['accuracy']:.4f}  "
                    f"MCC {result['mcc']:.4f}  ({result['n']} rows)")
        elif cfg.eval.metric == "generation":
            line = format_generation(result)
        elif cfg.eval.metric == "exact_match":
            line = (f"{cfg.eval.split}: exact match {result['exact_match']:.4f} ± {result['stderr']:.4f} "
                    f"({result['n']} prompts, {result['nfe']} network calls, {result['tokens_per_forward']:.2f} "
                    f"tokens per forward)")
        else:
            line = format_result(result, cfg.eval.split)
    print(line, file=sys.stderr)
    text = json.dumps(json_safe(result), allow_nan=False)
    print(text)
    if args.json:
        write_output(Path(args.json), text + "\n", "--json")
    return 0


def json_safe(value):
    """``value`` with non-finite floats as null (JSON has no NaN or infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def cmd_sample(args) -> int:
    """Run ``unmask sample``."""
    if args.json:
        output_file(args.json, "--json")
    quantize_overrides(args, ("sample",))
    ckpt = open_source(args.checkpoint, args.tokenizer)
    cfg = checkpoint_config(ckpt, args.overrides)
    gen = run_sample(ckpt, cfg, device_for(args.device), args.prompt, args.template, args.chat)
    print_samples(gen)  # first: a result file that cannot be written loses nothing
    if args.json:
        write_output(Path(args.json), json.dumps({"summary": gen.summary(), "texts": gen.texts, "ids": gen.ids,
                                                  "row_nfe": gen.row_nfe,
                                                  "tokens_per_forward": gen.tokens_per_forward}) + "\n", "--json")
    return 0


def cmd_scaling(args) -> int:
    """Run ``unmask scaling``."""
    try:
        budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError:
        raise ConfigError(f"--budgets {args.budgets!r}: comma-separated numbers expected") from None
    families = [f for f in args.families.split(",") if f]
    try:
        records = run_sweep(args.config, args.overrides, args.sizes.split(","), budgets,
                            families, args.out, args.eval_sequences)
        summary = summarize(records)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    out = Path(args.out)
    (out / "fits.json").write_text(json.dumps(summary, indent=1))
    if plot_sweep(records, out / "scaling.png"):
        print(f"plot: {out / 'scaling.png'}")
    for family, fit in summary["families"].items():
        for why in fit["no_fit"].values():
            print(f"{family}: {why}")
        law = fit.get("loss_law")
        if law:
            print(f"{family}: L* = {law['coefficient']:.4g} C^{law['exponent']:.4f}, "
                  f"N* ∝ C^{fit['size_law']['exponent']:.3f}")
    for budget, factor in summary.get("compute_factor", {}).items():
        print(f"compute factor MDM/AR at C = {budget}: {factor:.2f}")
    print(f"fits: {out / 'fits.json'}")
    return 0


def cmd_serve(args) -> int:
    """Run ``unmask serve``."""
    from .serve.app import serve  # FastAPI and uvicorn: loaded only to serve
    from .serve.service import ServeConfig

    limits = {"--max-batch-rows": args.max_batch_rows, "--max-pending": args.max_pending, "--max-n": args.max_n,
              "--max-steps": args.max_steps, "--timeout": args.timeout, "--max-body-bytes": args.max_body_bytes,
              "--max-stream-lag": args.max_stream_lag, "--max-step-tokens": args.max_step_tokens,
              "--cache-budget-bytes": args.cache_budget_bytes, "--max-likelihood-rows": args.max_likelihood_rows,
              "--mc-samples": args.mc_samples}
    if args.prefix_cache_bytes < 0:
        raise ConfigError("--prefix-cache-bytes must be a number >= 0")
    for flag, value in limits.items():
        if not (0 < value < math.inf):
            raise ConfigError(f"{flag} must be a positive number")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a TCP port (1-65535)")
    if not (0 <= args.batch_window_ms < math.inf):
        raise ConfigError("--batch-window-ms must be a number >= 0")
    config = ServeConfig(scheduling=args.scheduling, max_batch_rows=args.max_batch_rows,
                         max_step_tokens=args.max_step_tokens, cache_budget_bytes=args.cache_budget_bytes,
                         max_likelihood_rows=args.max_likelihood_rows, mc_samples=args.mc_samples,
                         prefix_cache_bytes=args.prefix_cache_bytes,
                         batch_window_ms=args.batch_window_ms, max_pending=args.max_pending, timeout_s=args.timeout,
                         max_n=args.max_n, max_steps=args.max_steps, max_body_bytes=args.max_body_bytes,
                         max_stream_lag=args.max_stream_lag)
    serve(args.checkpoint, args.host, args.port, str(device_for(args.device)), config, args.model_precision,
          args.tokenizer, args.name, args.quantize)
    return 0


def cmd_convert(args) -> int:
    """Run ``unmask convert``."""
    source = open_source(args.model)
    if not isinstance(source, OpenWeights):
        raise ConfigError(f"{args.model} is not a Hugging Face causal LM folder (GPT-2, Llama or Qwen2 layout)")
    converted = to_diffusion(source, shift=not args.no_shift)
    out = save_pretrained(converted, args.out)
    m = converted.config.model
    print(f"wrote {out}: a masked diffusion model from {source.path} (mask id {converted.tokenizer.mask_id}, "
          f"{'with' if m.logit_shift else 'without'} logit shift); continue it with "
          f"`unmask train CONFIG train.init_from={out}`")
    return 0


QUANTIZE_HELP = ("the network for inference: int8 weight-only (torchao; unmask[quantize]), int8-dynamic (int8 weights "
                 "and per-row int8 inputs, CPU) or none")
TOKENIZER_HELP = "tokenizer folder for a released model that ships none (MDLM: GPT-2's; SMDM: TinyLlama's)"
CARD_METRICS = ("nll", "stderr", "perplexity", "bits_per_token", "bits_per_char", "gen_ppl", "entropy", "mauve")


def cmd_export(args) -> int:
    """Run ``unmask export``."""
    source = open_source(args.checkpoint, args.tokenizer)
    metrics = None
    if args.metrics:
        try:
            result = json.loads(Path(args.metrics).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--metrics {args.metrics}: not JSON ({exc})") from None
        split = result.get("split", "")
        metrics = {f"{split} {k}".strip(): result[k] for k in CARD_METRICS if isinstance(result.get(k), (int, float))}
    out = export(source, args.out, to=args.to, ema=not args.raw, metrics=metrics)
    print(f"wrote {out} ({args.to}, {'raw' if args.raw else 'EMA'} weights of {source.path}, step {source.step})")
    return 0


def cmd_quickstart(args) -> int:
    """Run ``unmask quickstart``."""
    cfg = load_config("quickstart", args.overrides)
    print(f"training a {cfg.family} model ({cfg.model.preset} preset) on {cfg.data.dataset}; run folder "
          f"{cfg.run_dir}")
    final = train(cfg, fresh=args.fresh)
    ckpt = Checkpoint(final)
    device = device_for(None)
    result = run_eval(ckpt, ckpt.config, device)
    print(format_result(result, ckpt.config.eval.split))
    print_samples(run_sample(ckpt, ckpt.config, device))
    print(f"\ncheckpoint: {final}\nnext: unmask eval {cfg.run_dir} | unmask sample {cfg.run_dir} "
          f"sample.num_samples=8")
    return 0


def cmd_rl(args) -> int:
    """Run ``unmask rl``."""
    ckpt = open_source(args.checkpoint, args.tokenizer)
    tree = parse_overrides(args.overrides)
    for section in tree:
        if section not in ("rl", "sample", "data", "adapter", "run_dir"):
            raise ConfigError(f"unmask rl takes rl.*, sample.*, data.*, adapter.* and run_dir overrides, not "
                              f"'{section}'")
    if "run_dir" not in tree:
        raise ConfigError("give run_dir=... for the fine-tuned model (the source run is left as it is)")
    if tree.get("adapter", {}).get("kind", "none") != "none":  # the source is the adapters' frozen base
        tree["train"] = {"init_from": str(args.checkpoint)}
    cfg = config_from_dict(merge_trees(to_dict(ckpt.config), tree))
    device = device_for(args.device)
    # an adapter run's base is the source's EMA weights, as train.init_from reads them
    model, objective = load_model(ckpt, ema=cfg.sample.use_ema or cfg.adapter.kind != "none", device=device)
    tokenizer = with_oov_policy(ckpt.tokenizer, cfg.data.oov, cfg.data.oov_replacement)
    final = rl_train(cfg, model, objective, tokenizer, device)
    records = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("event") == "eval"]
    if evals:
        print(f"held-out reward: {evals[0]['reward']:.4f} before, {evals[-1]['reward']:.4f} after "
              f"{cfg.rl.iterations} iterations ({cfg.rl.mode})")
    print(f"checkpoint: {final}")
    return 0


def cmd_task(args) -> int:
    """Run ``unmask task``."""
    try:
        if args.name == "star-graph":
            meta = write_star_graph_task(args.out, args.variant, args.train, args.valid, args.test, args.seed)
        elif args.name == "arithmetic":
            meta = write_arithmetic_task(args.out, args.operands, args.digits, args.train, args.valid, args.test,
                                         args.seed, args.digit_order)
        else:
            meta = write_sorting_task(args.out, args.length, args.alphabet, args.train, args.valid, args.test,
                                      args.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    sizes = meta["sizes"]
    print(f"wrote {args.out}/{{train,valid,test}}.jsonl ({args.name}: {sizes['train']}/{sizes['valid']}/"
          f"{sizes['test']}); train with data.dataset=text data.path={args.out}/train.jsonl "
          f"data.valid_path={args.out}/valid.jsonl data.test_path={args.out}/test.jsonl data.prompt_field=prompt "
          f"data.layout=pad data.length={meta['suggested_length']} (or the task's config: unmask configs)")
    return 0


def cmd_config(args) -> int:
    """Run ``unmask config``."""
    keys = [k for k in config_keys() if k.key.startswith(args.prefix or "")]
    if not keys:
        raise ConfigError(f"no config key starts with {args.prefix!r}")
    width = max(len(k.key) for k in keys)
    for k in keys:
        print(f"{k.key:{width}}  {k.type:12} = {k.default!r:<14} {k.help}")
    return 0


def sampler_help() -> str:
    """Every sampler with the ``sample.*`` keys it reads and their defaults (from the registry)."""
    lines = ["samplers (sample.sampler=NAME; auto: the family's default):"]
    for spec in SAMPLERS.values():
        lines.append(f"  {spec.name} ({spec.decoding} models): {spec.summary}")
        lines.append("      " + settings_line(spec.settings))
    lines.append("around a diffusion sampler:")
    lines.append(f"  {WINDOWS} (full-sequence models): " + settings_line(WindowSettings))
    lines.append(f"  {BLOCKS} (block models): " + settings_line(BlockSettings))
    return "\n".join(lines)


def settings_line(settings: type) -> str:
    """A settings dataclass's fields as ``name=default`` pairs, comma-separated."""
    return ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(settings))


def cmd_configs(args) -> int:
    """Run ``unmask configs``."""
    for name in packaged_configs():
        first = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:24s} {first}")
    return 0


def cmd_plan(args) -> int:
    """Run ``unmask plan``."""
    cfg = load_config(args.config, args.overrides)
    cfg, tokenizer = planning_inputs(cfg)
    vocab = tokenizer.vocab_size
    settings = compared_settings(cfg) if args.compare else {"as configured": cfg}
    if cfg.model.moe_experts:
        shape = model_shape(cfg, tokenizer)
        print(f"mixture of experts: {shape.parameters / 1e9:,.2f}B parameters, {shape.active / 1e9:,.2f}B active per "
              f"token (bf16 weights for inference: {2 * shape.parameters / 1e9:,.1f} GB)")
    for world in args.world:
        plans = {name: plan_memory(c, model_shape(c, tokenizer), vocab, world, args.device)
                 for name, c in settings.items()}
        first = next(iter(plans.values()))
        print(f"\n{world} {args.device} process{'es' if world > 1 else ''}, micro-batch {first.micro_batch} x "
              f"{cfg.data.length} tokens, precision {cfg.train.precision}; GB per process\n")
        print(plan_table(plans))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``unmask`` command, one subcommand per ``cmd_*`` handler."""
    parser = argparse.ArgumentParser(prog="unmask", description="Masked diffusion language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train or resume a run")
    p.add_argument("config", nargs="?", help="YAML file or packaged config name (see 'unmask configs')")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--fresh", action="store_true", help="delete the run folder first instead of resuming")
    p.set_defaults(func=cmd_train)
    p.epilog = "every config key with its type, default and meaning: unmask config [PREFIX]"
    model_help = ("run or checkpoint folder, save_pretrained folder, released MDLM folder or .ckpt, LLaDA/Dream/"
                  "Qwen2/Llama folder, SMDM .safetensors file, or hub id")
    for name, func, helptext in (("eval", cmd_eval, "evaluate a model"), ("sample", cmd_sample, "sample")):
        p = sub.add_parser(name, help=helptext, epilog=sampler_help() if name == "sample" else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("checkpoint", help=model_help)
        p.add_argument("overrides", nargs="*", help="eval.*, sample.* or data.* overrides")
        p.add_argument("--json", help="also write the result as JSON to this file")
        p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        p.add_argument("--tokenizer", help=TOKENIZER_HELP)
        p.add_argument("--quantize", choices=QUANTIZE_SCHEMES,
                       help=QUANTIZE_HELP + (" (sets eval.quantize and sample.quantize)" if name == "eval" else
                                             " (sets sample.quantize)"))
        if name == "eval":
            p.add_argument("--zero-shot", metavar="CORPUS", help="wikitext2 / wikitext103 (with data.path=DIR) or "
                           "a text file or folder: perplexity with and without EOS between documents")
        if name == "sample":
            p.add_argument("--prompt", action="append", help="text the samples start with (kept fixed); "
                           "repeat for several prompts, each gets sample.num_samples rows")
            p.add_argument("--template", help="text with [MASK] / [MASK*n] where tokens are to be generated "
                           "(infilling); the rest is kept fixed")
            p.add_argument("--chat", action="store_true", help="the prompts are a user's messages, put in the "
                           "model's chat template (instruct models); prints the answers")
        p.set_defaults(func=func)
    p = sub.add_parser("export", help="write a model as a Hugging Face style folder or in MDLM's layouts")
    p.add_argument("checkpoint", help=model_help)
    p.add_argument("out", help="output folder (or .ckpt file for --to mdlm-ckpt)")
    p.add_argument("--to", default="unmask", choices=("unmask", "mdlm-hf", "mdlm-ckpt", *WRITABLE),
                   help="unmask: config.json + model.safetensors + tokenizer + model card (default); mdlm-hf: "
                   "the kuleshov-group/mdlm-owt layout; mdlm-ckpt: a Lightning-layout .ckpt; llada, dream, qwen2, "
                   "llama, smdm: the released layouts of those models (Llama-backbone models)")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--metrics", help="an `unmask eval --json` result whose figures go into the model card")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("convert", help="make a Hugging Face causal LM (GPT-2, Llama, Qwen2) a masked diffusion "
                       "model (A2D)")
    p.add_argument("model", help="a local folder (or hub id) of a GPT-2, Llama or Qwen2 causal LM")
    p.add_argument("out", help="output folder (unmask's format)")
    p.add_argument("--no-shift", action="store_true", help="each position predicts itself instead of the next "
                   "(default: Dream's shift, position i scored by the output at i - 1)")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("serve", help="HTTP completions API with streaming, and a page that shows the canvas unmask")
    p.add_argument("checkpoint", help=model_help)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.add_argument("--model-precision", default="fp32", choices=("fp32", "bf16", "auto"),
                   help="network precision (fp32: bit-reproducible samples)")
    p.add_argument("--quantize", default="none", choices=QUANTIZE_SCHEMES, help=QUANTIZE_HELP)
    p.add_argument("--scheduling", default="step", choices=("step", "request", "serial"),
                   help="step: continuous batching (requests join and leave between denoising steps); request: "
                   "requests of one shape batched within --batch-window-ms, run to the end; serial: one at a time")
    p.add_argument("--max-batch-rows", type=int, default=32, help="rows decoded together (per step or batch)")
    p.add_argument("--max-step-tokens", type=int, default=8192,
                   help="step scheduling: canvas positions decoded together per step (rows x length)")
    p.add_argument("--cache-budget-bytes", type=int, default=1 << 30,
                   help="bytes the queued and running requests' caches may reserve (429 beyond it)")
    p.add_argument("--prefix-cache-bytes", type=int, default=1 << 28,
                   help="keys and values of prompt prefixes (causal and block diffusion) kept for reuse across "
                   "requests (0: none)")
    p.add_argument("--max-likelihood-rows", type=int, default=4096,
                   help="largest likelihood request (echo with logprobs), in network rows")
    p.add_argument("--mc-samples", type=int, default=32,
                   help="Monte-Carlo draws of a diffusion model's likelihood bound (a request's mc_samples wins)")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="request scheduling: how long the worker waits for more requests of the same shape")
    p.add_argument("--max-pending", type=int, default=64, help="queued or running requests before 429")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request before 504")
    p.add_argument("--max-n", type=int, default=8, help="largest n (samples) per request")
    p.add_argument("--max-steps", type=int, default=4096, help="largest number of sampling steps per request")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 beyond it)")
    p.add_argument("--max-stream-lag", type=int, default=64,
                   help="canvases a slow streaming client may fall behind before intermediate ones are skipped")
    p.add_argument("--name", help="the model's id in the API (default: the name of its folder)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("scaling", help="IsoFLOP sweep (sizes x budgets x families), fits and plots; resumable")
    p.add_argument("config", help="YAML path or packaged config name: the data and training settings")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--sizes", required=True, help="comma-separated HIDDENxBLOCKS, e.g. 64x2,96x3,128x4,192x4")
    p.add_argument("--budgets", required=True, help="comma-separated compute budgets in FLOPs, e.g. 1e12,3e12,1e13")
    p.add_argument("--families", default="mdlm,ar", help="mdlm, ar or both (default)")
    p.add_argument("--out", required=True, help="folder for records.jsonl, fits.json, the plot and the runs")
    p.add_argument("--eval-sequences", type=int, default=256, help="validation rows scored per run")
    p.set_defaults(func=cmd_scaling)
    p = sub.add_parser("rl", help="GRPO / Co-GRPO fine-tuning of a masked diffusion model on a reward")
    p.add_argument("checkpoint", help=model_help)
    p.add_argument("overrides", nargs="*", help="rl.*, sample.*, data.* and run_dir=... overrides")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.set_defaults(func=cmd_rl)
    p = sub.add_parser("task", help="write a verifiable task's files (star-graph path finding, sorting, multi-step "
                                    "arithmetic)")
    p.add_argument("name", choices=("star-graph", "sorting", "arithmetic"))
    p.add_argument("--variant", default="easy", choices=tuple(STAR_VARIANTS), help="star graphs")
    p.add_argument("--length", type=int, default=8, help="sorting: characters per sequence")
    p.add_argument("--alphabet", default="abcdefghijklmnop", help="sorting: the characters, in their order")
    p.add_argument("--operands", type=int, default=4, help="arithmetic: numbers per chain")
    p.add_argument("--digits", type=int, default=2, help="arithmetic: digits of each number, at most")
    p.add_argument("--digit-order", choices=DIGIT_ORDERS, default="lsd",
                   help="arithmetic: lsd writes every number units first (what small models learn), msd as usual")
    p.add_argument("--out", required=True, help="folder for train/valid/test.jsonl and task.json")
    p.add_argument("--train", type=int, default=50_000)
    p.add_argument("--valid", type=int, default=500)
    p.add_argument("--test", type=int, default=2_000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_task)
    p = sub.add_parser("plan", help="the memory each training process needs (weights, gradients, AdamW, EMA, "
                                    "activations) and the GPUs it fits on")
    p.add_argument("config", nargs="?", help="YAML file or packaged config name (see 'unmask configs')")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--world", type=int, nargs="+", default=[1], help="numbers of processes to plan for")
    p.add_argument("--compare", action="store_true", help="also FSDP, activation checkpointing and LoRA")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="the processes' device")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("quickstart", help="train a small model on the shipped corpus, evaluate and sample")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the quickstart config")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    p.set_defaults(func=cmd_quickstart)
    p = sub.add_parser("config", help="every config key with its type, default, meaning and allowed values")
    p.add_argument("prefix", nargs="?", help="only keys starting with this (e.g. train. or sample.)")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("configs", help="list the packaged configs")
    p.set_defaults(func=cmd_configs)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments) and run the command; the exit status (a user error is
    printed as one line, status 2)."""
    parser = build_parser()
    # argparse stops filling the positional overrides at the first option, so the overrides after
    # it (`unmask train a=1 --fresh b=2`) come back as extras: they are overrides too.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides.extend(extra)
    if getattr(args, "config", None) and "=" in args.config:  # `unmask train key=value ...`
        args.overrides.insert(0, args.config)
        args.config = None
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        # one line, even when a message quotes a multi-line parser error (malformed YAML)
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"unmask: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unmask: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`unmask config | head`): nothing left to say
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
