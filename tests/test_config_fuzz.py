"""The config loader and the command line under bad input: every key with wrong types, values at and
beyond its bounds and random values gives a config or a one-line ``ConfigError``, never anything
else; and the inputs that used to print tracebacks or be accepted silently are one-line errors
(exit 2)."""

from __future__ import annotations

import json
import shutil
import time
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unmask.cli import main
from unmask.config import (
    RANGES,
    ConfigError,
    config_from_dict,
    config_keys,
    in_interval,
    load_config,
)

from toys import TINY

KEYS = {k.key: k.annotation for k in config_keys()}  # every dotted key (the samplers' too) and its type


def nested(key: str, value) -> dict:
    tree: dict = {}
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def check(call) -> None:
    """``call`` returns a config or raises a one-line ConfigError."""
    try:
        call()
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc), repr(exc)


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
                       | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                   max_size=3),
                       max_leaves=8)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(sorted(KEYS)), value=JSONISH)
def test_any_value_for_any_key_is_a_config_or_a_one_line_error(key, value):
    check(lambda: config_from_dict(nested(key, value)))


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(sorted(KEYS)), raw=st.text(max_size=30))
def test_any_override_text_is_a_config_or_a_one_line_error(key, raw):
    check(lambda: load_config(None, [f"{key}={raw}"]))


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=200))
def test_any_yaml_file_is_a_config_or_a_one_line_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    check(lambda: load_config(path))


@pytest.mark.parametrize("key", sorted(KEYS))
def test_wrong_types_are_refused_for_every_key(key):
    annotation = KEYS[key]
    wrong = [{"a": 1}]
    if annotation in (int, float, bool) or typing.get_origin(annotation) is list:
        wrong.append("not a number")
    if annotation is int:
        wrong += [1.5, True]
    if annotation in (int, float):
        wrong += [[1], float("nan")]
    for value in wrong:
        with pytest.raises(ConfigError):
            config_from_dict(nested(key, value))


@pytest.mark.parametrize("key", sorted(RANGES))
def test_values_beyond_each_bound_are_refused(key):
    interval = RANGES[key]
    low, high = interval[1:-1].split(", ")
    is_int = KEYS[key] in (int, int | None)
    step = 1 if is_int else 1e-9
    probes = [float(low) - step, float(low)] + ([] if high == "inf" else [float(high), float(high) + step])
    for probe in probes:
        value = int(probe) if is_int else probe
        wrapped = [value, value] if key == "train.betas" else value
        if in_interval(value, interval):
            try:
                config_from_dict(nested(key, wrapped))
            except ConfigError as exc:  # another key's relation to this one, never the range itself
                assert "out of range" not in str(exc), (key, value, exc)
        else:
            with pytest.raises(ConfigError, match="out of range"):
                config_from_dict(nested(key, wrapped))


def test_the_smallest_accepted_model_trains_evaluates_and_samples(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcabc\n" * 200)
    run = tmp_path / "run"
    smallest = ["model.hidden=2", "model.heads=1", "model.blocks=1", "model.cond_dim=1", "model.length=3",
                "data.length=3", "train.batch_size=1", "train.steps=1", "train.progress=false", "train.ema=0",
                "train.warmup_steps=0", "train.lr=0", "train.threads=1", "data.dataset=text", f"data.path={corpus}"]
    assert main(["train", f"run_dir={run}", *smallest]) == 0
    assert main(["eval", str(run), "eval.mc_samples=1", "eval.batch_size=1", "eval.max_sequences=1"]) == 0
    assert main(["sample", str(run), "sample.num_samples=1", "sample.steps=1", "sample.batch_size=1"]) == 0


@pytest.mark.parametrize("shape", [["model.hidden=1000000", "model.heads=2"], ["model.blocks=1000000000"]])
def test_a_model_larger_than_memory_is_refused_before_it_is_built(tmp_path, capsys, shape):
    """A billion blocks used to build a billion modules on the meta device (no end in sight)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcabc\n" * 200)
    start = time.perf_counter()
    assert main(["train", f"run_dir={tmp_path / 'run'}", "data.dataset=text", f"data.path={corpus}", *shape,
                 "train.progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GiB" in err, err
    assert time.perf_counter() - start < 30


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    corpus = root / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 100)
    run = root / "run"
    assert main(["train", *TINY, "data.dataset=text", f"data.path={corpus}", f"run_dir={run}", "train.steps=1"]) == 0
    return {"run": run, "corpus": corpus, "root": root}


def broken_tokenizer(run: dict, content: str) -> Path:
    target = run["root"] / f"tok-{abs(hash(content))}"
    if not target.exists():
        shutil.copytree(run["run"], target)
        for ckpt in (target / "checkpoints").iterdir():
            (ckpt / "checksums.json").unlink()
            (ckpt / "tokenizer" / "unmask_tokenizer.json").write_text(content)
    return target


CASES = [
    # values accepted silently before
    (["train", "train.lr=-1"], "train.lr=-1 is out of range"),
    (["train", "model.blocks=0"], "model.blocks=0 is out of range"),
    (["train", "train.warmup_steps=-10"], "train.warmup_steps=-10 is out of range"),
    (["train", "train.ema=2"], "train.ema=2 is out of range"),
    (["train", "train.save_every=-1"], "train.save_every=-1 is out of range"),
    (["train", "train.keep_checkpoints=-1"], "train.keep_checkpoints=-1 is out of range"),
    (["train", "train.max_minutes=-1"], "train.max_minutes=-1 is out of range"),
    (["train", "data.valid_fraction=1.5"], "data.valid_fraction=1.5 is out of range"),
    (["eval", "{run}", "eval.max_sequences=-1"], "eval.max_sequences=-1 is out of range"),
    (["train", "train.lr=nan"], "finite number"),
    # tracebacks before
    (["train", "model.hidden=0"], "model.hidden=0 is out of range"),
    (["sample", "{run}", "sample.length=-4"], "sample.length=-4 is out of range"),
    (["sample", "{run}", "--device", "cuda"], "no CUDA device"),
    (["sample", "{run}", "--device", "foo"], "is not a device"),
    (["export", "{run}", "{corpus}"], "nothing was written"),
    (["eval", "{tok-missing-key}"], "lacks the key 'alphabet'"),
    (["eval", "{tok-garbage}"], "not valid JSON"),
    (["eval", "{tok-list}"], "JSON list"),
    (["serve", "{run}", "--timeout", "nan"], "--timeout must be a positive number"),
    (["serve", "{run}", "--max-body-bytes", "0"], "--max-body-bytes must be a positive number"),
    (["train", "model.backbone=llama", "model.heads=4", "model.kv_heads=3"], "is not a multiple of model.kv_heads=3"),
    # a size that held the machine before (4 GB and no output)
    (["sample", "{run}", "sample.num_samples=100000000"], "GiB of results"),
    # accepted before, with no effect but twice the network calls
    (["sample", "{run}", "sample.guidance=1"], "guides towards a prompt"),
]


@pytest.mark.parametrize("argv, fragment", CASES, ids=[" ".join(c[0])[:50] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(run, capsys, argv, fragment):
    if "{tok-missing-key}" in argv or "{tok-garbage}" in argv or "{tok-list}" in argv:
        content = {"{tok-missing-key}": json.dumps({"kind": "char", "oov": "error", "oov_replacement": " "}),
                   "{tok-garbage}": "\x00garbage{", "{tok-list}": "[]"}[argv[1]]
        argv = [argv[0], str(broken_tokenizer(run, content))]
    argv = [a.format(run=run["run"], corpus=run["corpus"]) for a in argv]
    if argv[0] == "train":
        argv = ["train", *TINY, "data.dataset=text", f"data.path={run['corpus']}",
                f"run_dir={run['root'] / 'never'}", *argv[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("unmask: error: "), err
    assert fragment in err, err
    assert not (run["root"] / "never").exists() or argv[0] != "train"


def test_an_unreachable_hub_fails_fast(run, capsys, monkeypatch):
    """data.tokenizer=gpt2 with no tokenizer files and no hub: an error within seconds, not after 25."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(run["root"] / "hf-home"))
    from unmask import hub

    hub.hub_reachable.cache_clear()
    start = time.perf_counter()
    try:
        code = main(["train", *TINY, "data.dataset=text", f"data.path={run['corpus']}", "data.tokenizer=gpt2",
                     f"run_dir={run['root'] / 'gpt2'}"])
    finally:
        hub.hub_reachable.cache_clear()
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hub" in err, err
    assert time.perf_counter() - start < 5


def test_yaml_config_file_errors_name_the_file(tmp_path, capsys):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train:\n  lr: 0.1 # caf\xe9\n".encode("latin-1"))
    assert main(["train", str(latin)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(latin) in err and "UTF-8" in err and len(err.splitlines()) == 1, err
    listed = tmp_path / "list.yaml"
    listed.write_text(yaml.safe_dump([1, 2]))
    assert main(["train", str(listed)]) == 2
    assert "mapping" in capsys.readouterr().err
