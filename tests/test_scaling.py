"""Scaling-law fits recover known exponents from synthetic IsoFLOP curves."""

import math

import numpy as np
import pytest

from unmask.experiments.scaling import (
    PowerLaw,
    compute_factor,
    fit_isoflop,
    fit_power_law,
    fit_sweep,
)


def synthetic_sweep(loss_law: PowerLaw, size_law: PowerLaw, budgets, curvature=0.05, noise=0.0, seed=0):
    """Records whose loss is L*(C) + k (log N - log N*(C))^2 at 5 sizes around the optimum."""
    rng = np.random.default_rng(seed)
    records = []
    for c in budgets:
        best = float(size_law(c))
        for factor in (0.1, 0.3, 1.0, 3.0, 10.0):
            n = best * factor
            loss = float(loss_law(c)) + curvature * math.log(factor) ** 2 + noise * rng.standard_normal()
            records.append({"budget": c, "parameters": n, "loss": loss})
    return records


def test_sweep_fit_recovers_exponents_exactly_without_noise():
    loss_law, size_law = PowerLaw(40.0, -0.048), PowerLaw(0.09, 0.52)
    fit = fit_sweep(synthetic_sweep(loss_law, size_law, [1e12, 1e13, 1e14, 1e15]))
    assert fit["loss_law"].exponent == pytest.approx(-0.048, rel=1e-9)
    assert fit["loss_law"].coefficient == pytest.approx(40.0, rel=1e-6)
    assert fit["size_law"].exponent == pytest.approx(0.52, rel=1e-9)
    for p in fit["isoflop"]:
        assert p.optimal_size == pytest.approx(float(size_law(p.budget)), rel=1e-6)
        assert p.loss(p.optimal_size) == pytest.approx(p.optimal_loss)


def test_sweep_fit_with_noise_stays_close():
    loss_law, size_law = PowerLaw(40.0, -0.05), PowerLaw(0.09, 0.5)
    fit = fit_sweep(synthetic_sweep(loss_law, size_law, [1e12, 1e13, 1e14, 1e15, 1e16], noise=0.002, seed=3))
    assert fit["loss_law"].exponent == pytest.approx(-0.05, abs=0.005)
    assert fit["size_law"].exponent == pytest.approx(0.5, abs=0.08)


def test_compute_factor_of_a_shifted_law():
    ar = PowerLaw(40.0, -0.05)
    mdm = PowerLaw(40.0 * 16 ** 0.05, -0.05)  # the MDM at 16 C reaches the AR's loss at C
    for c in (1e12, 1e15):
        assert compute_factor(mdm, ar, c) == pytest.approx(16.0)


def test_fit_errors():
    with pytest.raises(ValueError, match="at least 3 sizes"):
        fit_isoflop([1, 2], [3, 2], 1e12)
    with pytest.raises(ValueError, match="no minimum"):
        fit_isoflop([1, 10, 100], [1.0, 2.0, 1.0], 1e12)
    with pytest.raises(ValueError, match="at least 2"):
        fit_power_law([1.0], [2.0])
    assert "loss_law" not in fit_sweep(synthetic_sweep(PowerLaw(40, -0.05), PowerLaw(0.1, 0.5), [1e12]))
    bad = [{"budget": 1.0, "parameters": n, "loss": loss} for n, loss in ((1, 1.0), (10, 2.0), (100, 1.0))]
    assert "no minimum" in fit_sweep(bad)["failed"][1.0]
    # a minimum beyond the sizes tried (losses still falling at the smallest model) is left out
    outside = [{"budget": 1.0, "parameters": n, "loss": loss} for n, loss in ((10, 1.0), (20, 1.1), (40, 1.3))]
    fit = fit_sweep(outside)
    assert fit["isoflop"] == [] and "outside the sizes tried" in fit["failed"][1.0]


def test_sweep_runs_records_resumes_and_reports(tmp_path, capsys):
    import json

    from unmask.cli import main

    from toys import TINY

    out = tmp_path / "sweep"

    def args(sizes="32x1,64x1,64x2"):
        return ["scaling", *TINY, "data.dataset=tinyshakespeare", "data.length=32", "train.batch_size=4",
                "eval.mc_samples=2", "--sizes", sizes, "--budgets", "5e8,1e9", "--families", "mdlm,ar",
                "--out", str(out), "--eval-sequences", "8"]

    assert main(args()) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 12 and {r["family"] for r in records} == {"mdlm", "ar"}
    for r in records:  # C = 6 N D with D the tokens seen (steps rounded)
        assert 6 * r["parameters"] * r["tokens"] == pytest.approx(r["budget"], rel=0.15)
    assert set(json.loads((out / "fits.json").read_text())["families"]) == {"mdlm", "ar"}
    capsys.readouterr()
    assert main(args()) == 0  # everything recorded: nothing trains again
    assert "valid loss" not in capsys.readouterr().out
    assert len((out / "records.jsonl").read_text().splitlines()) == 12
    assert main(args("30x1")) == 2
    assert "multiple of 32" in capsys.readouterr().err
