"""Open-weight diffusion LLMs in their released layouts: LLaDA, Dream, and Hugging Face Llama/Qwen2.

A folder holds ``config.json``, the weights (``model.safetensors``, or shards listed in
``model.safetensors.index.json``) and the tokenizer (``tokenizer.json``, ``tokenizer_config.json``
with its chat template). :func:`read_open_weights` reads the config and the tokenizer; the weights are
read only when the model is built (:meth:`OpenWeights.build`): the network is made on the meta device in
the checkpoint's dtype and each tensor is assigned as it is read, one at a time, so an 8B bf16
checkpoint needs its 16 GB once, never an fp32 copy.

One :class:`Layout` per released format says how its ``config.json`` maps to :class:`ModelConfig` and
its parameter names to the backbone's (:mod:`unmask.models.llama`, which uses Llama/Qwen2 names):

* ``llada`` (``model_type: llada``, LLaDA-8B and LLaDA-1.5): ``model.transformer.blocks.{i}.{q_proj,
  k_proj, v_proj, attn_out, ff_proj, up_proj, ff_out, attn_norm, ff_norm}``, ``wte``, ``ln_f``, ``ff_out``
  (``ff_proj`` is the SwiGLU gate, block ``ff_out`` the down projection); predicts in place.
* ``dream`` (``model_type: Dream``): Qwen2 names; position ``i`` is scored by the logit at ``i - 1``.
* ``qwen2`` / ``llama`` (causal LMs of ``transformers``): the source of an AR-to-diffusion conversion.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig, RunConfig, config_from_dict
from ..data.tokenization import HFTokenizer
from ..families import family_of
from ..files import member, read_json
from ..models.llama import swiglu_width
from ..runtime import memory_bytes
from .checkpoint import CheckpointError, WeightSource

INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Layout:
    """A released checkpoint format: ``renames`` pairs (theirs, ours) of parameter names with ``{i}``
    for the block number; ``model`` maps ``config.json`` to :class:`ModelConfig` fields."""

    name: str
    model_types: tuple[str, ...]
    renames: tuple[tuple[str, str], ...]
    model: Callable[[dict], dict]
    config_json: Callable[[ModelConfig], dict] = lambda m: {}  # ModelConfig -> the layout's config.json fields
    causal: bool = False
    bos_prompt: bool = False  # prompts start with BOS (LLaDA's tokenizer adds it; Qwen2's does not)
    sample: tuple[tuple[str, object], ...] = ()  # the sample.* defaults the model's own repository uses

    def _compiled(self, forward: bool) -> list[tuple[re.Pattern, str]]:
        out = []
        for theirs, ours in self.renames:
            src, dst = (theirs, ours) if forward else (ours, theirs)
            out.append((re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + "$"), dst))
        return out

    def to_ours(self, key: str) -> str | None:
        """Our name of the checkpoint's parameter ``key`` (None: not a parameter of this layout)."""
        for pattern, dst in self._compiled(True):
            m = pattern.match(key)
            if m:
                return dst.replace("{i}", m.group(1)) if m.groups() else dst
        return None

    def to_theirs(self, key: str) -> str:
        for pattern, dst in self._compiled(False):
            m = pattern.match(key)
            if m:
                return dst.replace("{i}", m.group(1)) if m.groups() else dst
        raise CheckpointError(f"parameter {key!r} has no name in the {self.name} layout")


def _require(config: dict, source: str, **expected) -> None:
    for key, allowed in expected.items():
        value = config.get(key)
        if value not in allowed:
            raise CheckpointError(f"{source}: {key}={value!r} is not supported (supported: {allowed})")


def _int(config: dict, key: str, source: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CheckpointError(f"{source}: {key} must be a non-negative integer, got {value!r}")
    return value


def _llada_model(c: dict) -> dict:
    src = "LLaDA config.json"
    _require(c, src, block_type=("llama",), layer_norm_type=("rms",), activation_type=("silu",),
             rope=(True,), alibi=(False, None), scale_logits=(False, None), input_emb_norm=(False, None),
             attention_layer_norm=(False, None), include_bias=(False, None))
    heads = _int(c, "n_heads", src)
    return dict(hidden=_int(c, "d_model", src), heads=heads, kv_heads=_int(c, "n_kv_heads", src, heads) or heads,
                blocks=_int(c, "n_layers", src), intermediate=_int(c, "mlp_hidden_size", src),
                vocab=_int(c, "embedding_size", src, c.get("vocab_size")), length=_int(c, "max_sequence_length", src),
                rope_base=float(c.get("rope_theta", 10000.0)), norm_eps=float(c.get("rms_norm_eps", 1e-5)),
                qkv_bias=bool(c.get("include_qkv_bias", False)), tie_embeddings=bool(c.get("weight_tying", False)),
                logit_shift=False)


def _rope_theta(c: dict, src: str) -> float:
    """``rope_theta`` of a ``transformers`` 4 config, or ``rope_parameters`` of a version 5 one; only plain
    rotary positions (no scaling) are supported."""
    _require(c, src, rope_scaling=(None,), use_sliding_window=(False, None))
    params = c.get("rope_parameters") or {}
    if not isinstance(params, dict) or params.get("rope_type", "default") != "default":
        raise CheckpointError(f"{src}: rope_parameters={params!r} is not supported (plain rotary positions only)")
    theta = c.get("rope_theta", params.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 1:
        raise CheckpointError(f"{src}: rope_theta must be a number above 1, got {theta!r}")
    return float(theta)


def _qwen2_model(c: dict, shift: bool, bias: bool | None = None) -> dict:
    src = "config.json"
    _require(c, src, hidden_act=("silu",))
    heads = _int(c, "num_attention_heads", src)
    hidden = _int(c, "hidden_size", src)
    if c.get("head_dim") not in (None, hidden // max(heads, 1)):
        raise CheckpointError(f"{src}: head_dim={c['head_dim']} differs from hidden_size / num_attention_heads")
    return dict(hidden=hidden, heads=heads, kv_heads=_int(c, "num_key_value_heads", src, heads) or heads,
                blocks=_int(c, "num_hidden_layers", src), intermediate=_int(c, "intermediate_size", src),
                vocab=_int(c, "vocab_size", src), length=_int(c, "max_position_embeddings", src),
                rope_base=_rope_theta(c, src), norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                qkv_bias=bool(c.get("attention_bias", False)) if bias is None else bias,
                tie_embeddings=bool(c.get("tie_word_embeddings", False)), logit_shift=shift)


def _llada_json(m: ModelConfig) -> dict:
    return {"architectures": ["LLaDAModelLM"], "d_model": m.hidden, "n_heads": m.heads,
            "n_kv_heads": m.kv_heads or m.heads, "n_layers": m.blocks, "mlp_hidden_size": m.intermediate,
            "embedding_size": m.vocab, "max_sequence_length": m.length,
            "rope_theta": m.rope_base, "rms_norm_eps": m.norm_eps,
            "include_qkv_bias": m.qkv_bias, "weight_tying": m.tie_embeddings, "block_type": "llama",
            "layer_norm_type": "rms", "activation_type": "silu", "rope": True, "alibi": False, "include_bias": False,
            "scale_logits": False, "input_emb_norm": False, "attention_layer_norm": False}


def _qwen2_json(architecture: str) -> Callable[[ModelConfig], dict]:
    def fields_(m: ModelConfig) -> dict:
        return {"architectures": [architecture], "hidden_size": m.hidden, "num_attention_heads": m.heads,
                "num_key_value_heads": m.kv_heads or m.heads, "num_hidden_layers": m.blocks,
                "intermediate_size": m.intermediate, "vocab_size": m.vocab, "max_position_embeddings": m.length,
                "rope_theta": m.rope_base, "rms_norm_eps": m.norm_eps, "hidden_act": "silu", "rope_scaling": None,
                "tie_word_embeddings": m.tie_embeddings, "attention_bias": m.qkv_bias}
    return fields_


_HF_NAMES = tuple((n, n) for n in (
    "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
    *(f"model.layers.{{i}}.self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")),
    "model.layers.{i}.self_attn.o_proj.weight", "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.post_attention_layernorm.weight",
    *(f"model.layers.{{i}}.mlp.{p}_proj.weight" for p in ("gate", "up", "down"))))

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("llada", ("llada",), (
        ("model.transformer.wte.weight", "model.embed_tokens.weight"),
        ("model.transformer.ln_f.weight", "model.norm.weight"),
        ("model.transformer.ff_out.weight", "lm_head.weight"),
        *((f"model.transformer.blocks.{{i}}.{p}_proj.{w}", f"model.layers.{{i}}.self_attn.{p}_proj.{w}")
          for p in "qkv" for w in ("weight", "bias")),
        ("model.transformer.blocks.{i}.attn_out.weight", "model.layers.{i}.self_attn.o_proj.weight"),
        ("model.transformer.blocks.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
        ("model.transformer.blocks.{i}.ff_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
        ("model.transformer.blocks.{i}.ff_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),
        ("model.transformer.blocks.{i}.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
        ("model.transformer.blocks.{i}.ff_out.weight", "model.layers.{i}.mlp.down_proj.weight")),
        _llada_model, _llada_json, bos_prompt=True,
        sample=(("sampler", "llada"), ("steps", 128), ("block_length", 32), ("temperature", 0.0))),
    Layout("dream", ("Dream", "dream"), _HF_NAMES, lambda c: _qwen2_model(c, shift=True, bias=True),
           _qwen2_json("DreamModel"),
           sample=(("sampler", "dream"), ("score", "entropy"), ("steps", 128), ("temperature", 0.2),
                   ("top_p", 0.95))),
    Layout("qwen2", ("qwen2",), _HF_NAMES, lambda c: _qwen2_model(c, shift=False, bias=True),
           _qwen2_json("Qwen2ForCausalLM"), causal=True),
    Layout("llama", ("llama",), _HF_NAMES, lambda c: _qwen2_model(c, shift=False), _qwen2_json("LlamaForCausalLM"),
           causal=True),
)}


def layout_of(config: dict) -> Layout | None:
    """The layout a ``config.json`` describes (by its ``model_type``), or None."""
    kind = config.get("model_type")
    return next((layout for layout in LAYOUTS.values() if kind in layout.model_types), None)


class OpenWeights(WeightSource):
    """A released open-weight folder: ``config`` (RunConfig), ``tokenizer``, ``layout``; weights read
    lazily by :meth:`build` or :meth:`tensors`."""

    def __init__(self, folder: Path, layout: Layout, config: RunConfig, tokenizer: HFTokenizer, meta: dict,
                 root: Path | None = None):
        self.path, self.layout, self.config, self.tokenizer, self.meta = folder, layout, config, tokenizer, meta
        self.step, self.format, self.card, self._root = 0, layout.name, {}, root
        self.dtype = _DTYPES.get(str(meta.get("torch_dtype", meta.get("dtype", "float32"))), torch.float32)

    def shards(self) -> dict[str, list[str]]:
        """Shard file -> the checkpoint keys it holds (one ``model.safetensors``, or the index's map)."""
        index = member(self.path, INDEX, self._root)
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index} has no weight_map of parameter names to shard files")
            out: dict[str, list[str]] = {}
            for key, shard in weight_map.items():
                out.setdefault(shard, []).append(key)
            return out
        single = member(self.path, "model.safetensors", self._root)
        if not single.is_file():
            raise CheckpointError(f"{self.path} has neither model.safetensors nor {INDEX}")
        with safe_open(str(single), "pt") as f:
            return {"model.safetensors": list(f.keys())}

    def tensors(self):
        """(our name, tensor) of every parameter, read one at a time in the checkpoint's dtype."""
        for shard, keys in self.shards().items():
            path = member(self.path, shard, self._root)
            if not path.is_file():
                raise CheckpointError(f"shard {shard} listed in {INDEX} is missing from {self.path}")
            try:
                with safe_open(str(path), "pt") as f:
                    present = set(f.keys())
                    for key in keys:
                        if key not in present:
                            raise CheckpointError(f"{path.name} does not hold {key!r} as its index says")
                        ours = self.layout.to_ours(key)
                        if ours is None:
                            raise CheckpointError(f"{path.name}: parameter {key!r} is not part of the "
                                                  f"{self.layout.name} layout")
                        yield ours, f.get_tensor(key)
            except (OSError, ValueError, RuntimeError) as exc:
                if isinstance(exc, CheckpointError):
                    raise
                raise CheckpointError(f"unreadable weights file {path}: {str(exc).splitlines()[0]}") from None

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        return dict(self.tensors())

    def ema_state(self) -> None:
        return None

    def build(self, ema: bool = True, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        """The network with the folder's weights, in ``dtype`` (default: the checkpoint's own, bf16 for
        the released models), made on the meta device and filled tensor by tensor, so the weights are
        in memory once. ``ema`` is accepted for the common interface (released weights have no EMA)."""
        dtype = dtype or self.dtype
        with torch.device("meta"):
            model = family_of(self.config).network(self.config, self.tokenizer).to(dtype)
        needed = sum(t.numel() for t in model.parameters()) * dtype.itemsize
        if torch.device(device).type == "cpu" and needed > memory_bytes():
            raise CheckpointError(f"{self.path}: the weights need {needed / 2**30:,.1f} GiB in {dtype}; this "
                                  f"machine has {memory_bytes() / 2**30:,.1f} GiB")
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        seen = set()
        for name, tensor in self.tensors():
            if name not in expected:
                raise CheckpointError(f"{self.path}: {name!r} has no place in a model of this config")
            if name in ("model.embed_tokens.weight", "lm_head.weight") and self.tokenizer.appended_mask and \
                    tuple(tensor.shape) == (expected[name][0] - 1, expected[name][1]):
                # a causal LM without a mask token: unmask's tokenizer appended one; its row is the mean
                # embedding (input) and zero (output: excluded by every sampler and loss anyway)
                extra = tensor.mean(0, keepdim=True) if name == "model.embed_tokens.weight" else tensor[:1] * 0
                tensor = torch.cat([tensor, extra])
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointError(f"{self.path}: {name!r} has shape {tuple(tensor.shape)}, the config says "
                                      f"{expected[name]}")
            if not torch.isfinite(tensor).all():
                raise CheckpointError(f"{self.path}: {name!r} holds NaN or infinite values")
            # a copy in memory of its own: safetensors hands out views of the file (which must not change
            # under a loaded model), and a read-once copy keeps at most one shard mapped at a time
            model.load_state_dict({name: tensor.to(device=device, dtype=dtype, copy=True)}, strict=False, assign=True)
            seen.add(name)
        tied = self.config.model.tie_embeddings
        missing = [k for k in expected if k not in seen and not (tied and k == "lm_head.weight")]
        if missing:
            raise CheckpointError(f"{self.path} lacks {len(missing)} parameters of the model, e.g. "
                                  f"{self.layout.to_theirs(missing[0])!r}")
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.rotary_emb.reset(device)
        return model


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _tokenizer(folder: Path, meta: dict, root: Path | None) -> HFTokenizer:
    """The folder's ``tokenizer.json`` with the special ids the model's config states, and the chat
    template of ``tokenizer_config.json``."""
    path = member(folder, "tokenizer.json", root)
    if not path.is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json")
    extra = member(folder, "tokenizer_config.json", root)
    tk_config = read_json(extra) if extra.is_file() else {}
    template = tk_config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    ids = {"bos": meta.get("bos_token_id"), "eos": meta.get("eos_token_id"), "pad": meta.get("pad_token_id"),
           "mask": meta.get("mask_token_id")}
    return HFTokenizer.from_file(path, ids=ids, chat_template=template if isinstance(template, str) else None)


def read_open_weights(folder: Path, meta: dict, root: Path | None = None) -> OpenWeights | None:
    """The open-weight folder whose ``config.json`` holds ``meta``, or None when its ``model_type`` is not
    one of :data:`LAYOUTS`. A bidirectional layout becomes a masked-diffusion model (family ``mdlm``,
    ``alpha_t = 1 - t`` as LLaDA and Dream train with), a causal one an ``ar`` model."""
    layout = layout_of(meta)
    if layout is None:
        return None
    tokenizer = _tokenizer(folder, meta, root)
    model = layout.model(meta)
    if model["vocab"] < tokenizer.vocab_size - int(tokenizer.appended_mask and layout.causal):
        raise CheckpointError(f"{folder}: the model has {model['vocab']} embedding rows but the tokenizer "
                              f"{tokenizer.vocab_size} ids")
    if not layout.causal and meta.get("mask_token_id") is None:
        raise CheckpointError(f"{folder}/config.json states no mask_token_id")
    tree = {"family": "ar" if layout.causal else "mdlm",
            "model": {**model, "backbone": "llama", "dropout": 0.0},
            "data": {"tokenizer": "hf", "tokenizer_path": str(folder), "length": min(model["length"], 256),
                     "frame": layout.bos_prompt},
            "sample": dict(layout.sample)}
    return OpenWeights(folder, layout, config_from_dict(tree), tokenizer, meta, root)


SHARD_BYTES = 5 * 2**30  # Hugging Face's default largest shard


def save_released(source, directory: str | Path, layout: str, weights: dict[str, torch.Tensor] | None = None,
                  shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a Llama-backbone model (``source``: any model source, or ``weights`` with its config and
    tokenizer) in a released layout: ``config.json``, safetensors shards of at most ``shard_bytes`` with
    ``model.safetensors.index.json`` (one ``model.safetensors`` when it fits), ``tokenizer.json`` and
    ``tokenizer_config.json`` (the chat template). Written beside ``directory`` and renamed into place;
    an existing non-empty ``directory`` is refused untouched."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    lay, cfg, tokenizer = LAYOUTS[layout], source.config, source.tokenizer
    m = dataclasses.replace(cfg.model, vocab=max(cfg.model.vocab, tokenizer.vocab_size),
                            intermediate=cfg.model.intermediate or swiglu_width(cfg.model.hidden))
    if m.backbone != "llama" or not isinstance(tokenizer, HFTokenizer):
        raise CheckpointError(f"the {layout} layout holds Llama-backbone models with a Hugging Face tokenizer; "
                              f"this one is {m.backbone} with a {tokenizer.kind} tokenizer (export it as 'unmask')")
    if lay.causal != (cfg.family == "ar") or (layout == "dream") != m.logit_shift or \
            (layout == "llada" and m.logit_shift):
        raise CheckpointError(f"a {cfg.family} model{' with' if m.logit_shift else ' without'} logit shift does "
                              f"not fit the {layout} layout")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise CheckpointError(f"{directory} exists and is not empty; nothing was written (choose a new folder)")
    weights = weights if weights is not None else source.weights(ema=True)
    theirs = {lay.to_theirs(k): v.detach().contiguous().cpu() for k, v in weights.items()
              if not (m.tie_embeddings and k == "lm_head.weight")}
    config = {**lay.config_json(m), "model_type": lay.model_types[0], "vocab_size": tokenizer.vocab_size
              if layout == "llada" else m.vocab, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
              "pad_token_id": tokenizer.pad_id, "torch_dtype": str(next(iter(theirs.values())).dtype).split(".")[-1]}
    if not lay.causal:
        config["mask_token_id"] = tokenizer.mask_id
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(theirs):
        nbytes = theirs[key].numel() * theirs[key].element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = theirs[key]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in theirs.values())
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    tokenizer.tk.save(str(tmp / "tokenizer.json"))
    tk_config = {"bos_token": tokenizer.piece(tokenizer.bos_id), "eos_token": tokenizer.piece(tokenizer.eos_id),
                 "pad_token": tokenizer.piece(tokenizer.pad_id)}
    if tokenizer.chat_template is not None:
        tk_config["chat_template"] = tokenizer.chat_template
    (tmp / "tokenizer_config.json").write_text(json.dumps(tk_config, indent=1) + "\n")
    if directory.exists():
        directory.rmdir()  # empty (checked above)
    os.replace(tmp, directory)
    return directory
