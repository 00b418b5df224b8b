"""Verifiable tasks shared by every model family: star-graph path finding, sorting, multi-step arithmetic
(:func:`arithmetic_chain`), and exact-match evaluation of prompt/answer pairs.

Star graphs (Bachmann and Nagarajan 2024; the variants of Patel et al. 2025, arXiv 2505.05755):
``degree`` directed chains ("arms") of ``arm_length`` nodes each (drawn per arm from
``[min_arm, max_arm]``) share one centre node. In the easy variant the centre is the first node of
every arm (a plain star); otherwise the centre sits at a random place of each arm, at least
``min_plan`` nodes before its end, so nodes lead *into* the centre too. The task shows the shuffled
edge list, a source (the first node of arm 0) and a goal (its last node); the answer is arm 0, the
unique path from source to goal. A left-to-right model must pick the right arm at the centre before
it has seen where the arms lead; the known failure of next-token prediction on this task.

Variants (the paper's code names): ``tiny`` and ``short`` (ours, for CPU-sized budgets: degree 2,
arms of 4, 12 labels; degree 3, arms of 3, 10 labels), ``easy`` = star_small (degree 3, arms of 5,
20 node labels), ``medium`` = vstar_small (degree 3, arms of 3-6, 20 labels, min_plan 2), ``hard`` = vstar_medium
(degree 5, arms of 6-12, 56 labels, min_plan 5).

Text format (character-level, one character per node): ``"ab bc cd ... s>g:"`` is the prompt, the
path ``"s...g"`` the answer; files are JSONL with ``prompt`` and ``text`` fields, read by the data
pipeline as prompt/response pairs (``data.prompt_field=prompt``), so MDLM, AR and ILM models train on
exactly the same rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .readers import DataError, read_jsonl

NODE_LABELS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


@dataclass(frozen=True)
class StarGraphSpec:
    """A star-graph variant (module docstring): ``degree`` arms of ``min_arm`` to ``max_arm`` nodes drawn from
    ``nodes`` labels."""

    degree: int
    min_arm: int
    max_arm: int
    nodes: int  # how many node labels the graphs draw from
    min_plan: int  # nodes of arm 0 at or after the centre, at least (variable variants)
    centre_first: bool  # the centre is the first node of every arm (the plain star)

    def __post_init__(self):
        if self.degree < 2 or self.min_arm < 2 or self.max_arm < self.min_arm:
            raise ValueError(f"impossible star graph: {self}")
        if self.degree * (self.max_arm - 1) + 1 > self.nodes:
            raise ValueError(f"{self.nodes} node labels cannot hold {self.degree} arms of {self.max_arm}")
        if self.nodes > len(NODE_LABELS):
            raise ValueError(f"at most {len(NODE_LABELS)} node labels")
        if not self.centre_first and not 1 <= self.min_plan <= self.min_arm - 1:
            raise ValueError(f"min_plan must lie in [1, min_arm - 1] = [1, {self.min_arm - 1}]")

    @property
    def max_text_length(self) -> int:
        """Characters of the longest prompt + answer: 2 per edge and a space after each, ``s>g:``,
        the path."""
        return 3 * self.degree * (self.max_arm - 1) + 4 + self.max_arm


STAR_VARIANTS = {
    "tiny": StarGraphSpec(degree=2, min_arm=4, max_arm=4, nodes=12, min_plan=1, centre_first=True),
    "short": StarGraphSpec(degree=3, min_arm=3, max_arm=3, nodes=10, min_plan=1, centre_first=True),
    "easy": StarGraphSpec(degree=3, min_arm=5, max_arm=5, nodes=20, min_plan=1, centre_first=True),
    "medium": StarGraphSpec(degree=3, min_arm=3, max_arm=6, nodes=20, min_plan=2, centre_first=False),
    "hard": StarGraphSpec(degree=5, min_arm=6, max_arm=12, nodes=56, min_plan=5, centre_first=False),
}


def star_graph(spec: StarGraphSpec, rng: np.random.Generator) -> dict:
    """One graph: ``{"edges": [(u, v)...] (shuffled), "source", "goal", "path": [...]}`` as node indices."""
    lengths = rng.integers(spec.min_arm, spec.max_arm + 1, size=spec.degree)
    if spec.centre_first:
        joins = np.zeros(spec.degree, dtype=np.int64)
    else:
        joins = np.array([rng.integers(0, n - spec.min_plan) for n in lengths])
    labels = rng.permutation(spec.nodes)[:int(lengths.sum()) - spec.degree + 1]
    centre, fresh = int(labels[0]), iter(int(x) for x in labels[1:])
    arms = [[centre if i == join else next(fresh) for i in range(n)] for n, join in zip(lengths, joins)]
    edges = [(a, b) for arm in arms for a, b in zip(arm, arm[1:])]
    edges = [edges[i] for i in rng.permutation(len(edges))]
    return {"edges": edges, "source": arms[0][0], "goal": arms[0][-1], "path": arms[0]}


def star_graph_text(graph: dict) -> tuple[str, str]:
    """(prompt, answer) strings of a graph."""
    edges = " ".join(NODE_LABELS[a] + NODE_LABELS[b] for a, b in graph["edges"])
    source, goal = NODE_LABELS[graph["source"]], NODE_LABELS[graph["goal"]]
    return f"{edges} {source}>{goal}:", "".join(NODE_LABELS[v] for v in graph["path"])


def star_graph_path_checks(prompt: str, generated: str) -> dict[str, bool]:
    """How far a generated answer to a star-graph prompt is right: ``starts`` (at the source),
    ``first_step`` (its second node is a neighbour of the source: an arm was picked), ``follows_edges``
    (every step is an edge of the graph: a path), ``reaches_goal`` (a path from the source that ends at
    the goal, i.e. the answer). A model that follows edges but picks arms at random ("Clever Hans")
    has ``follows_edges`` near 1 and exact match near 1/degree."""
    *edges, query = prompt.rstrip(":").split(" ")
    source, goal = query.split(">")
    pairs = set(edges)
    follows = len(generated) >= 2 and all(a + b in pairs for a, b in zip(generated, generated[1:]))
    starts = generated[:1] == source
    return {"starts": starts, "first_step": starts and len(generated) >= 2 and source + generated[1] in pairs,
            "follows_edges": starts and follows, "reaches_goal": starts and follows and generated[-1:] == goal}


def _written_here(task_file: Path) -> bool:
    """Whether ``task_file`` is the ``task.json`` of an earlier ``unmask task`` (whose files may be replaced)."""
    try:
        meta = json.loads(task_file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and {"sizes", "seed"} <= set(meta)


def write_splits(out: Path, draw, sizes: dict[str, int], seed: int, meta: dict) -> dict:
    """Write ``{train,valid,test}.jsonl`` of prompt/answer pairs ``draw(rng)`` (each split from its own
    seeded stream; valid and test prompts unseen in training) and ``task.json`` (``meta`` with the
    sizes and seed), each file atomically."""
    for name, n in sizes.items():
        if n < 1:
            raise ValueError(f"--{name} must be >= 1")
    existing = [f"{name}.jsonl" for name in sizes if (out / f"{name}.jsonl").exists()]
    if existing and not _written_here(out / "task.json"):
        raise ValueError(f"{out} already holds {', '.join(existing)}, not written by unmask task; nothing was "
                         f"replaced: choose another --out")
    seen: set[str] = set()
    splits = {}
    for stream, (split, n) in enumerate(sizes.items()):  # every split drawn before anything is written
        rng = np.random.default_rng([seed, stream])
        rows, attempts = [], 0
        while len(rows) < n:
            attempts += 1
            if attempts > 100 * n:
                raise ValueError(f"could not draw {n} {split} prompts unseen in training; the task is too small")
            prompt, answer = draw(rng)
            if split != "train" and prompt in seen:
                continue
            if split == "train":
                seen.add(prompt)
            rows.append(json.dumps({"prompt": prompt, "text": answer}))
        splits[split] = rows
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        tmp = out / f".{split}.jsonl.tmp"
        tmp.write_text("\n".join(rows) + "\n")
        os.replace(tmp, out / f"{split}.jsonl")
    meta = {**meta, "seed": seed, "sizes": sizes}
    (out / "task.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def write_star_graph_task(out: str | Path, variant: str = "easy", train: int = 50_000, valid: int = 500,
                          test: int = 2_000, seed: int = 0) -> dict:
    """Write ``train.jsonl``, ``valid.jsonl``, ``test.jsonl`` and ``task.json`` to ``out``; the splits
    come from independent seeded streams and the test split holds no prompt seen in training."""
    if variant not in STAR_VARIANTS:
        raise ValueError(f"unknown star-graph variant {variant!r}; known: {', '.join(STAR_VARIANTS)}")
    spec = STAR_VARIANTS[variant]
    return write_splits(Path(out), lambda rng: star_graph_text(star_graph(spec, rng)),
                        {"train": train, "valid": valid, "test": test}, seed,
                        {"task": "star-graph", "variant": variant, "spec": asdict(spec),
                         "suggested_length": 2 + spec.max_text_length})


def write_sorting_task(out: str | Path, length: int = 8, alphabet: str = "abcdefghijklmnop", train: int = 50_000,
                       valid: int = 500, test: int = 2_000, seed: int = 0) -> dict:
    """Sorting: the prompt is ``length`` random characters of ``alphabet`` (repeats allowed) and a colon,
    the answer the same characters in alphabet order; files and splits as :func:`write_splits`."""
    if length < 2 or len(set(alphabet)) != len(alphabet) or len(alphabet) < 2:
        raise ValueError("sorting needs length >= 2 and an alphabet of at least 2 distinct characters")
    rank = {c: i for i, c in enumerate(alphabet)}

    def draw(rng):
        chars = "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=length))
        return chars + ":", "".join(sorted(chars, key=rank.__getitem__))

    return write_splits(Path(out), draw, {"train": train, "valid": valid, "test": test}, seed,
                        {"task": "sorting", "length": length, "alphabet": alphabet,
                         "suggested_length": 2 * length + 3})


DIGIT_ORDERS = ("lsd", "msd")  # least significant digit first (little-endian) or the usual order


def total_width(operands: int, digits: int) -> int:
    """Digits of the largest running total of ``operands`` numbers below ``10^digits``: every number's width."""
    return len(str(operands * (10 ** digits - 1)))


def arithmetic_chain(operands: int, digits: int, rng: np.random.Generator, order: str = "lsd") -> tuple[str, str]:
    """A chain of ``operands`` numbers below ``10^digits`` joined by ``+`` and ``-`` (a ``-`` only where the running
    total stays non-negative), and its prefix sums (the running totals, the first number first), every number
    written with as many digits as the largest possible total has (zeros on the high side). ``order="msd"``
    writes them as usual, ``"0312+0045-0107+0268="`` -> ``"0312,0357,0250,0518"``; ``"lsd"`` writes every number
    units first, ``"2130+5400-7010+8620="`` -> ``"2130,7530,0520,8150"`` (Lee et al. 2023, "Teaching arithmetic to
    small transformers": a digit then follows from the digits of its place and the carry into it, all already
    written). One width for every number puts each digit of a total at the same distance from the same digit of
    the total before it and of the number it adds, for every total: one rule, learned once. Each total needs the
    one before it (a multi-step computation whose steps depend on each other, as a word problem's do), and the
    digits of one total depend on each other through carries."""
    if order not in DIGIT_ORDERS:
        raise ValueError(f"unknown digit order {order!r}: one of {', '.join(DIGIT_ORDERS)}")
    width = total_width(operands, digits)

    def written(value: int) -> str:
        text = f"{value:0{width}d}"
        return text[::-1] if order == "lsd" else text

    total = int(rng.integers(0, 10 ** digits))
    prompt, totals = [written(total)], [written(total)]
    for _ in range(operands - 1):
        value = int(rng.integers(0, 10 ** digits))
        if value <= total and rng.random() < 0.5:
            total -= value
            prompt.append("-" + written(value))
        else:
            total += value
            prompt.append("+" + written(value))
        totals.append(written(total))
    return "".join(prompt) + "=", ",".join(totals)


def write_arithmetic_task(out: str | Path, operands: int = 4, digits: int = 2, train: int = 50_000,
                          valid: int = 500, test: int = 2_000, seed: int = 0, order: str = "lsd") -> dict:
    """Multi-step arithmetic (:func:`arithmetic_chain`): files and splits as :func:`write_splits` (an unknown
    ``order`` fails at the first draw, before anything is written); the answer is right when every running total
    is (exact match)."""
    if not 2 <= operands <= 16 or not 1 <= digits <= 9:
        raise ValueError("arithmetic needs 2 to 16 operands of 1 to 9 digits")
    prompt = operands * (total_width(operands, digits) + 1)  # each number and its sign (or "=")
    answer = prompt - 1  # the same numbers, comma-separated
    return write_splits(Path(out), lambda rng: arithmetic_chain(operands, digits, rng, order),
                        {"train": train, "valid": valid, "test": test}, seed,
                        {"task": "arithmetic", "operands": operands, "digits": digits, "order": order,
                         "suggested_length": 2 + prompt + answer})


def read_pairs(path: str | Path, prompt_field: str = "prompt", answer_field: str = "text") -> list[tuple[str, str]]:
    """(prompt, answer) pairs of a JSONL file."""
    pairs = [(str(p), str(a)) for p, a in read_jsonl(Path(path), (prompt_field, answer_field))]
    if not pairs:
        raise DataError(f"{path} holds no prompt/answer pairs")
    return pairs


def answer_of(ids: list[int], prompt_length: int, tokenizer) -> str:
    """The generated answer in a sampled row ``[BOS] prompt answer [EOS|PAD...]``: the tokens after
    the prompt up to the first special token."""
    out = []
    for token in ids[1 + prompt_length:]:
        if token in tokenizer.special_ids:
            break
        out.append(token)
    return tokenizer.decode(out)
