"""The public Python API: the README's and the docs' example runs as written, and the top-level names exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import unmask

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("page", ["README.md", "docs/get-started/tour.md"])
def test_the_python_example_runs_as_written(page, tmp_path, monkeypatch, capsys):
    text = (ROOT / page).read_text()
    block = re.search(r"From Python.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, page, "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"^test bound: \d+\.\d+ bits/char$", out, re.M), out
    assert "['ar', 'bd3lm', 'classifier', 'ilm', 'mdlm', 'udlm']" in out and "'first_hitting'" in out
    assert (tmp_path / "runs" / "api" / "checkpoints" / "step_00000020").is_dir()
    exported = unmask.from_pretrained(tmp_path / "runs" / "api-export")
    assert exported.config.family == "mdlm"


@pytest.mark.parametrize("preset, first, command, expected", [
    ({}, "unmask", "train", "PASSIVE"),                                # the command's safe default on a shared machine
    ({}, "unmask", "serve", None),                                     # a server keeps OpenMP's spin-then-sleep
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "unmask", "train", "ACTIVE"),      # the user's choice stands
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "unmask", "serve", "PASSIVE"),
    ({"GOMP_SPINCOUNT": "300000"}, "unmask", "train", None),           # a spin count is a choice too
    ({}, "torch", "train", None),                                      # too late to matter: left alone
    ({}, "unmask", None, None),                                        # a library user's process is left alone
])
def test_the_command_chooses_how_openmp_waits_unless_the_user_chose(preset, first, command, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | preset
    entry = f"import unmask.__main__ as entry; entry.set_wait_policy([{command!r}, 'x']); " if command else ""
    code = f"import {first}, sys; {entry}import os; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    policy, torch_loaded = out.split()
    assert policy == str(expected)
    assert torch_loaded == str(first == "torch")  # importing unmask loads nothing heavy


def test_an_unknown_loading_option_is_an_error_not_ignored(tmp_path):
    with pytest.raises(TypeError, match="unknown model-source option 'dtype'"):
        unmask.from_pretrained(tmp_path, dtype="bfloat16")


def test_public_names():
    for name in unmask.__all__:
        assert getattr(unmask, name) is not None, name
    assert set(unmask.FAMILIES) == {"mdlm", "bd3lm", "ar", "ilm", "classifier", "udlm"}
    assert {spec.default_sampler for spec in unmask.FAMILIES.values()} - {None} <= set(unmask.SAMPLERS)


def test_every_config_key_is_documented_by_unmask_config(capsys):
    from unmask.cli import main
    from unmask.config import config_keys

    keys = config_keys()
    assert all(k.help for k in keys), [k.key for k in keys if not k.help]
    assert main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [k.key for k in keys]
    assert any(line.startswith("sample.sampler") and "auto | ancestral" in line for line in lines)
    assert main(["config", "train.lr"]) == 0
    assert "peak learning rate" in capsys.readouterr().out


def test_sample_help_lists_every_sampler_with_its_keys(capsys):
    import pytest

    from unmask.cli import main

    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    out = capsys.readouterr().out
    for spec in unmask.SAMPLERS.values():
        assert f"  {spec.name} ({spec.decoding} models)" in out
    assert "tokens_per_step=1" in out and "kv_cache=True" in out


def test_the_registries_feed_the_config_and_the_server_schema():
    import typing

    import pytest

    from unmask.config import ConfigError, load_config
    from unmask.serve.service import CompletionRequest

    with pytest.raises(ConfigError, match="not one of auto, " + ", ".join(unmask.SAMPLERS)):
        load_config(None, ["sample.sampler=bogus"])
    with pytest.raises(ConfigError, match="family"):
        load_config(None, ["family=bogus"])
    schema = typing.get_args(CompletionRequest.model_fields["sampler"].annotation)[0]
    assert set(typing.get_args(schema)) == set(unmask.SAMPLERS)
