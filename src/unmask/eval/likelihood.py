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
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..config import DataConfig
from ..data.layouts import TOKEN, Rows, counted_positions
from ..data.tokenization import Tokenizer
from ..objectives.base import Noise, Objective, unwrap
from ..runtime import autocast, generator_for


class EvaluationError(ValueError):
    """An evaluation without a meaningful result: nothing to score, or non-finite model outputs."""


def select_rows(n_rows: int, max_sequences: int, seed: int) -> np.ndarray:
    """All rows in order, or a seeded random subset of ``max_sequences`` of them (sorted)."""
    if max_sequences <= 0 or max_sequences >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng([seed, 7]).choice(n_rows, size=max_sequences, replace=False))


@torch.no_grad()
def likelihood_of_rows(model, objective: Objective, rows: Rows, data_cfg: DataConfig,
             tokenizer: Tokenizer, mc_samples: int = 4, batch_size: int = 16, max_sequences: int = 0,
             seed: int = 0, precision: str = "fp32", device: torch.device = torch.device("cpu"),
             progress: bool = False) -> dict:
    """Score ``rows`` (or ``max_sequences`` of them) with ``objective``'s exact estimator: ``mc_samples`` stratified
    draws per row for a bound, one pass for an exact NLL; the result dict of the module docstring."""
    model.eval()
    is_ar = objective.bound == "exact"  # one pass is the exact NLL
    k = 1 if is_ar else mc_samples
    indices = select_rows(len(rows), max_sequences, seed)
    if len(indices) == 0:
        raise EvaluationError("there are no rows to evaluate in this split")
    per_seq_mean, per_seq_var, per_seq_tokens = [], [], []
    n_chars = n_bytes = 0
    start = time.perf_counter()
    bar = None
    if progress:

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
    if objective.per_sequence:  # ILM: its training objective per sequence, not a bound
        n = len(means)
        return {"family": objective.family, "bound": "none", "sequences": n, "tokens": int(tokens.sum()),
                "mc_samples": k, "loss": float(means.mean()),
                "stderr": float(means.std() / math.sqrt(n)) if n > 1 else None,
                "seconds": time.perf_counter() - start}
    total_tokens = float(tokens.sum())
    if total_tokens == 0:
        raise EvaluationError("the rows of this split hold no counted tokens (see data.count_bos/eos/pad)")
    nll = float(means.sum()) / total_tokens
    if not math.isfinite(nll):
        raise EvaluationError(f"the model's NLL is {nll}: its outputs are not finite (corrupt or diverged weights, "
                              f"or an overflow in bf16: try eval.precision=fp32)")
    mc_stderr = math.sqrt(float((variances / k).sum())) / total_tokens if k > 1 else (0.0 if is_ar else None)
    n = len(means)
    residual = means - nll * tokens
    between = (math.sqrt(float((residual ** 2).sum()) * n / max(n - 1, 1)) / total_tokens) if n > 1 else None
    total_nats = float(means.sum())
    return {
        "family": objective.family,
        "bound": objective.bound,
        "sequences": n,
        "tokens": int(total_tokens),
        "mc_samples": k,
        "nll": nll,
        "stderr": mc_stderr,
        "stderr_between_sequences": between,
        "perplexity": math.exp(nll) if nll < 700 else math.inf,
        "bits_per_token": nll / math.log(2),
        "bits_per_char": total_nats / math.log(2) / n_chars if n_chars else None,
        "bits_per_byte": total_nats / math.log(2) / n_bytes if n_bytes else None,
        "counted": {"bos": data_cfg.count_bos, "eos": data_cfg.count_eos, "pad": data_cfg.count_pad},
        "seconds": time.perf_counter() - start,
    }


def format_result(r: dict, split: str) -> str:
    """One readable line."""
    if r["bound"] == "none":
        err = f" ± {r['stderr']:.4f}" if r.get("stderr") else ""
        return (f"{r['family']} {split}: training objective {r['loss']:.4f}{err} per sequence (not a likelihood "
                f"bound; {r['sequences']} seqs, K={r['mc_samples']}, {r['seconds']:.1f}s)")
    bound = "<=" if r["bound"] == "nelbo" else "="
    err = f" ± {r['stderr']:.4f}" if r.get("stderr") else ""
    bpc = f", {r['bits_per_char']:.4f} bits/char" if r.get("bits_per_char") else ""
    return (f"{r['family']} {split}: nll {bound} {r['nll']:.4f}{err} nats/token, ppl {bound} {r['perplexity']:.3f}, "
            f"{r['bits_per_token']:.4f} bits/token{bpc} ({r['sequences']} seqs, {r['tokens']} tokens, "
            f"K={r['mc_samples']}, {r['seconds']:.1f}s)")


def _context_key(sequence: list[int], start: int) -> int:
    """A stable key of (context, continuation length): choices that share a context share draws."""
    return zlib.crc32(np.asarray(sequence[:start] + [len(sequence)], dtype=np.int64).tobytes())


@torch.no_grad()
def continuation_loglikelihoods(model, objective: Objective, sequences: list[list[int]],
                                starts: list[int], mc_samples: int = 16, batch_rows: int = 64, seed: int = 0,
                                precision: str = "fp32", device: torch.device = torch.device("cpu"),
                                estimator: str = "auto", guidance: float = 0.0) -> list[tuple[float, float, bool]]:
    """``log p(x[s:] | x[:s])`` for each sequence ``x`` and start ``s``: ``(loglik, stderr, greedy)``.

    AR: exact (``stderr`` 0); ``greedy`` is whether every continuation token is the argmax given its
    prefix. MDLM: the NELBO lower bound of the n continuation tokens with the context clean, from
    ``mc_samples`` Monte-Carlo draws, with one of two unbiased estimators:

    * ``time``: MDLM eq. 10, ``t`` stratified over ``[0, 1)``, each token masked with probability
      ``1 - alpha(t)``, weight ``w(t)``. Needed for time-conditioned models; its ``1/t`` weight gives
      heavy tails on short continuations.
    * ``count`` (default for models without time conditioning, where the two are equal in
      expectation, Ou et al. 2024): the number of masked tokens ``k`` stratified over ``1..n``, a
      uniformly random set of ``k`` masked, weight ``n/k``; the any-order form
      ``sum_k 1/k E_{|M|=k}[sum_{l in M} -log p(x_l | unmasked)]``. Bounded weights, lower variance.

    Draws depend on ``(seed, context, continuation length)`` only: results do not depend on batching,
    and the choices of one multiple-choice question share their draws (common random numbers), so
    their differences are much more precise than each value. ``stderr`` is the Monte-Carlo standard
    error (i.i.d. formula, an upper estimate under stratification). ``greedy``: with the whole
    continuation masked, is every position's argmax its token (one-shot greedy). Sequences of equal
    length are batched together, up to ``batch_rows`` rows (K rows each for MDLM).

    ``guidance`` w (MDLM): score with SMDM's rescaled conditional ``l_u + (1 + w)(l_c - l_u)``, the
    unconditional branch having the context masked (SMDM, section 3, for multiple choice); its
    per-token distributions are normalized, so the result is the same kind of bound, of a different
    (guided) model.
    """
    model.eval()
    is_ar = objective.bound == "exact"
    if estimator == "auto":
        counts = getattr(objective, "count_estimator", False)  # MDLM's any-order form (not AR's, not BD3's)
        estimator = "time" if unwrap(model).time_conditioning or not counts else "count"
    if estimator not in ("time", "count"):
        raise ValueError(f"estimator must be auto, time or count, got {estimator!r}")
    if estimator == "count" and unwrap(model).time_conditioning:
        raise ValueError("the count estimator needs a model without time conditioning")
    if guidance and is_ar:
        raise ValueError("guidance applies to masked diffusion models")
    k = 1 if is_ar else mc_samples
    if k < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    results: list[tuple[float, float, bool] | None] = [None] * len(sequences)
    by_length: dict[int, list[int]] = {}
    for i, (seq, s) in enumerate(zip(sequences, starts)):
        if not 0 <= s < len(seq):
            raise ValueError(f"sequence {i}: the continuation must be non-empty (start {s}, length {len(seq)})")
        by_length.setdefault(len(seq), []).append(i)
    per_batch = max(1, batch_rows // k)
    for length, members in by_length.items():
        for lo in range(0, len(members), per_batch):
            group = members[lo:lo + per_batch]
            x0 = torch.tensor([sequences[i] for i in group], dtype=torch.long, device=device)
            counted = torch.zeros_like(x0, dtype=torch.bool)
            for r, i in enumerate(group):
                counted[r, starts[i]:] = True
            if is_ar:
                with autocast(device, precision):
                    logits = model(objective.inputs(x0)).float()
                logits[..., objective.mask_id] = float("-inf")
                logp = logits.log_softmax(-1).gather(-1, x0[..., None])[..., 0]
                greedy = ((logits.argmax(-1) == x0) | ~counted).all(-1)
                for r, i in enumerate(group):
                    results[i] = (float(logp[r][counted[r]].double().sum()), 0.0, bool(greedy[r]))
                continue
            time_u, mask_u = [], []
            for i in group:
                gen = generator_for(seed, _context_key(sequences[i], starts[i]), 0x11CE)
                offset = torch.rand(1, generator=gen, dtype=torch.float64)
                time_u.append((torch.arange(k, dtype=torch.float64) + offset) / k)
                mask_u.append(torch.rand(k, length, generator=gen))
            noise = Noise(torch.cat(time_u), torch.cat(mask_u)).to(device)
            x0k, countedk = x0.repeat_interleave(k, 0), counted.repeat_interleave(k, 0)
            with autocast(device, precision):
                if estimator == "time":
                    nats = objective.loss(model, x0k, countedk, noise, exact=True, guidance=guidance)
                else:
                    nats = objective.loss_by_count(model, x0k, countedk, noise, guidance=guidance)
                nats = nats.double().cpu().reshape(len(group), k)
                full = torch.where(counted, torch.full_like(x0, objective.mask_id), x0)
                ones = torch.ones(len(group), dtype=torch.float64, device=device)
                logits = objective.logits(model, full, x0, objective.model_sigma(ones)).float()
            if objective.mask_id < logits.shape[-1]:  # (a uniform-noise model has no mask among its outputs)
                logits[..., objective.mask_id] = float("-inf")
            greedy = ((logits.argmax(-1) == x0) | ~counted).all(-1)
            for r, i in enumerate(group):
                stderr = float(nats[r].std() / math.sqrt(k)) if k > 1 else float("nan")
                results[i] = (-float(nats[r].mean()), stderr, bool(greedy[r]))
    return results


@dataclass
class TokenScores:
    """Per-token log-likelihood terms of a sequence ``x`` of n tokens after its BOS (OpenAI's echoed
    ``logprobs``), built so that for every ``k`` the terms from ``k`` on sum to ``suffix[k]``, the
    log-likelihood of ``x[k:]`` given ``x[:k]`` that :func:`continuation_loglikelihoods` gives for that split:
    exact for AR models, the NELBO bound for diffusion models (``bound``), with its Monte-Carlo standard
    error ``stderr[k]``. So a client that sums the terms of a continuation (lm-eval's ``local-completions``)
    gets the same number as unmask's own lm-eval model. ``top[k]``: the ``top_k`` most likely tokens at
    position ``k`` with their log-probabilities (AR: given ``x[:k]``; diffusion: with ``x[k:]`` masked).
    ``next_token``: (id, log-probability, top) of the most likely token after the sequence, when asked."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]
    suffix: list[float]
    stderr: list[float]
    bound: bool
    next_token: tuple[int, float, list[tuple[int, float]]] | None = None


def _top(logp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` largest entries of log-probabilities ``logp`` (V,) as (id, value)."""
    if k <= 0:
        return []
    values, ids = logp.topk(min(k, logp.numel()))
    return list(zip(ids.tolist(), values.tolist()))


@torch.no_grad()
def token_loglikelihoods(model, objective: Objective, ids: list[int], bos: list[int], top_k: int = 0,
                         mc_samples: int = 32, seed: int = 0, batch_rows: int = 64, precision: str = "fp32",
                         device: torch.device = torch.device("cpu"), estimator: str = "auto",
                         next_token: bool = False) -> TokenScores:
    """The :class:`TokenScores` of ``ids`` (n tokens) after ``bos`` (the model's BOS, or nothing).

    AR: one forward, ``logprobs[k] = log p(x_k | x_<k)``. Diffusion: ``suffix[k]`` is the NELBO bound of
    ``x[k:]`` given ``x[:k]`` (:func:`continuation_loglikelihoods` with start ``k``, the same draws as for
    that split alone) and ``logprobs[k] = suffix[k] - suffix[k + 1]`` (``suffix[n] = 0``): a telescoping
    split of the bound, so each term alone is noisy (and may be positive) while every suffix sum is the
    bound itself. Costs ``n * mc_samples + n`` network rows (+ 1 with ``next_token``)."""
    model.eval()
    seq, b, n = bos + ids, len(bos), len(ids)
    if n == 0:
        raise ValueError("there is no token to score")
    mask_id = objective.mask_id
    exact = objective.bound == "exact"
    x0 = torch.tensor([seq], dtype=torch.long, device=device)
    if exact:
        fed = torch.cat([x0, x0[:, :1]], dim=1) if next_token else x0  # one more output: the next token's
        with autocast(device, precision):
            logits = model(objective.inputs(fed))[0].float()
        logits[..., mask_id] = float("-inf")
        logp = logits.log_softmax(-1)
        terms = logp[b:b + n].gather(-1, x0[0, b:, None])[:, 0].double()
        suffix = terms.flip(0).cumsum(0).flip(0).tolist()
        top = [_top(logp[b + k], top_k) for k in range(n)]
        after = logp[-1]
        scores = TokenScores(terms.tolist(), top, suffix, [0.0] * n, bound=False)
    else:
        parts = continuation_loglikelihoods(model, objective, [seq] * n, [b + k for k in range(n)], mc_samples,
                                            batch_rows, seed, precision, device, estimator)
        suffix = [ll for ll, _, _ in parts]
        terms = [suffix[k] - (suffix[k + 1] if k + 1 < n else 0.0) for k in range(n)]
        hidden = torch.arange(b + n, device=device)[None, :] >= (b + torch.arange(n, device=device))[:, None]
        rows = x0.expand(n, -1)
        full = torch.where(hidden, torch.full_like(rows, mask_id), rows)
        ones = torch.ones(n, dtype=torch.float64, device=device)
        with autocast(device, precision):
            logits = objective.logits(model, full, rows, objective.model_sigma(ones)).float()
        if mask_id < logits.shape[-1]:
            logits[..., mask_id] = float("-inf")
        logp = logits.log_softmax(-1)
        top = [_top(logp[k, b + k], top_k) for k in range(n)]
        scores = TokenScores(terms, top, suffix, [e for _, e, _ in parts], bound=True)
        if next_token:
            canvas = torch.cat([x0, torch.full_like(x0[:, :1], mask_id)], dim=1)
            with autocast(device, precision):
                last = objective.logits(model, canvas, canvas, objective.model_sigma(ones[:1])).float()[0, -1]
            if mask_id < last.numel():
                last[mask_id] = float("-inf")
            after = last.log_softmax(-1)
    if next_token:
        best = int(after.argmax())
        scores.next_token = (best, float(after[best]), _top(after, top_k))
    return scores
