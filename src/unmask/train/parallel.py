"""How a model is spread over processes: DDP (``train.parallel=ddp``: every process holds the whole
model, its gradients and AdamW state) or FSDP2 (``fsdp``: ``fully_shard`` on each transformer block,
then on the root, so each of ``W`` processes holds ``1/W`` of the weights, gradients and optimizer
state and gathers one block's weights at a time), and activation checkpointing per block.

Mixed precision under FSDP (``train.precision=bf16``): the sharded fp32 weights are the master copy
that AdamW updates; each block computes with a bf16 copy gathered for the pass, and gradients are
reduce-scattered in ``train.reduce_precision`` (fp32 by default). ``train.cpu_offload`` (CUDA only)
keeps the shards and the optimizer state in CPU memory; each block's weights reach the GPU for its
pass only.

Loading a checkpoint into a sharded model (:func:`restore`): written with the same number of
processes, each process reads its own shard files only; otherwise every process assembles the full
tensors once and keeps its share (``distribute_tensor``), which needs the whole model and optimizer
state in CPU memory for a moment.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch.distributed._composable import checkpoint as checkpoint_activations
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from ..checkpoints.checkpoint import Checkpoint, CheckpointError, check_finite, load_weights, with_aliases
from ..config import ConfigError, RunConfig
from ..models.registry import transformer_blocks
from ..runtime import Distributed

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parallelize(model: torch.nn.Module, cfg: RunConfig, dist: Distributed,
                precision: str) -> tuple[torch.nn.Module, Callable[[bool], ContextManager]]:
    """Apply activation checkpointing and the data parallelism of ``cfg.train`` to ``model`` (in place
    for FSDP). Returns the module to call forward on and ``sync(last)``, the context of one
    micro-batch's backward (gradients are reduced only in the ``last`` one)."""
    t = cfg.train
    blocks = transformer_blocks(model)
    if t.activation_checkpointing:
        if not blocks:
            raise ConfigError("train.activation_checkpointing: this model has no transformer blocks")
        for block in blocks:
            checkpoint_activations(block)
    if t.cpu_offload and (t.parallel != "fsdp" or dist.device.type != "cuda"):
        raise ConfigError("train.cpu_offload needs train.parallel=fsdp on CUDA")
    if t.parallel == "fsdp":
        mesh = init_device_mesh(dist.device.type, (dist.world,))
        mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                     reduce_dtype=DTYPES[t.reduce_precision])
        offload = CPUOffloadPolicy() if t.cpu_offload else OffloadPolicy()
        # FSDP shards tensors, not scalars (the soft-mask's): those stay whole on every process and their
        # gradients are averaged here, as FSDP averages the rest
        scalars = [p for p in model.parameters() if p.dim() == 0]
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mixed, offload_policy=offload)
        fully_shard(model, mesh=mesh, mp_policy=mixed, offload_policy=offload, ignored_params=set(scalars))

        @contextlib.contextmanager
        def fsdp_sync(last: bool):
            model.set_requires_gradient_sync(last)
            yield
            if last and dist.world > 1:
                for p in scalars:
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad.div_(dist.world)

        return model, fsdp_sync
    if dist.world > 1:
        ddp = DistributedDataParallel(model)
        return ddp, lambda last: contextlib.nullcontext() if last else ddp.no_sync()
    return model, lambda last: contextlib.nullcontext()


def full_value(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor of ``x`` (a DTensor reduced or gathered: a collective on every process)."""
    return x.full_tensor() if isinstance(x, DTensor) else x


def shard_like(value: torch.Tensor, like: torch.Tensor, local: bool) -> torch.Tensor:
    """``value`` laid out as ``like``: for a DTensor ``like``, ``value`` is this process's shard
    (``local``) or the full tensor, which each process cuts to its share."""
    if not isinstance(like, DTensor):
        return value.to(like.device)
    value = value.to(like.device, like.dtype)
    if local:
        return DTensor.from_local(value, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                  stride=like.stride())
    return distribute_tensor(value, like.device_mesh, like.placements)


def restore(ckpt: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema, dist: Distributed,
            names: set[str] | None = None) -> None:
    """Load the weights, optimizer state and EMA of ``ckpt`` into a (possibly sharded) training run;
    ``names``: the only weights the checkpoint holds (an adapter run's), None: all of them."""
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    local = sharded and ckpt.shards == dist.world  # each process reads its own shard files
    rank = dist.rank if local else None
    weights = with_aliases(model, ckpt.tensors("model", rank))
    expected = {k: v for k, v in model.state_dict().items() if names is None or k in names}
    if names is None and not sharded:
        load_weights(model, weights, str(ckpt.path))  # (the plain case also restores tied aliases)
    else:
        check_finite(weights, str(ckpt.path))
        if sorted(weights) != sorted(expected):
            raise CheckpointError(f"{ckpt.path} does not match the model (saved from another architecture or "
                                  f"other adapters)")
        model.load_state_dict({k: shard_like(weights[k], v, local) for k, v in expected.items()}, strict=False)
    optimizer_state = ckpt.optimizer_state(rank)
    if optimizer_state is None:
        raise CheckpointError(f"{ckpt.path} has no optimizer state, so training cannot resume from it")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entries in optimizer_state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value) and value.dim():
                entries[name] = shard_like(value, params[index], local)
    optimizer.load_state_dict(optimizer_state)
    ema_state = ckpt.ema_state(rank)
    if ema is not None and ema_state is not None:
        ema_state = with_aliases(model, ema_state)
        ema.load({k: shard_like(ema_state[k], v, local) for k, v in expected.items()},
                 ckpt.state.get("ema_updates", ckpt.step))
