"""The multi-step arithmetic task: every running total right, files within the length they suggest."""

from __future__ import annotations

import json
import re

import numpy as np

from unmask.cli import main
from unmask.data.tasks import arithmetic_chain


def totals_of(prompt: str) -> list[int]:
    """The running totals of a chain like ``"312+45-107="``, recomputed from its terms."""
    first, *terms = re.findall(r"[+-]?\d+", prompt.rstrip("="))
    total, out = int(first), []
    for term in terms:
        total += int(term)
        out.append(total)
    return out


def test_chains_hold_their_running_totals_and_never_go_negative():
    rng = np.random.default_rng(3)
    signs = set()
    for _ in range(2000):
        prompt, answer = arithmetic_chain(5, 3, rng)
        assert re.fullmatch(r"\d{3}([+-]\d{3}){4}=", prompt), prompt
        totals = totals_of(prompt)
        assert answer == ",".join(f"{t:04d}" for t in totals) and min(totals) >= 0  # 5 x 999 has 4 digits
        signs |= set(re.findall(r"[+-]", prompt))
    assert signs == {"+", "-"}


def test_task_files_fit_the_suggested_length(tmp_path, capsys):
    out = tmp_path / "arith"
    assert main(["task", "arithmetic", "--operands", "6", "--digits", "4", "--out", str(out), "--train", "300",
                 "--valid", "20", "--test", "20"]) == 0
    meta = json.loads((out / "task.json").read_text())
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert len(train) == 300 and len(test) == 20
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in train}  # held-out prompts
    longest = max(len(r["prompt"]) + len(r["text"]) for r in train + test)
    assert longest + 2 == meta["suggested_length"]  # BOS and EOS around prompt and answer: every row as long
    assert main(["task", "arithmetic", "--operands", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "operands" in capsys.readouterr().err and not (tmp_path / "bad").exists()
