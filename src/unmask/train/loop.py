"""The training loop: one function, plain PyTorch, data-parallel through ``torchrun``.

Every source of randomness at step ``s`` is derived from ``(seed, s)``: the rows read
(:class:`~unmask.data.layouts.BatchOrder`), the diffusion noise (drawn for the global batch, then sliced per
process) and dropout (seeded per step and rank). A run resumed from a checkpoint at step ``s``
therefore computes exactly what the uninterrupted run would have, and one process with the global
batch makes the same update as several processes sharing it.

Loss normalisation: each process divides its sum of per-token losses by the *global* number of
counted tokens in the step (one all-reduce), so gradients equal those of the whole batch at once,
whatever the number of processes and accumulation steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoints.checkpoint import (
    Checkpoint,
    list_checkpoints,
    load_weights,
    resume_point,
    save_checkpoint,
)
from ..checkpoints.pretrained import check_base, initialize_from, open_source, source_reference
from ..checkpoints.runfolder import RunLock, clear_run_folder
from ..config import ConfigError, ModelConfig, RunConfig, dump_config, to_dict, validate
from ..data.layouts import BatchOrder, counted_positions, random_lengths
from ..data.tokenization import with_oov_policy
from ..eval.classification import classification_metrics, predict, selection_score
from ..eval.likelihood import likelihood_of_rows
from ..families import build_model, build_objective, family_of
from ..models.adapters import add_adapters, trainable_names
from ..models.common import count_parameters
from ..objectives.base import draw_noise
from ..objectives.distill import PARALLEL_METHODS
from ..runtime import (
    Distributed,
    LiveTensorBytes,
    deterministic_algorithms,
    generator_for,
    init_distributed,
    peak_memory_mb,
    resolve_precision,
    seed_for,
    set_threads,
    shutdown_distributed,
)
from .distill import distill_targets, distillation_objective, teacher_trajectories
from .optim import EMA, learning_rate, parameter_groups
from .parallel import parallelize, restore
from .step import Batch, TrainState, train_step


def init_tokenizer(cfg: RunConfig):
    """With ``train.init_from``, the run reads its data with the source model's tokenizer (under
    ``data.oov``), so fine-tuning data need not rebuild the same vocabulary; None otherwise."""
    if not cfg.train.init_from:
        return None

    return with_oov_policy(open_source(cfg.train.init_from).tokenizer, cfg.data.oov, cfg.data.oov_replacement)


# Keys a resumed run may change: they do not alter what is computed at each step (run_dir: a run folder
# moved or copied elsewhere resumes by its content, not by the path it was trained at).
RESUMABLE = ("run_dir", "train.steps", "train.max_minutes", "train.log_every", "train.save_every",
             "train.keep_checkpoints", "train.eval_every", "train.eval_sequences", "train.progress", "train.compile",
             "train.init_from", "train.parallel", "train.cpu_offload", "train.activation_checkpointing",
             "train.track_memory", "data.cache_dir", "eval", "sample", "rl")


def resume_differences(saved: RunConfig, new: RunConfig) -> list[str]:
    """Dotted keys whose values differ between a run's saved config and the config it is resumed
    with, other than :data:`RESUMABLE` ones, as ``key: saved -> new``."""
    def leaves(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out.update(leaves(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = value
        return out

    a, b = leaves(to_dict(saved)), leaves(to_dict(new))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not any(k == r or k.startswith(r + ".") for r in RESUMABLE)]


def check_resumable(ckpt: Checkpoint, cfg: RunConfig, run_dir: Path) -> None:
    """Refuse to resume ``ckpt`` with settings that change what each step computes."""
    changed = resume_differences(ckpt.config, cfg)
    if changed:
        shown = "; ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise ConfigError(f"{run_dir} was trained with other settings ({shown}); resuming would not continue "
                          f"that run: use the same settings, another run_dir (train.init_from={run_dir} starts "
                          f"from its weights) or --fresh")


def micro_batching(cfg: RunConfig, world: int) -> tuple[int, int]:
    """(micro batch size per process, accumulation steps) for the global ``train.batch_size``."""
    t = cfg.train
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the {world} processes")
    local = t.batch_size // world
    micro = t.micro_batch_size or local
    if local % micro:
        raise ConfigError(f"per-process batch {local} is not divisible by train.micro_batch_size={micro}")
    return micro, local // micro


class MetricsLog:
    """JSONL metrics, appended by the main process; one record per step and event."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def resume_at(self, step: int) -> int:
        """Drop the records of the steps after ``step`` (logged after the checkpoint a resume starts from,
        before a kill: they are done again) and a line cut short by the kill; rewritten beside the file and
        renamed into place. Returns how many records were dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(record, dict) and record.get("step", 0) > step:
                dropped += 1
            else:
                kept.append(line + "\n")
        if dropped:
            tmp = self.path.with_name(f".tmp-{self.path.name}-{os.getpid()}")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)
        return dropped

    def write(self, record: dict) -> None:
        """Append ``record`` as one JSON line (main process only)."""
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class TrainingError(RuntimeError):
    """Training that cannot go on (a non-finite loss)."""


def train(cfg: RunConfig, fresh: bool = False) -> Path:
    """Train (or resume) the run ``cfg.run_dir``, holding its :class:`~unmask.checkpoints.runfolder.RunLock`;
    returns the final checkpoint folder."""
    dist = init_distributed(group=cfg.train.parallel == "fsdp")
    lock = RunLock(Path(cfg.run_dir))
    tracker = LiveTensorBytes() if cfg.train.track_memory else None
    try:
        with deterministic_algorithms(cfg.train.deterministic, dist.device), tracker or contextlib.nullcontext():
            return _train(cfg, dist, fresh, lock, tracker)
    finally:
        lock.release()
        shutdown_distributed()


# the model.* keys that fix the shapes of the weights (the rest: dropout, length, ... may differ from a source)
ARCHITECTURE = ("backbone", "hidden", "blocks", "heads", "kv_heads", "intermediate", "vocab", "cond_dim", "norm_eps",
                "qkv_bias", "tie_embeddings", "logit_shift", "rope_base", "head_dim", "qk_norm", "rotary_dim",
                "moe_experts", "moe_top_k", "moe_width", "moe_shared", "moe_groups", "moe_top_groups", "moe_scale",
                "moe_dense_layers", "layer_types", "sliding_window", "global_head_dim", "global_kv_heads",
                "global_rope_base", "global_rotary_fraction", "softcap")
CHOSEN = ("block_size",)  # taken from the source when left at the default, else the run's own choice


def with_source_architecture(cfg: RunConfig) -> RunConfig:
    """With ``train.init_from``, every architecture key of ``model.*`` left at its default takes the
    source's value, so continuing a released, converted or earlier model needs no model settings; a key
    set to something else than the source has is an error naming it. A run of the source's family also
    keeps its decoding: with ``sample.sampler=auto``, the source's sampler and the sampler keys the run does
    not set (an SDAR fine-tune samples as SDAR does)."""
    if not cfg.train.init_from:
        return cfg
    opened = open_source(cfg.train.init_from).config
    if opened.family == cfg.family and cfg.sample.sampler == "auto":
        cfg = dataclasses.replace(cfg, sample=dataclasses.replace(
            cfg.sample, sampler=opened.sample.sampler, settings={**opened.sample.settings, **cfg.sample.settings}))
    source, defaults = opened.model, ModelConfig()
    adopted, conflicts = {}, []
    for key in (*ARCHITECTURE, *CHOSEN):
        ours, theirs = getattr(cfg.model, key), getattr(source, key)
        if ours == getattr(defaults, key):
            adopted[key] = theirs
        elif ours != theirs and key not in CHOSEN:
            conflicts.append(f"model.{key}={ours} (it has {theirs})")
    if conflicts:
        raise ConfigError(f"train.init_from={cfg.train.init_from} fixes the architecture: {'; '.join(conflicts)}")
    return validate(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **adopted)))


def _train(cfg: RunConfig, dist: Distributed, fresh: bool, lock: RunLock, tracker: LiveTensorBytes | None) -> Path:
    cfg = with_source_architecture(cfg)
    if cfg.train.init_from:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                 init_from=source_reference(cfg.train.init_from)))
    t = cfg.train
    set_threads(t.threads, dist.world)
    device = dist.device
    precision = resolve_precision(t.precision, device)
    run_dir = Path(cfg.run_dir)
    ckpt_root = run_dir / "checkpoints"
    micro, accumulation = micro_batching(cfg, dist.world)
    spec = family_of(cfg)
    if spec.labels and dist.world > 1:
        raise ConfigError(f"{spec.description} runs in one process; start it without torchrun")
    # a classifier validates (and keeps its best checkpoint) ten times a run unless told otherwise
    eval_every = t.eval_every or (max(1, t.steps // 10) if spec.labels else 0)
    distilling = cfg.distill.method != "none"  # a teacher's student (unmask.train.distill)
    recorded = cfg.distill.method in PARALLEL_METHODS  # ... trained on the teacher's recorded decodings
    # the main process locks the run folder, then tokenizes (and caches) the data; the others then
    # open the cache. A failure on the main process is shared so that no process waits at a barrier
    failure = None
    if dist.main:
        try:
            lock.acquire()
            if lock.stale_owner:
                print(f"{run_dir}: taking over the lock of {lock.stale_owner}, which is no longer running")
            if fresh:
                clear_run_folder(run_dir)
            data = spec.data(cfg, init_tokenizer(cfg), t.progress)
            train_rows = (teacher_trajectories(cfg, data.tokenizer, device, record=True, progress=t.progress)
                          if recorded else data.rows("train"))
            valid_rows = data.rows("valid") if eval_every else None
        except Exception as exc:
            failure = exc
    if dist.all_sum([1.0 if failure else 0.0])[0]:
        if failure:
            raise failure
        raise RuntimeError("the main process failed to prepare the data")
    if not dist.main:
        data = spec.data(cfg, init_tokenizer(cfg), False)
        train_rows = (teacher_trajectories(cfg, data.tokenizer, device, record=False) if recorded
                      else data.rows("train"))
        valid_rows = data.rows("valid") if eval_every else None
    tokenizer = data.tokenizer

    torch.manual_seed(seed_for(t.seed, 0x1417))
    model = build_model(cfg, tokenizer).to(device)
    objective = build_objective(cfg, tokenizer)
    train_objective = distillation_objective(cfg, objective, tokenizer, device) if distilling else objective
    ckpt = resume_point(ckpt_root, print if dist.main else lambda message: None)
    adapters = cfg.adapter.kind != "none"
    if ckpt is not None:
        check_resumable(ckpt, cfg, run_dir)
    base_digest = None
    if t.init_from and (ckpt is None or adapters):  # an adapter run's frozen base is loaded on resume too
        base_digest = initialize_from(model, t.init_from, cfg, tokenizer)
        if adapters and ckpt is not None:
            check_base(ckpt.state.get("base_sha256"), base_digest, t.init_from, str(ckpt.path))
        if dist.main and ckpt is None:
            print(f"initialized {run_dir} from {t.init_from}")
    if adapters:
        add_adapters(model, cfg.adapter, cfg.model.backbone)
    saved_names = set(trainable_names(model)) if adapters else None  # what checkpoints hold (None: all)
    if dist.main:
        dump_config(cfg, run_dir / "config.yaml")
        tokenizer.save(run_dir / "tokenizer")
    dist.barrier()
    params = count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fsdp = t.parallel == "fsdp"
    parallel_model, sync = parallelize(model, cfg, dist, precision)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), betas=tuple(t.betas), eps=t.adam_eps)
    ema = EMA(model, t.ema) if t.ema > 0 and spec.ema else None

    start_step, elapsed_before = 0, 0.0
    best = {"score": -math.inf, "step": 0}  # the best validation score (families that select a checkpoint)
    if ckpt is not None:
        restore(ckpt, model, optimizer, ema, dist, saved_names)
        start_step, elapsed_before = ckpt.step, ckpt.state.get("elapsed_seconds", 0.0)
        best = ckpt.state.get("best", best)
        if dist.main:
            print(f"resuming {run_dir} from step {start_step}")

    seq_len = cfg.data.length
    time_blocks, extra_noise = objective.time_blocks(seq_len), objective.extra_noise
    local = micro * accumulation
    state = TrainState(model, train_objective, optimizer,
                       torch.compile(parallel_model) if t.compile else parallel_model, ema, device, precision, micro,
                       t.grad_clip, dist.world, sync)
    order = BatchOrder(len(train_rows), t.batch_size, t.seed)
    log = MetricsLog(run_dir / "metrics.jsonl", dist.main)
    redone = log.resume_at(start_step)
    if dist.main:
        log.write({"event": "start", "step": start_step, "dropped_records": redone, "parameters": params,
                   "world": dist.world, "parallel": t.parallel, "trainable_parameters": trainable,
                   "precision": precision, "device": str(device), "train_rows": len(train_rows), "micro_batch": micro,
                   "accumulation": accumulation})

    bar = None
    if dist.main and t.progress:

        bar = tqdm(total=t.steps, initial=start_step, desc=f"train {cfg.family}", unit="step", dynamic_ncols=True)
    window_loss = window_tokens = 0.0
    window_start, window_steps = time.perf_counter(), 0
    run_start = time.perf_counter()
    step = checked_step = start_step
    last_saved = ckpt.path if ckpt is not None else None
    finite = torch.ones((), dtype=torch.bool, device=device)  # losses and gradients finite since checked_step

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - run_start

    def check_finite() -> None:
        """Stop, on every process, before a non-finite loss is logged or its weights saved."""
        nonlocal checked_step
        if dist.all_sum([0.0 if bool(finite) else 1.0])[0]:
            saved = f"the last checkpoint ({last_saved}) is intact" if last_saved else "no checkpoint was written"
            raise TrainingError(f"the training loss or gradient became NaN or infinite between steps {checked_step} "
                                f"and {step}; nothing after step {checked_step} was saved and {saved}; lower "
                                f"train.lr, raise train.warmup_steps or set train.grad_clip")
        checked_step = step

    def save(at: int, root: Path = ckpt_root, keep: int = t.keep_checkpoints) -> Path:
        state = {"elapsed_seconds": elapsed(), "ema_updates": ema.updates if ema else 0,
                 "epoch": order.epoch_of(at), "rows_seen": at * t.batch_size, "best": best}
        if adapters:
            state["base_sha256"] = base_digest
        weights, averages = model.state_dict(), ema.state_dict(model) if ema else None
        if saved_names is not None:
            weights = {k: v for k, v in weights.items() if k in saved_names}
            averages = averages and {k: v for k, v in averages.items() if k in saved_names}
        return save_checkpoint(root, at, weights, cfg, tokenizer, optimizer.state_dict(), averages, state, keep=keep,
                               group=dist)

    while step < t.steps:
        model.train()
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        rows = order.batch(step)[dist.rank * local:(dist.rank + 1) * local]
        ids_np, kinds = train_rows.get(rows)
        if t.random_length_prob > 0:  # drawn for the global batch, then this process's share
            u = np.random.default_rng(seed_for(t.seed, step, 0x1E27)).random((2, t.batch_size))
            u = u[:, dist.rank * local:(dist.rank + 1) * local]
            ids_np, kinds = random_lengths(ids_np, kinds, u[0] < t.random_length_prob, u[1], tokenizer.pad_id)
        # host-side counts and device-side loss sums: no host-device synchronization inside a step
        counted_np = counted_positions(kinds, cfg.data)
        x0 = torch.from_numpy(ids_np).to(device, non_blocking=True)
        counted = torch.from_numpy(counted_np).to(device, non_blocking=True)
        noise = draw_noise(t.batch_size, seq_len, generator_for(t.seed, step, 0x7015E), cfg.diffusion.antithetic,
                           time_blocks, extra_noise)
        noise = noise.slice(dist.rank * local, (dist.rank + 1) * local).to(device)
        labels = torch.as_tensor(train_rows.labels[rows]).to(device) if spec.labels else None
        # the unit losses are averaged over: counted tokens, or rows for per-sequence objectives (ILM)
        local_tokens = float(len(counted_np) if objective.per_sequence else counted_np.sum())
        global_tokens = dist.all_sum([local_tokens])[0]
        torch.manual_seed(seed_for(t.seed, step, dist.rank, 0xD0))
        targets = distill_targets(train_rows, rows, step, t.steps, device) if recorded else {}
        metrics = train_step(state, Batch(x0, counted, noise, global_tokens, labels, targets))
        finite &= metrics.finite
        grad_norm = metrics.grad_norm
        step += 1
        window_loss = window_loss + metrics.loss_sum
        window_tokens += local_tokens
        window_steps += 1

        stop_for_time = False
        if t.max_minutes > 0:
            stop_for_time = dist.all_sum([1.0 if elapsed() >= t.max_minutes * 60 else 0.0])[0] > 0
        validating = bool(eval_every) and (step % eval_every == 0 or step == t.steps)
        saving = (t.save_every and step % t.save_every == 0) or (validating and spec.labels)
        if (t.log_every > 0 and step % t.log_every == 0) or step == t.steps or stop_for_time or saving:
            check_finite()
        if (t.log_every > 0 and step % t.log_every == 0) or step == t.steps or stop_for_time:
            loss_sum_g, tokens_g = dist.all_sum([float(window_loss), window_tokens])
            seconds = time.perf_counter() - window_start
            record = {"step": step, "loss": loss_sum_g / max(tokens_g, 1.0), "lr": lr,
                      "grad_norm": float(grad_norm),
                      "tokens_per_second": window_steps * t.batch_size * seq_len / seconds,
                      "elapsed_seconds": elapsed(), "epoch": order.epoch_of(step)}
            if cfg.model.soft_mask_top_k:
                record["soft_mask_omegas"] = [float(w.detach()) for w in model.soft_mask.omegas]
            log.write(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
            window_loss = window_tokens = 0.0
            window_start, window_steps = time.perf_counter(), 0
        if bar is not None:
            bar.update(1)
        if validating and (dist.main or fsdp):  # a sharded model's forward needs every process
            metrics, score = _validate(cfg, spec, model, ema, objective, valid_rows, tokenizer, device)
            log.write({"step": step, "event": "eval", "split": "valid", **metrics})
            if score is not None and score > best["score"]:
                best = {"score": score, "step": step}
                save(step, run_dir / "best", keep=1)
        if saving and (dist.main or fsdp):  # each process writes its shard
            last_saved = save(step)
        dist.barrier()
        if stop_for_time:
            break
    if bar is not None:
        bar.close()
    check_finite()
    def per_process(value: float) -> list[float]:
        return dist.all_sum([value if r == dist.rank else 0.0 for r in range(dist.world)])

    peaks = per_process(peak_memory_mb(device))
    tensor_peaks = tracker and per_process(tracker.peak / 2**20)
    if (dist.main or fsdp) and (last_saved is None or not last_saved.name.endswith(f"{step:08d}")):
        last_saved = save(step)
    if dist.main:
        end = {"event": "end", "step": step, "elapsed_seconds": elapsed(), "peak_memory_mb": peaks[0],
               "peak_memory_mb_per_process": peaks}
        if tensor_peaks:
            end["peak_tensor_mb_per_process"] = tensor_peaks
        if spec.labels:
            last_saved = list_checkpoints(run_dir / "best")[-1]
            end.update(score_best(cfg, model, data, last_saved, best, device))
        log.write(end)
    dist.barrier()
    return last_saved or list_checkpoints(ckpt_root)[-1]


def score_best(cfg: RunConfig, model: torch.nn.Module, data, best_path: Path, best: dict,
               device: torch.device) -> dict:
    """A classifier's final figures: the best validation checkpoint scored on the valid and test files,
    written to ``test_metrics.json``; returned flat for the end record of ``metrics.jsonl``."""
    load_weights(model, open_source(best_path).weights(ema=False), str(best_path))
    precision = resolve_precision(cfg.train.precision, device)
    result = {"best_step": best["step"]}
    for split in ("valid", "test"):
        if data.has(split):
            rows = data.rows(split)
            result[split] = classification_metrics(predict(model, rows, cfg.eval.batch_size, device, precision),
                                                   rows.labels)
    (Path(cfg.run_dir) / "test_metrics.json").write_text(json.dumps(result, indent=1))
    return {f"{split}_{name}": value for split in ("valid", "test") if split in result
            for name, value in result[split].items()}


def _validate(cfg, spec, model, ema, objective, rows, tokenizer, device) -> tuple[dict, float | None]:
    """Validation figures and the score that picks the best checkpoint (None: no selection). A
    classifier: its metrics on the validation file, scored by AUC (two classes) or accuracy; others:
    the NELBO on ``train.eval_sequences`` rows, with the EMA weights when available."""
    if spec.labels:
        precision = resolve_precision(cfg.train.precision, device)
        metrics = classification_metrics(predict(model, rows, cfg.eval.batch_size, device, precision), rows.labels)
        return metrics, selection_score(metrics, len(cfg.classifier.labels))
    backup = None
    if ema is not None and cfg.eval.use_ema:
        backup = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(ema.state_dict(model))
    try:
        result = likelihood_of_rows(model, objective, rows, cfg.data, tokenizer, mc_samples=cfg.eval.mc_samples,
                                    batch_size=cfg.eval.batch_size, max_sequences=cfg.train.eval_sequences,
                                    seed=cfg.eval.seed, precision=resolve_precision(cfg.eval.precision, device),
                                    device=device)
    finally:
        if backup is not None:
            model.load_state_dict(backup)
    keys = ("nll", "stderr", "perplexity", "bits_per_token", "bits_per_char", "loss")
    return {k: result[k] for k in keys if k in result}, None
