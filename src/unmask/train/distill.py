"""Parallelism distillation in ``unmask train``: the ``distill.*`` keys turn a run into a student of a teacher.

Decision: distillation is a training objective, not a command of its own. A student is trained by the one
training loop (the same step, checkpoints, kill -9 safe resume, LoRA, DDP/FSDP, logging and validation as any
run); what changes is where its rows come from and what its loss is. Before the first step the teacher decodes
the training prompts once through the decoding engine (:mod:`unmask.train.trajectories`: memory-mapped,
keyed by teacher and settings, resumable, shared by every student of that teacher), and every step draws rows
from those decodings and scores them with :class:`~unmask.objectives.distill.ParallelDistillation`. A student
starts from the teacher's weights when ``train.init_from`` names it (the usual recipe) or from scratch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from ..checkpoints.checkpoint import load_model
from ..checkpoints.pretrained import open_source, weights_digest
from ..config import ConfigError, RunConfig
from ..data.cache import default_cache_dir
from ..data.layouts import EOS, PAD, PROMPT, TOKEN, starts_with_bos
from ..data.tasks import read_pairs
from ..data.tokenization import Tokenizer
from ..objectives.block_diffusion import BlockDiffusion
from ..objectives.distill import STEP_METHODS, ParallelDistillation, StepDistillation
from ..objectives.mdlm import MaskedDiffusion
from ..pipeline import checkpoint_config
from ..samplers.registry import make_sampler
from .trajectories import Trajectories, record_trajectories, trajectory_directory


class TrajectoryRows:
    """Training rows from a teacher's decodings: ``get(indices)`` -> (ids, kinds) (n, L) as the data layouts give
    them (the teacher's fixed positions as prompt, its generated ones by token: EOS, PAD or a token), and
    ``reveal_steps(indices)`` (n, L)."""

    def __init__(self, trajectories: Trajectories, tokenizer: Tokenizer):
        self.trajectories, self.eos, self.pad = trajectories, tokenizer.eos_id, tokenizer.pad_id

    def __len__(self) -> int:
        return len(self.trajectories)

    def get(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """The ids and kinds of the rows at ``indices``."""
        ids = np.asarray(self.trajectories.tokens[indices], dtype=np.int64)
        generated = np.asarray(self.trajectories.reveal_step[indices]) >= 0
        kinds = np.where(ids == self.eos, EOS, np.where(ids == self.pad, PAD, TOKEN)).astype(np.int8)
        return ids, np.where(generated, kinds, PROMPT).astype(np.int8)

    def reveal_steps(self, indices) -> np.ndarray:
        """The teacher's reveal steps (n, L) int64 of the rows at ``indices``."""
        return np.asarray(self.trajectories.reveal_step[indices], dtype=np.int64)


def open_teacher(cfg: RunConfig, tokenizer: Tokenizer):
    """The teacher's source, checked against the run: same tokenizer, same family, a context as long as the rows."""
    d = cfg.distill
    teacher = open_source(d.teacher)
    if teacher.tokenizer.fingerprint() != tokenizer.fingerprint():
        raise ConfigError(f"the teacher {d.teacher} has another tokenizer than this run's: a student learns the "
                          f"teacher's tokens, so both need the same vocabulary")
    if teacher.config.family != cfg.family:
        raise ConfigError(f"the teacher {d.teacher} is a {teacher.config.family} model; this run trains family "
                          f"{cfg.family}")
    if cfg.data.length > teacher.config.model.length:
        raise ConfigError(f"data.length={cfg.data.length} is longer than the teacher's context "
                          f"({teacher.config.model.length} tokens): it cannot decode rows of this length")
    return teacher


def distillation_objective(cfg: RunConfig, base, tokenizer: Tokenizer, device: torch.device):
    """The run's training objective over the family's masked diffusion ``base``: the distillation loss of
    ``distill.method`` (SDTT's with the teacher loaded here, on ``device``)."""
    if not isinstance(base, MaskedDiffusion) or isinstance(base, BlockDiffusion):
        raise ConfigError(f"distill.method={cfg.distill.method} applies to masked-diffusion families whose whole "
                          f"canvas is one sequence (mdlm), not family {cfg.family}")
    d = cfg.distill
    if d.method in STEP_METHODS:
        teacher, _ = load_model(open_teacher(cfg, tokenizer), device=device)
        teacher.requires_grad_(False)
        return StepDistillation(base, teacher, d.student_steps, d.per_step)
    return ParallelDistillation(base, d.method, d.block_size, d.min_mask_ratio, d.max_mask_ratio, d.complementary,
                                d.entropy_weight, d.entropy_temperature)


def teacher_trajectories(cfg: RunConfig, tokenizer: Tokenizer, device: torch.device, record: bool,
                         progress: bool = False) -> TrajectoryRows:
    """The teacher's decodings of the training prompts: recorded here (``record``: the main process; resumed if
    an earlier recording stopped), else opened (the other processes, after the main one recorded them). Without a
    prompt file (``distill.prompts``, ``data.path``) the teacher decodes ``distill.max_prompts`` unconditional
    rows; rows begin with BOS where the teacher's training rows do."""
    d = cfg.distill
    teacher = open_teacher(cfg, tokenizer)
    length = cfg.data.length
    source = d.prompts or cfg.data.path
    if source:
        pairs = read_pairs(source, cfg.data.prompt_field or "prompt", cfg.data.text_field)
        prompts = [p for p, _ in pairs][:d.max_prompts or None]
    elif d.max_prompts:
        prompts = [""] * d.max_prompts
    else:
        raise ConfigError("distillation needs prompts: distill.prompts=FILE.jsonl (or data.path), or "
                          "distill.max_prompts=N for N unconditional decodings")
    bos = starts_with_bos(teacher.config.data)
    sample = checkpoint_config(teacher, [f"sample.{kv}" for kv in d.teacher_sample]).sample
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    model, objective = load_model(teacher, device=device if record else "cpu")  # the others only read its identity
    identity = weights_digest(model.state_dict())
    if not record:
        return TrajectoryRows(Trajectories.open(trajectory_directory(cache, identity, tokenizer, sample, length,
                                                                     prompts, cfg.train.seed, bos)), tokenizer)
    sampler = make_sampler(sample, objective, tokenizer, teacher.config.model.length)

    def report(done: int, total: int) -> None:
        if progress:
            print(f"teacher decodings: {done}/{total}", file=sys.stderr, flush=True)

    with torch.no_grad():
        recorded = record_trajectories(model, sampler, tokenizer, sample, prompts, length, identity, cache,
                                       cfg.train.seed, d.teacher_batch, report, bos)
    return TrajectoryRows(recorded, tokenizer)


def distill_targets(rows: TrajectoryRows, indices, step: int, steps: int, device) -> dict[str, torch.Tensor]:
    """What the distillation loss takes beside the rows: the teacher's reveal steps and the training progress."""
    reveal = torch.from_numpy(rows.reveal_steps(indices)).to(device)
    return {"reveal_step": reveal, "progress": torch.full((len(reveal),), step / max(steps, 1), device=device)}

