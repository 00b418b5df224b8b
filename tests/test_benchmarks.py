"""Benchmark scripts do not rot: every one imports against the current package, answers --help and runs
its whole pipeline at a tiny size (``--smoke``) without writing into the repository."""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "common.py")
# run by another script, not on its own: reference_peers.py starts it under the references' Python
WORKERS = ("reference_worker.py",)


def test_every_benchmark_script_answers_help():
    code = ("import runpy, sys\n"
            "for name in sys.argv[1:]:\n"
            "    sys.argv = [name, '--help']\n"
            "    try:\n"
            "        runpy.run_path(name, run_name='__main__')\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code in (0, None), (name, exc.code)\n")
    proc = subprocess.run([sys.executable, "-c", code, *SCRIPTS], cwd=BENCHMARKS, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("usage:") == len(SCRIPTS), proc.stdout[-2000:]


def _results_state() -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize("script", [s for s in SCRIPTS if s not in WORKERS])
def test_every_benchmark_script_runs_its_smoke_mode(script, tmp_path):
    before = _results_state()
    # one thread: on 2 cores a second spinning OpenMP thread competes with pytest's own process
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _results_state() == before, "a smoke run wrote into benchmarks/results"


@pytest.mark.slow
def test_reference_peers_against_the_references_themselves(tmp_path):
    """``reference_peers.py --smoke`` with real checkouts (its own smoke test uses a stand-in reference), each
    group optional: ``UNMASK_FAST_DLLM`` and ``UNMASK_LLADA`` name them, ``UNMASK_REFERENCE_PYTHON`` their
    environment (transformers 4.49); ``UNMASK_BD3LMS`` bd3lms' (lightning, hydra-core, omegaconf in that
    environment); ``UNMASK_SDAR`` SDAR's with ``UNMASK_SDAR_PYTHON`` (transformers 4.52.4, einops) and
    ``UNMASK_DLLM`` dllm's with ``UNMASK_DLLM_PYTHON`` (transformers 4.57). Every case of the checkouts given at
    a tiny shape: tokens equal on both sides, for bd3lms' sampled cases equal NFE, for SDAR's (sampled, the
    reference's draws replayed by unmask's warm-up) equal tokens and NFE."""
    env = os.environ.get
    flags, cases, rows = ["--reference-python", env("UNMASK_REFERENCE_PYTHON", sys.executable)], [], {}
    if env("UNMASK_FAST_DLLM") and env("UNMASK_LLADA"):
        flags += ["--fast-dllm", env("UNMASK_FAST_DLLM"), "--llada", env("UNMASK_LLADA")]
        cases += ["llada", "fast-dllm-thr0.9", "fast-dllm-prefix", "fast-dllm-dual", "dream", "dream-block-dual"]
        rows["tokens equal"] = 8  # llada and dream at two batch sizes
    if env("UNMASK_BD3LMS"):
        flags += ["--bd3lms", env("UNMASK_BD3LMS")]
        cases += ["bd3lm", "mdlm"]
        rows["sampled, NFE equal"] = 2
    if env("UNMASK_SDAR"):
        flags += ["--sdar", env("UNMASK_SDAR"), "--sdar-python", env("UNMASK_SDAR_PYTHON", sys.executable)]
        cases.append("sdar")
        rows["sampled, tokens equal"] = 1
    if env("UNMASK_DLLM"):
        flags += ["--dllm", env("UNMASK_DLLM"), "--dllm-python", env("UNMASK_DLLM_PYTHON", sys.executable)]
        cases.append("llada2")
        rows["tokens equal"] = rows.get("tokens equal", 0) + 1
    if not cases:
        pytest.skip("no reference checkouts: set UNMASK_FAST_DLLM and UNMASK_LLADA (and UNMASK_REFERENCE_PYTHON), "
                    "UNMASK_BD3LMS, UNMASK_SDAR (and UNMASK_SDAR_PYTHON) or UNMASK_DLLM (and UNMASK_DLLM_PYTHON)")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "reference_peers.py"), "--smoke", *flags,
                           "--cases", ",".join(cases)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    found = {label: sum(f"| {label} |" in row for row in table) for label in rows}
    assert found == rows and len(table) == sum(rows.values()), proc.stdout


def test_reference_peers_replays_the_draws_of_torch_multinomial(monkeypatch):
    """reference_peers' sdar case compares sampled tokens because unmask's warm-up draws what SDAR's
    ``generate`` draws: ``torch.multinomial`` over a block's (block, V) probabilities after
    ``torch.manual_seed(0)`` is ``argmax(p / q)`` with ``q`` one ``exponential_`` slab per call, which
    ``TorchMultinomialDraws`` gives unmask's sampler (as uniforms ``exp(-q)``), whichever positions it reads."""
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import reference_peers

    block, vocab = 4, 50
    probs = torch.rand(3, block, vocab, generator=torch.Generator().manual_seed(1)).pow(4).softmax(-1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        expected = [torch.multinomial(p, num_samples=1)[:, 0] for p in probs]
    draws = reference_peers.TorchMultinomialDraws(torch.zeros(1, dtype=torch.long), torch.Generator().manual_seed(0),
                                                  block)
    for p, want, where in zip(probs, expected, (torch.arange(block), torch.tensor([1, 3]), torch.tensor([2]))):
        u = draws.uniforms(torch.zeros(len(where), dtype=torch.long), 0, where, vocab)
        assert torch.equal((p[where].double() / -torch.log(u)).argmax(-1), want[where])


def test_perf_counts_the_flops_of_a_training_step(monkeypatch):
    """perf.py's FLOP count built its model with a tokenizer stand-in that had no mask id, and crashed."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import perf

    cfg = perf.run_config("nano", "char", 128, 8, "fp32", [])
    flops = perf.flops_per_token(cfg, 66, 128)
    m = cfg.model
    assert flops > 6 * 12 * m.blocks * m.hidden ** 2  # at least 6 N for the blocks' matmuls


def test_text_parallelism_picks_the_most_parallel_setting_at_ar_entropy_within_the_slack(monkeypatch):
    """parallelism.py --text: ratios to the teacher's first-hitting gen-PPL, the entropy test against the AR
    model's, and per model the setting with the most tokens per forward that passes both (worked by hand)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import parallelism

    def rec(model, decoder, tpf, ppl, entropy, tps):
        return {"model": model, "decoder": decoder, "setting": f"{tpf}", "tokens_per_forward": tpf, "gen_ppl": ppl,
                "entropy": entropy, "tokens_per_second": tps}

    tolerance = parallelism.ENTROPY_TOLERANCE
    ar = rec("ar", "ar + kv", 1.0, 5.0, 3.10, 100.0)
    records = [rec("teacher", "first-hitting", 1.0, 40.0, 3.08, 30.0),
               rec("teacher", "ancestral", 2.0, 45.0, 3.07, 60.0),
               rec("teacher", "ancestral", 4.0, 50.5, 3.06, 120.0),  # 1.2625 x the reference: over the slack
               rec("student", "ancestral", 8.0, 49.0, 3.10 + 0.6 * tolerance, 250.0),  # 1.225 x, at AR's entropy
               rec("student", "threshold", 16.0, 30.0, 3.10 - 1.5 * tolerance, 500.0),  # below AR's entropy
               ar]
    result = parallelism.summarize_text(records, ar)
    assert result["teacher_gen_ppl"] == 40.0
    assert [r["at_ar_entropy"] for r in records] == [True, True, True, True, False, True]
    assert records[2]["gen_ppl_ratio_to_teacher"] == pytest.approx(1.2625)
    best = result["most_parallel_within_slack"]
    assert (best["teacher"]["tokens_per_forward"], best["teacher"]["speed_vs_ar"]) == (2.0, pytest.approx(0.6))
    assert (best["student"]["tokens_per_forward"], best["student"]["speed_vs_ar"]) == (8.0, pytest.approx(2.5))
    assert "ar" not in best

def test_arithmetic_parallelism_aups_with_paired_bootstrap_errors(monkeypatch):
    """parallelism.py: each curve's AUP (worked by hand), its bootstrap standard error over the test prompts, and a
    student's AUP minus its teacher's, resampled on the same prompts: zero error for a copy of the teacher."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import parallelism

    n = 20

    def rec(model, decoder, tpf, misses, decoder_calls=1.0, tps=100.0):
        hits = [0] * misses + [1] * (n - misses)
        return {"model": model, "decoder": decoder, "setting": str(tpf), "tokens_per_forward": float(tpf),
                "accuracy": sum(hits) / n, "mean_row_nfe": decoder_calls, "tokens_per_second": tps * tpf,
                "row_hits": hits, "row_tokens_per_forward": [float(tpf)] * n}

    def curve(model, misses_at_two):
        return [rec(model, "fixed steps", 1, 0, 15.0), rec(model, "fixed steps", 2, misses_at_two, 7.5)]

    ar = rec("ar", "ar + kv", 1, 0)
    records = [*curve("teacher", 1), *curve("copy", 1), *curve("better", 0), ar]
    result = parallelism.summarize(records, ar, draws=200)
    aups = {c["model"]: c for c in result["aup"]}
    teacher = 100 + 0.5 * (95 * math.exp(-3 * 0.05) + 100)  # the second point at 95 %, on the 5-point floor
    assert aups["teacher"]["aup"] == pytest.approx(teacher)
    assert aups["better"]["aup"] == pytest.approx(200.0)
    assert aups["better"]["aup_minus_teacher"] == pytest.approx(200.0 - teacher)
    # a resample that draws the missed row twice puts the teacher's second point below the floor: the AUP moves
    assert aups["teacher"]["aup_stderr"] > 1.0
    assert aups["copy"]["aup_minus_teacher"] == 0.0 and aups["copy"]["aup_minus_teacher_stderr"] == 0.0
    assert aups["better"]["aup_minus_teacher_stderr"] > 1.0 and aups["better"]["aup_stderr"] == 0.0
    assert "aup_minus_teacher" not in aups["teacher"] and "ar" not in aups
    assert all("row_hits" not in r and "row_tokens_per_forward" not in r for r in records)
    assert result["teacher_accuracy"] == 1.0 and result["teacher_accuracy_one_token_per_call"] == 1.0


@pytest.fixture(scope="module")
def insertion_text_models(tmp_path_factory):
    """insertion.py's module and its two-step ILM and MDLM text models."""
    tmp_path = tmp_path_factory.mktemp("insertion")
    sys.path.insert(0, str(BENCHMARKS))
    import insertion

    from common import SMOKE_OVERRIDES

    args = argparse.Namespace(preset="nano", text_steps=2, threads=1, ilm_stop_noise=0.0, ilm_dropout=0.0,
                              ilm_stop_head="binary", text_split="contiguous",
                              text_seed=1)
    smoke = (*[o for o in SMOKE_OVERRIDES if not o.startswith(("model.length=", "data.length="))],
             f"data.cache_dir={tmp_path / 'cache'}")
    return insertion, *(insertion.text_model(args, tmp_path, smoke, family) for family in ("ilm", "mdlm"))


def test_infilling_keeps_the_context_and_reads_back_each_models_span(insertion_text_models):
    """insertion.py's infill stage: the ILM's span is what its sampler inserted between the fixed left and
    right (the same text as the library's template path gives for that row), an MDLM's the k masked places."""
    from unmask.config import SampleConfig
    from unmask.pipeline import generate_rows

    insertion, ilm, mdlm = insertion_text_models
    tok = ilm.tokenizer
    cases = [{"left": tok.encode(a).tolist(), "span": tok.encode(b).tolist(), "right": tok.encode(c).tolist()}
             for a, b, c in [("ROMEO:\nI ", "love thee", " not."), ("", "First", " Citizen:\nSpeak.")]]
    cfg = SampleConfig(batch_size=8, steps=16, seed=3, gap="sample")
    spans, totals = insertion.fill_spans(ilm, cases, cfg)
    assert totals["nfe"] >= 1 and all(len(s) + len(c["left"]) + len(c["right"]) <= 127 for s, c in zip(spans, cases))
    model, objective = insertion.load_model(ilm)
    direct = generate_rows(model, objective, tok, SampleConfig(num_samples=1, seed=3, gap="sample"), 128, 128,
                           template="ROMEO:\nI [MASK] not.", bos=True)
    assert tok.decode(cases[0]["left"] + spans[0] + cases[0]["right"]) == direct.texts[0]
    for k in (1, 5, 18):
        spans, _ = insertion.fill_spans(mdlm, cases, cfg, [k] * len(cases))
        assert all(len(s) <= k for s in spans) and any(len(s) == k for s in spans)


def test_stop_calibration_weighs_every_state_of_every_path_once(insertion_text_models):
    """Complete states weigh 1 and each of ``states`` incomplete ones ``n0 / states``, so the share of
    complete states is exactly rows / sum(n0 + 1), whatever the model predicts."""
    from unmask.data.dataset import Data
    from unmask.data.layouts import TOKEN

    insertion, ilm, _ = insertion_text_models
    rows = Data(ilm.config.data, tokenizer=ilm.tokenizer).rows("test")
    c = insertion.stop_calibration(ilm, rows, 24, states=3)
    _, kinds = rows.get(insertion.select_rows(len(rows), 24, 0))
    n0 = (kinds == TOKEN).sum(1)
    assert c["rows"] == 24 and c["complete"] == pytest.approx(24 / (n0 + 1).sum(), rel=1e-12)
    assert sum(b["weight"] for b in c["bins"]) == pytest.approx(1.0)
    assert sum(b["states"] for b in c["bins"]) == 24 * 4
    assert 0 < c["predicted"] < 1
    substituted = c["complete_with_substitutions"]  # none substituted: the complete states above
    assert list(substituted) == [0, 1, 3] and substituted[0]["mean"] == pytest.approx(c["mean_p_complete_rows"])
