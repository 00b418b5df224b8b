"""The reference side of ``reference_peers.py``: decodes with the references' own code (local checkouts) in
their own environment (Fast-dLLM pins transformers 4.49) and imports nothing of unmask.

    python reference_worker.py --fast-dllm DIR --llada DIR --bd3lms DIR --folder MODEL --case '{...}' \
        --prompt '[[...]]'

Prints one JSON line: the median CPU seconds of ``--repeats`` calls after a warm-up, the generated tokens
and the NFE.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch


def timed(call, repeats: int) -> dict:
    """One warm-up call, then ``repeats`` timed by the process's CPU time; ``call()`` -> (tokens, nfe)."""
    with torch.no_grad():
        tokens, nfe = call()
        times = []
        for _ in range(repeats):
            start = time.process_time()
            call()
            times.append(time.process_time() - start)
    return {"seconds": statistics.median(times), "tokens": tokens.tolist(), "nfe": None if nfe is None else int(nfe),
            "generated": tokens.numel()}


def load_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NfeCounter:
    """Counts a model's forward calls (Dream's samplers do not report their NFE)."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        model.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def install_bd3lms_stand_ins() -> None:
    """The three import-time stand-ins the reference vectors used for bd3lms' ``diffusion.py`` (their README):
    an empty ``dataloader`` (the real one needs ``datasets`` and the network), a ``timm.scheduler`` placeholder
    (imported by ``utils.py`` for training) and a ``metrics.Metrics`` that does nothing (its constructor
    downloads GPT-2's tokenizer). None of them is on the sampling path. Lightning (and through it transformers)
    is imported first: they probe for an installed ``timm`` when imported, and must find none."""
    import lightning  # noqa: F401

    timm, scheduler, metrics = (types.ModuleType(n) for n in ("timm", "timm.scheduler", "metrics"))
    scheduler.CosineLRScheduler = type("CosineLRScheduler", (), {})
    timm.scheduler = scheduler
    metrics.Metrics = type("Metrics", (), {"__init__": lambda self, *a, **k: None})
    sys.modules.update({"dataloader": types.ModuleType("dataloader"), "timm": timm, "timm.scheduler": scheduler,
                        "metrics": metrics})


def bd3lms_call(case: dict, bd3lms: Path, folder: Path, prompt: torch.Tensor):
    """bd3lms' ``Diffusion._semi_ar_sampler`` (its default sampling settings: first-hitting, no KV cache, one
    row) with ``algo`` bd3lm (blocks of ``block_size``) or mdlm (one block), on unmask's DiT weights (the same
    key names); the row starts with BOS, as the reference's sampler always does."""
    import numpy as np
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    install_bd3lms_stand_ins()
    sys.path.insert(0, str(bd3lms))
    import diffusion

    meta = json.loads((folder / "config.json").read_text())
    model, kwargs = meta["run_config"]["model"], case["kwargs"]
    bd3 = kwargs["algo"] == "bd3lm"
    config = OmegaConf.create({
        "mode": "sample_eval", "block_size": model["block_size"] if bd3 else model["length"],
        "model": {"type": "ddit", "hidden_size": model["hidden"], "cond_dim": model["cond_dim"],
                  "length": model["length"], "n_blocks": model["blocks"], "n_heads": model["heads"],
                  "dropout": 0.0, "tie_word_embeddings": False, "attn_backend": "sdpa"},
        "algo": {"name": kwargs["algo"], "backbone": "dit", "parameterization": "subs", "time_conditioning": False,
                 "T": 0, "causal_attention": False, "dropout": 0.0, "ignore_bos": True, "cross_attn": bd3,
                 "var_min": bd3, "sampler": "semi_ar", "mdlm_loss_scale": False},
        "noise": {"type": "loglinear"}, "loader": {"eval_batch_size": 1},
        "sampling": {"first_hitting": True, "kv_cache": False, "nucleus_p": 1.0, "var_length": False},
        "training": {"ema": 0, "antithetic_sampling": True, "sampling_eps_min": 1e-3, "sampling_eps_max": 1.0}})
    # the tokenizer's vocabulary has no mask token: bd3lms appends the mask as the last id, which is where
    # unmask's word tokenizer has it
    vocab = meta["vocab_size"]
    tokenizer = types.SimpleNamespace(vocab_size=vocab - 1, mask_token=None, bos_token_id=int(prompt[0, 0]))
    lm = diffusion.Diffusion(config, tokenizer).eval()
    lm.backbone.load_state_dict(load_file(str(folder / "model.safetensors")))
    block = config.block_size

    def call():
        torch.manual_seed(0)
        np.random.seed(0)
        x, nfe = lm._semi_ar_sampler(n_samples=1, num_steps=block, num_strides=model["length"] // block,
                                     seqlen=model["length"])
        return x[:, 1:], nfe
    return call


def reference_call(case: dict, fast_dllm: Path, llada: Path, bd3lms: Path | None, folder: Path,
                   prompt: torch.Tensor):
    """A function decoding ``prompt`` with the reference's code for ``case`` -> (generated tokens, nfe)."""
    repo, function = case["function"].split(":")
    kwargs = case["kwargs"]
    if repo == "bd3lms":
        return bd3lms_call(case, bd3lms, folder, prompt)
    mask_id = json.loads((folder / "config.json").read_text())["mask_token_id"]
    if case["layout"] == "llada":
        sys.path.insert(0, str(fast_dllm / "llada"))
        from model.modeling_llada import LLaDAModelLM  # the copy Fast-dLLM vendors (LLaDA's repo has none)

        model = LLaDAModelLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
        source = llada / "generate.py" if repo == "llada" else fast_dllm / "llada" / "generate.py"
        decode = getattr(load_file(source, f"reference_{repo}_generate"), function)
        counter = NfeCounter(model)

        def call():  # Fast-dLLM's functions return (tokens, nfe), LLaDA's the tokens: its calls are counted
            counter.calls = 0
            out = decode(model, prompt, mask_id=mask_id, **kwargs)
            tokens, nfe = out if isinstance(out, tuple) else (out, counter.calls)
            return tokens[:, prompt.shape[1]:], nfe
        return call
    sys.path.insert(0, str(fast_dllm / "dream"))
    from model.modeling_dream import DreamModel

    model = DreamModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    if repo == "dream-block":  # bound onto the model as Fast-dLLM's dream/eval.py does
        from model.generation_utils_block import DreamGenerationMixin

        model.diffusion_generate = types.MethodType(DreamGenerationMixin.diffusion_generate, model)
        model._sample = types.MethodType(DreamGenerationMixin._sample, model)
    counter = NfeCounter(model)

    def call():
        counter.calls = 0
        out = model.diffusion_generate(prompt, mask_token_id=mask_id, return_dict_in_generate=True, top_p=None,
                                       top_k=None, **kwargs)
        return out.sequences[:, prompt.shape[1]:], counter.calls
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast-dllm", required=True)
    parser.add_argument("--llada", required=True)
    parser.add_argument("--bd3lms", help="a checkout of kuleshov-group/bd3lms (its diffusion.py and models/)")
    parser.add_argument("--folder", required=True, help="the model in its released layout")
    parser.add_argument("--case", required=True, help="JSON: layout, function (repo:name) and its keywords")
    parser.add_argument("--prompt", required=True, help="JSON: the prompt rows' token ids")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    prompt = torch.tensor(json.loads(args.prompt))
    call = reference_call(json.loads(args.case), Path(args.fast_dllm), Path(args.llada),
                          args.bd3lms and Path(args.bd3lms), Path(args.folder), prompt)
    print(json.dumps(timed(call, args.repeats)))


if __name__ == "__main__":
    main()
