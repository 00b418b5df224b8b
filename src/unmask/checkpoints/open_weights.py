"""Open-weight models in their released layouts: LLaDA, Dream, SMDM, and Hugging Face GPT-2/Llama/Qwen2.

A folder holds ``config.json``, the weights (``model.safetensors``, or shards listed in
``model.safetensors.index.json``) and the tokenizer (``tokenizer.json``, ``tokenizer_config.json``
with its chat template). :func:`read_open_weights` reads the config and the tokenizer; the weights are
read only when the model is built (:meth:`OpenWeights.build`): the network is made on the meta device in
the checkpoint's dtype and each tensor is assigned as it is read, one at a time, so an 8B bf16
checkpoint needs its 16 GB once, never an fp32 copy.

One :class:`Layout` per released format says how its ``config.json`` maps to :class:`ModelConfig` and
its parameter names to the backbone's (:mod:`unmask.models.llama`, which uses Llama/Qwen2 names, or
:mod:`unmask.models.gpt2`):

* ``llada`` (``model_type: llada``, LLaDA-8B and LLaDA-1.5): ``model.transformer.blocks.{i}.{q_proj,
  k_proj, v_proj, attn_out, ff_proj, up_proj, ff_out, attn_norm, ff_norm}``, ``wte``, ``ln_f``, ``ff_out``
  (``ff_proj`` is the SwiGLU gate, block ``ff_out`` the down projection); predicts in place.
* ``dream`` (``model_type: Dream``): Qwen2 names; position ``i`` is scored by the logit at ``i - 1``.
* ``qwen2`` / ``llama`` / ``gpt2`` (causal LMs of ``transformers``): the sources of an AR-to-diffusion
  conversion (:mod:`unmask.checkpoints.conversion`); GPT-2's ``Conv1D`` weights are transposed.
* ``smdm``: SMDM's bare lit-gpt safetensors file (:func:`read_smdm`); its fused q/k/v weights are split.

``qwen2``, ``llama``, ``llada`` and ``dream`` are also written back (:func:`save_released`).
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from ..config import ConfigError, ModelConfig, RunConfig, config_from_dict
from ..data.tokenization import HFTokenizer
from ..families import family_of, refuse_beyond_memory
from ..files import member, read_json
from ..models.llama import swiglu_width
from ..runtime import memory_bytes
from .checkpoint import CheckpointError, WeightSource, check_dtype, check_header, check_weights

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
    # a tensor that needs more than a rename (SMDM's fused q/k/v, GPT-2's transposed Conv1D weights):
    # (our name, tensor, model) -> our (name, tensor) pieces
    convert: Callable[[str, torch.Tensor, ModelConfig], list[tuple[str, torch.Tensor]]] | None = None
    # its inverse, for the layouts unmask writes back: (our state, model, mask id) -> their state
    unconvert: Callable[[dict[str, torch.Tensor], ModelConfig, int], dict[str, torch.Tensor]] | None = None
    bare: bool = False  # the release is one safetensors file and a tokenizer, without config.json (SMDM)
    family: str | None = None  # the family its models are (None: ar when causal, else mdlm)
    qk_norm: bool = False  # its attention has query/key norms and heads of their own width (Qwen3)
    ignore: tuple[str, ...] = ()  # checkpoint keys that are not parameters (regular expressions)
    sample: tuple[tuple[str, object], ...] = ()  # the sample.* defaults the model's own repository uses
    # a tied copy's checkpoint key -> the key of the tensor it must equal (None: not a copy); checked, not loaded
    tied: Callable[[str], str | None] | None = None
    backbone: str = "llama"  # the network its models run on (model.backbone)
    nested: str | None = None  # the config.json entry that holds the model's fields and token ids (text_config)
    masks: bool = True  # its models have a mask token (else the tokenizer's appended mask is never an input)

    def _compiled(self, forward: bool) -> list[tuple[re.Pattern, str]]:
        """(pattern, target) per rename: ``{i}`` (the layer) and ``{e}`` (the expert) match numbers."""
        out = []
        for theirs, ours in self.renames:
            src, dst = (theirs, ours) if forward else (ours, theirs)
            pattern = re.sub(r"\\\{(\w)\\\}", r"(?P<\1>\\d+)", re.escape(src))
            out.append((re.compile("^" + pattern + "$"), dst))
        return out

    @staticmethod
    def _filled(dst: str, m: re.Match) -> str:
        return re.sub(r"\{(\w)\}", lambda slot: m.group(slot.group(1)), dst)

    def to_ours(self, key: str) -> str | None:
        """Our name of the checkpoint's parameter ``key`` (None: not a parameter of this layout)."""
        for pattern, dst in self._compiled(True):
            m = pattern.match(key)
            if m:
                return self._filled(dst, m)
        return None

    def read(self, key: str, tensor: torch.Tensor, model: ModelConfig) -> list[tuple[str, torch.Tensor]] | None:
        """Our (name, tensor) pieces of the checkpoint's ``key`` (None: not a parameter of this layout)."""
        if any(re.fullmatch(pattern, key) for pattern in self.ignore):
            return []
        ours = self.to_ours(key)
        if ours is None:
            return None
        return self.convert(ours, tensor, model) if self.convert else [(ours, tensor)]

    def to_theirs(self, key: str) -> str:
        """The layout's name of our parameter ``key`` (the inverse of :meth:`to_ours`); an error when it has none."""
        for pattern, dst in self._compiled(False):
            m = pattern.match(key)
            if m:
                return self._filled(dst, m)
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


def _number(config: dict, key: str, source: str, default: float, above: float) -> float:
    """``config[key]`` (or ``default``): a finite number above ``above`` (not a string, not a boolean)."""
    value = config.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not above < value < float("inf"):
        raise CheckpointError(f"{source}: {key} must be a number above {above:g}, got {value!r}")
    return float(value)


def _llada_model(c: dict) -> dict:
    src = "LLaDA config.json"
    _require(c, src, block_type=("llama",), layer_norm_type=("rms",), activation_type=("silu",),
             rope=(True,), alibi=(False, None), scale_logits=(False, None), input_emb_norm=(False, None),
             attention_layer_norm=(False, None), include_bias=(False, None))
    heads = _int(c, "n_heads", src)
    return dict(hidden=_int(c, "d_model", src), heads=heads, kv_heads=_int(c, "n_kv_heads", src, heads) or heads,
                blocks=_int(c, "n_layers", src), intermediate=_int(c, "mlp_hidden_size", src),
                vocab=_int(c, "embedding_size", src, c.get("vocab_size")), length=_int(c, "max_sequence_length", src),
                rope_base=_number(c, "rope_theta", src, 10000.0, 1), norm_eps=_number(c, "rms_norm_eps", src, 1e-5, 0),
                qkv_bias=bool(c.get("include_qkv_bias", False)), tie_embeddings=bool(c.get("weight_tying", False)),
                logit_shift=False)


def _rope_theta(c: dict, src: str) -> float:
    """``rope_theta`` of a ``transformers`` 4 config, or ``rope_parameters`` of a version 5 one; only plain
    rotary positions (no scaling) are supported."""
    _require(c, src, rope_scaling=(None,), use_sliding_window=(False, None))
    params = c.get("rope_parameters") or {}
    if not isinstance(params, dict) or params.get("rope_type", "default") != "default":
        raise CheckpointError(f"{src}: rope_parameters={params!r} is not supported (plain rotary positions only)")
    return _number(c, "rope_theta", src, params.get("rope_theta", 10000.0), 1)


def _qwen2_model(c: dict, shift: bool, bias: bool | None = None, qk_norm: bool = False) -> dict:
    """The :class:`ModelConfig` fields of a Qwen2/Llama ``config.json`` (``qk_norm``: Qwen3's, whose heads may be
    wider or narrower than ``hidden_size / num_attention_heads``)."""
    src = "config.json"
    _require(c, src, hidden_act=("silu",))
    heads = _int(c, "num_attention_heads", src)
    hidden = _int(c, "hidden_size", src)
    head_dim = c.get("head_dim")
    if head_dim not in (None, hidden // max(heads, 1)) and not qk_norm:
        raise CheckpointError(f"{src}: head_dim={c['head_dim']} differs from hidden_size / num_attention_heads")
    extra = dict(head_dim=_int(c, "head_dim", src, hidden // max(heads, 1)), qk_norm=True) if qk_norm else {}
    return dict(**extra, hidden=hidden, heads=heads, kv_heads=_int(c, "num_key_value_heads", src, heads) or heads,
                blocks=_int(c, "num_hidden_layers", src), intermediate=_int(c, "intermediate_size", src),
                vocab=_int(c, "vocab_size", src), length=_int(c, "max_position_embeddings", src),
                rope_base=_rope_theta(c, src), norm_eps=_number(c, "rms_norm_eps", src, 1e-6, 0),
                qkv_bias=bool(c.get("attention_bias", False)) if bias is None else bias,
                tie_embeddings=bool(c.get("tie_word_embeddings", False)), logit_shift=shift)


def _sdar_model(c: dict) -> dict:
    """SDAR's ``config.json`` (Qwen3 with block diffusion): the Qwen3 fields and ``block_size``."""
    src = "SDAR config.json"
    _require(c, src, fuse_cross_entropy=(False, True, None))
    return dict(**_qwen2_model(c, shift=False, bias=bool(c.get("attention_bias", False)), qk_norm=True),
                block_size=_int(c, "block_size", src, 4) or 4)


def _sdar_json(m: ModelConfig) -> dict:
    return {**_qwen2_json("SDARForCausalLM")(m), "head_dim": m.head_size, "block_size": m.block_size,
            "use_sliding_window": False, "fuse_cross_entropy": False}  # SDAR's forward reads it even in eval


LLADA2_BLOCK = 32  # LLaDA2's configs state no block size; its generate's block_length default


def _llada2_model(c: dict) -> dict:
    """LLaDA2.0/2.1's ``config.json`` (Ling 2.0's MoE: ``model_type`` ``llada2_moe``, dllm's ``llada21_moe``),
    transformers 4 or 5 (``rope_parameters``); the routing variants other than the one implemented are refused
    by name."""
    src = "LLaDA2 config.json"
    _require(c, src, hidden_act=("silu",), use_qkv_bias=(False, None), use_bias=(False, None), norm_head=(False, None),
             score_function=("sigmoid", None), moe_router_enable_expert_bias=(True, None), norm_topk_prob=(True, None),
             router_dtype=("fp32", None), use_qk_norm=(True, False, None))
    heads, hidden = _int(c, "num_attention_heads", src), _int(c, "hidden_size", src)
    head_dim = _int(c, "head_dim", src, hidden // max(heads, 1))
    params = c.get("rope_parameters") or {}
    factor = _number(c, "partial_rotary_factor", src, params.get("partial_rotary_factor", 1.0), 0)
    if factor > 1:
        raise CheckpointError(f"{src}: partial_rotary_factor={factor} is above 1")
    return dict(hidden=hidden, heads=heads, kv_heads=_int(c, "num_key_value_heads", src, heads) or heads,
                head_dim=head_dim, qk_norm=bool(c.get("use_qk_norm", True)), rotary_dim=int(head_dim * factor),
                blocks=_int(c, "num_hidden_layers", src), intermediate=_int(c, "intermediate_size", src),
                vocab=_int(c, "vocab_size", src), length=_int(c, "max_position_embeddings", src),
                rope_base=_rope_theta(c, src), norm_eps=_number(c, "rms_norm_eps", src, 1e-6, 0), qkv_bias=False,
                tie_embeddings=bool(c.get("tie_word_embeddings", False)), logit_shift=False,
                moe_experts=_int(c, "num_experts", src), moe_top_k=_int(c, "num_experts_per_tok", src),
                moe_width=_int(c, "moe_intermediate_size", src), moe_shared=_int(c, "num_shared_experts", src, 0),
                moe_groups=_int(c, "n_group", src, 1) or 1, moe_top_groups=_int(c, "topk_group", src, 1) or 1,
                moe_scale=_number(c, "routed_scaling_factor", src, 1.0, 0),
                moe_dense_layers=_int(c, "first_k_dense_replace", src, 0), block_size=LLADA2_BLOCK)


def _llada2_json(m: ModelConfig) -> dict:
    return {"architectures": ["LLaDA2MoeModelLM"], "hidden_size": m.hidden, "num_attention_heads": m.heads,
            "num_key_value_heads": m.kv_heads or m.heads, "head_dim": m.head_size, "num_hidden_layers": m.blocks,
            "intermediate_size": m.intermediate, "vocab_size": m.vocab, "max_position_embeddings": m.length,
            "rope_theta": m.rope_base, "rope_scaling": None, "rms_norm_eps": m.norm_eps, "hidden_act": "silu",
            "partial_rotary_factor": (m.rotary_dim or m.head_size) / m.head_size, "use_qk_norm": m.qk_norm,
            "use_qkv_bias": False, "use_bias": False, "norm_head": False, "tie_word_embeddings": m.tie_embeddings,
            "num_experts": m.moe_experts, "num_experts_per_tok": m.moe_top_k, "moe_intermediate_size": m.moe_width,
            "num_shared_experts": m.moe_shared, "n_group": m.moe_groups, "topk_group": m.moe_top_groups,
            "routed_scaling_factor": m.moe_scale, "first_k_dense_replace": m.moe_dense_layers,
            "score_function": "sigmoid", "moe_router_enable_expert_bias": True, "norm_topk_prob": True}


def _llada2_unfuse(ours: str, tensor: torch.Tensor, m: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """LLaDA2's fused attention weight: the rows of every query head, then of every key head, then of every
    value head (``head_dim`` rows each)."""
    if not ours.endswith(".self_attn.qkv_proj.weight"):
        return [(ours, tensor)]
    kv, d = m.kv_heads or m.heads, m.head_size
    if tensor.shape != ((m.heads + 2 * kv) * d, m.hidden):
        raise CheckpointError(f"a fused attention weight of shape {tuple(tensor.shape)} does not fit {m.heads} heads "
                              f"({kv} key/value heads) of {d}")
    q, k, v = tensor.split([m.heads * d, kv * d, kv * d])
    prefix = ours.removesuffix("qkv_proj.weight")
    return [(prefix + "q_proj.weight", q), (prefix + "k_proj.weight", k), (prefix + "v_proj.weight", v)]


def _llada2_fuse(state: dict[str, torch.Tensor], m: ModelConfig, mask_id: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_llada2_unfuse` on a whole state, every other tensor renamed."""
    return _fused(state, "llada2", lambda q, k, v: torch.cat([q, k, v]))


_LLADA2_NAMES = (
    ("model.word_embeddings.weight", "model.embed_tokens.weight"), ("model.norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.layers.{i}.attention.query_key_value.weight", "model.layers.{i}.self_attn.qkv_proj.weight"),
    ("model.layers.{i}.attention.dense.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("model.layers.{i}.attention.query_layernorm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    ("model.layers.{i}.attention.key_layernorm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
    *((f"model.layers.{{i}}.{n}.weight",) * 2 for n in ("input_layernorm", "post_attention_layernorm", "mlp.gate")),
    ("model.layers.{i}.mlp.gate.expert_bias",) * 2,
    *((f"model.layers.{{i}}.mlp.{p}_proj.weight",) * 2 for p in ("gate", "up", "down")),
    *((f"model.layers.{{i}}.mlp.experts.{{e}}.{p}_proj.weight",) * 2 for p in ("gate", "up", "down")),
    *((f"model.layers.{{i}}.mlp.shared_experts.{p}_proj.weight",) * 2 for p in ("gate", "up", "down")))


# transformers' values where a DiffusionGemma config.json says nothing (its class defaults, which save_pretrained
# does not write): the full layers' head width, the rotary of each kind, the logits' soft cap
GEMMA_GLOBAL_HEAD_DIM = 512
GEMMA_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
              "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}}
GEMMA_SOFTCAP = 30.0


def _diffusiongemma_model(c: dict) -> dict:
    """DiffusionGemma's ``text_config`` (transformers 5.25 ``diffusion_gemma_text``): the layer kinds, the heads of
    full-attention layers (``per_layer_config`` or ``global_head_dim`` / ``num_global_key_value_heads``), the
    rotary of each kind (``rope_parameters``), experts, soft cap; ``canvas_length`` is the top level's."""
    src = "DiffusionGemma config.json text_config"
    # use_bidirectional_attention "vision" makes image tokens attend both ways: text alone stays causal
    _require(c, src, hidden_activation=("gelu_pytorch_tanh",), attention_bias=(False, None),
             tie_word_embeddings=(True, None), use_bidirectional_attention=(None, False, "vision"))
    layers = _int(c, "num_hidden_layers", src)
    kinds = c.get("layer_types")
    if kinds is None:  # transformers' default: five sliding layers, then a full one
        kinds = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    if not isinstance(kinds, list) or len(kinds) != layers or not set(kinds) <= {"sliding_attention", "full_attention"}:
        raise CheckpointError(f"{src}: layer_types must list {layers} sliding_attention or full_attention layers")
    kinds = [*kinds[:-1], "full_attention"]  # transformers makes the last layer full whatever the config says
    heads, head_dim = _int(c, "num_attention_heads", src), _int(c, "head_dim", src)
    kv = _int(c, "num_key_value_heads", src, heads) or heads
    per = c.get("per_layer_config") or {}
    overrides = [per.get(str(i), {}) for i, kind in enumerate(kinds) if kind == "full_attention"]
    if not isinstance(per, dict) or any(o != overrides[0] for o in overrides) or \
            any(str(i) in per for i, kind in enumerate(kinds) if kind != "full_attention"):
        raise CheckpointError(f"{src}: per_layer_config must give every full_attention layer the same head shape, "
                              f"and no sliding layer one of its own")
    full = overrides[0] if overrides else {}
    rope = {**GEMMA_ROPE, **(c.get("rope_parameters") or {})}
    sliding_rope, full_rope = rope["sliding_attention"], rope["full_attention"]
    if sliding_rope.get("rope_type", "default") != "default" or \
            full_rope.get("rope_type", "default") not in ("default", "proportional"):
        raise CheckpointError(f"{src}: rope_parameters={rope!r} is not supported (default sliding, proportional full)")
    return dict(hidden=_int(c, "hidden_size", src), heads=heads, kv_heads=kv, head_dim=head_dim, blocks=layers,
                layer_types=kinds, sliding_window=_int(c, "sliding_window", src, 0),
                global_head_dim=_int(full, "head_dim", src, c.get("global_head_dim") or GEMMA_GLOBAL_HEAD_DIM),
                global_kv_heads=_int(full, "num_key_value_heads", src, c.get("num_global_key_value_heads") or kv),
                rope_base=_number(sliding_rope, "rope_theta", src, 10000.0, 1),
                global_rope_base=_number(full_rope, "rope_theta", src, 1000000.0, 1),
                global_rotary_fraction=_number(full_rope, "partial_rotary_factor", src, 1.0, 0),
                intermediate=_int(c, "intermediate_size", src), vocab=_int(c, "vocab_size", src),
                length=_int(c, "max_position_embeddings", src), norm_eps=_number(c, "rms_norm_eps", src, 1e-6, 0),
                moe_experts=_int(c, "num_experts", src), moe_top_k=_int(c, "top_k_experts", src),
                moe_width=_int(c, "moe_intermediate_size", src),
                softcap=float(c.get("final_logit_softcapping", GEMMA_SOFTCAP) or 0.0),  # (null: none)
                tie_embeddings=True)


def _diffusiongemma_json(m: ModelConfig) -> dict:
    """The text fields of DiffusionGemma's ``config.json`` (:func:`save_released` nests them in ``text_config``)."""
    kinds = list(m.layer_types) or ["full_attention"] * m.blocks
    return {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma_text",
            "hidden_size": m.hidden, "num_attention_heads": m.heads, "num_key_value_heads": m.kv_heads or m.heads,
            "head_dim": m.head_size, "num_hidden_layers": m.blocks, "layer_types": kinds,
            "sliding_window": m.sliding_window,
            "per_layer_config": {str(i): {"head_dim": m.global_head_dim or m.head_size,
                                          "num_key_value_heads": m.global_kv_heads or m.kv_heads or m.heads}
                                 for i, kind in enumerate(kinds) if kind == "full_attention"},
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": m.rope_base},
                                "full_attention": {"rope_type": "proportional",
                                                   "rope_theta": m.global_rope_base or m.rope_base,
                                                   "partial_rotary_factor": m.global_rotary_fraction}},
            "intermediate_size": m.intermediate, "vocab_size": m.vocab, "max_position_embeddings": m.length,
            "rms_norm_eps": m.norm_eps, "num_experts": m.moe_experts, "top_k_experts": m.moe_top_k,
            "moe_intermediate_size": m.moe_width, "final_logit_softcapping": m.softcap or None,
            "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False, "tie_word_embeddings": True}


_DG_LAYER = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
             "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
             "mlp.down_proj.weight", "router.proj.weight", "router.scale", "router.per_expert_scale",
             "experts.gate_up_proj", "experts.down_proj", "layer_scalar",
             *(f"{n}.weight" for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                       "pre_feedforward_layernorm_2", "post_feedforward_layernorm",
                                       "post_feedforward_layernorm_1", "post_feedforward_layernorm_2")))
_DIFFUSIONGEMMA_NAMES = (
    ("model.decoder.embed_tokens.weight", "embed_tokens.weight"), ("model.decoder.norm.weight", "norm.weight"),
    *((f"model.decoder.self_conditioning.{n}.weight", f"self_conditioning.{n}.weight")
      for n in ("pre_norm", "gate_proj", "up_proj", "down_proj")),
    *((f"model.decoder.layers.{{i}}.{n}", f"layers.{{i}}.{n}") for n in _DG_LAYER),
    ("model.encoder.language_model.layers.{i}.layer_scalar", "layers.{i}.encoder_layer_scalar"))
# the tied copies of decoder tensors (the output layer, the encoder's copies: checked against them) and the vision tower
_DIFFUSIONGEMMA_IGNORED = (r"lm_head\.weight", r"model\.encoder\.language_model\.(?!layers\.\d+\.layer_scalar$).*",
                           r"model\.encoder\.(vision_tower|embed_vision)\..*")


def _diffusiongemma_tied(key: str) -> str | None:
    """The decoder key a tied copy stands for: the output layer is the embedding; the encoder's weights (not its
    layer scalars) are the decoder's."""
    if key == "lm_head.weight":
        return "model.decoder.embed_tokens.weight"
    m = re.fullmatch(r"model\.encoder\.language_model\.(.+)", key)
    return None if m is None or re.fullmatch(r"layers\.\d+\.layer_scalar", m.group(1)) else \
        f"model.decoder.{m.group(1)}"


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


def _smdm_unfuse(ours: str, tensor: torch.Tensor, m: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """lit-gpt's fused attention weight, rows grouped per key/value head: the group's ``heads / kv_heads``
    query heads, then its key head, then its value head (each ``head_dim`` rows)."""
    if not ours.endswith(".self_attn.qkv_proj.weight"):
        return [(ours, tensor)]
    kv, d = m.kv_heads or m.heads, m.hidden // m.heads
    per = m.heads // kv
    if tensor.shape != ((m.heads + 2 * kv) * d, m.hidden):
        raise CheckpointError(f"a fused attention weight of shape {tuple(tensor.shape)} does not fit {m.heads} heads "
                              f"({kv} key/value heads) of {d}")
    w = tensor.view(kv, per + 2, d, m.hidden)
    prefix = ours.removesuffix("qkv_proj.weight")
    return [(prefix + "q_proj.weight", w[:, :per].reshape(-1, m.hidden)),
            (prefix + "k_proj.weight", w[:, per].reshape(-1, m.hidden)),
            (prefix + "v_proj.weight", w[:, per + 1].reshape(-1, m.hidden))]


def _gpt2_model(c: dict) -> dict:
    src = "GPT-2 config.json"
    _require(c, src, activation_function=("gelu_new", "gelu_pytorch_tanh", "gelu_fast"),
             scale_attn_weights=(True, None), scale_attn_by_inverse_layer_idx=(False, None),
             reorder_and_upcast_attn=(False, None))
    hidden = _int(c, "n_embd", src)
    return dict(backbone="gpt2", hidden=hidden, blocks=_int(c, "n_layer", src), heads=_int(c, "n_head", src),
                intermediate=c.get("n_inner") or 4 * hidden, vocab=_int(c, "vocab_size", src),
                length=_int(c, "n_positions", src), norm_eps=_number(c, "layer_norm_epsilon", src, 1e-5, 0),
                qkv_bias=True, tie_embeddings=True, logit_shift=False)


_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def _gpt2_transpose(ours: str, tensor: torch.Tensor, m: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """``transformers``' ``Conv1D`` stores ``(in, out)``; ``nn.Linear`` holds ``(out, in)``."""
    return [(ours, tensor.t().contiguous() if ours.endswith(_CONV1D) else tensor)]


_GPT2_NAMES = ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias",
               *(f"h.{{i}}.{m}.{w}" for m in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
                 for w in ("weight", "bias")))


def _fused(state: dict[str, torch.Tensor], layout: str, fuse,
           other=lambda key, value: value) -> dict[str, torch.Tensor]:
    """``state`` under ``layout``'s names, each layer's q/k/v weights made one by ``fuse(q, k, v)`` and every other
    tensor passed through ``other(key, value)``."""
    out = {}
    for key, value in state.items():
        if key.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            continue
        if key.endswith("self_attn.q_proj.weight"):
            prefix = key.removesuffix("q_proj.weight")
            key, value = prefix + "qkv_proj.weight", fuse(value, state[prefix + "k_proj.weight"],
                                                          state[prefix + "v_proj.weight"])
        else:
            value = other(key, value)
        out[LAYOUTS[layout].to_theirs(key)] = value
    return out


def _smdm_fuse(state: dict[str, torch.Tensor], m: ModelConfig, mask_id: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_smdm_unfuse` on a whole state: q/k/v fused per key/value group, the output
    layer without the mask's row (SMDM's head has one row fewer than its embedding)."""
    kv, d = m.kv_heads or m.heads, m.hidden // m.heads

    def fuse(q, k, v):
        groups = [q.view(kv, m.heads // kv, d, m.hidden), k.view(kv, 1, d, m.hidden), v.view(kv, 1, d, m.hidden)]
        return torch.cat(groups, dim=1).reshape(-1, m.hidden)

    return _fused(state, "smdm", fuse, lambda key, value: value[:mask_id] if key == "lm_head.weight" else value)


# SMDM's released sizes (lit_gpt/config.py, Diff_LLaMA_<size>M; the size counts non-embedding parameters):
# name -> (blocks, heads, hidden, MLP width); 32k vocabulary, length 2048, no GQA
SMDM_SIZES = {"6M": (6, 4, 256, 1024), "19M": (8, 6, 384, 1536), "34M": (8, 8, 512, 2048),
              "48M": (9, 9, 576, 2304), "66M": (10, 10, 640, 2560), "85M": (13, 10, 640, 2560),
              "75M": (16, 8, 640, 1600), "113M": (12, 12, 768, 3072), "142M": (15, 12, 768, 3072),
              "170M": (18, 12, 768, 3072), "180M": (14, 14, 896, 3584), "206M": (16, 14, 896, 3584),
              "231M": (18, 14, 896, 3584), "268M": (16, 16, 1024, 4096), "302M": (18, 16, 1024, 4096),
              "336M": (20, 16, 1024, 4096), "472M": (18, 10, 1280, 5120), "551M": (21, 10, 1280, 5120),
              "629M": (24, 10, 1280, 5120), "571M": (18, 11, 1408, 5632), "666M": (21, 11, 1408, 5632),
              "761M": (24, 11, 1408, 5632), "717M": (19, 12, 1536, 6144), "831M": (22, 12, 1536, 6144),
              "944M": (25, 12, 1536, 6144), "1028M": (20, 14, 1792, 7168), "1233M": (24, 14, 1792, 7168),
              "1476M": (22, 16, 2048, 8192), "1678M": (25, 16, 2048, 8192), "2121M": (28, 17, 2176, 8704)}
SMDM_HEADS = {(blocks, hidden, width): heads for blocks, heads, hidden, width in SMDM_SIZES.values()}
SMDM_TOKENIZER = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"  # Llama-2's 32k vocabulary


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
    Layout("smdm", (), (
        ("transformer.wte.weight", "model.embed_tokens.weight"),
        ("transformer.ln_f.weight", "model.norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
        ("transformer.h.{i}.norm_1.weight", "model.layers.{i}.input_layernorm.weight"),
        ("transformer.h.{i}.norm_2.weight", "model.layers.{i}.post_attention_layernorm.weight"),
        ("transformer.h.{i}.attn.attn.weight", "model.layers.{i}.self_attn.qkv_proj.weight"),
        ("transformer.h.{i}.attn.proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
        ("transformer.h.{i}.mlp.swiglu.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
        ("transformer.h.{i}.mlp.swiglu.w2.weight", "model.layers.{i}.mlp.up_proj.weight"),
        ("transformer.h.{i}.mlp.swiglu.w3.weight", "model.layers.{i}.mlp.down_proj.weight")),
        lambda c: {}, convert=_smdm_unfuse, unconvert=_smdm_fuse, bare=True),
    Layout("gpt2", ("gpt2",), (*((f"transformer.{n}", f"transformer.{n}") for n in _GPT2_NAMES),
                                *((n, f"transformer.{n}") for n in _GPT2_NAMES), ("lm_head.weight", "lm_head.weight")),
           _gpt2_model, causal=True, convert=_gpt2_transpose,
           ignore=(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias",)),
    Layout("sdar", ("sdar",), (*_HF_NAMES, *((f"model.layers.{{i}}.self_attn.{p}_norm.weight",) * 2 for p in "qk")),
           _sdar_model, _sdar_json, family="bd3lm", qk_norm=True,
           sample=(("sampler", "sdar"), ("steps", 4), ("temperature", 1.0), ("strategy", "dynamic"),
                   ("threshold", 0.85), ("stop_at_eos", True))),
    Layout("llada2", ("llada2_moe", "llada21_moe"), _LLADA2_NAMES, _llada2_model, _llada2_json,
           convert=_llada2_unfuse, unconvert=_llada2_fuse, family="bd3lm", qk_norm=True,
           sample=(("sampler", "llada2"), ("threshold", 0.95), ("temperature", 0.0), ("stop_at_eos", True),
                   ("after_stop", "keep"))),
    Layout("diffusiongemma", ("diffusion_gemma",), _DIFFUSIONGEMMA_NAMES, _diffusiongemma_model, _diffusiongemma_json,
           family="udlm", backbone="diffusiongemma", nested="text_config", masks=False, ignore=_DIFFUSIONGEMMA_IGNORED,
           tied=_diffusiongemma_tied,
           sample=(("sampler", "entropy_bound"), ("steps", 48))),
    Layout("qwen2", ("qwen2",), _HF_NAMES, lambda c: _qwen2_model(c, shift=False, bias=True),
           _qwen2_json("Qwen2ForCausalLM"), causal=True),
    Layout("llama", ("llama",), _HF_NAMES, lambda c: _qwen2_model(c, shift=False), _qwen2_json("LlamaForCausalLM"),
           causal=True),
)}


# export --to these: the layouts whose tensors are renamed, or converted back
WRITABLE = tuple(name for name, layout in LAYOUTS.items() if layout.convert is None or layout.unconvert)


def layout_of(config: dict) -> Layout | None:
    """The layout a ``config.json`` describes (by its ``model_type``), or None."""
    kind = config.get("model_type")
    return next((layout for layout in LAYOUTS.values() if kind in layout.model_types), None)


class OpenWeights(WeightSource):
    """A released open-weight folder: ``config`` (RunConfig), ``tokenizer``, ``layout``; weights read
    lazily by :meth:`build` or :meth:`tensors`."""

    def __init__(self, folder: Path, layout: Layout, config: RunConfig, tokenizer: HFTokenizer, meta: dict,
                 root: Path | None = None, file: str | None = None):
        """``file``: one safetensors file of ``folder`` holding every weight (SMDM's release) instead of
        ``model.safetensors`` or an index."""
        self.path, self.layout, self.config, self.tokenizer, self.meta = folder, layout, config, tokenizer, meta
        self.step, self.format, self.card, self._root, self._file = 0, layout.name, {}, root, file
        stated = meta.get("torch_dtype", meta.get("dtype", "float32"))
        if not isinstance(stated, str) or stated not in _DTYPES:
            raise CheckpointError(f"{folder}: config.json states torch_dtype={stated!r}; released weights are "
                                  f"{', '.join(_DTYPES)}")
        self.dtype = _DTYPES[stated]

    def shards(self) -> dict[str, list[str]]:
        """Shard file -> the checkpoint keys it holds (one ``model.safetensors``, or the index's map)."""
        index = member(self.path, INDEX, self._root)
        if self._file is None and index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or \
                    not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index} has no weight_map of parameter names to shard files")
            out: dict[str, list[str]] = {}
            for key, shard in weight_map.items():
                out.setdefault(shard, []).append(key)
            return out
        name = self._file or "model.safetensors"
        single = member(self.path, name, self._root)
        if not single.is_file():
            raise CheckpointError(f"{self.path} has neither model.safetensors nor {INDEX}")
        check_header(single)
        try:
            with safe_open(str(single), "pt") as f:
                return {name: list(f.keys())}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"unreadable weights file {single}: {str(exc).splitlines()[0]}") from None

    def check_depth(self, shards: dict[str, list[str]]) -> None:
        """The number of layers the weight names hold (one more than the largest layer index in them) must
        be ``config.json``'s: checked from the names alone, before a network of the stated depth is built."""
        ignored = [re.compile(pattern) for pattern in self.layout.ignore]
        indices = {int(m.group(1)) for keys in shards.values() for key in keys
                   if (m := _LAYER_INDEX.search(key)) and not any(p.fullmatch(key) for p in ignored)}
        held = max(indices) + 1 if indices else 0
        if held != self.config.model.blocks:
            raise CheckpointError(f"{self.path}: config.json states {self.config.model.blocks} layers but the "
                                  f"weights hold {held}")

    def tensors(self):
        """(our name, tensor) of every parameter, read one at a time in the checkpoint's dtype (after
        :meth:`_meta_network`'s checks, which :meth:`weights` and :meth:`build` make first)."""
        for shard, keys in self.shards().items():
            path = member(self.path, shard, self._root)
            if not path.is_file():
                raise CheckpointError(f"shard {shard} listed in {INDEX} is missing from {self.path}")
            check_header(path)
            try:
                with safe_open(str(path), "pt") as f:
                    present = set(f.keys())
                    for key in keys:
                        if key not in present:
                            raise CheckpointError(f"{path.name} does not hold {key!r} as its index says")
                        pieces = self.layout.read(key, f.get_tensor(key), self.config.model)
                        if pieces is None:
                            raise CheckpointError(f"{path.name}: parameter {key!r} is not part of the "
                                                  f"{self.layout.name} layout")
                        yield from pieces
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                if isinstance(exc, CheckpointError):
                    raise
                raise CheckpointError(f"unreadable weights file {path}: {str(exc).splitlines()[0]}") from None

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        """Every parameter under our name, checked against ``config.json`` (names, shapes, types, finite
        values), with a causal LM's missing mask row appended as :meth:`build` does."""
        model = self._meta_network(self.dtype, "cpu")
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        tensors = {k: with_mask_row(model, k, v, shapes[k], self.tokenizer.mask_id) if k in shapes else v
                   for k, v in self.tensors()}
        checked = check_weights(model, tensors, str(self.path))
        self.check_tied_copies(checked)
        return checked

    def ema_state(self) -> None:
        """None: released weights come without a separate EMA."""
        return None

    def _meta_network(self, dtype: torch.dtype, device: torch.device | str) -> torch.nn.Module:
        """The network of ``config.json`` on the meta device, after the checks that cost O(1): weights that
        would not fit this machine's memory (when they are to be on the CPU) and a depth the weight names do
        not have."""
        cpu = torch.device(device).type == "cpu"
        if cpu:
            try:
                refuse_beyond_memory(self.config, max(self.tokenizer.vocab_size, self.config.model.vocab), dtype)
            except ConfigError as exc:
                raise CheckpointError(f"{self.path}: {exc}") from None
        self.check_depth(self.shards())
        with torch.device("meta"):
            model = family_of(self.config).network(self.config, self.tokenizer).to(dtype)
        needed = sum(t.numel() for t in model.parameters()) * dtype.itemsize
        if cpu and needed > memory_bytes():
            raise CheckpointError(f"{self.path}: the weights need {needed / 2**30:,.1f} GiB in {dtype}; this "
                                  f"machine has {memory_bytes() / 2**30:,.1f} GiB")
        return model

    def build(self, ema: bool = True, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        """The network with the folder's weights, in ``dtype`` (default: the checkpoint's own, bf16 for
        the released models), made on the meta device and filled tensor by tensor, so the weights are
        in memory once. ``ema`` is accepted for the common interface (released weights have no EMA)."""
        dtype = dtype or self.dtype
        model = self._meta_network(dtype, device)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        seen = set()
        for name, tensor in self.tensors():
            if name not in expected:
                raise CheckpointError(f"{self.path}: {name!r} has no place in a model of this config")
            tensor = with_mask_row(model, name, tensor, expected[name], self.tokenizer.mask_id)
            check_dtype(name, tensor, dtype, str(self.path))
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
        self.check_tied_copies(model.state_dict())
        model.materialize(device)
        return model

    def check_tied_copies(self, state: dict[str, torch.Tensor]) -> None:
        """Every tied copy the folder stores (``Layout.tied``) equals the tensor it stands for, as loaded in
        ``state`` (our names); a CheckpointError naming both otherwise. Copies are read one at a time."""
        if self.layout.tied is None:
            return
        for shard, keys in self.shards().items():
            copies = [(k, self.layout.tied(k)) for k in keys if self.layout.tied(k) is not None]
            if not copies:
                continue
            with safe_open(str(member(self.path, shard, self._root)), "pt") as f:
                for key, original in copies:
                    ours = self.layout.to_ours(original)
                    copy = f.get_tensor(key)
                    if ours not in state or tuple(copy.shape) != tuple(state[ours].shape) or \
                            not torch.equal(copy.to(state[ours].dtype), state[ours].cpu()):
                        raise CheckpointError(f"{self.path}: {key!r} is a tied copy of {original!r} but differs "
                                              f"from it")


def with_mask_row(model: torch.nn.Module, name: str, tensor: torch.Tensor, shape: tuple[int, ...],
                  mask_id: int) -> torch.Tensor:
    """``tensor`` with a row for the mask appended when it is an embedding of ``model`` that has none (a
    causal LM, to which unmask's tokenizer appended a mask; SMDM's output layer): the mean embedding as
    input, zero as output (its logit is excluded anyway)."""
    if name not in (model.INPUT_EMBEDDING, "lm_head.weight") or mask_id != shape[0] - 1 or \
            tuple(tensor.shape) != (shape[0] - 1, *shape[1:]):
        return tensor
    extra = tensor.mean(0, keepdim=True) if name == model.INPUT_EMBEDDING else tensor[:1] * 0
    return torch.cat([tensor, extra])


_LAYER_INDEX = re.compile(r"\.(\d+)\.")  # the layer of a weight name: model.layers.3.mlp..., transformer.h.3....
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
    for role, value in ids.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise CheckpointError(f"{folder}/config.json: {role}_token_id={value!r} is not a token id")
    if ids["mask"] is None and tk_config.get("mask_token") is not None:  # SDAR names it in tokenizer_config.json
        ids["mask"] = _named_token(path, tk_config["mask_token"], f"{folder}/tokenizer_config.json: mask_token")
    mask = ids["mask"]
    shared = [role for role in ("eos", "bos", "pad") if mask is not None and ids[role] == mask]
    if shared:
        raise CheckpointError(f"{folder}/config.json: mask_token_id={mask} is also the {shared[0]} id; the mask "
                              f"must be a token of its own")
    tokenizer = HFTokenizer.from_file(path, ids=ids, chat_template=template if isinstance(template, str) else None)
    if mask is not None and mask not in tokenizer.tk.get_added_tokens_decoder():
        raise CheckpointError(f"{folder}/config.json: mask_token_id={mask} is the ordinary token "
                              f"{tokenizer.tk.id_to_token(mask)!r} of tokenizer.json, not a special token")
    return tokenizer


def _named_token(tokenizer_json: Path, token, source: str) -> int:
    """The id ``tokenizer.json`` gives the token ``token`` (a string, or ``{"content": ...}`` as
    ``tokenizer_config.json`` writes added tokens)."""
    content = token.get("content") if isinstance(token, dict) else token
    found = Tokenizer.from_file(str(tokenizer_json)).token_to_id(content) if isinstance(content, str) else None
    if found is None:
        raise CheckpointError(f"{source}={content!r} is not a token of {tokenizer_json.name}")
    return found


def read_open_weights(folder: Path, meta: dict, root: Path | None = None) -> OpenWeights | None:
    """The open-weight folder whose ``config.json`` holds ``meta``, or None when its ``model_type`` is not
    one of :data:`LAYOUTS`. A bidirectional layout becomes a masked-diffusion model (family ``mdlm``,
    ``alpha_t = 1 - t`` as LLaDA and Dream train with), a causal one an ``ar`` model."""
    layout = layout_of(meta)
    if layout is None:
        return None
    fields = meta
    if layout.nested is not None:
        fields = meta.get(layout.nested)
        if not isinstance(fields, dict):
            raise CheckpointError(f"{folder}/config.json has no {layout.nested} object")
    tokenizer = _tokenizer(folder, fields, root)
    try:
        model = layout.model(fields)
        if layout.nested is not None:  # DiffusionGemma: the canvas length is the top level's
            model["block_size"] = _int(meta, "canvas_length", "config.json", 256)
    except CheckpointError as exc:
        raise CheckpointError(f"{folder}: {exc}") from None
    if not layout.causal and layout.masks and tokenizer.appended_mask:
        raise CheckpointError(f"{folder}: neither config.json (mask_token_id) nor tokenizer_config.json (mask_token) "
                              f"states the mask token")
    beyond = tokenizer.appended_mask or (not layout.masks and tokenizer.mask_id == tokenizer.vocab_size - 1)
    if model["vocab"] < tokenizer.vocab_size - int(beyond and (layout.causal or not layout.masks)):
        raise CheckpointError(f"{folder}: the model has {model['vocab']} embedding rows but the tokenizer "
                              f"{tokenizer.vocab_size} ids")
    tree = {"family": layout.family or ("ar" if layout.causal else "mdlm"),
            "model": {"backbone": layout.backbone, **model, "dropout": 0.0},
            "data": {"tokenizer": "hf", "tokenizer_path": str(folder), "length": min(model["length"], 256),
                     "frame": layout.bos_prompt},
            "sample": dict(layout.sample)}
    try:
        config = config_from_dict(tree)
    except ConfigError as exc:  # shapes the architecture cannot take (heads that do not divide, ...)
        raise CheckpointError(f"{folder}/config.json: {exc}") from None
    return OpenWeights(folder, layout, config, tokenizer, meta, root)


SHARD_BYTES = 5 * 2**30  # Hugging Face's default largest shard


def save_released(source, directory: str | Path, layout: str, weights: dict[str, torch.Tensor] | None = None,
                  shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a Llama-backbone model (``source``: any model source, or ``weights`` with its config and
    tokenizer) in a released layout: ``config.json``, safetensors shards of at most ``shard_bytes`` with
    ``model.safetensors.index.json`` (one ``model.safetensors`` when it fits), ``tokenizer.json`` and
    ``tokenizer_config.json`` (the chat template). Written beside ``directory`` and renamed into place;
    an existing non-empty ``directory`` is refused untouched."""
    if layout not in WRITABLE:
        raise CheckpointError(f"unmask writes the {', '.join(WRITABLE)} layouts, not {layout!r}")
    lay, cfg, tokenizer = LAYOUTS[layout], source.config, source.tokenizer
    vocab = cfg.model.vocab or tokenizer.vocab_size - int(tokenizer.appended_mask) if not lay.masks else \
        max(cfg.model.vocab, tokenizer.vocab_size)  # a model without a mask token has no row for the appended one
    m = dataclasses.replace(cfg.model, vocab=vocab,
                            intermediate=cfg.model.intermediate or swiglu_width(cfg.model.hidden))
    if m.backbone != lay.backbone or not isinstance(tokenizer, HFTokenizer):
        raise CheckpointError(f"the {layout} layout holds {lay.backbone}-backbone models with a Hugging Face "
                              f"tokenizer; this one is {m.backbone} with a {tokenizer.kind} tokenizer (export it as "
                              f"'unmask')")
    family = lay.family or ("ar" if lay.causal else "mdlm")
    if family != cfg.family or (layout == "dream") != m.logit_shift:
        raise CheckpointError(f"a {cfg.family} model{' with' if m.logit_shift else ' without'} logit shift does "
                              f"not fit the {layout} layout (it holds {family} models)")
    plain_heads = m.head_size == m.hidden // m.heads
    if lay.backbone == "llama" and (m.qk_norm != lay.qk_norm or (not plain_heads and not lay.qk_norm)):
        raise CheckpointError(f"the {layout} layout holds models {'with' if lay.qk_norm else 'without'} query/key "
                              f"norms{'' if lay.qk_norm else ' and heads of hidden / heads'}; this one has "
                              f"model.qk_norm={m.qk_norm}, heads of {m.head_size}")
    if m.soft_mask_top_k:
        raise CheckpointError(f"the {layout} layout has no place for the soft-mask module; export it as 'unmask'")
    if lay.bare and (tokenizer.mask_id != m.vocab - 1 or m.qkv_bias or m.tie_embeddings):
        raise CheckpointError(f"the {layout} layout holds untied models without biases whose mask is the last "
                              f"embedding row (here {tokenizer.mask_id} of {m.vocab})")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise CheckpointError(f"{directory} exists and is not empty; nothing was written (choose a new folder)")
    weights = weights if weights is not None else source.weights(ema=True)
    with torch.device("meta"):  # what the written config.json describes, checked before anything is written
        described = family_of(cfg).network(dataclasses.replace(cfg, model=m), tokenizer)
    shapes = {k: tuple(v.shape) for k, v in described.state_dict().items()}
    weights = {k: with_mask_row(described, k, v, shapes[k], tokenizer.mask_id) if k in shapes else v
               for k, v in weights.items()}  # the folder's config.json counts the mask's row
    weights = check_weights(described, weights, f"{getattr(source, 'path', 'the model')}")
    weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()
               if not (m.tie_embeddings and k == "lm_head.weight")}
    theirs = lay.unconvert(weights, m, tokenizer.mask_id) if lay.unconvert else \
        {lay.to_theirs(k): v for k, v in weights.items()}
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
    if len(shards) == 1 or lay.bare:
        save_file(theirs, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in theirs.values())
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    if not lay.bare:
        dtype = str(next(iter(theirs.values())).dtype).split(".")[-1]
        config = {**lay.config_json(m), "model_type": lay.model_types[0],
                  "vocab_size": tokenizer.vocab_size if layout == "llada" else m.vocab,
                  "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
                  "torch_dtype": dtype}
        if not lay.causal and lay.masks:
            config["mask_token_id"] = tokenizer.mask_id
        if lay.nested is not None:  # DiffusionGemma: the text model's fields nested, the canvas length at the top
            text = {**config, "model_type": lay.config_json(m)["model_type"]}
            config = {"architectures": text.pop("architectures"), "model_type": lay.model_types[0], lay.nested: text,
                      "canvas_length": m.block_size, "tie_word_embeddings": True, "torch_dtype": dtype,
                      **{k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        # the special ids again, where the model's own generation code reads them (Dream's from_pretrained
        # requires the file)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id")
                      if k in config}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=1) + "\n")
    written = json.loads(tokenizer.tk.to_str())
    if not lay.masks and tokenizer.mask_id >= m.vocab:  # a mask beyond the model's ids is not the model's: left out
        written["added_tokens"] = [t for t in written.get("added_tokens", []) if t.get("id") != tokenizer.mask_id]
    (tmp / "tokenizer.json").write_text(json.dumps(written, ensure_ascii=False))
    tk_config = {"bos_token": tokenizer.piece(tokenizer.bos_id), "eos_token": tokenizer.piece(tokenizer.eos_id),
                 "pad_token": tokenizer.piece(tokenizer.pad_id)}
    if tokenizer.chat_template is not None:
        tk_config["chat_template"] = tokenizer.chat_template
    (tmp / "tokenizer_config.json").write_text(json.dumps(tk_config, indent=1) + "\n")
    if directory.exists():
        directory.rmdir()  # empty (checked above)
    os.replace(tmp, directory)
    return directory


def read_smdm(path: Path, tokenizer_path: str | None = None, heads: int | None = None) -> OpenWeights:
    """An SMDM checkpoint (``mdm-<size>-<flops>.safetensors``: lit-gpt's bidirectional ``TransEncoder``, a bare
    state dict): the shape comes from its tensors, the head count from SMDM's size table (or ``heads``).
    Its tokenizer (TinyLlama's, Llama-2's 32k) is ``tokenizer_path``, else a ``tokenizer.json`` beside the
    file, else the hub's; the mask is id 32000, the embedding's extra row (the output layer has none: its
    mask logit is 0 and never used)."""
    check_header(path)
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"unreadable weights file {path}: {str(exc).splitlines()[0]}") from None
    if "transformer.wte.weight" not in shapes or "transformer.h.0.attn.attn.weight" not in shapes:
        raise CheckpointError(f"{path} is not an SMDM checkpoint (no transformer.wte / transformer.h.0.attn.attn)")
    rows, hidden = shapes["transformer.wte.weight"]
    blocks = len({k.split(".")[2] for k in shapes if k.startswith("transformer.h.")})
    intermediate = shapes["transformer.h.0.mlp.swiglu.w1.weight"][0]
    heads = heads or SMDM_HEADS.get((blocks, hidden, intermediate))
    if heads is None:
        raise CheckpointError(f"{path}: {blocks} blocks of width {hidden} are not one of SMDM's sizes; give the "
                              f"head count (heads=N)")
    if tokenizer_path:
        tokenizer_file = Path(tokenizer_path)
        tokenizer_file = tokenizer_file / "tokenizer.json" if tokenizer_file.is_dir() else tokenizer_file
    elif (path.parent / "tokenizer.json").is_file():
        tokenizer_file = path.parent / "tokenizer.json"
    else:
        tokenizer_file = None
    tokenizer = HFTokenizer.from_file(tokenizer_file) if tokenizer_file else HFTokenizer.from_hub(SMDM_TOKENIZER)
    if tokenizer.mask_id != rows - 1 or tokenizer.vocab_size != rows:
        raise CheckpointError(f"{path}: the embedding has {rows} rows (mask = the last) but the tokenizer gives "
                              f"{tokenizer.vocab_size} ids with the mask at {tokenizer.mask_id}")
    model = dict(backbone="llama", hidden=hidden, blocks=blocks, heads=heads, kv_heads=heads,
                 intermediate=intermediate, vocab=rows, length=2048, rope_base=10000.0, norm_eps=1e-5,
                 qkv_bias=False, tie_embeddings=False, logit_shift=False, dropout=0.0)
    tree = {"family": "mdlm", "model": model,
            "data": {"tokenizer": "hf", "tokenizer_path": str(tokenizer_file or SMDM_TOKENIZER), "length": 1024,
                     "frame": True}}
    with safe_open(str(path), "pt") as f:
        dtype = {"BF16": "bfloat16", "F16": "float16"}.get(f.get_slice("transformer.wte.weight").get_dtype(), "float32")
    return OpenWeights(path.parent, LAYOUTS["smdm"], config_from_dict(tree), tokenizer, {"torch_dtype": dtype},
                       file=path.name)
