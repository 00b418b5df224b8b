"""Objectives that train parallel decoding into a masked-diffusion model from a teacher's answers.

Each training row is a teacher's decoding (:mod:`unmask.train.trajectories`): ``x0`` its final canvas, the
answer positions ``counted`` (what the teacher generated), and for each one the step it was revealed at. A
row's answer is cut into blocks of ``block_size`` positions (0: one block); a block ``b`` is drawn uniformly,
the blocks before it are clean, those after it masked and not scored, and inside it a share ``r`` of the
positions is masked, ``r`` drawn uniformly in ``[r_now, r_max]`` with ``r_now`` rising linearly from ``r_min``
to ``r_max`` over training (the curriculum of d3LLM's trainer, Hao AI Lab 2025, ``d3llm_llada_train.py``):

* **trajectory** (d3LLM's pseudo-trajectory distillation): the visible positions of the block are the
  ``floor((1 - r) m)`` the teacher revealed first (by reveal step, then position): the model learns, from the
  teacher's own intermediate states, to produce at once the tokens the teacher produced over the later steps;
* **certainty** (dParallel's certainty-forcing distillation, Chen et al. 2025): each position of the block is
  masked with probability ``r``, independently.

The loss of a row (nats, summed; the loop divides by the answer tokens):
``CE(masked) + CE(complement) + w * sum_{masked, argmax = x0} H(softmax(logits / T))``: the cross-entropy of
the teacher's tokens at the masked positions, the same for the complementary mask (the block's visible positions
masked instead: dParallel's complementary loss, ``complementary``), and the entropy at temperature ``T`` of
the predictions that are already right (certainty forcing: confident where correct, so threshold decoding
reveals many tokens per step). d3LLM's trainer divides the sum of the three means by 4, a constant that the
learning rate absorbs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.common import bucketed_positions
from .base import Noise, Objective, per_sequence_sums
from .mdlm import MaskedDiffusion, subs_log_probs

PARALLEL_METHODS = ("trajectory", "certainty")  # trained on a teacher's recorded decodings
STEP_METHODS = ("sdtt",)  # trained on the data, the teacher called at every step


def block_masks(counted: torch.Tensor, block_u: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The drawn block of each row's answer and what follows it: ``(in_block, after)`` (B, L) bool. The answer
    positions ``counted`` (B, L) are cut, in order, into blocks of ``block_size`` (0: one block; the last may be
    shorter); row ``i`` takes block ``floor(block_u[i] * blocks_i)``."""
    index = counted.long().cumsum(1) - 1  # position within the answer
    n = counted.sum(1)
    size = n.clamp(min=1) if block_size <= 0 else torch.full_like(n, block_size)
    blocks = (n + size - 1) // size
    chosen = (block_u.to(counted.device) * blocks).floor().long().clamp(max=(blocks - 1).clamp(min=0))
    block = index // size[:, None]
    return counted & (block == chosen[:, None]), counted & (block > chosen[:, None])


def visible_in_block(in_block: torch.Tensor, ratio: torch.Tensor, reveal_step: torch.Tensor | None,
                     mask_u: torch.Tensor) -> torch.Tensor:
    """The positions of each row's block left visible at mask share ``ratio`` (B,): with the teacher's
    ``reveal_step`` (B, L), the ``floor((1 - ratio) m)`` revealed first (ties by position); without, those whose
    ``mask_u`` (B, L) is at least ``ratio``."""
    if reveal_step is None:
        return in_block & (mask_u.to(in_block.device) >= ratio[:, None])
    length = in_block.shape[1]
    order = reveal_step.long() * length + torch.arange(length, device=in_block.device)
    keys = torch.where(in_block, order, torch.full_like(order, torch.iinfo(torch.long).max))
    rank = keys.argsort(1).argsort(1)
    keep = ((1 - ratio) * in_block.sum(1)).floor().long()
    return in_block & (rank < keep[:, None])


def without_mask(logits: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits`` (N, V) with the mask class at -inf (SUBS: the mask is never a token), and that class's column
    (V,) bool."""
    excluded = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    excluded[mask_id] = True
    return logits.masked_fill(excluded, float("-inf")), excluded


class ParallelDistillation(Objective):
    """The trajectory or certainty-forcing distillation loss (module docstring) of a masked-diffusion ``base``
    (its mask id and noise levels). ``loss`` takes ``progress`` (B,) (the training's progress in [0, 1], for the
    curriculum) and, for ``trajectory``, ``reveal_step`` (B, L)."""

    per_sequence = False
    bound = "none"

    def __init__(self, base: MaskedDiffusion, method: str, block_size: int = 0, min_mask_ratio: float = 0.0,
                 max_mask_ratio: float = 0.8, complementary: bool = True, entropy_weight: float = 2.0,
                 entropy_temperature: float = 0.5):
        if method not in PARALLEL_METHODS:
            raise ValueError(f"unknown distillation method {method!r} ({', '.join(PARALLEL_METHODS)})")
        if not 0 <= min_mask_ratio <= max_mask_ratio <= 1:
            raise ValueError("need 0 <= min_mask_ratio <= max_mask_ratio <= 1")
        if entropy_temperature <= 0 or entropy_weight < 0 or block_size < 0:
            raise ValueError("need entropy_temperature > 0, entropy_weight >= 0 and block_size >= 0")
        self.base, self.method, self.block_size = base, method, block_size
        self.family, self.mask_id = base.family, base.mask_id
        self.min_mask_ratio, self.max_mask_ratio = min_mask_ratio, max_mask_ratio
        self.complementary, self.entropy_weight = complementary, entropy_weight
        self.entropy_temperature = entropy_temperature

    def mask_ratio(self, progress: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``r`` (B,): uniform in ``[r_now, r_max]``, ``r_now = r_min + progress (r_max - r_min)``."""
        now = self.min_mask_ratio + progress.double() * (self.max_mask_ratio - self.min_mask_ratio)
        return now + u.double() * (self.max_mask_ratio - now)

    def loss(self, model, x0: torch.Tensor, counted: torch.Tensor, noise: Noise, exact: bool = False,
             progress: torch.Tensor | None = None, reveal_step: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row loss sums (B,) on the teacher's rows ``x0`` (B, L) (module docstring)."""
        if progress is None or (self.method == "trajectory" and reveal_step is None):
            raise ValueError(f"{self.method} distillation needs the training progress"
                             f"{' and the teacher reveal steps' if self.method == 'trajectory' else ''}")
        device = x0.device
        time_u, mask_u = noise.time_u.to(device), noise.mask_u.to(device)
        ratio = self.mask_ratio(progress.to(device), time_u)
        in_block, after = block_masks(counted, mask_u[:, 0], self.block_size)
        visible = visible_in_block(in_block, ratio, reveal_step if self.method == "trajectory" else None, mask_u)
        sigma = self.base.model_sigma(ratio)
        total = self._scored(model, x0, in_block & ~visible, after, sigma, certainty=True)
        if self.complementary:
            total = total + self._scored(model, x0, visible, after, sigma, certainty=False)
        return total

    def _scored(self, model, x0, scored, hidden, sigma, certainty: bool) -> torch.Tensor:
        """``sum CE`` over the ``scored`` positions of ``x0`` masked together with ``hidden`` (B,), plus the
        certainty term when asked."""
        xt = torch.where(scored | hidden, torch.full_like(x0, self.mask_id), x0)
        index, n = bucketed_positions(scored)  # (padded to a handful of sizes; the padding is not read)
        logits = model(xt, sigma, positions=index).float()[:n]
        index = index[:n]
        logits, excluded = without_mask(logits, self.mask_id)
        targets = x0.reshape(-1)[index]
        sums = per_sequence_sums(F.cross_entropy(logits, targets, reduction="none"), index, x0.shape)
        if not certainty or not self.entropy_weight:
            return sums
        right = (logits.argmax(-1) == targets).float()
        log_p = (logits / self.entropy_temperature).log_softmax(-1)
        entropy = -(log_p.exp() * log_p.masked_fill(excluded, 0.0)).sum(-1)
        return sums + self.entropy_weight * per_sequence_sums(entropy * right, index, x0.shape)


class StepDistillation(Objective):
    """Self-distillation through time (SDTT, Deschenaux and Gulcehre 2025, ``multi_round_sdtt.py``): a student that
    decodes in ``student_steps`` steps learns, at every masked position of ``x_t``, what a ``teacher`` decoding in
    ``per_step`` times as many steps predicts there over ``per_step`` of its steps.

    From ``x_t`` the teacher takes ``per_step`` MDLM ancestral steps of ``dt = 1 / (student_steps per_step)``
    (``t_i = t - i dt``; a masked position becomes token ``v`` with weight
    ``p(v | x) (alpha(s) - alpha(t_i)) / (1 - alpha(t_i))``, ``s = t_i - dt``); the target of a position is the
    teacher's distribution ``log p(x_0 | .)`` at the step that unmasked it, or at its last step if none did. The
    loss of a row is ``sum_{masked} KL(target || student)`` (SDTT's forward KL, ``kl-fwd``). Multi-round SDTT is
    a sequence of runs, each student the next round's teacher with half the steps. The teacher's steps draw from
    torch's generator (seeded per step and process by the training loop): a run repeats itself, but a run on more
    processes draws other teacher steps than one process."""

    per_sequence = False
    bound = "none"

    def __init__(self, base: MaskedDiffusion, teacher, student_steps: int, per_step: int = 2):
        if student_steps < 1 or per_step < 2:
            raise ValueError("SDTT needs student_steps >= 1 and per_step >= 2 teacher steps per student step")
        self.base, self.teacher, self.family, self.mask_id = base, teacher, base.family, base.mask_id
        self.student_steps, self.per_step = student_steps, per_step

    @torch.no_grad()
    def teacher_targets(self, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The targets (B, L, V) log-probabilities from the teacher's steps from ``x_t`` at times ``t`` (B,), and
        which positions one of its steps unmasked (B, L) bool."""
        dt = 1.0 / (self.student_steps * self.per_step)
        alpha = self.base.schedule.alpha
        current, updated, targets = xt, torch.zeros_like(xt, dtype=torch.bool), None
        for i in range(self.per_step):
            t_i = (t.double() - i * dt).clamp(min=dt / 2)
            s_i = (t_i - dt).clamp(min=0.0)
            log_p = subs_log_probs(self.teacher(current, self.base.model_sigma(t_i)), current, self.mask_id)
            targets = log_p if targets is None else torch.where(updated[..., None], targets, log_p)
            unmask = ((alpha(s_i) - alpha(t_i)) / (1 - alpha(t_i))).float()
            masked = current == self.mask_id
            moves = masked & (torch.rand(current.shape, device=current.device) < unmask[:, None])
            tokens = torch.multinomial(log_p[moves].exp(), 1)[:, 0] if moves.any() else None
            current = current.clone()
            if tokens is not None:
                current[moves] = tokens
            targets = torch.where(moves[..., None], log_p, targets)
            updated |= moves
        return targets, updated

    def loss(self, model, x0: torch.Tensor, counted: torch.Tensor, noise: Noise, exact: bool = False) -> torch.Tensor:
        """Per-row ``sum_{masked} KL(teacher target || student)`` (B,) at ``x_t ~ q(x_t | x_0)``."""
        t, _ = self.base.times_and_weights(noise.time_u.to(x0.device), exact=False)
        xt = self.base.mask(x0, t, noise.mask_u.to(x0.device), counted)
        targets, _ = self.teacher_targets(xt, t)
        index, n = bucketed_positions(xt == self.mask_id)
        logits = model(xt, self.base.model_sigma(t), positions=index).float()[:n]
        index = index[:n]
        logits, excluded = without_mask(logits, self.mask_id)
        student = logits.log_softmax(-1)
        target = targets.reshape(-1, targets.shape[-1])[index]
        kl = (target.exp() * (target - student).masked_fill(excluded, 0.0)).sum(-1)  # (0 log 0 = 0 at the mask)
        return per_sequence_sums(kl, index, x0.shape)
