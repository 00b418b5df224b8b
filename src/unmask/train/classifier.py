"""Sequence classification on the DiT backbone (MDLM's downstream fine-tuning), for DNA and for text.

``family: classifier`` runs put a head on the bidirectional backbone: the last block's hidden states,
pooled (``mean`` over non-padding positions, or ``cls``: the BOS position), a layer norm, dropout and a
linear layer to the classes. Rows are ``[BOS] sequence [EOS] [PAD]...`` of ``data.length`` (longer
sequences are truncated), read from CSV/TSV/JSONL files with ``data.text_field`` and
``data.label_field`` (``data.path`` train, ``data.valid_path``, ``data.test_path``). The backbone starts
from a pretrained MDLM (``train.init_from``) or from scratch; the input is the clean sequence (no masks).

Training: AdamW with the LM runs' learning-rate schedule, gradient clipping, bf16 autocast where native,
every draw seeded by ``(seed, step)``; the validation split is scored every ``train.eval_every`` steps
and the checkpoint with the best validation score (ROC AUC for two classes, accuracy otherwise) is
kept as ``best/``; the test split is scored with it at the end (``test_metrics.json``). One process.

Metrics (scikit-learn): accuracy, Matthews correlation coefficient, ROC AUC (binary: of the
positive-class probability; more classes: one-vs-rest macro average), cross-entropy.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoints.checkpoint import (
    Checkpoint,
    list_checkpoints,
    load_weights,
    resume_point,
    save_checkpoint,
)
from ..checkpoints.runfolder import RunLock, clear_run_folder
from ..config import RunConfig, dump_config
from ..data.labelled import LabelledSplit, label_names, read_labelled
from ..data.layouts import BatchOrder
from ..data.readers import DataError
from ..data.tokenization import build_tokenizer
from ..eval.classification import classification_metrics, predict, selection_score
from ..models.classifier import build_classifier
from ..runtime import autocast, deterministic_algorithms, resolve_precision, seed_for, set_threads
from .loop import (
    MetricsLog,
    TrainingError,
    check_resumable,
    init_tokenizer,
    initialize_from,
)
from .optim import learning_rate


def train_classifier(cfg: RunConfig, fresh: bool = False) -> Path:
    """Fine-tune (``train.init_from``) or train from scratch; returns the best checkpoint folder. Writes
    the run folder like ``unmask train`` (config, metrics.jsonl, checkpoints) plus ``test_metrics.json``,
    holding its lock."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with RunLock(Path(cfg.run_dir)), deterministic_algorithms(cfg.train.deterministic, device):
        if fresh:
            clear_run_folder(Path(cfg.run_dir))
        return _train_classifier(cfg, device)


def _train_classifier(cfg: RunConfig, device: torch.device) -> Path:
    t, d = cfg.train, cfg.data
    set_threads(t.threads, 1)
    precision = resolve_precision(t.precision, device)
    run_dir = Path(cfg.run_dir)
    train_texts, train_labels = read_labelled(d.path, d.text_field, d.label_field)
    names = cfg.classifier.labels or label_names(train_labels)
    if len(names) < 2:
        raise DataError(f"{d.path}: a classifier needs at least two classes, found {names}")
    cfg.classifier.labels = names
    try:
        tokenizer = init_tokenizer(cfg) or build_tokenizer(d.tokenizer, d.tokenizer_path, d.alphabet, d.oov,
                                                           d.oov_replacement,
                                                           corpus_symbols=lambda: set("".join(train_texts)))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(str(exc)) from None
    splits = {"train": LabelledSplit(d.path, cfg, tokenizer, names),
              "valid": LabelledSplit(d.valid_path, cfg, tokenizer, names)}
    if d.test_path:
        splits["test"] = LabelledSplit(d.test_path, cfg, tokenizer, names)

    torch.manual_seed(seed_for(t.seed, 0xC1A55))
    model = build_classifier(cfg, tokenizer)
    ckpt_root = run_dir / "checkpoints"
    ckpt = resume_point(ckpt_root, print)
    if ckpt is not None:
        check_resumable(ckpt, cfg, run_dir)
    elif t.init_from:
        initialize_from(model.backbone, t.init_from, cfg, tokenizer, family="mdlm")
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    dump_config(cfg, run_dir / "config.yaml")
    tokenizer.save(run_dir / "tokenizer")
    start_step, best = 0, {"score": -math.inf, "step": 0}
    if ckpt is not None:
        load_weights(model, ckpt.weights(ema=False), str(ckpt.path))
        optimizer.load_state_dict(ckpt.optimizer_state())
        start_step, best = ckpt.step, ckpt.state.get("best", best)
    log = MetricsLog(run_dir / "metrics.jsonl", True)
    log.write({"event": "start", "step": start_step, "parameters": sum(p.numel() for p in model.parameters()),
               "classes": names, **{f"{k}_rows": len(v) for k, v in splits.items()}, "init_from": t.init_from})
    order = BatchOrder(len(splits["train"]), t.batch_size, t.seed)
    eval_every = t.eval_every or max(1, t.steps // 10)
    window_loss, window_start = torch.zeros((), device=device), time.perf_counter()

    def evaluate_split(name: str) -> dict:
        return classification_metrics(predict(model, splits[name], cfg.eval.batch_size, device, precision),
                                      splits[name].labels)

    def save(step: int, path_root: Path, keep: int) -> Path:
        return save_checkpoint(path_root, step, model.state_dict(), cfg, tokenizer, optimizer.state_dict(),
                               trainer_state={"best": best}, keep=keep)

    for step in range(start_step, t.steps):
        model.train()
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = torch.from_numpy(order.batch(step))
        torch.manual_seed(seed_for(t.seed, step, 0xD0))
        with autocast(device, precision):
            logits = model(splits["train"].ids[rows].to(device), splits["train"].keep[rows].to(device))
        loss = F.cross_entropy(logits.float(), splits["train"].labels[rows].to(device))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_loss += loss.detach()
        done = step + 1
        if not math.isfinite(float(loss.detach())):  # before anything is logged or saved
            raise TrainingError(f"the classifier's loss became NaN or infinite at step {done}; lower train.lr or "
                                f"set train.grad_clip")
        if t.log_every and done % t.log_every == 0:
            log.write({"step": done, "loss": float(window_loss) / t.log_every, "lr": lr, "grad_norm": float(grad_norm),
                       "seconds": time.perf_counter() - window_start, "epoch": order.epoch_of(done)})
            window_loss, window_start = torch.zeros((), device=device), time.perf_counter()
        if done % eval_every == 0 or done == t.steps:
            metrics = evaluate_split("valid")
            score = selection_score(metrics, len(names))
            log.write({"step": done, "event": "eval", "split": "valid", **metrics})
            if score > best["score"]:
                best = {"score": score, "step": done}
                save(done, run_dir / "best", keep=1)
            save(done, ckpt_root, keep=t.keep_checkpoints)
    best_path = list_checkpoints(run_dir / "best")[-1]
    load_weights(model, Checkpoint(best_path).weights(ema=False), str(best_path))
    result = {"best_step": best["step"], "valid": evaluate_split("valid")}
    if "test" in splits:
        result["test"] = evaluate_split("test")
    (run_dir / "test_metrics.json").write_text(json.dumps(result, indent=1))
    log.write({"event": "end", "step": t.steps, **{f"{k}_{m}": v for k in ("valid", "test") if k in result
                                                     for m, v in result[k].items()}})
    return best_path
