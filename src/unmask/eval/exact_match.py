"""Exact-match accuracy of generated answers on prompt/answer pairs."""

from __future__ import annotations

import math
from dataclasses import replace

from ..data.tasks import answer_of
from ..pipeline import encode_fixed, generate_rows


def exact_match(model, objective, tokenizer, sample_cfg, pairs: list[tuple[str, str]], length: int,
                model_length: int, device, autocast=None, examples: int = 5, per_row: bool = False) -> dict:
    """Generate an answer for every prompt (``sample_cfg``, one sample each, canvases of ``length``:
    ``[BOS] prompt`` then the positions to fill) and score exact matches; the standard error is the
    binomial one. The first ``examples`` (prompt, answer, generated) triples come back (-1: all); with
    ``per_row``, each row's hit (0/1) and tokens per forward too (``row_hits``, ``row_tokens_per_forward``)."""
    cfg = replace(sample_cfg, num_samples=1)
    gen = generate_rows(model, objective, tokenizer, cfg, length, model_length, prompts=[p for p, _ in pairs],
                        bos=True, device=device, autocast=autocast)
    answers = [answer_of(ids, len(encode_fixed(tokenizer, p)), tokenizer) for ids, (p, _) in zip(gen.ids, pairs)]
    hits = [a == truth for a, (_, truth) in zip(answers, pairs)]
    n, accuracy = len(hits), sum(hits) / len(hits)
    shown = list(zip(pairs, answers))[:examples if examples >= 0 else None]
    rows = {"row_hits": [int(h) for h in hits], "row_tokens_per_forward": gen.tokens_per_forward} if per_row else {}
    return {"exact_match": accuracy, "stderr": math.sqrt(accuracy * (1 - accuracy) / n), "n": n,
            "examples": [{"prompt": p, "answer": t, "generated": a} for (p, t), a in shown],
            **gen.summary(), **rows}
