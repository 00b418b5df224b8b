"""Typed run configuration: dataclasses loaded from YAML with ``key=value`` overrides.

A run is described by one :class:`RunConfig`. ``load_config("configs/x.yaml", ["train.lr=1e-3"])``
reads the YAML file, applies the overrides (values parsed as YAML scalars), checks every key and type
against the dataclasses, resolves the model preset, and returns the resolved config. Unknown keys,
wrong types and unknown presets raise :class:`ConfigError` with a one-line message.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import math
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, Callable

import yaml

from .files import UnsafeFileError, read_text


class ConfigError(ValueError):
    """A malformed configuration (unknown key, wrong type, unknown preset, impossible value)."""


@dataclass
class ModelConfig:
    """The network: MDLM's DiT (``backbone: dit``, ``models/dit.py``) or a Llama/Qwen2-style transformer
    (``backbone: llama``, ``models/llama.py``: LLaDA, Dream, SMDM).

    ``preset`` fills every field it names; keys given explicitly next to it win.
    """

    preset: str | None = None  # a preset of `unmask config` (nano, micro, mini, tiny, small, llada-8b, ...)
    backbone: str = "dit"  # dit (MDLM), llama (LLaDA, Dream, SMDM), gpt2 (A2D from GPT-2) or diffusiongemma
    hidden: int = 768  # width of the transformer
    blocks: int = 12  # transformer blocks
    heads: int = 12  # attention heads (hidden / heads must be even)
    kv_heads: int = 0  # llama: key/value heads of grouped-query attention (0: heads)
    head_dim: int = 0  # llama: width of each attention head (0: hidden / heads; Qwen3 and SDAR set it apart)
    qk_norm: bool = False  # llama: RMSNorm of each head's queries and keys before the rotary positions (Qwen3, SDAR)
    rotary_dim: int = 0  # llama: the leading features of each head the rotary positions turn (0: all; LLaDA2: half)
    moe_experts: int = 0  # llama: > 0: mixture-of-experts MLPs of this many routed experts (LLaDA2)
    moe_top_k: int = 0  # llama MoE: experts each token is routed to
    moe_width: int = 0  # llama MoE: the intermediate width of each expert
    moe_shared: int = 0  # llama MoE: shared experts every token also passes (one MLP this many experts wide)
    moe_groups: int = 1  # llama MoE: groups of consecutive experts; a token's experts come from its best groups
    moe_top_groups: int = 1  # llama MoE: the groups a token may use (ranked by the sum of their two best scores)
    moe_scale: float = 1.0  # llama MoE: the routed experts' weights are multiplied by it
    moe_dense_layers: int = 0  # llama MoE: the first layers keep a dense MLP (model.intermediate wide)
    intermediate: int = 0  # llama: width of the SwiGLU MLP (0: 8/3 hidden rounded up to a multiple of 256)
    vocab: int = 0  # embedding rows when larger than the tokenizer's vocabulary (LLaDA pads to 126464)
    norm_eps: float = 1e-5  # llama: RMSNorm epsilon
    qkv_bias: bool = False  # llama: biases on the q, k and v projections (Qwen2, Dream)
    tie_embeddings: bool = False  # llama: the output layer shares the embedding matrix
    logit_shift: bool = False  # llama: position i is scored by the output at i - 1 (Dream)
    cond_dim: int = 128  # dit: width of the time-conditioning embedding
    dropout: float = 0.1  # dropout in attention and MLP outputs
    length: int = 1024  # longest sequence the model takes (rotary table size)
    time_conditioning: bool = False  # feed sigma(t) to the network (MDLM's adaLN); off: sigma = 0
    rope_base: float = 10000.0  # rotary embedding base
    soft_mask_top_k: int = 0  # > 0: soft-masked inputs from the top-k of the previous pass (0 = binary MDLM)
    block_size: int = 0  # bd3lm: tokens per block (1: autoregressive, data.length: MDLM); udlm: canvas length
    layer_types: list[str] = field(default_factory=list)  # diffusiongemma: per layer sliding_attention/full_attention
    sliding_window: int = 0  # diffusiongemma: positions a sliding_attention layer sees
    global_head_dim: int = 0  # diffusiongemma: head width of full_attention layers (0: model.head_dim)
    global_kv_heads: int = 0  # diffusiongemma: key/value heads of full_attention layers (0: model.kv_heads)
    global_rope_base: float = 0.0  # diffusiongemma: rotary base of full_attention layers (0: model.rope_base)
    global_rotary_fraction: float = 1.0  # diffusiongemma: the fraction of rotary pairs full_attention layers turn
    softcap: float = 0.0  # diffusiongemma: logits c tanh(z / c) (0: none)

    @property
    def head_size(self) -> int:
        """The width of each attention head: ``head_dim``, or ``hidden / heads``."""
        return self.head_dim or self.hidden // self.heads


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # MDLM's configs/model/*.yaml
    "tiny": dict(hidden=512, blocks=8, heads=8, cond_dim=128, dropout=0.1, length=1024),
    "small": dict(hidden=768, blocks=12, heads=12, cond_dim=128, dropout=0.1, length=1024),
    "medium": dict(hidden=1024, blocks=24, heads=16, cond_dim=128, dropout=0.1, length=1024),
    # CPU presets: short runs are under-fitted, so no dropout.
    "nano": dict(hidden=128, blocks=4, heads=4, cond_dim=64, dropout=0.0, length=1024),
    "micro": dict(hidden=256, blocks=4, heads=4, cond_dim=64, dropout=0.0, length=1024),
    "mini": dict(hidden=384, blocks=6, heads=6, cond_dim=128, dropout=0.0, length=1024),
    # Llama-style backbones: the released open-weight shapes, and a CPU-sized one with LLaDA's layout
    "llada-8b": dict(backbone="llama", hidden=4096, blocks=32, heads=32, kv_heads=32, intermediate=12288,
                     vocab=126464, length=4096, rope_base=500000.0, norm_eps=1e-5, dropout=0.0),
    "dream-7b": dict(backbone="llama", hidden=3584, blocks=28, heads=28, kv_heads=4, intermediate=18944,
                     vocab=152064, length=131072, rope_base=1000000.0, norm_eps=1e-6, qkv_bias=True,
                     logit_shift=True, dropout=0.0),
    # the 2026 block-diffusion releases (family=bd3lm with model.block_size; their README figures): LLaDA2.0/2.1-mini
    # (Ling 2.0 MoE, 16B total) and SDAR-4B/8B-Chat (their config.json: Qwen3's shapes, untied)
    "llada2-mini": dict(backbone="llama", hidden=2048, blocks=20, heads=16, kv_heads=4, head_dim=128, qk_norm=True,
                        rotary_dim=64, intermediate=5120, vocab=157184, length=32768, rope_base=600000.0, norm_eps=1e-6,
                        moe_experts=256, moe_top_k=8, moe_width=512, moe_shared=1, moe_groups=8, moe_top_groups=4,
                        moe_scale=2.5, moe_dense_layers=1, dropout=0.0),
    "sdar-4b": dict(backbone="llama", hidden=2560, blocks=36, heads=32, kv_heads=8, head_dim=128, qk_norm=True,
                    intermediate=9728, vocab=151936, length=32768, rope_base=1000000.0, norm_eps=1e-6, dropout=0.0),
    "sdar-8b": dict(backbone="llama", hidden=4096, blocks=36, heads=32, kv_heads=8, head_dim=128, qk_norm=True,
                    intermediate=12288, vocab=151936, length=32768, rope_base=1000000.0, norm_eps=1e-6, dropout=0.0),
    # SMDM's two main released sizes (Diff_LLaMA_170M and _1028M; vocabulary 32,000 + the mask)
    "smdm-170m": dict(backbone="llama", hidden=768, blocks=18, heads=12, intermediate=3072, vocab=32001,
                      length=2048, rope_base=10000.0, norm_eps=1e-5, dropout=0.0),
    "smdm-1028m": dict(backbone="llama", hidden=1792, blocks=20, heads=14, intermediate=7168, vocab=32001,
                       length=2048, rope_base=10000.0, norm_eps=1e-5, dropout=0.0),
    "llama-nano": dict(backbone="llama", hidden=128, blocks=4, heads=4, kv_heads=2, intermediate=384,
                       length=1024, rope_base=10000.0, norm_eps=1e-5, dropout=0.0),
}


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized and how it is cut into rows."""

    dataset: str = "tinyshakespeare"  # tinyshakespeare, text8, text8-prefix, wikitext2, wikitext103, text (files) or hf
    path: str | None = None  # file, folder or dataset name (text, hf, text8 zip, wikitext folder)
    valid_path: str | None = None  # explicit validation file (text); else a fraction of path
    test_path: str | None = None  # explicit test file (text); else a fraction of path
    hf_config: str | None = None  # Hugging Face dataset configuration name
    hf_split_names: list[str] = field(default_factory=lambda: ["train", "validation", "test"])  # its train, valid, test
    hf_streaming: bool = False  # stream a hub dataset instead of downloading it whole
    text_field: str = "text"  # JSONL/CSV/hf column with the text (the response for prompt/response pairs)
    label_field: str = "label"  # family classifier: the label column of CSV/TSV/JSONL files
    prompt_field: str | None = None  # supervised pairs: the prompt column; data.text_field is the response
    messages_field: str | None = None  # supervised chats: a JSONL field of messages, rendered by the chat template
    pad_with_eos: bool = False  # pad layout: fill rows with EOS (counted when count_eos) instead of PAD
    documents: str = "file"  # what a document is in plain text files: file, line or blank_line (paragraph)
    valid_fraction: float = 0.05  # share of the documents (or characters) held out for validation
    test_fraction: float = 0.05  # share held out for testing
    split_order: str = "contiguous"  # text documents by fraction: contiguous (the last are test) or shuffled (seeded)
    tokenizer: str = "char"  # char, text8, dna, byte, gpt2 or hf
    tokenizer_path: str | None = None  # tokenizer files (gpt2: encoder.json + vocab.bpe; hf: tokenizer.json or hub id)
    alphabet: str | None = None  # the char tokenizer's symbols (default: those of the corpus)
    oov: str = "error"  # symbols outside a closed alphabet: error, replace or drop
    oov_replacement: str = " "  # the symbol that replaces them (data.oov=replace)
    length: int = 256  # tokens per row
    layout: str = "wrap"  # wrap (documents joined and cut) or pad (one document per row)
    frame: bool = True  # wrap layout: [BOS] chunk [EOS] rows (else bare chunks)
    insert_eos: bool = True  # wrap layout: EOS after every document
    count_bos: bool = True  # score BOS positions in losses and bounds
    count_eos: bool = True  # score EOS positions
    count_pad: bool = False  # score PAD positions
    cache_dir: str | None = None  # where token caches go (default $UNMASK_CACHE or ~/.cache/unmask)


@dataclass
class DiffusionConfig:
    """Noise schedule and NELBO estimator (MDLM, Sahoo et al. 2024, section 3)."""

    schedule: str = "loglinear"  # noise schedule alpha(t): loglinear, cosine, linear or geometric
    schedule_eps: float = 0.0  # alpha(1) = eps (MDLM trains with 1e-3)
    sigma_min: float = 1e-4  # linear/geometric schedules: smallest noise level
    sigma_max: float = 20.0  # linear/geometric schedules: largest noise level
    t_min: float = 1e-3  # training draws t from [t_min, t_max]
    t_max: float = 1.0  # training draws t from [t_min, t_max] (< 1: BD3-LM's clipped schedule)
    antithetic: bool = True  # stratified (low-discrepancy) times over the global batch
    discrete_steps: int = 0  # T > 0: the T-step NELBO instead of the continuous one
    soft_mask_prob: float = 0.8  # soft-mask models: share of training rows given the two-pass soft input
    self_conditioning: float = 0.5  # udlm: share of training rows whose second pass takes the first pass's logits
    ilm_weighting: str = "path"  # insertion models: row weight (n0+1)/L (path, unbiased) or 1 (paper)
    ilm_stop_noise: float = 0.0  # insertion models: share of rows given a character-substituted copy for the stop head
    ilm_stop_head: str = "binary"  # insertion models: binary (P(stop), BCE) or count (P(n missing), CE; stop = P(n=0))


@dataclass
class TrainConfig:
    """Optimization (AdamW, warm-up, learning-rate schedule, EMA, clipping), precision, parallelism, and the cadence
    of logging, evaluation and checkpoints."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # rows per step over all processes
    micro_batch_size: int | None = None  # rows per pass per process (0/null: the whole share)
    lr: float = 3e-4  # peak learning rate (AdamW)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    adam_eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 100  # linear warm-up steps
    lr_schedule: str = "constant"  # after warm-up: constant or cosine
    min_lr_ratio: float = 0.1  # cosine: final learning rate as a share of lr
    grad_clip: float = 1.0  # gradient norm clipping (0: none)
    ema: float = 0.9999  # EMA decay of the weights used for evaluation and sampling (0: off)
    precision: str = "auto"  # auto (bf16 where native), fp32 or bf16 autocast
    compile: bool = False  # wrap the model in torch.compile
    seed: int = 1  # every draw of the run derives from it
    log_every: int = 10  # steps between metrics.jsonl records
    eval_every: int = 0  # steps between validation scores (0: none)
    eval_sequences: int = 64  # validation rows scored each time
    save_every: int = 0  # steps between checkpoints (0: only the last)
    keep_checkpoints: int = 2  # newest checkpoints kept (0: all)
    max_minutes: float = 0.0  # stop and save after this wall-clock time (0: no limit)
    progress: bool = True  # show a progress bar
    threads: int = 0  # CPU threads (0: the machine's cores shared among local processes)
    deterministic: bool = True  # deterministic kernels: same seed and threads -> bit-identical runs (docs: Guarantees)
    init_from: str | None = None  # start a new run from these weights (continued pretraining)
    soft_mask_lr: float = 1e-2  # learning rate of the soft-mask scalars (their own AdamW group)
    random_length_prob: float = 0.0  # share of rows cut to a random length (SMDM: 0.01)
    parallel: str = "ddp"  # ddp (a whole copy per process) or fsdp (weights, gradients, optimizer state sharded)
    reduce_precision: str = "fp32"  # fsdp: dtype of the gradient reduce-scatter (fp32 or bf16)
    cpu_offload: bool = False  # fsdp on CUDA: keep the sharded weights and optimizer state in CPU memory
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    track_memory: bool = False  # count live tensor bytes per process (slower): peak_tensor_mb in metrics.jsonl


@dataclass
class EvalConfig:
    """``metric: likelihood`` (NELBO / NLL), ``generation`` (samples scored by ``evaluator``) or
    ``exact_match`` (answers generated for the prompts of a prompt/answer split, see :mod:`unmask.data.tasks`)."""

    metric: str = "likelihood"  # likelihood, generation or exact_match
    evaluator: str | None = None  # generation: the AR model that scores samples (run folder or HF causal LM folder)
    mauve: bool = True  # generation: also MAUVE (needs mauve-text)
    split: str = "test"  # train, valid or test
    mc_samples: int = 4  # Monte-Carlo draws of the bound per row
    batch_size: int = 16  # rows per forward pass
    max_sequences: int = 0  # score a seeded subset of this many rows (0: all)
    use_ema: bool = True  # score the EMA weights
    seed: int = 0  # seed of the Monte-Carlo draws and the row subset
    precision: str = "fp32"  # auto, fp32 or bf16
    quantize: str = "none"  # weights of the scored network: none or int8 (weight-only, torchao)


@dataclass(init=False)
class SampleConfig:
    """Which sampler and how (see :mod:`unmask.samplers`); ``auto`` = the family's default sampler.

    The fields are the keys of every decoding. The samplers' own keys (``sample.steps``, ``sample.score``,
    ...) belong to the samplers: each declares them in its settings dataclass, registered with it
    (:func:`register_sample_settings`, :data:`SAMPLE_KEYS`). They are flat like the fields: given as keywords
    (``SampleConfig(sampler="llada", steps=64)``, ``dataclasses.replace(cfg, steps=8)``), written as
    ``sample.steps`` in YAML and overrides, kept in ``settings`` when given, and read as attributes (a key
    not given reads as its default).
    """

    sampler: str = "auto"  # auto (the family's default) or a sampler of `unmask sample --help`
    num_samples: int = 4  # samples per prompt (or unconditional)
    length: int = 0  # canvas length (0: data.length)
    model_precision: str = "fp32"  # the network's precision: auto, fp32 or bf16
    quantize: str = "none"  # the network's weights: none or int8 (weight-only, torchao)
    seed: int = 0  # row i draws from (seed, i): batching does not change samples
    batch_size: int = 16  # rows per sampler call
    use_ema: bool = True  # sample with the EMA weights
    compile: bool = False  # torch.compile the network for decoding (pays after tens of seconds of compiling)
    settings: dict[str, Any] = field(default_factory=dict)  # the samplers' keys given (flat: sample.steps)

    def __init__(self, *, settings: dict[str, Any] | None = None, **keys: Any):
        for f in dataclasses.fields(self):
            if f.name != "settings":
                setattr(self, f.name, keys.pop(f.name, f.default))
        self.settings = {**(settings or {}), **keys}

    def resolved(self) -> dict[str, Any]:
        """Every sampler key with its value: the given ones, defaults for the rest."""
        load_registries()
        return {name: self.settings.get(name, key.default) for name, key in SAMPLE_KEYS.items()} | self.settings

    def __eq__(self, other: object) -> bool:  # a key given at its default equals the key not given
        if not isinstance(other, SampleConfig):
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(self)
                   if f.name != "settings") and self.resolved() == other.resolved()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "settings":
            raise AttributeError(name)
        if name in self.settings:
            return self.settings[name]
        load_registries()
        if name in SAMPLE_KEYS:
            return SAMPLE_KEYS[name].default
        raise AttributeError(f"no sampler reads sample.{name}{_suggest(name, SAMPLE_KEYS)}")


@dataclass
class SampleKey:
    """A ``sample.*`` key that samplers read: one type, default and range; each reader's meaning."""

    name: str
    annotation: Any
    default: Any
    readers: dict[str, str]  # reader (a sampler or a wrapper) -> what the key means to it
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)  # reader -> its allowed values
    switched: set[str] = field(default_factory=set)  # readers to which a value off the default is a request

    @property
    def switch(self) -> bool:
        """A value off the default asks for a behaviour (guidance, windows): a sampler that does not read
        the key refuses it instead of ignoring it."""
        return bool(self.switched)

    def allowed(self) -> tuple[str, ...]:
        """The values some reader allows (empty: any value of the type)."""
        return tuple(dict.fromkeys(v for options in self.choices.values() for v in options))


SAMPLE_KEYS: dict[str, SampleKey] = {}  # filled by register_sample_settings (the sampler registry)


@dataclass
class AdapterConfig:
    """Parameter-efficient fine-tuning of the model ``train.init_from`` names (``unmask.models.adapters``):
    the base stays frozen; checkpoints hold the adapters (and soft-mask scalars), readers merge them."""

    kind: str = "none"  # none, lora or dora (LoRA with a learned magnitude per output)
    rank: int = 16  # r: the rank of the update B A
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapters' input
    targets: list[str] = field(default_factory=lambda: ["attention"])  # attention, mlp, or module names (regex)


@dataclass
class ClassifierConfig:
    """``family: classifier``: a classification head on the DiT backbone (:mod:`unmask.models.classifier`)."""

    pooling: str = "mean"  # mean over non-padding positions, or cls (the BOS position)
    dropout: float = 0.1  # dropout before the classification layer
    labels: list[str] | None = None  # class names in index order; read from the training data when unset


@dataclass
class RLConfig:
    """``unmask rl``: GRPO / Co-GRPO fine-tuning of a masked diffusion model (:mod:`unmask.train.rl`)."""

    prompts: str | None = None  # JSONL prompt/answer pairs (data.prompt_field, data.text_field) for rollouts
    eval_prompts: str | None = None  # held-out pairs, scored every eval_every iterations
    reward: str = "exact_match"  # exact_match, prefix_match, or module:function
    mode: str = "co"  # model (GRPO on the network), schedule (on the schedule policy), co (alternating)
    sampler: str = "scheduled"  # the schedule-driven rollout, or any diffusion sampler (mode=model)
    schedule: list[str] = field(default_factory=lambda: ["reveal", "temperature"])  # learned schedule parameters
    schedule_std: float = 0.3  # initial std of the schedule policy's Gaussians (0: deterministic)
    sample_steps: int = 8  # K, steps of a scheduled rollout
    iterations: int = 100  # GRPO iterations
    prompts_per_step: int = 8  # prompts per iteration
    group_size: int = 8  # G rollouts per prompt
    epochs: int = 1  # updates per batch of rollouts
    clip: float = 0.2  # PPO clipping epsilon
    kl: float = 0.04  # beta, weight of the KL to the initial model
    lr: float = 1e-5  # the model's learning rate
    schedule_lr: float = 0.05  # learning rate of the schedule policy
    grad_clip: float = 1.0  # gradient norm clipping of the model
    step_subsample: int = 0  # steps of each rollout scored per model update (0 = all)
    alternate_every: int = 5  # co: iterations per block before switching between model and schedule
    eval_every: int = 10  # iterations between held-out scores (0: none)
    eval_batch: int = 100  # held-out prompts scored
    seed: int = 0  # seed of prompt order and rollouts


@dataclass
class DistillConfig:
    """Parallelism distillation in ``unmask train`` (:mod:`unmask.train.distill`): the student (this run) learns to
    decode many tokens per forward from a teacher's decodings of the training prompts."""

    method: str = "none"  # none, trajectory (d3LLM), certainty (dParallel) or sdtt (step distillation of MDLM)
    teacher: str | None = None  # the teacher: a run folder, checkpoint or model folder with this run's tokenizer
    teacher_sample: list[str] = field(default_factory=list)  # sample.* overrides of the teacher's decoding (key=value)
    prompts: str | None = None  # JSONL pairs whose prompts the teacher decodes (default: data.path)
    max_prompts: int = 0  # decode the first this many prompts (0: all); without prompts: this many unconditional rows
    block_size: int = 0  # positions per block of an answer (0: the whole answer is one block)
    min_mask_ratio: float = 0.0  # the curriculum's share of a block masked at the start of training
    max_mask_ratio: float = 0.8  # ... and at its end (each row draws uniformly between the current share and this)
    complementary: bool = True  # also the cross-entropy of the complementary mask (dParallel)
    entropy_weight: float = 2.0  # weight of the entropy of right predictions (certainty forcing; 0: none)
    entropy_temperature: float = 0.5  # temperature of that entropy
    teacher_batch: int = 64  # prompts the teacher decodes at once
    student_steps: int = 32  # sdtt: the steps the student is trained to decode in
    per_step: int = 2  # sdtt: the teacher's steps per student step


@dataclass
class RunConfig:
    """A whole run: the model family, the run folder and one section per concern (``model``, ``data``, ``diffusion``,
    ``train``, ``eval``, ``sample``, ``classifier``, ``rl``, ``adapter``, ``distill``)."""

    family: str = "mdlm"  # the model family (unmask.families)
    run_dir: str = "runs/default"  # the run folder: config, metrics, checkpoints
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


# Allowed values of string keys. The families (``unmask.families``) and the samplers
# (``unmask.samplers.registry``) register theirs, so that each is named in one place.
QUANTIZE_SCHEMES = ("none", "int8", "int8-dynamic")  # see unmask.models.quantize

CHOICES: dict[str, tuple[str, ...]] = {
    "data.layout": ("wrap", "pad"),
    "data.documents": ("file", "line", "blank_line"),
    "data.split_order": ("contiguous", "shuffled"),
    "data.oov": ("error", "replace", "drop"),
    "data.tokenizer": ("char", "text8", "dna", "byte", "gpt2", "hf"),
    "diffusion.schedule": ("loglinear", "cosine", "linear", "geometric"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.parallel": ("ddp", "fsdp"),
    "train.reduce_precision": ("fp32", "bf16"),
    "adapter.kind": ("none", "lora", "dora"),
    "eval.split": ("train", "valid", "test"),
    "eval.metric": ("likelihood", "generation", "exact_match"),
    "eval.precision": ("auto", "fp32", "bf16"),
    "sample.model_precision": ("auto", "fp32", "bf16"),
    "eval.quantize": QUANTIZE_SCHEMES,
    "sample.quantize": QUANTIZE_SCHEMES,
    "classifier.pooling": ("mean", "cls"),
    "distill.method": ("none", "trajectory", "certainty", "sdtt"),
    "rl.mode": ("model", "schedule", "co"),
}


def register_choices(key: str, options: tuple[str, ...]) -> None:
    """Declare the allowed values of the string key ``key`` (its registry owns the names)."""
    CHOICES[key] = options


# The modules that declare keys, choices and rules (the families; the samplers' settings): reading or
# describing a config loads them first, so that this module used on its own knows every key.
KEY_REGISTRIES = ("unmask.families", "unmask.samplers.registry")


def load_registries() -> None:
    """Import the modules that register keys, choices and rules (the families, the samplers)."""
    for module in KEY_REGISTRIES:
        import_module(module)


RULES: list[Callable[[RunConfig], None]] = []  # relations between keys that a registry owns (run last)


def register_rule(rule: Callable[[RunConfig], None]) -> None:
    """Declare a check of whole configs (raising :class:`ConfigError`) that a registry owns, such as the
    keys a model family reads."""
    RULES.append(rule)


def class_table(cls: type, name: str) -> dict:
    """A class-level table (``RANGES``, ``CHOICES``) merged over the class and its bases (the class wins)."""
    out: dict = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get(name, {}))
    return out


def register_sample_settings(reader: str, settings: type) -> None:
    """Declare the ``sample.*`` keys that ``reader`` (a sampler, or a wrapper such as semi-autoregressive
    windows) reads: the fields of its ``settings`` dataclass with their types, defaults and trailing
    comments (the help), and its ``RANGES``, ``CHOICES`` and ``SWITCHES`` (:attr:`SampleKey.switch`). Keys
    are flat, so a key read by several samplers has one type, default and range wherever it is declared;
    its allowed values are the union of theirs here, and each sampler checks its own when it is built."""
    hints, comments = typing.get_type_hints(settings), _field_comments(settings)
    ranges, choices = class_table(settings, "RANGES"), class_table(settings, "CHOICES")
    switches = {name for klass in settings.__mro__ for name in vars(klass).get("SWITCHES", ())}
    run_keys = {f.name for f in dataclasses.fields(SampleConfig)}
    for f in dataclasses.fields(settings):
        dotted, known = f"sample.{f.name}", SAMPLE_KEYS.get(f.name)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # (a list: its factory's)
        if f.name in run_keys:
            raise ValueError(f"{reader}: sample.{f.name} is a key of every decoding, not a sampler's")
        if known is None:
            SAMPLE_KEYS[f.name] = known = SampleKey(f.name, hints[f.name], default, {})
            if f.name in ranges:
                RANGES[dotted] = ranges[f.name]
        elif (known.annotation, known.default, RANGES.get(dotted)) != (hints[f.name], default, ranges.get(f.name)):
            raise ValueError(f"{reader}: sample.{f.name} is declared with another type, default or range by "
                             f"{', '.join(known.readers)}")
        known.readers[reader] = comments[f.name]
        if f.name in switches:
            known.switched.add(reader)
        if f.name in choices:
            known.choices[reader] = tuple(choices[f.name])
            CHOICES[dotted] = known.allowed()


def forget_sample_settings(reader: str) -> None:
    """Undo :func:`register_sample_settings` for ``reader``: keys nobody else reads are gone, and the
    allowed values are those of the remaining readers."""
    for name, key in list(SAMPLE_KEYS.items()):
        if key.readers.pop(reader, None) is None:
            continue
        key.choices.pop(reader, None)
        key.switched.discard(reader)
        if key.choices:
            CHOICES[f"sample.{name}"] = key.allowed()
        else:
            CHOICES.pop(f"sample.{name}", None)
        if not key.readers:
            del SAMPLE_KEYS[name]
            RANGES.pop(f"sample.{name}", None)


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {annotation}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 2 ** 63:
                raise ConfigError(f"config key '{key}': {value} does not fit a 64-bit integer")
            return value
    elif annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
            return number
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key '{key}': expected {annotation.__name__}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'root'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    open_keys = SAMPLE_KEYS if cls is SampleConfig else {}  # the samplers' keys (flat in the section)
    if cls is SampleConfig:
        names.discard("settings")  # not a key of its own: what it holds is written flat
    kwargs = {}
    for key, value in data.items():
        full = prefix + str(key)
        if key in open_keys:
            kwargs[key] = _coerce(value, open_keys[key].annotation, full)
            continue
        if key not in names:
            close = difflib.get_close_matches(str(key), list(names | set(open_keys)), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value or {}, full + ".")
        else:
            kwargs[key] = _coerce(value, annotation, full)
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: typing.Sequence[str]) -> dict[str, Any]:
    """``["train.lr=1e-3", "model.preset=small"]`` -> nested dict, values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"override {item!r}: value is not valid YAML ({problem})") from None
        _set_path(tree, key, value)
    return tree


def merge_trees(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``update``, nested dicts merged key by key (``update`` wins); neither is changed."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_preset(tree: dict[str, Any]) -> dict[str, Any]:
    model = tree.get("model")
    if not isinstance(model, dict) or model.get("preset") is None:
        return tree
    name = model["preset"]
    if not isinstance(name, str) or name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset '{name}'{_suggest(str(name), MODEL_PRESETS)}; "
                          f"known: {', '.join(MODEL_PRESETS)}")
    return merge_trees(tree, {"model": merge_trees(MODEL_PRESETS[name], model)})


# Allowed values of numeric keys as intervals ("[a, b)": a included, b excluded; inf unbounded).
RANGES: dict[str, str] = {
    "model.hidden": "[1, inf)", "model.blocks": "[1, inf)", "model.heads": "[1, inf)", "model.cond_dim": "[1, inf)",
    "model.dropout": "[0, 1)", "model.length": "[3, inf)", "model.rope_base": "(1, inf)",
    "model.soft_mask_top_k": "[0, inf)", "model.kv_heads": "[0, inf)", "model.intermediate": "[0, inf)",
    "model.vocab": "[0, inf)", "model.norm_eps": "(0, 1)", "model.block_size": "[0, inf)", "model.head_dim": "[0, inf)",
    "model.rotary_dim": "[0, inf)", "model.moe_experts": "[0, inf)", "model.moe_top_k": "[0, inf)",
    "model.moe_width": "[0, inf)", "model.moe_shared": "[0, inf)", "model.moe_groups": "[1, inf)",
    "model.moe_top_groups": "[1, inf)", "model.moe_scale": "(0, inf)", "model.moe_dense_layers": "[0, inf)",
    "data.valid_fraction": "[0, 1)", "data.test_fraction": "[0, 1)", "data.length": "[3, inf)",
    "diffusion.schedule_eps": "[0, 1)", "diffusion.sigma_min": "(0, inf)", "diffusion.sigma_max": "(0, inf)",
    "diffusion.t_min": "[0, 1)", "diffusion.t_max": "(0, 1]",
    "diffusion.discrete_steps": "[0, inf)", "diffusion.soft_mask_prob": "[0, 1]",
    "diffusion.ilm_stop_noise": "[0, 1]",
    "train.steps": "[1, inf)", "train.batch_size": "[1, inf)", "train.micro_batch_size": "[0, inf)",
    "train.lr": "[0, inf)", "train.betas": "[0, 1)", "train.adam_eps": "(0, inf)", "train.weight_decay": "[0, inf)",
    "train.warmup_steps": "[0, inf)", "train.min_lr_ratio": "[0, 1]", "train.grad_clip": "[0, inf)",
    "train.ema": "[0, 1)", "train.seed": "[0, inf)", "train.log_every": "[0, inf)", "train.eval_every": "[0, inf)",
    "train.eval_sequences": "[1, inf)", "train.save_every": "[0, inf)", "train.keep_checkpoints": "[0, inf)",
    "train.max_minutes": "[0, inf)", "train.threads": "[0, inf)", "train.soft_mask_lr": "[0, inf)",
    "train.random_length_prob": "[0, 1]",
    "eval.mc_samples": "[1, inf)", "eval.batch_size": "[1, inf)", "eval.max_sequences": "[0, inf)",
    "eval.seed": "[0, inf)",
    "sample.num_samples": "[1, inf)", "sample.length": "[0, inf)", "sample.seed": "[0, inf)",
    "sample.batch_size": "[1, inf)",
    "classifier.dropout": "[0, 1)",
    "adapter.rank": "[1, inf)", "adapter.alpha": "(0, inf)", "adapter.dropout": "[0, 1)",
    "rl.schedule_std": "[0, inf)", "rl.sample_steps": "[1, inf)", "rl.iterations": "[1, inf)",
    "rl.prompts_per_step": "[1, inf)", "rl.group_size": "[2, inf)", "rl.epochs": "[1, inf)", "rl.clip": "(0, inf)",
    "rl.kl": "[0, inf)", "rl.lr": "[0, inf)", "rl.schedule_lr": "[0, inf)", "rl.grad_clip": "[0, inf)",
    "rl.step_subsample": "[0, inf)", "rl.alternate_every": "[1, inf)", "rl.eval_every": "[0, inf)",
    "rl.eval_batch": "[1, inf)", "rl.seed": "[0, inf)",
    "distill.max_prompts": "[0, inf)", "distill.block_size": "[0, inf)", "distill.min_mask_ratio": "[0, 1]",
    "distill.max_mask_ratio": "[0, 1]", "distill.entropy_weight": "[0, inf)", "distill.entropy_temperature": "(0, inf)",
    "distill.teacher_batch": "[1, inf)", "distill.student_steps": "[1, inf)", "distill.per_step": "[2, inf)",
}
INTERVAL = re.compile(r"([\[(])(-?[\d.]+), (inf|-?[\d.]+)([\])])")


def in_interval(value: float, interval: str) -> bool:
    """Whether ``value`` lies in ``interval``, written as in :data:`RANGES` (``[a, b)``, ``(a, inf)``, ...)."""
    opening, low, high, closing = INTERVAL.fullmatch(interval).groups()
    above = value >= float(low) if opening == "[" else value > float(low)
    below = high == "inf" or (value <= float(high) if closing == "]" else value < float(high))
    return above and below


def value_at(cfg: Any, dotted: str) -> Any:
    """The value of the dotted key ``dotted`` (``train.lr``) of ``cfg``."""
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_diffusiongemma(m: ModelConfig) -> None:
    """The shape rules of the diffusiongemma backbone: a kind per layer, a window for sliding layers, experts in
    every layer, a dense MLP width, a canvas."""
    kinds = list(m.layer_types) or ["full_attention"] * m.blocks
    if len(kinds) != m.blocks or not set(kinds) <= {"sliding_attention", "full_attention"}:
        raise ConfigError(f"model.layer_types must name {m.blocks} layers (model.blocks), each sliding_attention or "
                          f"full_attention")
    if "sliding_attention" in kinds and m.sliding_window < 2:
        raise ConfigError(f"sliding_attention layers need model.sliding_window >= 2, got {m.sliding_window}")
    if m.moe_experts < 1 or not 1 <= m.moe_top_k <= m.moe_experts or m.moe_width < 1 or m.intermediate < 1:
        raise ConfigError("model.backbone=diffusiongemma has a dense MLP and experts in every layer: set "
                          "model.intermediate, model.moe_experts, model.moe_top_k (<= experts) and model.moe_width")
    if m.block_size > m.length:
        raise ConfigError(f"model.block_size={m.block_size} (the canvas) exceeds the model's length {m.length}")
    if (m.global_head_dim or m.head_size) % 2 or not 0 <= m.global_rotary_fraction <= 1:
        raise ConfigError("model.global_head_dim must be even and model.global_rotary_fraction in [0, 1]")


def validate(cfg: RunConfig) -> RunConfig:
    """Check choices, value ranges (:data:`RANGES`) and relations that the types alone do not express."""
    for name in cfg.sample.settings:
        if name not in SAMPLE_KEYS:
            raise ConfigError(f"unknown config key 'sample.{name}'{_suggest(name, SAMPLE_KEYS)}")
    for dotted, options in CHOICES.items():
        node = value_at(cfg, dotted)
        if node not in options:
            raise ConfigError(f"config key '{dotted}' = {node!r} is not one of {', '.join(options)}"
                              f"{_suggest(str(node), options)}")
    for dotted, interval in RANGES.items():
        node = value_at(cfg, dotted)
        for value in node if isinstance(node, list) else [node]:
            if value is not None and not in_interval(value, interval):
                shown = f"{value:g}" if isinstance(value, float) else value
                raise ConfigError(f"{dotted}={shown} is out of range: it must lie in {interval}")
    m = cfg.model
    if m.hidden % m.heads and not m.head_dim:
        raise ConfigError(f"model.hidden={m.hidden} is not divisible by model.heads={m.heads} (or set model.head_dim)")
    if m.head_size % 2:
        raise ConfigError(f"model head dimension {m.head_size} must be even for rotary embeddings")
    if (m.qk_norm or m.rotary_dim) and m.backbone != "llama" or \
            (m.head_dim or m.moe_experts) and m.backbone not in ("llama", "diffusiongemma"):
        raise ConfigError(f"model.head_dim, qk_norm, rotary_dim and moe_* are settings of the llama backbone (head_dim "
                          f"and moe_* also of diffusiongemma), not {m.backbone}")
    gemma = (m.layer_types, m.sliding_window, m.global_head_dim, m.global_kv_heads, m.global_rope_base, m.softcap)
    if any(gemma) and m.backbone != "diffusiongemma":
        raise ConfigError("model.layer_types, sliding_window, global_* and softcap are settings of the diffusiongemma "
                          f"backbone, not {m.backbone}")
    if m.backbone == "diffusiongemma":
        _check_diffusiongemma(m)
    if m.rotary_dim % 2 or m.rotary_dim > m.head_size:
        raise ConfigError(f"model.rotary_dim={m.rotary_dim} must be even and at most the head width {m.head_size}")
    if m.moe_experts and not (0 < m.moe_top_k <= m.moe_experts and m.moe_width > 0 and m.moe_experts % m.moe_groups == 0
                              and m.moe_top_groups <= m.moe_groups
                              and m.moe_top_k <= m.moe_top_groups * (m.moe_experts // m.moe_groups)):
        raise ConfigError(f"model.moe_*: {m.moe_experts} experts in {m.moe_groups} groups, {m.moe_top_k} per token "
                          f"from {m.moe_top_groups} groups, width {m.moe_width}: need 0 < top_k <= the experts of "
                          f"the groups used, groups dividing the experts and a width > 0")
    if m.kv_heads and m.heads % m.kv_heads:
        raise ConfigError(f"model.heads={m.heads} is not a multiple of model.kv_heads={m.kv_heads} (each key/value "
                          f"head serves a whole group of query heads)")
    if cfg.data.length > m.length:
        raise ConfigError(f"data.length={cfg.data.length} exceeds the model's maximum length "
                          f"model.length={m.length}")
    if cfg.data.valid_fraction + cfg.data.test_fraction >= 1:
        raise ConfigError(f"data.valid_fraction + data.test_fraction = "
                          f"{cfg.data.valid_fraction + cfg.data.test_fraction:g} leaves no training data")
    if cfg.diffusion.sigma_min >= cfg.diffusion.sigma_max:
        raise ConfigError("diffusion.sigma_min must be below diffusion.sigma_max")
    d = cfg.distill
    if d.method != "none" and not d.teacher:
        raise ConfigError(f"distill.method={d.method} needs distill.teacher=... (the model whose decodings it learns)")
    if d.method != "none" and cfg.train.random_length_prob > 0:
        raise ConfigError("distillation trains on the teacher's whole rows: set train.random_length_prob=0")
    if d.min_mask_ratio > d.max_mask_ratio:
        raise ConfigError("distill.min_mask_ratio must not exceed distill.max_mask_ratio")
    if len(cfg.train.betas) != 2:
        raise ConfigError(f"train.betas must be two numbers (beta1, beta2), got {cfg.train.betas}")
    if (cfg.data.prompt_field or cfg.data.messages_field) and cfg.data.layout != "pad":
        raise ConfigError("prompt/response pairs (data.prompt_field, data.messages_field) need data.layout=pad (one "
                          "pair per row)")
    if cfg.data.prompt_field and cfg.data.messages_field:
        raise ConfigError("data.prompt_field and data.messages_field are two ways to give pairs: set one")
    if cfg.adapter.kind != "none" and not cfg.train.init_from:
        raise ConfigError(f"adapter.kind={cfg.adapter.kind} trains adapters on a frozen model: set train.init_from")
    if cfg.diffusion.t_min >= cfg.diffusion.t_max:
        raise ConfigError(f"diffusion.t_min={cfg.diffusion.t_min:g} must be below diffusion.t_max="
                          f"{cfg.diffusion.t_max:g}")
    for rule in RULES:
        rule(cfg)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """The validated :class:`RunConfig` of a nested dict (a preset resolved, registries loaded)."""
    load_registries()
    return validate(_build(RunConfig, _resolve_preset(tree or {}), ""))


CONFIG_DIR = Path(__file__).parent / "configs"  # the packaged configs (`unmask configs`)


def packaged_configs() -> list[str]:
    """The names of the packaged configs (``unmask configs``), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_path(name: str | Path) -> Path:
    """A YAML file, or the packaged config of that name."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = CONFIG_DIR / f"{name}.yaml"
    if packaged.is_file():
        return packaged
    raise ConfigError(f"config '{name}' is neither a file nor a packaged config ({', '.join(packaged_configs())})")


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a YAML config (a file or a packaged config's name; or start from defaults), apply
    ``key=value`` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = config_path(path)
        try:
            tree = yaml.safe_load(read_text(path)) or {}
        except UnsafeFileError as exc:
            raise ConfigError(f"config file {exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or exc.__class__.__name__
            raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return config_from_dict(merge_trees(tree, parse_overrides(overrides)))


@dataclass(frozen=True)
class KeyInfo:
    """One config key: dotted name, type, default and the meaning written next to its field."""

    key: str
    type: str
    default: Any
    help: str
    annotation: Any = None


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field of a dataclass and of its dataclass bases, read from
    their source."""
    out: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        source = textwrap.dedent(inspect.getsource(klass))
        comments = {tok.start[0]: tok.string.lstrip("# ").strip() for tok in
                    tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
        tree = ast.parse(source).body[0]
        out.update({node.target.id: comments.get(node.end_lineno, "") for node in tree.body
                    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)})
    return out


def _key_info(key: str, annotation: Any, default: Any, meaning: str) -> KeyInfo:
    allowed = CHOICES.get(key) or RANGES.get(key)
    meaning += f" [{' | '.join(allowed)}]" if key in CHOICES else ""
    meaning += f" {allowed}" if key in RANGES else ""
    type_name = str(annotation).replace("typing.", "") if not isinstance(annotation, type) else annotation.__name__
    return KeyInfo(key, type_name, default, meaning.strip(), annotation)


def config_keys(cls: type = RunConfig, prefix: str = "") -> list[KeyInfo]:
    """Every key of the config with its type, default and meaning, generated from the dataclasses and the
    registered sampler settings (so the help cannot drift from the code); ``CHOICES`` and ``RANGES`` add
    the allowed values."""
    load_registries()
    hints, comments = typing.get_type_hints(cls), _field_comments(cls)
    defaults = cls()
    out = []
    for f in dataclasses.fields(cls):
        key, annotation = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(annotation):
            out += config_keys(annotation, key + ".")
        elif not (cls is SampleConfig and f.name == "settings"):
            out.append(_key_info(key, annotation, getattr(defaults, f.name), comments[f.name]))
    if cls is SampleConfig:
        for name, spec in SAMPLE_KEYS.items():
            readers: dict[str, list[str]] = {}
            for reader, meaning in spec.readers.items():
                readers.setdefault(meaning, []).append(reader)
            meaning = "; ".join(f"{text} ({', '.join(who)})" for text, who in readers.items())
            out.append(_key_info(prefix + name, spec.annotation, spec.default, meaning))
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as nested plain data; every sampler key sits flat in the ``sample`` section with its value
    (given or default), as in YAML."""
    tree = dataclasses.asdict(cfg)
    if isinstance(cfg, RunConfig):
        del tree["sample"]["settings"]
        tree["sample"].update(cfg.sample.resolved())
    return tree


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back to an equal config)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
