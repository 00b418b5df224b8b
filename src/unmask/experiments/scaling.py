"""IsoFLOP sweeps and scaling-law fits (SMDM, Nie et al. 2024; Chinchilla's approach 2).

``unmask scaling CONFIG --sizes 64x2,96x3,128x4,192x4 --budgets 1e12,3e12,1e13 --families mdlm,ar``
trains every (family, size, budget) of the grid on the config's data, ``steps = C / (6 N B L)`` with
``N`` the non-embedding parameters (Kaplan's convention; the embedding and output layers are excluded)
and ``B L`` the tokens of a step, scores the validation loss (MDM: the NELBO bound with
``eval.mc_samples`` draws; AR: exact NLL) and appends one JSON record per run to
``OUT/records.jsonl``; runs already recorded are skipped and interrupted runs resume, so the sweep can
be stopped and restarted. Then it fits and plots.

A sweep trains models of several sizes ``N`` at several compute budgets ``C = 6 N D`` and records the
validation loss of each. Per budget, the loss is fitted by a parabola in ``log N``; its vertex gives
the compute-optimal size ``N*(C)`` and loss ``L*(C)``. Across budgets, power laws are fitted by least
squares in log-log space: ``L* = A C^alpha`` and ``N* = B C^beta``. Two families (MDM and AR) on the
same data are compared by the compute factor: the compute the MDM needs to reach the loss the AR model
reaches with ``C``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoints.checkpoint import Checkpoint, load_model
from ..config import ConfigError, load_config
from ..data.dataset import Data
from ..eval.likelihood import likelihood_of_rows
from ..families import FAMILIES, build_model
from ..models.common import count_parameters
from ..train.loop import train


@dataclass
class IsoFLOPFit:
    """The parabola ``loss = a (log N)^2 + b log N + c`` of one budget and its vertex."""

    budget: float
    a: float
    b: float
    c: float

    @property
    def optimal_size(self) -> float:
        """The compute-optimal size ``N*`` at the vertex: ``exp(-b / 2a)``."""
        return math.exp(-self.b / (2 * self.a))

    @property
    def optimal_loss(self) -> float:
        """The loss at the vertex, ``L* = c - b^2 / 4a``."""
        return self.c - self.b ** 2 / (4 * self.a)

    def loss(self, size: float) -> float:
        """The fitted loss of a model of ``size`` parameters."""
        x = math.log(size)
        return self.a * x * x + self.b * x + self.c


@dataclass
class PowerLaw:
    """``y = coefficient * x^exponent``, fitted in log-log space."""

    coefficient: float
    exponent: float

    def __call__(self, x):
        """``coefficient * x^exponent`` (element-wise for arrays)."""
        return self.coefficient * np.asarray(x, dtype=float) ** self.exponent

    def inverse(self, y):
        """The ``x`` whose value is ``y``: ``(y / coefficient)^(1 / exponent)``."""
        return (np.asarray(y, dtype=float) / self.coefficient) ** (1 / self.exponent)


def fit_isoflop(sizes, losses, budget: float) -> IsoFLOPFit:
    """Least-squares parabola in ``log N`` through (size, loss) points of one budget (at least 3
    sizes); an error when it opens downwards (no minimum: the sweep missed the optimum)."""
    sizes, losses = np.asarray(sizes, dtype=float), np.asarray(losses, dtype=float)
    if len(sizes) < 3:
        raise ValueError(f"budget {budget:.3g}: an IsoFLOP parabola needs at least 3 sizes, got {len(sizes)}")
    a, b, c = np.polyfit(np.log(sizes), losses, 2)
    if a <= 0:
        raise ValueError(f"budget {budget:.3g}: the loss has no minimum over the sizes tried (parabola opens "
                         f"downwards); add smaller and larger models")
    return IsoFLOPFit(budget, float(a), float(b), float(c))


def fit_power_law(x, y) -> PowerLaw:
    """``log y = exponent log x + log coefficient`` by least squares (at least 2 points)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2:
        raise ValueError("a power law needs at least 2 points")
    exponent, log_coefficient = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLaw(float(math.exp(log_coefficient)), float(exponent))


def fit_sweep(records: list[dict]) -> dict:
    """Fits of a family's records (``{"budget", "parameters", "loss"}`` each): the IsoFLOP parabola of
    every budget whose minimum lies within the sizes tried (``failed`` says why the others are left
    out: an extrapolated optimum says nothing reliable), and the power laws of ``L*`` and ``N*``
    against ``C`` through those optima."""
    budgets = sorted({r["budget"] for r in records})
    parabolas, failed = [], {}
    for budget in budgets:
        points = sorted((r["parameters"], r["loss"]) for r in records if r["budget"] == budget)
        try:
            fit = fit_isoflop(*zip(*points), budget)
        except ValueError as exc:
            failed[budget] = str(exc)
            continue
        if not points[0][0] <= fit.optimal_size <= points[-1][0]:
            failed[budget] = (f"budget {budget:.3g}: the fitted optimum ({fit.optimal_size:,.0f} parameters) lies "
                              f"outside the sizes tried ({points[0][0]:,}-{points[-1][0]:,}); not used for the laws")
            continue
        parabolas.append(fit)
    out = {"isoflop": parabolas, "failed": failed}
    if len(parabolas) >= 2:
        c = [p.budget for p in parabolas]
        out["loss_law"] = fit_power_law(c, [p.optimal_loss for p in parabolas])
        out["size_law"] = fit_power_law(c, [p.optimal_size for p in parabolas])
    return out


FACTOR_BETWEEN = ("mdlm", "ar")  # SMDM's compute factor: the MDM's compute over the AR model's at equal loss


def compute_factor(mdm: PowerLaw, ar: PowerLaw, budget: float) -> float:
    """How many times the compute ``budget`` the MDM needs to reach the optimal loss the AR model
    reaches with ``budget`` (from the two loss laws)."""
    return float(mdm.inverse(ar(budget)) / budget)


def parse_size(spec: str) -> tuple[int, int]:
    """``"HIDDENxBLOCKS"`` -> (hidden, blocks); heads are ``hidden / 32`` (at least 1)."""
    try:
        hidden, blocks = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"model size {spec!r} is not HIDDENxBLOCKS (for example 128x4)") from None
    if hidden < 32 or hidden % 32 or blocks < 1:
        raise ValueError(f"model size {spec!r}: hidden must be a positive multiple of 32, blocks >= 1")
    return hidden, blocks


def run_sweep(config_path, overrides: list[str], sizes: list[str], budgets: list[float], families: list[str],
              out: str, eval_sequences: int = 256) -> list[dict]:
    """Train and score every grid point not yet in ``out/records.jsonl``; returns all records. Families
    must be scored by a likelihood (a bound or exact), so that their losses compare."""
    scored = [name for name, spec in FAMILIES.items() if spec.likelihood]
    wrong = [f for f in families if f not in scored]
    if wrong or not families:
        raise ValueError(f"--families: {' and/or '.join(scored)}, not {', '.join(wrong) or 'nothing'}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    records_path = out_dir / "records.jsonl"
    records = [json.loads(line) for line in records_path.read_text().splitlines()] if records_path.exists() else []
    done = {(r["family"], r["size"], r["budget"]) for r in records}
    plans = []  # every grid point checked before anything trains
    for family in families:
        for spec in sizes:
            hidden, blocks = parse_size(spec)
            model_keys = [f"model.hidden={hidden}", f"model.blocks={blocks}", f"model.heads={max(1, hidden // 32)}"]
            for budget in budgets:
                run_dir = out_dir / "runs" / f"{family}-{spec}-{budget:.0e}"
                cfg = load_config(config_path, [*overrides, f"family={family}", *model_keys, f"run_dir={run_dir}",
                                                "train.max_minutes=0"])
                data = Data(cfg.data)
                n = count_parameters(build_model(cfg, data.tokenizer), exclude_embeddings=True)
                tokens_per_step = cfg.train.batch_size * cfg.data.length
                steps = int(round(budget / (6 * n * tokens_per_step)))
                if steps < 5:
                    raise ConfigError(f"budget {budget:.3g} gives {spec} only {steps} steps; raise the budget or "
                                      f"lower the size")
                cfg.train.steps = steps
                cfg.train.warmup_steps = min(cfg.train.warmup_steps, steps // 10)
                if (family, spec, budget) not in done:
                    plans.append((family, spec, hidden, blocks, budget, n, steps, tokens_per_step, cfg, data))
    for family, spec, hidden, blocks, budget, n, steps, tokens_per_step, cfg, data in plans:
        start = time.perf_counter()
        final = train(cfg)
        seconds = time.perf_counter() - start
        model, objective = load_model(Checkpoint(final), ema=cfg.eval.use_ema)
        result = likelihood_of_rows(model, objective, data.rows("valid"), cfg.data, data.tokenizer,
                                    mc_samples=cfg.eval.mc_samples, batch_size=cfg.eval.batch_size,
                                    max_sequences=eval_sequences, seed=cfg.eval.seed)
        record = {"family": family, "size": spec, "hidden": hidden, "blocks": blocks, "parameters": n,
                  "budget": budget, "steps": steps, "tokens": steps * tokens_per_step,
                  "loss": result["nll"], "stderr": result["stderr"], "train_seconds": seconds}
        with open(records_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)
        print(f"{family} {spec} ({n:,} parameters) C={budget:.2g}: {steps} steps, valid loss "
              f"{result['nll']:.4f} ({seconds:.0f} s)", flush=True)
    return records


def summarize(records: list[dict]) -> dict:
    """Fits per family and, with both families, the MDM/AR compute factor at each budget."""
    families = sorted({r["family"] for r in records})
    fits = {f: fit_sweep([r for r in records if r["family"] == f]) for f in families}
    out = {"families": {}}
    for f, fit in fits.items():
        entry = {"isoflop": [{"budget": p.budget, "optimal_parameters": p.optimal_size,
                              "optimal_loss": p.optimal_loss} for p in fit["isoflop"]],
                 "no_fit": {f"{b:.3g}": why for b, why in fit["failed"].items()}}
        for law in ("loss_law", "size_law"):
            if law in fit:
                entry[law] = {"coefficient": fit[law].coefficient, "exponent": fit[law].exponent}
        out["families"][f] = entry
    mdm, ar = FACTOR_BETWEEN
    if all("loss_law" in fits.get(f, {}) and fits[f]["loss_law"].exponent < 0 for f in FACTOR_BETWEEN):
        budgets = sorted({r["budget"] for r in records})
        out["compute_factor"] = {f"{c:.3g}": compute_factor(fits[mdm]["loss_law"], fits[ar]["loss_law"], c)
                                 for c in budgets}
    return out


def plot_sweep(records: list[dict], path) -> bool:
    """Loss against parameters per budget with the fitted parabolas (one panel per family), and the
    optimal loss against compute with the fitted power laws. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    families = sorted({r["family"] for r in records})
    fig, axes = plt.subplots(1, len(families) + 1, figsize=(5.2 * (len(families) + 1), 4.4))
    for ax, family in zip(axes, families):
        rows = [r for r in records if r["family"] == family]
        fit = fit_sweep(rows)
        parabolas = {p.budget: p for p in fit["isoflop"]}
        for budget in sorted({r["budget"] for r in rows}):
            pts = sorted((r["parameters"], r["loss"]) for r in rows if r["budget"] == budget)
            line = ax.plot(*zip(*pts), "o", label=f"C = {budget:.0e}")[0]
            if budget in parabolas:
                grid = np.geomspace(pts[0][0] * 0.8, pts[-1][0] * 1.25, 60)
                ax.plot(grid, [parabolas[budget].loss(n) for n in grid], "-", color=line.get_color(), lw=1)
                ax.plot(parabolas[budget].optimal_size, parabolas[budget].optimal_loss, "*", ms=11,
                        color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"{family}: IsoFLOP curves")
        ax.legend(fontsize=7)
    ax = axes[-1]
    for family in families:
        fit = fit_sweep([r for r in records if r["family"] == family])
        budgets = [p.budget for p in fit["isoflop"]]
        ax.plot(budgets, [p.optimal_loss for p in fit["isoflop"]], "o", label=f"{family} optimum")
        if "loss_law" in fit:
            grid = np.geomspace(min(budgets) / 2, max(budgets) * 4, 50)
            law = fit["loss_law"]
            ax.plot(grid, law(grid), "-", lw=1, label=f"{family}: L* ∝ C^{law.exponent:.3f}")
    if ax.has_data():
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("compute C = 6ND (FLOPs)")
    ax.set_ylabel("optimal validation loss")
    ax.set_title("loss at the compute-optimal size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
