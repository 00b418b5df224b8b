"""Benchmark scripts do not rot: every one imports against the current package, answers --help and runs
its whole pipeline at a tiny size (``--smoke``) without writing into the repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "common.py")


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
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_script_runs_its_smoke_mode(script, tmp_path):
    before = _results_state()
    # one thread: on 2 cores a second spinning OpenMP thread competes with pytest's own process
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _results_state() == before, "a smoke run wrote into benchmarks/results"


def test_perf_counts_the_flops_of_a_training_step(monkeypatch):
    """perf.py's FLOP count built its model with a tokenizer stand-in that had no mask id, and crashed."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import perf

    cfg = perf.run_config("nano", "char", 128, 8, "fp32", [])
    flops = perf.flops_per_token(cfg, 66, 128)
    m = cfg.model
    assert flops > 6 * 12 * m.blocks * m.hidden ** 2  # at least 6 N for the blocks' matmuls
