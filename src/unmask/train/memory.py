"""The memory planner (``unmask plan``): what one process of a training run holds, before it runs.

Per process, with ``P`` parameters of which ``T`` train (all, or an adapter run's adapters), ``W``
processes (``1/W`` under FSDP, whole under DDP):

* weights ``4 P`` bytes (fp32 master copy); FSDP adds the gathered copy of up to two blocks (the one
  computing and the one prefetched) in the compute precision;
* gradients ``4 T``; DDP also holds reduction buckets of ``4 T`` for the whole run when ``W > 1``;
* AdamW state ``8 T`` (two moments), and while it steps its temporaries: on CUDA its multi-tensor
  update makes one full-size temporary at a time (``4 T``), on CPU it updates one tensor at a time
  (two temporaries the size of the largest); the EMA ``4 T``;
* activations: each of the micro-batch's tokens keeps ``a * hidden`` floats per block for the backward
  pass, and the loss ``k * V`` floats over the vocabulary ``V`` (logits, their log-softmax and
  gradient). ``a`` (per backbone, :attr:`~unmask.models.registry.BackboneSpec.activation_floats`) and ``k``
  (per family, :attr:`~unmask.families.FamilySpec.loss_floats`) were measured on CPU with torch 2.13 by
  counting the bytes of live tensors through one training step (dit 21, llama 25, gpt2 19; mdlm 1.7,
  autoregressive losses over every position 3.2: ``F.cross_entropy``'s log-softmax and gradient, as on
  CUDA); on CPU unmask's cross-entropy (:class:`~unmask.objectives.base.SoftmaxCrossEntropy`) keeps one
  (N, V) tensor fewer, so there the loss keeps :data:`CPU_LOSS_SHARE` of it (re-measured: autoregressive
  1.1-1.7 instead of 2.1-2.7 over the other terms, mdlm 0.6 fewer); the attention keeps no ``L x L`` matrix
  (PyTorch's fused attention), so they do not grow with the length. With activation checkpointing a block keeps
  only its input (``hidden`` floats per token) and one block at a time is recomputed. bf16 compute
  stores activations in 2 bytes instead of 4 (layer norms and the loss stay fp32: an estimate).

The peak holds the weights, AdamW state, EMA (and DDP's buckets), and then the larger of: activations
or gradients (the backward pass frees the one as it makes the other), or gradients and the step's
temporaries.
``tests/test_memory.py`` checks the plan against the peak of live tensor bytes of real training
steps on CPU (within 15 %), for shapes where activations dominate and where the parameters do. Not
counted: the framework itself (CUDA context, allocator caching and fragmentation), which is why a GPU
"fits" only with 10 % to spare.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import ConfigError, RunConfig
from ..families import family_of
from ..models.adapters import add_adapters
from ..models.registry import BACKBONES, transformer_blocks
from .loop import init_tokenizer, micro_batching, with_source_architecture

GPU_MEMORY_GB = (24, 40, 80, 141)
HEADROOM = 0.9  # the share of a GPU's memory a plan may fill


@dataclass
class MemoryPlan:
    """Bytes per process of one training configuration."""

    parameters: int
    trainable: int
    world: int
    micro_batch: int
    weights: float
    gradients: float
    buckets: float  # DDP's, for the whole run
    optimizer: float
    ema: float
    activations: float
    temporaries: float  # AdamW's while it steps

    @property
    def total(self) -> float:
        """The peak (module docstring): the backward pass or the optimizer step, whichever holds more."""
        passes = max(self.activations, self.gradients)
        held = self.weights + self.optimizer + self.ema + self.buckets
        return held + max(passes, self.gradients + self.temporaries)

    def parts(self) -> dict[str, float]:
        """The plan's bytes by part (weights, gradients, optimizer, EMA, activations, temporaries) and the total."""
        return {"weights": self.weights, "gradients": self.gradients + self.buckets, "optimizer": self.optimizer,
                "ema": self.ema,
                "activations": self.activations, "temporaries": self.temporaries, "total": self.total}

    def fits(self, gigabytes: float) -> bool:
        """Whether the total fits within the usable share (``HEADROOM``) of ``gigabytes`` of device memory."""
        return self.total <= HEADROOM * gigabytes * 1e9


def planning_inputs(cfg: RunConfig):
    """(the config as training resolves it, with the architecture of ``train.init_from``; the tokenizer
    training would use)."""
    cfg = with_source_architecture(cfg)
    return cfg, family_of(cfg).data(cfg, init_tokenizer(cfg), False).tokenizer


@dataclass(frozen=True)
class NetworkShape:
    """What the planner needs to know of a network: its parameter counts, its number of transformer
    blocks, the parameters of one block and the largest trainable tensor (elements)."""

    parameters: int
    trainable: int
    blocks: int
    block_parameters: int
    largest_trainable: int
    active: int = 0  # the parameters a token passes through (a mixture of experts: the routed experts it uses)


def _built_shape(cfg: RunConfig, tokenizer, blocks: int) -> torch.nn.Module:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, blocks=blocks))
    with torch.device("meta"):  # (not build_model: a plan may be for more memory than this machine has)
        try:
            model = family_of(cfg).network(cfg, tokenizer)
        except RuntimeError as exc:  # a tensor of more than 2^63 bytes
            raise ConfigError(f"a {cfg.family} model of this shape cannot be built: {str(exc).splitlines()[0]}") \
                from None
        if cfg.adapter.kind != "none":
            add_adapters(model, cfg.adapter, cfg.model.backbone)
    return model


def model_shape(cfg: RunConfig, tokenizer) -> NetworkShape:
    """The :class:`NetworkShape` of the run's network (with its adapters when it has some) in O(1): the
    network is built on the meta device with one and with two blocks, and the counts of ``model.blocks``
    blocks follow exactly, since every block is the same (``P(n) = P(1) + (n - 1) (P(2) - P(1))``; with a
    mixture of experts after ``model.moe_dense_layers`` dense ones, from those layers plus one and two); a
    billion blocks costs what two do. Layers of kinds of their own (``model.layer_types``, one per layer) are
    counted on the whole network. ``active``: the parameters one token passes through."""
    m = cfg.model
    n = m.blocks
    first = min(m.moe_dense_layers, n - 1) if m.moe_experts else 0  # the dense layers before the experts'
    if m.layer_types:
        one = two = _built_shape(cfg, tokenizer, n)
    else:
        one, two = _built_shape(cfg, tokenizer, first + 1), _built_shape(cfg, tokenizer, first + 2)

    def grown(count) -> int:
        return count(one) if m.layer_types else count(one) + (n - first - 1) * (count(two) - count(one))

    def idle(model) -> int:  # the routed experts a token does not use
        experts = [getattr(b, "experts", None) or b.mlp.experts for b in transformer_blocks(model)
                   if hasattr(b, "experts") or hasattr(b.mlp, "experts")]
        return sum(sum(p.numel() for p in group.parameters()) * (1 - m.moe_top_k / len(group)) for group in experts)

    parameters = grown(lambda model: sum(p.numel() for p in model.parameters()))
    return NetworkShape(parameters=parameters,
                        trainable=grown(lambda model: sum(p.numel() for p in model.parameters() if p.requires_grad)),
                        blocks=grown(lambda model: len(transformer_blocks(model))),
                        block_parameters=max((sum(p.numel() for p in b.parameters()) for b in transformer_blocks(two)),
                                             default=0),
                        largest_trainable=max((p.numel() for p in two.parameters() if p.requires_grad), default=0),
                        active=parameters - round(grown(idle)))


CPU_LOSS_SHARE = 2.2 / 3.2  # of the 3.2 floats per token and vocabulary entry of an AR loss, 1 is not kept on CPU


def plan_memory(cfg: RunConfig, shape: NetworkShape, vocab_size: int, world: int = 1,
                device: str = "cuda") -> MemoryPlan:
    """The plan of ``cfg`` run on ``world`` processes of ``device`` (cuda or cpu); ``shape``: its network's
    (:func:`model_shape`)."""
    t, m = cfg.train, cfg.model
    if world < 1:
        raise ConfigError(f"--world must be at least 1, got {world}")
    micro, _ = micro_batching(cfg, world)
    params, trainable = shape.parameters, shape.trainable
    compute_bytes = 2 if t.precision == "bf16" else 4
    shards = world if t.parallel == "fsdp" else 1
    weights = 4 * params / shards
    if t.parallel == "fsdp":
        weights += 2 * shape.block_parameters * compute_bytes
    gradients = 4 * trainable / shards
    buckets = 4 * trainable if t.parallel == "ddp" and world > 1 else 0.0
    family = family_of(cfg)
    tokens = micro * cfg.data.length * (2 if family.blocks else 1)  # block diffusion: the two streams
    per_block = BACKBONES[m.backbone].activation_floats * m.hidden
    if t.activation_checkpointing:
        kept = shape.blocks * m.hidden + per_block
    else:
        kept = shape.blocks * per_block
    loss = family.loss_floats * (CPU_LOSS_SHARE if device == "cpu" else 1.0) * max(vocab_size, m.vocab) * 4
    activations = tokens * (kept * compute_bytes + loss)
    ema = 4 * trainable / shards if t.ema > 0 else 0.0
    if device == "cuda":
        temporaries = 4 * trainable / shards
    else:
        temporaries = 2 * 4 * shape.largest_trainable / shards
    return MemoryPlan(params, trainable, world, micro, weights, gradients, buckets, 8 * trainable / shards, ema,
                      activations, temporaries)


def compared_settings(cfg: RunConfig) -> dict[str, RunConfig]:
    """The run as configured and, beside it, the usual ways to fit more: FSDP, FSDP with activation
    checkpointing, and LoRA (rank 16 on attention, when the run has no adapters) on top of that."""
    t = cfg.train
    fsdp = dataclasses.replace(t, parallel="fsdp")
    recompute = dataclasses.replace(fsdp, activation_checkpointing=True)
    settings = {"as configured": cfg, "fsdp": dataclasses.replace(cfg, train=fsdp),
                "fsdp + activation checkpointing": dataclasses.replace(cfg, train=recompute)}
    if cfg.adapter.kind == "none":
        lora = dataclasses.replace(cfg.adapter, kind="lora", rank=16, targets=["attention"])
        settings["fsdp + checkpointing + LoRA r=16"] = dataclasses.replace(cfg, train=recompute, adapter=lora)
    return settings


def plan_table(plans: dict[str, MemoryPlan]) -> str:
    """A Markdown table of plans (GB per process) and the GPUs each fits on; the peak (total) holds the
    weights, AdamW and EMA, and the larger of the activations or gradients, or gradients + step."""
    lines = ["| setting | parameters (trained) | weights | gradients | AdamW | EMA | activations | AdamW step | "
             "peak | fits on |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in plans.items():
        gb = {k: f"{v / 1e9:,.2f}" for k, v in p.parts().items()}
        fits = ", ".join(f"{g} GB" for g in GPU_MEMORY_GB if p.fits(g)) or "none of 24/40/80/141 GB"
        lines.append(f"| {name} | {p.parameters / 1e6:,.1f}M ({p.trainable / 1e6:,.1f}M) | {gb['weights']} | "
                     f"{gb['gradients']} | {gb['optimizer']} | {gb['ema']} | {gb['activations']} | "
                     f"{gb['temporaries']} | {gb['total']} | {fits} |")
    return "\n".join(lines)

