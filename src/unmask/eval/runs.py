"""Evaluation entry points: a model source and a config in, a result dict out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..checkpoints.checkpoint import load_model
from ..checkpoints.pretrained import open_source
from ..config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    merge_trees,
    parse_overrides,
    to_dict,
)
from ..data.dataset import Data
from ..data.labelled import LabelledSplit
from ..data.layouts import TOKEN, starts_with_bos
from ..data.readers import DataError
from ..data.tasks import read_pairs
from ..data.tokenization import DNATokenizer, with_oov_policy
from ..families import family_of
from ..pipeline import Generation, LoadedModel, Source, checkpoint_config, generate_rows
from ..runtime import autocast, device_for, resolve_precision
from .classification import classification_metrics, predict
from .exact_match import exact_match
from .generation import generation_metrics, load_evaluator
from .likelihood import likelihood_of_rows, select_rows


def reading_tokenizer(ckpt: Source, cfg: RunConfig):
    """The model's tokenizer under the run's ``data.oov`` policy (ids unchanged)."""
    return with_oov_policy(ckpt.tokenizer, cfg.data.oov, cfg.data.oov_replacement)


def evaluate(model: LoadedModel | Source | str | Path, overrides: Sequence[str] = (), device: str | None = None,
             progress: bool = False, **eval_settings) -> dict:
    """Score ``model`` (a :class:`LoadedModel`, a model source or its path) as ``unmask eval`` does:
    ``eval.*`` settings as keywords (``split="valid"``, ``mc_samples=8``, ``metric="generation"``, ...),
    other ``eval.*``/``sample.*``/``data.*`` overrides as ``key=value`` strings."""
    source = model.source if isinstance(model, LoadedModel) else \
        model if isinstance(model, Source) else open_source(model)
    settings = [f"eval.{key}={json.dumps(value)}" for key, value in eval_settings.items()]
    cfg = checkpoint_config(source, [*overrides, *settings])
    return run_eval(source, cfg, device_for(device), progress)


def run_eval(ckpt: Source, cfg: RunConfig, device: torch.device, progress: bool = True) -> dict:
    """The result of ``unmask eval`` on ``ckpt`` under ``cfg``: classifier metrics, generation quality, exact match
    or likelihood (``eval.metric``)."""
    if family_of(cfg).labels:
        return run_classifier_eval(ckpt, cfg, device)
    if cfg.eval.metric == "generation":
        return run_generation_eval(ckpt, cfg, device)
    if cfg.eval.metric == "exact_match":
        return run_exact_match(ckpt, cfg, device)
    model, objective = load_model(ckpt, ema=cfg.eval.use_ema, device=device, quantize=cfg.eval.quantize)
    tokenizer = reading_tokenizer(ckpt, cfg)
    data = Data(cfg.data, tokenizer=tokenizer, progress=progress)
    e = cfg.eval
    result = likelihood_of_rows(model, objective, data.rows(e.split), cfg.data, tokenizer, e.mc_samples, e.batch_size,
                                e.max_sequences, e.seed, resolve_precision(e.precision, device), device, progress)
    result.update(split=e.split, checkpoint=str(ckpt.path), step=ckpt.step, ema=e.use_ema and ckpt.has_ema,
                  quantize=e.quantize)
    return result


def run_classifier_eval(ckpt: Source, cfg: RunConfig, device: torch.device) -> dict:
    """Accuracy, MCC, AUC and cross-entropy of a classifier on ``eval.split`` (its data file)."""
    path = {"train": cfg.data.path, "valid": cfg.data.valid_path, "test": cfg.data.test_path}[cfg.eval.split]
    if not path:
        raise ConfigError(f"this classifier has no {cfg.eval.split} file: set data.{cfg.eval.split}_path")
    model, _ = load_model(ckpt, ema=False, device=device)
    split = LabelledSplit(path, cfg, ckpt.tokenizer, cfg.classifier.labels)
    probs = predict(model, split, cfg.eval.batch_size, device, resolve_precision(cfg.eval.precision, device))
    return {**classification_metrics(probs, split.labels), "split": cfg.eval.split, "path": path,
            "checkpoint": str(ckpt.path), "step": ckpt.step}


def run_exact_match(ckpt: Source, cfg: RunConfig, device: torch.device) -> dict:
    """Exact-match accuracy of generated answers on the prompt/answer pairs of ``eval.split``."""
    path = {"train": cfg.data.path, "valid": cfg.data.valid_path, "test": cfg.data.test_path}[cfg.eval.split]
    if not path or not cfg.data.prompt_field:
        raise ConfigError("eval.metric=exact_match needs prompt/answer files: data.prompt_field and "
                          f"data.{cfg.eval.split}_path (JSONL)")
    pairs = read_pairs(path, cfg.data.prompt_field, cfg.data.text_field)
    if cfg.eval.max_sequences > 0:
        pairs = [pairs[i] for i in select_rows(len(pairs), cfg.eval.max_sequences, cfg.eval.seed)]
    s = cfg.sample
    model, objective = load_model(ckpt, ema=s.use_ema, device=device, quantize=s.quantize)
    precision = resolve_precision(s.model_precision, device)
    tokenizer = reading_tokenizer(ckpt, cfg)
    result = exact_match(model, objective, tokenizer, s, pairs, s.length or cfg.data.length, cfg.model.length,
                         device, autocast=lambda: autocast(device, precision))
    result.update(split=cfg.eval.split, path=path, sampler=s.sampler, checkpoint=str(ckpt.path), step=ckpt.step)
    return result


def run_sample(ckpt: Source, cfg: RunConfig, device: torch.device, prompts: list[str] | None = None,
               template: str | None = None, chat: bool = False) -> Generation:
    """Samples of ``ckpt`` under ``cfg.sample`` (``unmask sample``): unconditional, after ``prompts``, infilling
    ``template``, or answers in the chat template."""
    s = cfg.sample
    model, objective = load_model(ckpt, ema=s.use_ema, device=device, quantize=s.quantize)
    precision = resolve_precision(s.model_precision, device)
    return generate_rows(model, objective, reading_tokenizer(ckpt, cfg), s, s.length or cfg.data.length,
                         cfg.model.length, prompts, template, bos=starts_with_bos(cfg.data), device=device,
                         autocast=lambda: autocast(device, precision), chat=chat)


def run_generation_eval(ckpt: Source, cfg: RunConfig, device: torch.device) -> dict:
    """Unconditional samples (``sample.*``) scored by ``eval.evaluator`` next to as many held-out
    rows of the ``eval.split`` of the same length."""
    if not cfg.eval.evaluator:
        raise ConfigError("eval.metric=generation needs eval.evaluator: an AR checkpoint of this project "
                          "or a Hugging Face causal LM folder")
    evaluator = load_evaluator(cfg.eval.evaluator, device)
    gen = run_sample(ckpt, cfg, device)
    rows = Data(cfg.data, tokenizer=reading_tokenizer(ckpt, cfg)).rows(cfg.eval.split)
    ids, kinds = rows.get(select_rows(len(rows), len(gen.texts), cfg.eval.seed))
    length = len(gen.ids[0])
    reference_ids = [row[k == TOKEN][:length].tolist() for row, k in zip(ids, kinds)]
    sample_ids = [[t for t in row if t not in ckpt.tokenizer.special_ids] for row in gen.ids]
    dna = isinstance(ckpt.tokenizer, DNATokenizer)
    result = generation_metrics(gen.texts, sample_ids, [ckpt.tokenizer.decode(r) for r in reference_ids],
                                reference_ids, evaluator, mauve=cfg.eval.mauve and not dna,
                                kmer_sizes=(3, 4, 6) if dna else ())
    result.update(gen.summary(), sampler=cfg.sample.sampler, steps=cfg.sample.steps, split=cfg.eval.split,
                  checkpoint=str(ckpt.path), step=ckpt.step)
    return result


def run_zero_shot(ckpt: Source, cfg: RunConfig, target: str, overrides: list[str], device: torch.device,
                  progress: bool = True) -> dict:
    """Likelihood on ``target`` (``wikitext2``/``wikitext103`` with ``data.path``, or a text file or
    folder, all of it as the test split) in the model's row layout, under both of MDLM's conventions:
    EOS inserted between documents (the released code) and not (the paper, bd3lms, DUO)."""
    given = parse_overrides(overrides).get("data", {})
    data = dict(to_dict(cfg.data), hf_split_names=["train", "validation", "test"])
    if target in ("wikitext2", "wikitext103"):
        data.update(dataset=target)
    else:
        path = Path(target)
        if not path.exists():
            raise DataError(f"--zero-shot {target}: neither wikitext2/wikitext103 nor an existing file or folder")
        data.update(dataset="text", path=str(path), test_path=str(path), valid_path=None,
                    documents=given.get("documents", "line"))
    data.update({k: v for k, v in given.items() if k not in ("insert_eos",)})
    out = {"zero_shot": target, "split": cfg.eval.split, "checkpoint": str(ckpt.path), "step": ckpt.step}
    model, objective = load_model(ckpt, ema=cfg.eval.use_ema, device=device, quantize=cfg.eval.quantize)
    e = cfg.eval
    for insert_eos in (True, False):
        run_cfg = config_from_dict(merge_trees(to_dict(cfg), {"data": dict(data, insert_eos=insert_eos)}))
        tokenizer = with_oov_policy(ckpt.tokenizer, run_cfg.data.oov, run_cfg.data.oov_replacement)
        rows = Data(run_cfg.data, tokenizer=tokenizer, progress=progress).rows(e.split)
        result = likelihood_of_rows(model, objective, rows, run_cfg.data, tokenizer, e.mc_samples, e.batch_size,
                                    e.max_sequences, e.seed, resolve_precision(e.precision, device), device, progress)
        out["with_eos" if insert_eos else "without_eos"] = result
    return out
