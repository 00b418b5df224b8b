"""Likelihood evaluation: the NELBO of a masked diffusion model, the exact NLL of an AR model.

For each sequence the MDLM bound is estimated with ``K`` Monte-Carlo draws of ``(t, x_t)`` (times
stratified over ``[0, 1)`` within the sequence) using the exact estimator of
:meth:`MaskedDiffusion.times_and_weights`. Reported:

* ``nll``: nats per counted token (the bound for mdlm, exact for ar), ``perplexity = exp(nll)``,
  ``bits_per_token``, ``bits_per_char`` and ``bits_per_byte`` (of the decoded counted text);
* ``stderr``: Monte-Carlo standard error of ``nll`` on this split (needs K >= 2; 0 for ar). It
  uses the i.i.d. formula, which over-estimates the error of the time-stratified draws: an upper
  estimate;
* ``stderr_between_sequences``: standard error treating sequences as independent samples.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .config import DataConfig
from .data import TOKEN, Rows, counted_positions
from .diffusion import Autoregressive, MaskedDiffusion, Noise
from .runtime import autocast, generator_for
from .tokenization import Tokenizer


def select_rows(n_rows: int, max_sequences: int, seed: int) -> np.ndarray:
    """All rows in order, or a seeded random subset of ``max_sequences`` of them (sorted)."""
    if max_sequences <= 0 or max_sequences >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng([seed, 7]).choice(n_rows, size=max_sequences, replace=False))


@torch.no_grad()
def evaluate(model, objective: MaskedDiffusion | Autoregressive, rows: Rows, data_cfg: DataConfig,
             tokenizer: Tokenizer, mc_samples: int = 4, batch_size: int = 16, max_sequences: int = 0,
             seed: int = 0, precision: str = "fp32", device: torch.device = torch.device("cpu"),
             progress: bool = False) -> dict:
    model.eval()
    is_ar = isinstance(objective, Autoregressive)
    k = 1 if is_ar else mc_samples
    indices = select_rows(len(rows), max_sequences, seed)
    per_seq_mean, per_seq_var, per_seq_tokens = [], [], []
    n_chars = n_bytes = 0
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(indices), desc="eval", unit=" seq", leave=False)
    for b, lo in enumerate(range(0, len(indices), batch_size)):
        chunk = indices[lo:lo + batch_size]
        ids_np, kinds = rows.get(chunk)
        counted_np = counted_positions(kinds, data_cfg)
        for row_ids, row_kinds in zip(ids_np, kinds):
            text = tokenizer.decode(row_ids[row_kinds == TOKEN])
            n_chars += len(text)
            n_bytes += len(text.encode("utf-8"))
        x0 = torch.from_numpy(ids_np).to(device).repeat_interleave(k, dim=0)
        counted = torch.from_numpy(counted_np).to(device).repeat_interleave(k, dim=0)
        gen = generator_for(seed, b, 0xE7A1)
        offsets = torch.rand(len(chunk), 1, generator=gen, dtype=torch.float64)
        time_u = ((torch.arange(k, dtype=torch.float64)[None] + offsets) / k).reshape(-1)
        noise = Noise(time_u, torch.rand(x0.shape, generator=gen))
        with autocast(device, precision):
            losses = objective.loss(model, x0, counted, noise.to(device), exact=True)
        losses = losses.double().cpu().reshape(len(chunk), k)
        per_seq_mean.append(losses.mean(dim=1))
        per_seq_var.append(losses.var(dim=1) if k > 1 else torch.zeros(len(chunk), dtype=torch.float64))
        per_seq_tokens.append(torch.from_numpy(counted_np.sum(axis=1)).double())
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    means, variances, tokens = (torch.cat(v) for v in (per_seq_mean, per_seq_var, per_seq_tokens))
    total_tokens = float(tokens.sum())
    nll = float(means.sum()) / total_tokens
    mc_stderr = math.sqrt(float((variances / k).sum())) / total_tokens if k > 1 else (0.0 if is_ar else None)
    n = len(means)
    residual = means - nll * tokens
    between = (math.sqrt(float((residual ** 2).sum()) * n / max(n - 1, 1)) / total_tokens) if n > 1 else None
    total_nats = float(means.sum())
    return {
        "family": objective.family,
        "bound": "exact" if is_ar else "nelbo",
        "sequences": n,
        "tokens": int(total_tokens),
        "mc_samples": k,
        "nll": nll,
        "stderr": mc_stderr,
        "stderr_between_sequences": between,
        "perplexity": math.exp(nll),
        "bits_per_token": nll / math.log(2),
        "bits_per_char": total_nats / math.log(2) / n_chars if n_chars else None,
        "bits_per_byte": total_nats / math.log(2) / n_bytes if n_bytes else None,
        "counted": {"bos": data_cfg.count_bos, "eos": data_cfg.count_eos, "pad": data_cfg.count_pad},
        "seconds": time.perf_counter() - start,
    }


def format_result(r: dict, split: str) -> str:
    """One readable line."""
    bound = "<=" if r["bound"] == "nelbo" else "="
    err = f" ± {r['stderr']:.4f}" if r.get("stderr") else ""
    bpc = f", {r['bits_per_char']:.4f} bits/char" if r.get("bits_per_char") else ""
    return (f"{r['family']} {split}: nll {bound} {r['nll']:.4f}{err} nats/token, ppl {bound} {r['perplexity']:.3f}, "
            f"{r['bits_per_token']:.4f} bits/token{bpc} ({r['sequences']} seqs, {r['tokens']} tokens, "
            f"K={r['mc_samples']}, {r['seconds']:.1f}s)")
