"""lm-evaluation-harness end to end with the ``unmask`` model on local task files: multiple choice
(loglikelihood), perplexity (loglikelihood_rolling) and generation (generate_until)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[lm-eval]')")

from test_interop import tiny_checkpoint  # noqa: E402

DOCS = [("the cat sat on the", [" mat", " sky", " zebra"], 0), ("once upon a", [" time", " stone"], 0),
        ("to be or not to", [" be", " see"], 0), ("a b c d e f", [" g", " q"], 0)]


def write_tasks(directory: Path) -> Path:
    data = directory / "data"
    data.mkdir(parents=True)
    with open(data / "choice.jsonl", "w") as f:
        for context, choices, label in DOCS:
            f.write(json.dumps({"context": context, "choices": choices, "label": label}) + "\n")
    with open(data / "text.jsonl", "w") as f:
        for line in ("the cat sat on the mat.", "once upon a time there was a cat.", "to be or not to be."):
            f.write(json.dumps({"text": line}) + "\n")
    with open(data / "gen.jsonl", "w") as f:
        for prompt, answer in (("the cat sat on the", " mat"), ("once upon a", " time")):
            f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
    tasks = directory / "tasks"
    tasks.mkdir()

    def task(name: str, data_file: str, body: str) -> None:
        head = (f"task: {name}\ndataset_path: json\ntest_split: test\n"
                f"dataset_kwargs:\n  data_files:\n    test: {data / data_file}\n")
        (tasks / f"{name}.yaml").write_text(head + textwrap.dedent(body))

    task("unmask_toy_choice", "choice.jsonl", """\
        output_type: multiple_choice
        doc_to_text: "{{context}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: "{{label}}"
        target_delimiter: ""
        metric_list:
          - metric: acc
        """)
    task("unmask_toy_ppl", "text.jsonl", """\
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: word_perplexity
          - metric: bits_per_byte
        """)
    task("unmask_toy_gen", "gen.jsonl", """\
        output_type: generate_until
        doc_to_text: "{{prompt}}"
        doc_to_target: "{{answer}}"
        generation_kwargs:
          until: ["."]
          max_gen_toks: 6
          do_sample: false
        metric_list:
          - metric: exact_match
        """)
    return tasks


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mdlm", "ar"])
def test_lm_eval_runs_all_request_types(tmp_path, family):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from unmask.eval.lm_eval import UnmaskLM

    ckpt = tiny_checkpoint(tmp_path, family)
    tasks = write_tasks(tmp_path)
    model = UnmaskLM(pretrained=str(ckpt), mc_samples=4, sampler="first_hitting" if family == "mdlm" else "ar")
    out = simple_evaluate(model=model, tasks=["unmask_toy_choice", "unmask_toy_ppl", "unmask_toy_gen"],
                          task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    results = out["results"]
    assert 0.0 <= results["unmask_toy_choice"]["acc,none"] <= 1.0
    assert math.isfinite(results["unmask_toy_ppl"]["word_perplexity,none"])
    assert results["unmask_toy_ppl"]["bits_per_byte,none"] > 0
    assert "exact_match,none" in results["unmask_toy_gen"]
    generations = [s["resps"][0][0] for s in out["samples"]["unmask_toy_gen"]]
    assert len(generations) == 2 and all("." not in g for g in generations)
    if family == "mdlm":
        assert model.last_stderr is not None and model.last_stderr > 0


def test_adapter_rejects_unknown_sampling_options(tmp_path):
    from unmask.config import ConfigError
    from unmask.eval.lm_eval import UnmaskLM

    with pytest.raises(ConfigError, match="sample.stepz"):
        UnmaskLM(pretrained=str(tiny_checkpoint(tmp_path)), stepz=4)


@pytest.mark.slow
def test_lm_eval_command_line(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    tasks = write_tasks(tmp_path)
    cmd = [sys.executable, "-m", "unmask.eval.lm_eval", "--model", "unmask", "--model_args",
           f"pretrained={ckpt},mc_samples=2", "--tasks", "unmask_toy_choice", "--include_path", str(tasks),
           "--output_path", str(tmp_path / "out")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "unmask_toy_choice" in run.stdout
    assert list((tmp_path / "out").rglob("results*.json"))


@pytest.mark.parametrize("family", ["mdlm", "ar"])
def test_generation_longer_than_the_model(tmp_path, family):
    """MDLM continues in semi-autoregressive windows; AR generates up to its length."""
    from types import SimpleNamespace

    from unmask.eval.lm_eval import UnmaskLM

    model = UnmaskLM(pretrained=str(tiny_checkpoint(tmp_path, family)), sampler="first_hitting" if family == "mdlm"
                     else "ar")
    model.cache_hook = SimpleNamespace(add_partial=lambda *a: None)
    context = "the cat sat on the mat and the dog sat"  # longer than the model's 32 positions with 40 new
    out = model.generate_until([SimpleNamespace(args=(context, {"max_gen_toks": 40}))])
    assert len(out) == 1 and len(out[0]) <= 40
