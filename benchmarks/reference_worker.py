"""The reference side of ``reference_peers.py``: decodes with the references' own code (local checkouts) in
their own environment (Fast-dLLM pins transformers 4.49, SDAR's model 4.52.4, dllm 4.57) and imports nothing
of unmask.

    python reference_worker.py --fast-dllm DIR --llada DIR --bd3lms DIR --sdar DIR --dllm DIR --folder MODEL \
        --case '{...}' --prompt '[[...]]'

(only the checkouts that the case reads are needed). Prints one JSON line: the median CPU seconds of
``--repeats`` calls after a warm-up, the generated tokens and the NFE of the warm-up, and the NFE and tokens
of the last timed call.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch


def timed(call, repeats: int) -> dict:
    """One warm-up call, then ``repeats`` timed by the process's CPU time; ``call()`` -> (tokens, nfe). The
    tokens and NFE of the warm-up are returned, and those of the last timed call (``last_tokens``,
    ``last_nfe``: a caller whose timed calls differ from its warm-up checks them too)."""
    with torch.no_grad():
        tokens, nfe = call()
        times, last = [], (tokens, nfe)
        for _ in range(repeats):
            start = time.process_time()
            last = call()
            times.append(time.process_time() - start)
    return {"seconds": statistics.median(times), "tokens": tokens.tolist(), "nfe": None if nfe is None else int(nfe),
            "generated": tokens.numel(), "last_tokens": last[0].tolist(),
            "last_nfe": None if last[1] is None else int(last[1])}


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


def load_package(folder: Path, name: str, stubs: dict[str, types.ModuleType] | None = None) -> types.ModuleType:
    """``folder`` imported as a package ``name`` (its modules' relative imports then work) without running
    anything above it (dllm's own ``__init__`` imports its training stack); ``stubs``: submodules given
    instead of the files."""
    init = folder / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
    else:  # a namespace of modules (SDAR's model folder)
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    for sub, module in (stubs or {}).items():
        sys.modules[f"{name}.{sub}"] = module
    if spec.loader is not None:
        spec.loader.exec_module(package)
    return package


def install_sdar_stand_ins() -> types.ModuleType:
    """The stand-ins the reference vectors used for SDAR's ``modeling_sdar.py`` (their README, section 2): its
    module-level import of flash-attn's Triton ``rms_norm_fn``, computed as documented in float32
    (``w * x / sqrt(mean(x^2) + eps)``), and ``flash_attn_func``, which the eval path calls whenever the mask is
    all True (every decoding call), as attention without a mask with grouped-query heads
    (``scaled_dot_product_attention``, flash-attn's layout [B, L, H, D]). Returns the placeholder for the
    training-only (Triton) ``fused_linear_diffusion_cross_entropy``, never called in eval mode."""
    import torch.nn.functional as F

    def rms_norm_fn(x, weight, bias=None, eps=1e-6, **_):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) * weight.float()
        return (out if bias is None else out + bias).to(x.dtype)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=softmax_scale, enable_gqa=True)
        return out.transpose(1, 2)

    names = ("flash_attn", "flash_attn.ops", "flash_attn.ops.triton", "flash_attn.ops.triton.layer_norm",
             "flash_attn.bert_padding")
    modules = {n: types.ModuleType(n) for n in names}
    for n, module in modules.items():  # transformers probes for flash-attn with find_spec: it finds no version
        module.__spec__ = importlib.machinery.ModuleSpec(n, None, is_package=True)
    modules["flash_attn"].flash_attn_func = flash_attn_func
    modules["flash_attn"].flash_attn_varlen_func = None
    modules["flash_attn.ops.triton.layer_norm"].rms_norm_fn = rms_norm_fn
    for n in ("index_first_axis", "pad_input", "unpad_input"):
        setattr(modules["flash_attn.bert_padding"], n, None)
    sys.modules.update(modules)
    fused = types.ModuleType("fused_linear_diffusion_cross_entropy")
    fused.FusedLinearDiffusionCrossEntropyLoss = type("FusedLinearDiffusionCrossEntropyLoss", (torch.nn.Module,), {})
    return fused


def sdar_call(case: dict, sdar: Path, folder: Path, prompt: torch.Tensor):
    """SDAR's ``block_diffusion_generate`` (its ``generate.py``) on its ``SDARForCausalLM``
    (``training/model/SDAR-4B-Chat/modeling_sdar.py``, with :func:`install_sdar_stand_ins`), one row;
    ``torch.manual_seed(0)`` before every call, so that each call draws the same. Returns the canvas after the
    prompt (whole blocks) and the number of model calls."""
    fused = install_sdar_stand_ins()
    load_package(sdar / "training" / "model" / "SDAR-4B-Chat", "sdar_reference",
                 {"fused_linear_diffusion_cross_entropy": fused})
    from sdar_reference.modeling_sdar import SDARForCausalLM

    model = SDARForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    decode = load_file(sdar / "generate.py", "reference_sdar_generate").block_diffusion_generate
    mask_id = json.loads((folder / "config.json").read_text())["mask_token_id"]
    counter = NfeCounter(model)

    def call():
        torch.manual_seed(0)
        counter.calls = 0
        x = decode(model, {"input_ids": prompt}, mask_id, **case["kwargs"])
        return x[:, prompt.shape[1]:], counter.calls
    return call


def bfloat16_masks_to_query_dtype() -> None:
    """The one change the reference vectors made around LLaDA2's ``generate`` (their README, section 2): it builds
    its additive block mask in bfloat16, which ``scaled_dot_product_attention`` refuses for a float32 model;
    the mask (0 and -inf, exact in both) is cast to the query's dtype."""
    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention

    def cast(query, key, value, attn_mask=None, *args, **kwargs):
        if attn_mask is not None and attn_mask.dtype == torch.bfloat16 and query.dtype != torch.bfloat16:
            attn_mask = attn_mask.to(query.dtype)
        return sdpa(query, key, value, attn_mask, *args, **kwargs)
    F.scaled_dot_product_attention = torch.nn.functional.scaled_dot_product_attention = cast


def llada2_call(case: dict, dllm: Path, folder: Path, prompt: torch.Tensor):
    """LLaDA2.1's ``generate`` (dllm's ``dllm/pipelines/llada21/models/modeling_llada21_moe.py``, the model's
    own method) with SDPA attention (:func:`bfloat16_masks_to_query_dtype`), one row. It calls
    ``self.forward`` directly, so its calls are counted by wrapping the bound ``forward``. Returns what it
    returns (the generated tokens up to the first EOS) and the number of model calls."""
    bfloat16_masks_to_query_dtype()
    load_package(dllm / "dllm" / "pipelines" / "llada21" / "models", "llada21_reference")
    from llada21_reference.modeling_llada21_moe import LLaDA2MoeModelLM

    model = LLaDA2MoeModelLM.from_pretrained(str(folder), torch_dtype=torch.float32,
                                             attn_implementation="sdpa").eval()
    meta = json.loads((folder / "config.json").read_text())
    forward, calls = model.forward, [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)
    model.forward = counted

    def call():
        calls[0] = 0
        out = model.generate(prompt, eos_id=meta["eos_token_id"], mask_id=meta["mask_token_id"], **case["kwargs"])
        return out, calls[0]
    return call


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


def reference_call(case: dict, checkouts: dict[str, Path | None], folder: Path, prompt: torch.Tensor):
    """A function decoding ``prompt`` with the reference's code for ``case`` -> (generated tokens, nfe);
    ``checkouts``: the local checkouts by flag name (fast_dllm, llada, bd3lms, sdar, dllm)."""
    repo, function = case["function"].split(":")
    kwargs = case["kwargs"]
    fast_dllm, llada = checkouts["fast_dllm"], checkouts["llada"]
    if repo == "bd3lms":
        return bd3lms_call(case, checkouts["bd3lms"], folder, prompt)
    if repo == "sdar":
        return sdar_call(case, checkouts["sdar"], folder, prompt)
    if repo == "dllm":
        return llada2_call(case, checkouts["dllm"], folder, prompt)
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
    parser.add_argument("--fast-dllm", help="a checkout of NVlabs/Fast-dLLM (the llada, fast-dllm and dream cases)")
    parser.add_argument("--llada", help="a checkout of ML-GSAI/LLaDA (the llada case)")
    parser.add_argument("--bd3lms", help="a checkout of kuleshov-group/bd3lms (its diffusion.py and models/)")
    parser.add_argument("--sdar", help="a checkout of JetAstra/SDAR (its generate.py and training/model/)")
    parser.add_argument("--dllm", help="a checkout of ZHZisZZ/dllm (its dllm/pipelines/llada21/models/)")
    parser.add_argument("--folder", required=True, help="the model in its released layout")
    parser.add_argument("--case", required=True, help="JSON: layout, function (repo:name) and its keywords")
    parser.add_argument("--prompt", required=True, help="JSON: the prompt rows' token ids")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    prompt = torch.tensor(json.loads(args.prompt))
    checkouts = {k: getattr(args, k) and Path(getattr(args, k))
                 for k in ("fast_dllm", "llada", "bd3lms", "sdar", "dllm")}
    call = reference_call(json.loads(args.case), checkouts, Path(args.folder), prompt)
    print(json.dumps(timed(call, args.repeats)))


if __name__ == "__main__":
    main()
