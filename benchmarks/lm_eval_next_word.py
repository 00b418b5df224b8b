"""lm-evaluation-harness with the ``unmask`` model: a next-word multiple-choice task built from a
corpus' test split, run for an MDLM and an AR checkpoint in one process.

Each item is ``context`` (the ``--context`` characters before a word) and four choices: the true next
word and three other words of the same length drawn from the test split. The MDLM scores choices by
its NELBO bound of the continuation given the context (``--mc-samples`` draws), the AR model by its
exact log-likelihood; ``acc`` is the fraction of items where the true word scores highest.

    python benchmarks/lm_eval_next_word.py --mdlm runs/quickstart --ar runs/quickstart-ar --tag tinyshakespeare
    python benchmarks/lm_eval_next_word.py --smoke          # seconds: the test suite runs this

Appends one JSON line per model to ``benchmarks/results/lm_eval_next_word.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from unmask.checkpoints.pretrained import open_source
from unmask.data.dataset import Data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine, smoke_run  # noqa: E402


def build_items(text: str, n: int, context: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = [(m.start(), m.group()) for m in re.finditer(r"[A-Za-z]{3,}", text)]
    by_length: dict[int, list[str]] = {}
    for _, w in words:
        by_length.setdefault(len(w), []).append(w)
    candidates = [(s, w) for s, w in words if s >= context and len(set(by_length[len(w)])) >= 4]
    items = []
    for start, word in rng.sample(candidates, n):
        others = sorted(set(by_length[len(word)]) - {word})
        choices = [" " + word] + [" " + w for w in rng.sample(others, 3)] if text[start - 1] == " " else \
            [word] + rng.sample(others, 3)
        ctx = text[start - context:start]
        if ctx.endswith(" "):
            ctx = ctx[:-1]
        items.append({"context": ctx, "choices": choices, "label": 0})
    return items


def write_task(directory: Path, items: list[dict]) -> Path:
    data = directory / "next_word.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    (directory / "next_word.yaml").write_text(
        "task: unmask_next_word\ndataset_path: json\ntest_split: test\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{label}}\"\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n")
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mdlm")
    parser.add_argument("--ar")
    parser.add_argument("--tag")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--context", type=int, default=96)
    parser.add_argument("--mc-samples", type=int, default=32)
    parser.add_argument("--estimator", default="auto", choices=("auto", "count", "time"))
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape; nothing is recorded")
    args = parser.parse_args()
    missing = [f"--{name}" for name in ("mdlm", "ar", "tag") if getattr(args, name) is None]
    if missing and not args.smoke:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    from lm_eval import evaluator, simple_evaluate
    from lm_eval.tasks import TaskManager

    from unmask.eval.lm_eval import UnmaskLM

    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:  # two-step models, beside the task in the temporary folder
            runs = Path(tmp) / "runs"
            args.mdlm, args.ar = str(smoke_run(runs, "mdlm")), str(smoke_run(runs, "ar"))
            args.tag, args.items, args.context, args.mc_samples = "smoke", 4, 16, 2
            evaluator.add_env_info = lambda results: None  # lm-eval's environment report: `pip list`, 1 s a model
        source = open_source(args.mdlm)
        stream = Data(source.config.data, tokenizer=source.tokenizer).stream("test")
        text = source.tokenizer.decode(stream.tokens[:])
        items = build_items(text, args.items, args.context, seed=0)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        out = ROOT / "benchmarks" / "results" / "lm_eval_next_word.jsonl"
        # only this task: indexing lm-eval's own thousands of task files takes seconds
        tasks = TaskManager(include_path=str(write_task(Path(tmp), items)), include_defaults=False)
        for family, path in (("mdlm", args.mdlm), ("ar", args.ar)):
            model = UnmaskLM(pretrained=path, mc_samples=args.mc_samples, estimator=args.estimator)
            start = time.perf_counter()
            result = simple_evaluate(model=model, tasks=["unmask_next_word"], task_manager=tasks)
            seconds = time.perf_counter() - start
            r = result["results"]["unmask_next_word"]
            record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "tag": args.tag,
                      "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "commit": commit,
                      "machine": machine(ceilings=not args.smoke), "family": family, "model": path,
                      "items": args.items, "context_chars": args.context,
                      "mc_samples": args.mc_samples if family == "mdlm" else None,
                      "estimator": args.estimator if family == "mdlm" else "exact",
                      "acc": r["acc,none"], "acc_stderr": r["acc_stderr,none"],
                      "mean_loglik_mc_stderr": model.last_stderr, "seconds": seconds,
                      "requests_per_second": 4 * args.items / seconds}
            print(json.dumps(record))
            if not args.smoke:
                with open(out, "a") as f:
                    f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
