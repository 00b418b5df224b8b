"""The reverse-curse generator and evaluation plumbing."""

import json

from unmask.config import load_config
from unmask.experiments.reverse_curse import (
    evaluate_reverse_curse,
    make_facts,
    write_facts,
)
from unmask.pipeline import from_pretrained
from unmask.train.loop import train

from toys import TINY


def test_facts_are_seeded_distinct_and_written_one_per_line(tmp_path):
    facts = make_facts(50, seed=3)
    assert facts == make_facts(50, seed=3) and facts != make_facts(50, seed=4)
    assert len({f.name for f in facts}) == 50 and len({f.description for f in facts}) == 50
    assert all(f.statement == f"{f.name} is {f.description}." and f.description.startswith("the ") for f in facts)
    path = write_facts(facts, tmp_path / "facts" / "train.txt")
    assert path.read_text().splitlines()[7] == facts[7].statement
    assert json.loads((tmp_path / "facts" / "facts.json").read_text())[0]["name"] == facts[0].name


def test_every_direction_is_scored_for_both_families(tmp_path):
    facts = make_facts(6, seed=0)
    path = write_facts(facts, tmp_path / "train.txt")
    results = {}
    for family in ("mdlm", "ar"):
        cfg = load_config(None, [*TINY, f"family={family}", "data.dataset=text", f"data.path={path}",
                                 "data.documents=line", "data.layout=pad", "data.length=64", "model.length=64",
                                 "data.valid_fraction=0", "data.test_fraction=0", f"run_dir={tmp_path / family}",
                                 "train.steps=5"])
        train(cfg)
        loaded = from_pretrained(tmp_path / family)
        results[family] = evaluate_reverse_curse(loaded, facts, mc_samples=2)
    assert set(results["mdlm"]) == {"forward", "reverse_reversed_sentence", "reverse_same_sentence", "reverse_ranking"}
    assert set(results["ar"]) == {"forward", "reverse_reversed_sentence", "reverse_ranking"}
    assert all(0 <= v <= 1 for r in results.values() for v in r.values())
    guided = evaluate_reverse_curse(from_pretrained(tmp_path / "mdlm"), facts, guidance=1.0)
    assert "reverse_ranking" not in guided and 0 <= guided["forward"] <= 1
