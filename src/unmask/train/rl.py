"""Reinforcement fine-tuning of masked diffusion models: GRPO for the model, for a schedule policy,
and for both in alternation (Co-GRPO, Zhou et al. 2025, arXiv 2512.22288; the paper is on images, the
text version is ours).

Generation is one Markov decision process. At step ``k`` of ``K`` the state is the canvas ``x_k``; the
action is a schedule action ``A_k`` (reveal fraction ``r_k``, token temperature ``tau_k``, guidance
weight ``w_k``) followed by the tokens ``V_k`` revealed. The policy factorizes as
``pi(V_k, A_k | x_k) = pi_phi(A_k | k) pi_theta(V_k | x_k, A_k)``:

* **schedule policy** ``pi_phi`` (:class:`SchedulePolicy`): per step a diagonal Gaussian over the
  unconstrained ``z_k`` (learned per-step means, a shared log-std), squashed to ``r = sigmoid(z)``,
  ``tau = exp(z)``, ``w = z``; parameters not learned stay at their fixed values;
* **model policy** ``pi_theta``: every masked position draws a token from
  ``softmax(l / tau_k)`` (SUBS: the mask excluded; with guidance ``l = l_u + (1 + w)(l_c - l_u)``,
  SMDM eq. 7); the ``max(1, round(r_k m))`` most confident of the ``m`` masked positions are revealed (all of
  them at the last step). ``log pi_theta(V_k | x_k, A_k) = sum_{l revealed} log softmax(l / tau_k)[x^l]``;
  which positions are revealed is treated as part of the environment (the usual MDM-GRPO
  simplification).

Training (group-relative policy optimization): ``G`` rollouts per prompt, terminal reward ``R``,
advantage ``A_i = (R_i - mean_G) / (std_G + eps)`` broadcast to every step. The model's loss is the
PPO-clipped surrogate ``min(rho A, clip(rho, 1 +- eps) A)`` per revealed token with
``rho = exp(log pi_theta - log pi_theta_old)``, minus ``beta`` times the k3 estimate of the KL to the
frozen initial model, averaged over a trajectory's tokens then over trajectories; to bound memory only
``step_subsample`` of the ``K`` steps of each rollout batch are scored. The schedule's loss is the same
surrogate with ``rho_phi`` from the Gaussian densities of the ``z_k``. ``mode``: ``model`` (GRPO on
theta, the schedule fixed at its means), ``schedule`` (theta frozen) or ``co`` (alternating blocks of
``alternate_every`` iterations, model first). A schedule with zero variance is deterministic, so
``mode=model`` with it is plain GRPO under a fixed schedule.

Any diffusion sampler can produce the model's rollouts instead (``rl.sampler``, ``mode=model`` only):
its steps are recorded through ``on_step`` and the tokens it revealed are scored at
``sample.temperature``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..checkpoints.checkpoint import save_checkpoint
from ..checkpoints.runfolder import LOCK_FILE, RunFolderError, RunLock
from ..config import ConfigError, RunConfig, dump_config, register_choices
from ..data.tasks import answer_of, read_pairs
from ..families import family_of
from ..models.adapters import adapters_disabled, add_adapters
from ..objectives.guidance import unconditional_input
from ..objectives.mdlm import MaskedDiffusion
from ..pipeline import make_canvas, request_ids
from ..runtime import seed_for
from ..samplers.base import row_seeds
from ..samplers.registry import make_sampler, samplers_for
from ..samplers.scheduled import ScheduledSampler, Trajectory, rollout_guided, rollout_sigma, tempered_log_probs

SCHEDULE_PARAMETERS = ("reveal", "temperature", "guidance")
register_choices("rl.sampler", ("scheduled", *samplers_for("diffusion")))  # scheduled: this module's rollout


Reward = Callable[[list[str], list[str], list[str]], list[float]]


def rollout_logits(model, diffusion: MaskedDiffusion, x: torch.Tensor, prompt: torch.Tensor,
                   guidance: torch.Tensor) -> torch.Tensor:
    """Logits (N, L, V) in float32 with the mask class at ``-inf``; rows with ``guidance != 0`` are
    guided, the unconditional branch being ``x`` with the prompt masked."""
    sigma = rollout_sigma(diffusion, x, prompt)
    conditional = model(x, sigma)
    rows = (guidance != 0).nonzero()[:, 0]
    l_u = model(unconditional_input(x[rows], prompt[rows], diffusion.mask_id), sigma[rows]) if len(rows) else None
    return rollout_guided(conditional, l_u, guidance, diffusion.mask_id)


def exact_match_reward(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    """1 when the completion equals the reference answer, else 0 (star graphs, any verifiable task)."""
    return [float(c == a) for c, a in zip(completions, answers)]


def prefix_match_reward(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    """The share of the answer's characters that the completion gets right, position by position (a
    denser signal for paths and sequences)."""
    return [sum(x == y for x, y in zip(c, a)) / max(len(a), len(c), 1) for c, a in zip(completions, answers)]


REWARDS: dict[str, Reward] = {"exact_match": exact_match_reward, "prefix_match": prefix_match_reward}


def load_reward(name: str) -> Reward:
    """A built-in reward by name, or ``module:function`` (any importable callable
    ``f(prompts, completions, answers) -> list[float]``)."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ConfigError(f"unknown reward {name!r}: built-in {', '.join(REWARDS)} or module:function")
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"reward {name!r} cannot be imported: {exc}") from None
    if not callable(fn):
        raise ConfigError(f"reward {name!r} is not callable")
    return fn


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages (N,) for rewards (N,) in consecutive groups of ``group``: ``(R - mean) / (std + eps)``
    within each group (population std; a group with equal rewards gets zeros)."""
    r = rewards.double().reshape(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)).reshape(-1)


class SchedulePolicy(nn.Module):
    """``pi_phi(z_k | k)``: a diagonal Gaussian per step ``k`` over the unconstrained parameters
    ``learned`` (a subset of reveal, temperature, guidance); ``mean`` (K, D), shared ``log_std`` (D,).

    Initialized at the fixed schedule it replaces: reveal ``1/(K - k)`` of the remaining masks (the same
    number every step), temperature ``temperature``, guidance ``guidance``. ``std = 0`` makes the policy
    deterministic (``z = mean``; it then has no density and cannot be trained)."""

    def __init__(self, steps: int, learned: tuple[str, ...], temperature: float = 1.0, guidance: float = 0.0,
                 std: float = 0.3):
        super().__init__()
        unknown = [p for p in learned if p not in SCHEDULE_PARAMETERS]
        if unknown or len(set(learned)) != len(learned):
            raise ConfigError(f"rl.schedule: parameters among {', '.join(SCHEDULE_PARAMETERS)} without repeats, "
                              f"got {list(learned)}")
        if steps < 1 or temperature <= 0 or std < 0:
            raise ConfigError("rl.sample_steps >= 1, sample.temperature > 0 and rl.schedule_std >= 0 needed")
        self.steps, self.learned = steps, tuple(learned)
        self.fixed = {"temperature": temperature, "guidance": guidance}
        reveal = torch.zeros(steps, dtype=torch.float64)  # the last step reveals everything anyway
        reveal[:-1] = torch.logit(1 / (steps - torch.arange(steps - 1, dtype=torch.float64)))
        init = {"reveal": reveal, "temperature": torch.full((steps,), math.log(temperature), dtype=torch.float64),
                "guidance": torch.full((steps,), float(guidance), dtype=torch.float64)}
        self.mean = nn.Parameter(torch.stack([init[p] for p in self.learned], 1).float()
                                 if self.learned else torch.zeros(steps, 0))
        self.std0 = std
        self.log_std = nn.Parameter(torch.full((len(self.learned),), math.log(std) if std > 0 else 0.0))

    @property
    def deterministic(self) -> bool:
        """Whether the policy always gives its means (zero ``std`` or nothing learned)."""
        return self.std0 == 0 or not self.learned

    def std(self) -> torch.Tensor:
        """The standard deviations (D,) of the learned parameters (zeros for a deterministic policy)."""
        return torch.zeros_like(self.log_std) if self.std0 == 0 else self.log_std.exp()

    def sample(self, k: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """``z_k`` (n, D) for ``n`` rollouts at step ``k``."""
        eps = torch.randn(n, len(self.learned), generator=generator)
        return (self.mean[k] + self.std() * eps).detach()

    def log_prob(self, k: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``log pi_phi(z | k)`` summed over the parameters: (n,) for steps ``k`` (n,) and ``z`` (n, D)."""
        if self.std0 == 0:
            raise ValueError("a zero-variance schedule has no density")
        mean, log_std = self.mean[k], self.log_std
        return (-0.5 * ((z - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def actions(self, k: int, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Squash ``z`` (n, D) into reveal fraction (in (0, 1); 1 at the last step), temperature (> 0)
        and guidance weight, each (n,)."""
        n = len(z)
        out = {"reveal": torch.full((n,), 1 / (self.steps - k)),
               "temperature": torch.full((n,), self.fixed["temperature"]),
               "guidance": torch.full((n,), self.fixed["guidance"])}
        for d, name in enumerate(self.learned):
            value = z[:, d]
            out[name] = {"reveal": torch.sigmoid, "temperature": torch.exp, "guidance": lambda v: v}[name](value)
        if k == self.steps - 1:
            out["reveal"] = torch.ones(n)
        return {key: v.detach().double() for key, v in out.items()}

    def summary(self) -> dict:
        """Per step, the squashed actions at the means (what the deterministic schedule does)."""
        with torch.no_grad():
            rows = [self.actions(k, self.mean[k][None]) for k in range(self.steps)]
        return {name: [round(float(r[name][0]), 4) for r in rows] for name in SCHEDULE_PARAMETERS} | {
            "std": [round(float(s), 4) for s in self.std().detach()]}


@dataclass
class Rollouts:
    """``N = P * G`` trajectories of ``K`` steps. ``canvases`` (N, K+1, L): the canvas before each step
    and the final one; ``z`` (N, K, D) the schedule draws; ``temperature``/``guidance`` (N, K) the
    actions used; ``old_log_probs`` (N, K, L) ``log pi_theta_old`` of the tokens revealed at each step
    (0 elsewhere); ``prompt`` (N, L) the fixed positions; texts of the completions and their rewards."""

    canvases: torch.Tensor
    z: torch.Tensor
    temperature: torch.Tensor
    guidance: torch.Tensor
    old_log_probs: torch.Tensor
    old_schedule_log_probs: torch.Tensor | None
    prompt: torch.Tensor
    completions: list[str]
    rewards: torch.Tensor
    group: int

    @property
    def steps(self) -> int:
        """The number of steps ``K`` of each trajectory."""
        return self.canvases.shape[1] - 1

    def revealed(self, k: int, mask_id: int) -> torch.Tensor:
        """(N, L) bool: the positions unmasked at step ``k``."""
        return (self.canvases[:, k] == mask_id) & (self.canvases[:, k + 1] != mask_id)


@torch.no_grad()
def recorded_rollouts(model, diffusion: MaskedDiffusion, sampler, canvas: torch.Tensor, seeds: torch.Tensor,
                      temperature: float) -> Trajectory:
    """Rollouts from any diffusion sampler: its canvases after every step that changed something (through
    ``on_step``), scored as the tokens revealed at ``temperature``; the trajectory of a scheduled rollout
    with D = 0 and no guidance."""
    frames = [canvas.clone()]

    def keep(c):
        if not torch.equal(c, frames[-1]):
            frames.append(c.clone())

    sampler.sample(model, canvas, seeds, on_step=keep)
    canvases = torch.stack(frames, 1)
    n, steps = len(canvas), canvases.shape[1] - 1
    temp = torch.full((n, steps), float(temperature), dtype=torch.float64)
    prompt = canvas != diffusion.mask_id
    zero = torch.zeros(n, dtype=torch.float64)
    log_probs = []
    for k in range(steps):
        x, nxt = canvases[:, k], canvases[:, k + 1]
        lp = tempered_log_probs(rollout_logits(model, diffusion, x, prompt, zero), temp[:, k])
        revealed = (x == diffusion.mask_id) & (nxt != diffusion.mask_id)
        log_probs.append(torch.where(revealed, lp.gather(2, nxt[:, :, None])[:, :, 0], torch.zeros_like(lp[..., 0])))
    return Trajectory(canvases, torch.zeros(n, steps, 0), temp, torch.zeros(n, steps, dtype=torch.float64),
                      torch.stack(log_probs, 1))


def clipped_surrogate(ratio: torch.Tensor, advantage: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's ``min(rho A, clip(rho, 1 - eps, 1 + eps) A)`` elementwise."""
    return torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)


def model_loss(model, reference, diffusion: MaskedDiffusion, rollouts: Rollouts, advantages: torch.Tensor,
               steps: list[int], clip: float, beta: float) -> tuple[torch.Tensor, dict]:
    """The model's GRPO loss on the ``steps`` of ``rollouts`` (a scalar to minimize) and diagnostics."""
    n = len(advantages)
    total = torch.zeros(n, device=advantages.device)
    tokens = torch.zeros(n, device=advantages.device)
    kl_sum = clipped = 0.0
    for k in steps:
        revealed = rollouts.revealed(k, diffusion.mask_id)
        if not revealed.any():
            continue
        x, nxt = rollouts.canvases[:, k], rollouts.canvases[:, k + 1]
        logits = rollout_logits(model, diffusion, x, rollouts.prompt, rollouts.guidance[:, k])
        new = tempered_log_probs(logits, rollouts.temperature[:, k]).gather(2, nxt[:, :, None])[:, :, 0]
        new = torch.where(revealed, new, torch.zeros_like(new))  # elsewhere -inf (still masked) or meaningless
        ratio = torch.exp(new - rollouts.old_log_probs[:, k])
        adv = advantages.float()[:, None].expand_as(ratio)
        objective = clipped_surrogate(ratio, adv, clip)
        if beta > 0:
            # the reference: a frozen copy, or (adapter runs) the model itself with its adapters off
            frozen = contextlib.nullcontext(reference) if reference is not None else adapters_disabled(model)
            with torch.no_grad(), frozen as ref_model:
                ref_logits = rollout_logits(ref_model, diffusion, x, rollouts.prompt, rollouts.guidance[:, k])
                ref = tempered_log_probs(ref_logits, rollouts.temperature[:, k]).gather(2, nxt[:, :, None])[:, :, 0]
                ref = torch.where(revealed, ref, torch.zeros_like(ref))
            kl = torch.exp(ref - new) - (ref - new) - 1
            objective = objective - beta * kl
            kl_sum += float(kl.detach()[revealed].sum())
        total = total + (objective * revealed).sum(1)
        tokens = tokens + revealed.sum(1)
        clipped += float(((ratio - 1).abs() > clip)[revealed].sum())
    count = float(tokens.sum())
    loss = -(total / tokens.clamp(min=1)).mean()
    return loss, {"kl": kl_sum / max(count, 1.0), "clip_fraction": clipped / max(count, 1.0), "tokens": count}


def schedule_loss(policy: SchedulePolicy, rollouts: Rollouts, advantages: torch.Tensor,
                  clip: float) -> tuple[torch.Tensor, dict]:
    """The schedule's GRPO loss: the clipped surrogate of ``rho_phi`` over every (rollout, step)."""
    n, steps = rollouts.z.shape[:2]
    k = torch.arange(steps).repeat(n)
    new = policy.log_prob(k, rollouts.z.reshape(n * steps, -1)).reshape(n, steps)
    ratio = torch.exp(new - rollouts.old_schedule_log_probs)
    objective = clipped_surrogate(ratio, advantages.float()[:, None].expand_as(ratio), clip)
    return -objective.mean(), {"clip_fraction": float(((ratio - 1).abs() > clip).float().mean())}


class Trainer:
    """Rollouts, advantages and alternating updates of the model and the schedule (module docstring)."""

    def __init__(self, model, diffusion: MaskedDiffusion, tokenizer, cfg: RunConfig, reward: Reward, device="cpu"):
        r = cfg.rl
        self.cfg, self.r, self.model, self.diffusion, self.tokenizer = cfg, r, model, diffusion, tokenizer
        self.reward, self.device = reward, torch.device(device)
        # with adapters the reference is the frozen base under them (no second copy in memory)
        adapters = cfg.adapter.kind != "none"
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if r.kl > 0 and not adapters else None
        learned = tuple(r.schedule) if r.mode != "model" else ()
        self.policy = SchedulePolicy(r.sample_steps, learned, cfg.sample.temperature, cfg.sample.guidance,
                                     r.schedule_std if learned else 0.0)
        self.model_optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=r.lr,
                                                 weight_decay=0.0)
        self.schedule_optimizer = torch.optim.Adam(self.policy.parameters(), lr=r.schedule_lr)
        self.sampler = None
        if r.sampler != "scheduled":
            self.sampler = make_sampler(replace(cfg.sample, sampler=r.sampler), diffusion, tokenizer, cfg.model.length)

    def phase(self, iteration: int) -> str:
        """What iteration ``iteration`` updates; a deterministic schedule has nothing to learn, so with it
        every mode updates the model (Co-GRPO reduces to GRPO)."""
        if self.policy.deterministic:
            return "model"
        if self.r.mode != "co":
            return self.r.mode
        return "model" if (iteration // self.r.alternate_every) % 2 == 0 else "schedule"

    def rollouts(self, pairs: list[tuple[str, str]], group: int, seed: int, mean_schedule: bool = False) -> Rollouts:
        """``group`` rollouts for each (prompt, answer) pair, scored by the reward."""
        prompt_ids = [request_ids(self.tokenizer, p, template=False) for p, _ in pairs]
        rows = [ids for ids in prompt_ids for _ in range(group)]
        canvas = make_canvas(self.tokenizer, rows, self.cfg.data.length, bos=True).to(self.device)
        seeds = row_seeds(seed, len(rows)).to(self.device)
        generator = torch.Generator().manual_seed(seed)
        self.model.eval()
        if self.sampler is not None:
            t = recorded_rollouts(self.model, self.diffusion, self.sampler, canvas, seeds, self.cfg.sample.temperature)
        else:
            policy = self.policy
            if mean_schedule and not policy.deterministic:
                policy = copy.deepcopy(policy)
                policy.std0 = 0.0
            sampler = ScheduledSampler(self.diffusion, policy, generator)
            sampler.sample(self.model, canvas, seeds)
            t = sampler.trajectory
        canvases, z, temperature, guidance, old = t.canvases, t.z, t.temperature, t.guidance, t.log_probs
        completions = [answer_of(row.tolist(), len(prompt_ids[i // group]), self.tokenizer)
                       for i, row in enumerate(canvases[:, -1].cpu())]
        prompts = [p for p, _ in pairs for _ in range(group)]
        answers = [a for _, a in pairs for _ in range(group)]
        rewards = torch.tensor(self.reward(prompts, completions, answers), dtype=torch.float64)
        old_schedule = None
        if not self.policy.deterministic and self.sampler is None:
            n, steps = z.shape[:2]
            with torch.no_grad():
                old_schedule = self.policy.log_prob(torch.arange(steps).repeat(n),
                                                    z.reshape(n * steps, -1)).reshape(n, steps)
        return Rollouts(canvases, z, temperature, guidance, old, old_schedule, canvas != self.diffusion.mask_id,
                        completions, rewards, group)

    def update(self, iteration: int, pairs: list[tuple[str, str]]) -> dict:
        """One iteration on the prompt/answer ``pairs``: rollouts, group advantages, then ``rl.epochs`` updates of
        the model or the schedule (:meth:`phase`); returns the iteration's metrics."""
        r = self.r
        seed = seed_for(r.seed, iteration, 0x6E90)
        rollouts = self.rollouts(pairs, r.group_size, seed)
        advantages = group_advantages(rollouts.rewards, r.group_size).to(self.device)
        phase = self.phase(iteration)
        info: dict = {"iteration": iteration + 1, "phase": phase, "reward": float(rollouts.rewards.mean()),
                      "reward_std": float(rollouts.rewards.std()) if len(rollouts.rewards) > 1 else 0.0}
        generator = torch.Generator().manual_seed(seed + 1)
        for _ in range(r.epochs):
            if phase == "model":
                steps = list(range(rollouts.steps))
                if 0 < r.step_subsample < len(steps):
                    steps = sorted(torch.randperm(len(steps), generator=generator)[:r.step_subsample].tolist())
                loss, extra = model_loss(self.model, self.reference, self.diffusion, rollouts, advantages, steps,
                                         r.clip, r.kl)
                self.model_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.grad_clip)
                self.model_optimizer.step()
            else:
                loss, extra = schedule_loss(self.policy, rollouts, advantages, r.clip)
                self.schedule_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.schedule_optimizer.step()
            info.update({f"{phase}_{k}": v for k, v in extra.items()}, loss=float(loss.detach()))
        return info

    @torch.no_grad()
    def evaluate(self, pairs: list[tuple[str, str]], seed: int) -> float:
        """Mean reward of one rollout per prompt with the schedule at its means."""
        total = 0.0
        for start in range(0, len(pairs), self.r.eval_batch):
            chunk = pairs[start:start + self.r.eval_batch]
            total += float(self.rollouts(chunk, 1, seed + start, mean_schedule=True).rewards.sum())
        return total / len(pairs)


def rl_train(cfg: RunConfig, model, diffusion: MaskedDiffusion, tokenizer, device="cpu",
             reward: Reward | None = None) -> Path:
    """Run ``cfg.rl.iterations`` GRPO / Co-GRPO iterations on ``model`` (changed in place); writes the
    run folder (resolved config, ``metrics.jsonl``, the model checkpoint with the schedule's summary,
    ``schedule.json``, ``rewards.png``) and returns the checkpoint."""
    r = cfg.rl
    if not family_of(cfg).reinforce:
        raise ConfigError(f"unmask rl fine-tunes masked diffusion models (MDLM, LLaDA, Dream), not {cfg.family}")
    if not r.prompts:
        raise ConfigError("rl.prompts: a JSONL file of prompt/answer pairs (data.prompt_field/data.text_field)")
    if r.mode != "model" and r.sampler != "scheduled":
        raise ConfigError(f"rl.mode={r.mode} learns a schedule, which only rl.sampler=scheduled follows")
    if r.mode == "schedule" and (r.schedule_std == 0 or not r.schedule):
        raise ConfigError("rl.mode=schedule needs a schedule to learn: rl.schedule parameters and rl.schedule_std > 0")
    prompt_field = cfg.data.prompt_field or "prompt"
    pairs = read_pairs(r.prompts, prompt_field, cfg.data.text_field)
    held_out = read_pairs(r.eval_prompts, prompt_field, cfg.data.text_field) if r.eval_prompts else []
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise RunFolderError(f"run_dir={run_dir} is not empty; unmask rl writes a new run folder (it does not "
                             f"resume), so give one that does not exist yet")
    if cfg.adapter.kind != "none":
        add_adapters(model, cfg.adapter, cfg.model.backbone)
    with RunLock(run_dir):
        trainer = Trainer(model.to(device), diffusion, tokenizer, cfg, reward or load_reward(r.reward), device)
        return _rl_loop(trainer, cfg, model, tokenizer, pairs, held_out, run_dir)


def _rl_loop(trainer: "Trainer", cfg: RunConfig, model: torch.nn.Module, tokenizer, pairs: list, held_out: list,
             run_dir: Path) -> Path:
    r = cfg.rl
    dump_config(cfg, run_dir / "config.yaml")
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(r.seed)).tolist()
    start = time.perf_counter()

    def log(record: dict) -> None:
        with open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    if held_out:
        log({"iteration": 0, "event": "eval", "reward": trainer.evaluate(held_out, r.seed)})
    for it in range(r.iterations):
        at = it * r.prompts_per_step
        record = trainer.update(it, [pairs[order[(at + j) % len(order)]] for j in range(r.prompts_per_step)])
        record.update(elapsed_seconds=time.perf_counter() - start, schedule=trainer.policy.summary())
        log(record)
        if held_out and r.eval_every and ((it + 1) % r.eval_every == 0 or it + 1 == r.iterations):
            log({"iteration": it + 1, "event": "eval", "reward": trainer.evaluate(held_out, r.seed)})
    (run_dir / "schedule.json").write_text(json.dumps(trainer.policy.summary(), indent=1) + "\n")
    state = {"rl_iterations": r.iterations, "schedule": trainer.policy.summary()}
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    weights = {k: v for k, v in model.state_dict().items() if cfg.adapter.kind == "none" or k in trained}
    ckpt = save_checkpoint(run_dir / "checkpoints", r.iterations, weights, cfg, tokenizer, trainer_state=state)
    plot_rewards(metrics, run_dir / "rewards.png")
    return ckpt


def plot_rewards(metrics: Path, out: Path) -> bool:
    """Training reward per iteration and held-out reward; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("event") != "eval"]
    evals = [r for r in records if r.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["iteration"] for r in train], [r["reward"] for r in train], lw=0.8, alpha=0.6, label="rollout reward")
    if evals:
        ax.plot([r["iteration"] for r in evals], [r["reward"] for r in evals], "o-", label="held-out reward")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True
