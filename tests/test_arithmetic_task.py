"""The multi-step arithmetic task: every running total right, files within the length they suggest."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from unmask.cli import main
from unmask.data.tasks import DIGIT_ORDERS, arithmetic_chain, write_arithmetic_task


def totals_of(prompt: str) -> list[int]:
    """The running totals of a chain like ``"312+45-107="``, recomputed from its terms."""
    first, *terms = re.findall(r"[+-]?\d+", prompt.rstrip("="))
    total = int(first)
    out = [total]
    for term in terms:
        total += int(term)
        out.append(total)
    return out


@pytest.mark.parametrize("order", DIGIT_ORDERS)
def test_chains_hold_their_running_totals_and_never_go_negative(order):
    rng = np.random.default_rng(3)
    signs = set()
    as_written = (lambda text: re.sub(r"\d+", lambda m: m.group(0)[::-1], text)) if order == "lsd" else str
    for _ in range(2000):
        prompt, answer = arithmetic_chain(5, 3, rng, order)
        assert re.fullmatch(r"\d{4}([+-]\d{4}){4}=", prompt), prompt  # 5 x 999 has 4 digits: every number 4 wide
        totals = totals_of(as_written(prompt))
        assert as_written(answer) == ",".join(f"{t:04d}" for t in totals) and min(totals) >= 0
        assert max(int(n) for n in re.findall(r"\d+", as_written(prompt))) < 1000  # numbers of at most 3 digits
        signs |= set(re.findall(r"[+-]", prompt))
    assert signs == {"+", "-"}
    assert arithmetic_chain(4, 3, np.random.default_rng(0), "lsd") == ("0580-6360+7030-0400=",
                                                                        "0580,4120,1250,1840")
    assert arithmetic_chain(4, 3, np.random.default_rng(0), "msd") == ("0850-0636+0307-0040=",
                                                                        "0850,0214,0521,0481")


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
    assert meta["order"] == "lsd"
    assert main(["task", "arithmetic", "--operands", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "operands" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["task", "arithmetic", "--operands", "2", "--digits", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "too small" in capsys.readouterr().err and not (tmp_path / "bad").exists()  # drawn before written
    with pytest.raises(ValueError, match="digit order"):  # the library refuses before writing too
        write_arithmetic_task(tmp_path / "bad", order="big")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit) as exc:
        main(["task", "arithmetic", "--digit-order", "big", "--out", str(tmp_path / "bad")])
    assert exc.value.code == 2 and not (tmp_path / "bad").exists()
