"""Silent corruption is never success: checkpoints carry checksums, weights and losses must be finite,
JSON output is valid JSON, and resume falls back past a corrupt newest checkpoint."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from unmask.checkpoints.checkpoint import (
    Checkpoint,
    CheckpointError,
    list_checkpoints,
    load_tensors,
    resume_point,
)
from unmask.cli import json_safe, main
from unmask.config import load_config
from unmask.pipeline import from_pretrained
from unmask.train.loop import TrainingError, train

from toys import TINY

EXACT = ["train.precision=fp32", "model.dropout=0.0"]



def args(corpus: Path, run: Path, *extra: str) -> list[str]:
    return [*TINY, "data.dataset=text", f"data.path={corpus}", f"run_dir={run}", *EXACT, *extra]


def strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def overwrite_data(path: Path, value: float = float("nan")) -> None:
    """Overwrite the first tensor values of a safetensors file, keeping its header intact."""
    data = bytearray(path.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    start = 8 + header
    data[start:start + 64] = struct.pack("<16f", *[value] * 16)
    path.write_bytes(bytes(data))


@pytest.fixture
def run(corpus, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *args(corpus, run, "train.steps=3", "train.save_every=1", "train.keep_checkpoints=2")]) == 0
    return run


def error_line(capsys) -> str:
    """The one error line (a progress bar may come before it)."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "unmask: error:" in line]
    assert len(lines) == 1 and captured.err.rstrip().endswith(lines[0]), captured.err
    return lines[0][lines[0].index("unmask: error:"):]


@pytest.mark.parametrize("value", [float("nan"), 3.0])
def test_overwritten_bytes_in_a_checkpoint_are_named_not_evaluated(run, capsys, value):
    """Before checksums, bytes overwritten inside ema.safetensors gave 'nll <= nan' and exit 0."""
    newest = list_checkpoints(run / "checkpoints")[-1]
    overwrite_data(newest / "ema.safetensors", value)
    for command in (["eval", str(run)], ["sample", str(run), "sample.num_samples=1", "sample.steps=2"]):
        assert main(command) == 2
        line = error_line(capsys)
        assert str(newest / "ema.safetensors") in line and "SHA-256" in line, line


def test_a_missing_file_of_a_checkpoint_is_named_not_replaced_by_another(run, capsys):
    """Without ema.safetensors (listed in checksums.json), sample and eval used the raw weights with exit 0
    and eval's JSON still said "ema": true."""
    newest = list_checkpoints(run / "checkpoints")[-1]
    (newest / "ema.safetensors").unlink()
    for command in (["eval", str(run)], ["sample", str(run), "sample.num_samples=1", "sample.steps=2"]):
        assert main(command) == 2
        line = error_line(capsys)
        assert str(newest / "ema.safetensors") in line and "is missing" in line, line
    with pytest.raises(CheckpointError, match="is missing"):
        from_pretrained(run)


def test_a_file_put_into_a_checkpoint_is_not_part_of_it(corpus, tmp_path, capsys):
    """An ema.safetensors put into a checkpoint trained without an EMA (not in its checksums.json) was read,
    unverified, as its EMA weights by sample, eval and from_pretrained."""
    run = tmp_path / "no-ema"
    assert main(["train", *args(corpus, run, "train.steps=2", "train.ema=0")]) == 0
    newest = list_checkpoints(run / "checkpoints")[-1]
    sample = ["sample", str(run), "sample.num_samples=2", "sample.steps=4", "--json", str(tmp_path / "s.json")]
    assert main(sample) == 0
    before = json.loads((tmp_path / "s.json").read_text())["ids"]
    shutil.copy(newest / "model.safetensors", newest / "ema.safetensors")
    overwrite_data(newest / "ema.safetensors", 1.0)
    assert main(sample) == 0 and json.loads((tmp_path / "s.json").read_text())["ids"] == before
    capsys.readouterr()
    assert main(["eval", str(run), "eval.max_sequences=2"]) == 0
    assert '"ema": false' in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="not written with the checkpoint"):
        Checkpoint(run).file("ema.safetensors")


def test_non_finite_weights_without_checksums_are_an_error(run, capsys):
    newest = list_checkpoints(run / "checkpoints")[-1]
    (newest / "checksums.json").unlink()  # as written before checksums existed
    overwrite_data(newest / "ema.safetensors")
    assert main(["eval", str(run)]) == 2
    assert "NaN or infinite" in error_line(capsys)
    with pytest.raises(CheckpointError, match="NaN"):
        Checkpoint(run).verify()


@pytest.mark.parametrize("damage", ["changed bytes", "missing EMA"])
def test_resume_falls_back_past_a_corrupt_newest_checkpoint_and_stays_exact(corpus, tmp_path, capsys, damage):
    common = ["train.steps=6", "train.save_every=2", "train.keep_checkpoints=2", "train.lr=0.003", "train.ema=0.9"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train(load_config(None, args(corpus, whole, *common)))
    train(load_config(None, args(corpus, broken, *common, "train.steps=4")))
    newest = list_checkpoints(broken / "checkpoints")[-1]
    assert newest.name == "step_00000004"
    if damage == "changed bytes":
        overwrite_data(newest / "optimizer.safetensors", 1.0)
    else:
        (newest / "ema.safetensors").unlink()
    capsys.readouterr()
    train(load_config(None, args(corpus, broken, *common)))
    out = capsys.readouterr().out
    assert f"checkpoint {newest} is unusable" in out and ("SHA-256" if damage == "changed bytes" else "missing") in out
    assert f"resuming {broken} from step 2" in out
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a = load_tensors(list_checkpoints(whole / "checkpoints")[-1] / name)
        b = load_tensors(list_checkpoints(broken / "checkpoints")[-1] / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_with_every_checkpoint_corrupt_is_an_error(run, capsys):
    for ckpt in list_checkpoints(run / "checkpoints"):
        overwrite_data(ckpt / "model.safetensors", 2.0)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        resume_point(run / "checkpoints", print)
    assert resume_point(run / "nothing-here", print) is None


def test_a_diverging_run_stops_before_logging_or_saving_non_finite_numbers(corpus, tmp_path, capsys):
    run = tmp_path / "diverge"
    code = main(["train", *args(corpus, run, "train.steps=40", "train.lr=1e30", "train.grad_clip=0",
                                "train.save_every=1", "train.warmup_steps=0")])
    assert code == 2
    line = error_line(capsys)
    assert "became NaN or infinite" in line, line
    for record in (run / "metrics.jsonl").read_text().splitlines():
        strict_json(record)
    for ckpt in list_checkpoints(run / "checkpoints"):
        Checkpoint(ckpt).verify()  # every checkpoint written is finite


def test_non_finite_loss_is_reported_with_the_steps_and_the_last_checkpoint(corpus, tmp_path, monkeypatch):
    from unmask.objectives.mdlm import MaskedDiffusion

    real = MaskedDiffusion.loss
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        calls["n"] += 1
        out = real(self, *a, **kw)
        return out * float("nan") if calls["n"] == 4 else out

    monkeypatch.setattr(MaskedDiffusion, "loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"between steps 2 and 4.*step_00000002"):
        train(load_config(None, args(corpus, run, "train.steps=6", "train.save_every=2", "train.log_every=2")))
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000002"]


def test_eval_json_is_strict_json(run, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", str(run), "eval.max_sequences=4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    assert strict_json(printed) == strict_json(out.read_text())
    assert json_safe({"a": [math.inf, 1.0, {"b": math.nan}]}) == {"a": [None, 1.0, {"b": None}]}


def test_data_oov_applies_to_eval_and_sample(run, tmp_path, capsys):
    """``data.oov`` was honoured only by --zero-shot: eval and sample ignored it."""
    odd = tmp_path / "odd.txt"
    odd.write_text("First Citizen: \u00a7 before we proceed any further, hear me speak.\n" * 20)
    base = ["eval", str(run), "data.dataset=text", f"data.path={odd}", "data.valid_fraction=0.2",
            "data.test_fraction=0.2", "eval.max_sequences=2"]
    assert main(base) == 2
    assert "outside the tokenizer's alphabet" in error_line(capsys)
    assert main(base + ["data.oov=replace"]) == 0
    assert main(base + ["data.oov=drop"]) == 0
    capsys.readouterr()
    sample = ["sample", str(run), "sample.num_samples=1", "sample.steps=2", "--prompt", "\u00a7First"]
    assert main(sample) == 2
    assert "outside the tokenizer's alphabet" in error_line(capsys)
    assert main(sample + ["data.oov=drop"]) == 0
    assert "--- sample 0" in capsys.readouterr().out


def test_a_safetensors_file_too_short_for_its_header_is_corrupt(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(4)}, str(path))
    path.write_bytes(path.read_bytes()[:6])
    with pytest.raises(CheckpointError, match="header length"):
        load_tensors(path)
