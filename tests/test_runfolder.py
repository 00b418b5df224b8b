"""Run folders: ``--fresh`` and exports delete only what unmask wrote; one process per run folder
(a lock that a killed owner does not leave behind); resuming with other settings is refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unmask.checkpoints.checkpoint import Checkpoint, list_checkpoints
from unmask.checkpoints.runfolder import (
    LOCK_FILE,
    RunFolderError,
    RunLock,
    clear_run_folder,
)
from unmask.cli import main

from toys import TINY


def train_args(corpus: Path, run: Path, *extra: str) -> list[str]:
    return ["train", *TINY, "data.dataset=text", f"data.path={corpus}", f"run_dir={run}", "train.steps=2", *extra]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("foreign, shown", [("notes.txt", "notes.txt"), ("data/corpus.txt", "(data)"),
                                            ("checkpoints/notes.txt", "checkpoints/notes.txt"),
                                            ("checkpoints/step_00000002/mine.bin", "step_00000002/mine.bin"),
                                            ("tokenizer/vocab.txt", "tokenizer/vocab.txt")])
def test_fresh_refuses_a_folder_with_files_unmask_did_not_write(corpus, tmp_path, capsys, foreign, shown):
    run = tmp_path / "run"
    assert main(train_args(corpus, run)) == 0
    (run / foreign).parent.mkdir(parents=True, exist_ok=True)
    (run / foreign).write_text("the user's own work")
    before = tree(run)
    assert main(train_args(corpus, run, "--fresh")) == 2
    line = error_line(capsys)
    assert "nothing was deleted" in line and shown in line, line
    assert tree(run) == before


def test_fresh_refuses_a_plain_folder_and_clears_a_run_folder(corpus, tmp_path, capsys):
    plain = tmp_path / "d"
    plain.mkdir()
    (plain / "notes.md").write_text("keep me")
    assert main(train_args(corpus, plain, "--fresh")) == 2
    assert "notes.md" in error_line(capsys)
    assert (plain / "notes.md").read_text() == "keep me"

    run = tmp_path / "run"
    assert main(train_args(corpus, run, "train.save_every=1")) == 0
    assert main(train_args(corpus, run, "train.steps=1", "--fresh")) == 0
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000001"]
    starts = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in starts if r.get("event") == "start"] == [0]


def test_clear_run_folder_keeps_its_lock_and_ignores_a_missing_folder(tmp_path):
    clear_run_folder(tmp_path / "absent")
    run = tmp_path / "run"
    with RunLock(run):
        (run / "metrics.jsonl").write_text("{}\n")
        clear_run_folder(run)
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
    link = tmp_path / "link"
    link.symlink_to(run)
    with pytest.raises(RunFolderError, match="not a run folder"):
        clear_run_folder(link)


def test_export_never_replaces_what_unmask_did_not_write(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(corpus, run)) == 0
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("my notes")
    a_file = tmp_path / "file.txt"
    a_file.write_text("data")
    for target in (folder, a_file):
        assert main(["export", str(run), str(target)]) == 2
        assert "nothing was written" in error_line(capsys)
    assert (folder / "README.md").read_text() == "my notes" and a_file.read_text() == "data"
    export = tmp_path / "export"
    assert main(["export", str(run), str(export)]) == 0
    assert main(["export", str(run), str(export), "--raw"]) == 0  # an earlier export is replaced
    card = (export / "README.md").read_text()
    (export / "README.md").write_text(card + "\nmy notes on this model\n")  # ...unless the user edited it
    assert main(["export", str(run), str(export)]) == 2
    assert "nothing was written" in error_line(capsys)
    assert (export / "README.md").read_text().endswith("my notes on this model\n")
    capsys.readouterr()
    for to, name in (("mdlm-hf", "hf"), ("mdlm-ckpt", "m.ckpt")):
        (tmp_path / name).write_text("someone's file") if to == "mdlm-ckpt" else (tmp_path / name).mkdir()
        if to == "mdlm-hf":
            (tmp_path / name / "config.json").write_text("{}")
        assert main(["export", str(run), str(tmp_path / name), "--to", to]) == 2
        assert "never replace" in error_line(capsys)
    assert (tmp_path / "m.ckpt").read_text() == "someone's file"
    assert (tmp_path / "hf" / "config.json").read_text() == "{}"

    # a dangling symbolic link (a traceback that left a .tmp-* folder) and an empty folder for a .ckpt file
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "out").symlink_to(tmp_path / "nowhere")
    for to in ("unmask", "mdlm-hf", "mdlm-ckpt"):
        assert main(["export", str(run), str(tmp_path / "links" / "out"), "--to", to]) == 2
        assert "symbolic link" in error_line(capsys)
    assert [p.name for p in (tmp_path / "links").iterdir()] == ["out"] and not (tmp_path / "nowhere").exists()
    (tmp_path / "empty").mkdir()
    assert main(["export", str(run), str(tmp_path / "empty"), "--to", "mdlm-ckpt"]) == 2
    assert "writes one .ckpt file" in error_line(capsys) and not any((tmp_path / "empty").iterdir())


def test_a_result_file_that_cannot_be_written_loses_nothing(corpus, tmp_path, capsys):
    """`sample --json FOLDER` and `--json /dev/full` were tracebacks after the work, with the samples lost."""
    run = tmp_path / "run"
    assert main(train_args(corpus, run)) == 0
    capsys.readouterr()
    for command in (["sample", str(run), "sample.num_samples=1"], ["eval", str(run), "eval.max_sequences=2"]):
        assert main([*command, "--json", str(tmp_path)]) == 2  # refused before the work
        captured = capsys.readouterr()
        assert captured.out == "" and "is a folder" in captured.err.strip() and len(captured.err.splitlines()) == 1
        assert main([*command, "--json", str(tmp_path / "no" / "such.json")]) == 2
        assert "does not exist" in error_line(capsys)
    if Path("/dev/full").exists():
        assert main(["sample", str(run), "sample.num_samples=1", "--json", "/dev/full"]) == 2
        captured = capsys.readouterr()
        assert captured.out.strip()  # the samples were printed first
        assert captured.err.strip().splitlines()[-1].startswith("unmask: error: --json /dev/full could not be written")


def wait_for(condition, proc, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"the first run ended early: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_one_process_per_run_folder_and_a_killed_owner_leaves_no_lock(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    args = train_args(corpus, run, "train.steps=100000", "train.save_every=5", "train.keep_checkpoints=1")
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "unmask", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        wait_for(lambda: list_checkpoints(run / "checkpoints"), proc, log)
        metrics_before = (run / "metrics.jsonl").read_bytes()
        assert main(args) == 2  # a second training of the same folder
        line = error_line(capsys)
        assert f"pid {proc.pid}" in line and "in use" in line, line
        assert (run / "metrics.jsonl").read_bytes().startswith(metrics_before)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    for line_ in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line_)  # one writer: every line whole
    step = Checkpoint(run).step
    assert main(train_args(corpus, run, "train.steps=100000", "train.save_every=5", "train.keep_checkpoints=1",
                           "train.max_minutes=0.001")) == 0
    out = capsys.readouterr().out
    assert f"taking over the lock of pid {proc.pid}" in out and f"resuming {run} from step {step}" in out
    assert (run / LOCK_FILE).read_text() == ""  # a clean exit leaves no owner behind


def test_resuming_with_other_settings_is_refused_and_keeps_the_config(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(corpus, run)) == 0
    saved = (run / "config.yaml").read_text()
    for change, shown in (("train.batch_size=8", "train.batch_size: 4 -> 8"), ("data.length=16", "data.length"),
                          ("train.lr=0.01", "train.lr: 0.0003 -> 0.01")):
        assert main(train_args(corpus, run, "train.steps=4", change)) == 2
        line = error_line(capsys)
        assert "trained with other settings" in line and shown in line, line
        assert (run / "config.yaml").read_text() == saved
    assert main(train_args(corpus, run, "train.steps=3", "train.log_every=2", "sample.steps=7")) == 0
    assert Checkpoint(run).step == 3

    moved = tmp_path / "moved"  # a copied or moved run folder resumes by its content, not by its old path
    shutil.copytree(run, moved)
    assert main(train_args(corpus, moved, "train.steps=4")) == 0
    assert Checkpoint(moved).step == 4 and Checkpoint(run).step == 3


def test_rl_refuses_a_folder_that_is_not_empty(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(corpus, run)) == 0
    target = tmp_path / "rl"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ab", "text": "cd"}\n')
    assert main(["rl", str(run), f"run_dir={target}", f"rl.prompts={prompts}", "rl.iterations=1"]) == 2
    assert "is not empty" in error_line(capsys)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]


def test_a_run_dir_that_is_a_file_is_a_one_line_error_and_the_file_is_kept(corpus, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main(train_args(corpus, a_file)) == 2
    assert "is a file; a run folder is a directory" in error_line(capsys)
    assert a_file.read_text() == "mine"
