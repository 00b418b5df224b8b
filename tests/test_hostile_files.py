"""Hostile model files at every entry point that takes a model path: nothing in a file runs, nothing
outside a model folder is read, nothing oversized is allocated, and each is a one-line error.

Entry points: ``unmask eval``, ``sample``, ``export``, ``serve``, ``rl``, ``train.init_from``,
``eval.evaluator``, ``from_pretrained`` and the lm-eval adapter. Files: pickle payloads, TorchScript
archives, zip bombs, pickled allocation bombs, oversized safetensors headers, deeply nested JSON,
YAML with Python tags, symbolic links out of the folder, a pickled Hugging Face evaluator.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import time
import zipfile
from pathlib import Path
from typing import Tuple

import pytest
import torch

from unmask.checkpoints.checkpoint import CheckpointError, save_checkpoint
from unmask.checkpoints.pretrained import save_pretrained
from unmask.cli import main
from unmask.config import load_config
from unmask.data.tokenization import build_tokenizer
from unmask.families import build_model
from unmask.files import UnsafeFileError, check_torch_archive
from unmask.pipeline import from_pretrained

from toys import TINY

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"


class Touch:
    """Unpickling this runs ``touch PATH``: the attack a pickle can carry."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class Allocate:
    """Unpickling this asks ``bytearray`` for a terabyte."""

    def __reduce__(self):
        return (bytearray, (10 ** 12,))


class Scripted(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` (run by ``torch.jit.load``) prints a marker."""

    def __init__(self):
        super().__init__()
        self.tag = "x"

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.tag, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        print("CODE FROM THE FILE RAN")
        self.tag = state[0]
        self.training = state[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tiny MDLM checkpoint and its save_pretrained export, and a file outside both."""
    root = tmp_path_factory.mktemp("good")
    cfg = load_config(None, TINY + [f"run_dir={root / 'run'}", "data.tokenizer=char", f"data.alphabet={ALPHABET!r}"])
    tokenizer = build_tokenizer("char", alphabet=ALPHABET)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    ckpt = save_checkpoint(root / "run" / "checkpoints", 3, model.state_dict(), cfg, tokenizer)
    from unmask.checkpoints.checkpoint import Checkpoint

    export = save_pretrained(Checkpoint(ckpt), root / "export")
    outside = root / "outside"
    outside.mkdir()
    shutil.copy(export / "model.safetensors", outside / "weights.safetensors")
    (outside / "secret.json").write_text(json.dumps({"kind": "char", "alphabet": "abc", "oov": "error",
                                                     "oov_replacement": " "}))
    return {"run": root / "run", "ckpt": ckpt, "export": export, "outside": outside}


def copy_export(good, tmp_path, name="m"):
    target = tmp_path / name
    shutil.copytree(good["export"], target)
    return target


def hostile(kind: str, good, tmp_path) -> tuple[Path, str]:
    """(path of a hostile model source, a fragment its error message must contain)."""
    marker = tmp_path / "pwned"
    if kind == "pickle":
        path = tmp_path / "evil.ckpt"
        torch.save({"state_dict": {"backbone.x": torch.zeros(1)}, "hyper_parameters": Touch(marker)}, path)
        return path, "system"
    if kind == "torchscript":
        path = tmp_path / "scripted.ckpt"
        torch.jit.script(Scripted()).save(str(path))
        return path, "TorchScript"
    if kind == "zip-bomb":
        path = tmp_path / "bomb.ckpt"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("bomb/data.pkl", b"\0" * (64 << 20))
        return path, "compressed"
    if kind == "allocation":
        path = tmp_path / "alloc.ckpt"
        torch.save({"state_dict": {"backbone.x": torch.zeros(1)}, "hyper_parameters": Allocate()}, path)
        return path, "bytearray"
    if kind == "header":
        folder = copy_export(good, tmp_path)
        (folder / "checksums.json").unlink()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2 ** 62) + b"{}")
        return folder, "header length"
    if kind == "header-with-checksums":
        folder = copy_export(good, tmp_path)
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2 ** 62) + b"{}")
        return folder, "SHA-256"
    if kind == "deep-json":
        folder = copy_export(good, tmp_path)
        (folder / "config.json").write_text("[" * 200_000 + "]" * 200_000)
        return folder, "config.json"
    if kind == "json-list":
        folder = copy_export(good, tmp_path)
        (folder / "config.json").write_text("[1, 2]")
        return folder, "JSON list"
    if kind == "yaml-tag":
        run = tmp_path / "run"
        shutil.copytree(good["run"], run)
        ckpt = run / "checkpoints" / good["ckpt"].name
        (ckpt / "checksums.json").unlink()
        (ckpt / "config.yaml").write_text(f"family: !!python/object/apply:os.system ['touch {marker}']\n")
        return run, "config"
    if kind == "symlink-checkpoint":
        run = tmp_path / "run"
        shutil.copytree(good["run"], run)
        ckpt = run / "checkpoints" / good["ckpt"].name
        (ckpt / "model.safetensors").unlink()
        (ckpt / "model.safetensors").symlink_to(good["outside"] / "weights.safetensors")
        return run, "outside"
    if kind.startswith("symlink"):
        name = kind.split(":")[1]
        folder = copy_export(good, tmp_path)
        (folder / "checksums.json").unlink()
        (folder / name).unlink()
        target = good["outside"] / ("secret.json" if name.endswith(".json") else "weights.safetensors")
        (folder / name).symlink_to(target)
        return folder, "outside"
    raise ValueError(kind)


KINDS = ["pickle", "torchscript", "zip-bomb", "allocation", "header", "header-with-checksums", "deep-json",
         "json-list", "yaml-tag", "symlink:model.safetensors", "symlink:unmask_tokenizer.json",
         "symlink:config.json", "symlink-checkpoint"]


def entry_points(source: Path, tmp_path: Path, good) -> dict:
    """Every way a model path enters unmask, as a call that returns an exit code (library calls:
    2 when they raise the documented error)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc def ghi\n" * 200)

    def library(call):
        def run():
            try:
                call()
            except (CheckpointError, ValueError, FileNotFoundError) as exc:
                print(f"unmask: error: {exc}", file=__import__("sys").stderr)
                return 2
            return 0
        return run

    def lm_eval():
        from unmask.eval.lm_eval import UnmaskLM

        UnmaskLM(pretrained=str(source))

    return {
        "eval": lambda: main(["eval", str(source)]),
        "sample": lambda: main(["sample", str(source)]),
        "export": lambda: main(["export", str(source), str(tmp_path / "exported")]),
        "serve": lambda: main(["serve", str(source)]),
        "rl": lambda: main(["rl", str(source), f"run_dir={tmp_path / 'rl'}", "rl.prompts=x.jsonl"]),
        "init_from": lambda: main(["train", *TINY, f"run_dir={tmp_path / 'ft'}", "data.dataset=text",
                                   f"data.path={corpus}", "data.tokenizer=char", f"data.alphabet={ALPHABET!r}",
                                   f"train.init_from={source}", "train.steps=1"]),
        "evaluator": lambda: main(["eval", str(good["run"]), "eval.metric=generation", f"eval.evaluator={source}",
                                   "sample.num_samples=1", "sample.steps=2"]),
        "from_pretrained": library(lambda: from_pretrained(source)),
        "lm_eval": library(lm_eval),
    }


@pytest.fixture
def no_serving(monkeypatch):
    import uvicorn

    def refuse(*args, **kwargs):
        raise AssertionError("a hostile model was loaded and served")

    monkeypatch.setattr(uvicorn, "run", refuse)


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_file_is_refused_at_every_entry_point(kind, good, tmp_path, capfd, no_serving):
    source, fragment = hostile(kind, good, tmp_path)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, call in entry_points(source, tmp_path, good).items():
        start = time.perf_counter()
        code = call()
        out, err = capfd.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (kind, name, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("unmask: error: "), (kind, name, err[-2000:])
        if name != "evaluator" or kind not in ("yaml-tag", "symlink-checkpoint"):
            assert fragment in lines[0], (kind, name, lines[0])
        assert "CODE FROM THE FILE RAN" not in out + err, (kind, name)
        assert not (tmp_path / "pwned").exists(), (kind, name)
        assert time.perf_counter() - start < 20, (kind, name)
        assert not (tmp_path / "exported").exists()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb < 500, f"{kind}: peak memory grew by {grown_mb:.0f} MB"


def test_torchscript_archive_would_run_code_through_torch_load(tmp_path, capfd):
    """The attack is real: torch.load hands a TorchScript archive to torch.jit.load, which runs its
    code; unmask refuses the archive before any torch loader sees it."""
    path = tmp_path / "scripted.ckpt"
    torch.jit.script(Scripted()).save(str(path))
    with pytest.warns(UserWarning):
        torch.load(path, weights_only=False)
    assert "CODE FROM THE FILE RAN" in capfd.readouterr().out
    with pytest.raises(UnsafeFileError, match="TorchScript"):
        check_torch_archive(path)


def test_archive_layout_admits_exactly_what_torch_save_writes(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"backbone.w": torch.ones(2, 3)}, "global_step": 3}, path)
    check_torch_archive(path)  # torch.save's own layout passes
    with zipfile.ZipFile(path) as z:
        records = {name: z.read(name) for name in z.namelist()}
    for extra, stored in (("plain/extra.py", True), ("other/data.pkl", True), ("plain/data/0", False)):
        bad = tmp_path / "bad.ckpt"
        with zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as z:
            for name, data in records.items():
                if name == extra:
                    continue
                z.writestr(name, data)
            if stored:
                z.writestr(extra, b"x")
            else:
                info = zipfile.ZipInfo(extra)
                info.compress_type = zipfile.ZIP_DEFLATED
                z.writestr(info, records[extra])
        with pytest.raises(UnsafeFileError):
            check_torch_archive(bad)


def test_pickled_hugging_face_evaluator_is_refused(good, tmp_path, capsys):
    """A Hugging Face evaluator folder whose weights are a pickle (.bin) is refused by name, and the
    message does not suggest weights_only=False."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "gpt"
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    capsys.readouterr()
    code = main(["eval", str(good["run"]), "eval.metric=generation", f"eval.evaluator={folder}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "safetensors" in err and "weights_only" not in err


def test_size_limits_refuse_before_reading(good, tmp_path, monkeypatch):
    import unmask.files as files

    folder = copy_export(good, tmp_path)
    monkeypatch.setattr(files, "JSON_LIMIT", 64)
    monkeypatch.setattr(files.read_json, "__defaults__", (dict, 64))
    with pytest.raises(UnsafeFileError, match="more than the 64"):
        from_pretrained(folder)


def test_symlinks_inside_a_folder_are_followed(good, tmp_path):
    """Links that stay inside the model folder (as a hub snapshot's do, into its own store) are fine."""
    folder = copy_export(good, tmp_path)
    (folder / "checksums.json").unlink()
    (folder / "store").mkdir()
    os.replace(folder / "model.safetensors", folder / "store" / "blob")
    (folder / "model.safetensors").symlink_to(folder / "store" / "blob")
    assert from_pretrained(folder).tokenizer.vocab_size == len(ALPHABET) + 4


def test_restricted_unpickler_still_reads_metadata_bytes(tmp_path):
    """bytes and bytearray with contents (as checkpoint metadata holds them) still load."""
    from unmask.checkpoints.released import read_lightning_ckpt

    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"backbone.x": torch.zeros(1)}, "blob": bytearray(b"abc"), "raw": b"xyz"}, path)
    obj = read_lightning_ckpt(path)
    assert obj["blob"] == bytearray(b"abc") and obj["raw"] == b"xyz"
