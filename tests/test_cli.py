"""The command line: train / eval / sample on tiny runs, and one-line errors with exit code 2 for bad
input."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from unmask.checkpoints.checkpoint import Checkpoint, list_checkpoints
from unmask.cli import main
from unmask.config import load_config
from unmask.models.quantize import QuantizeError, quantize_weights
from unmask.pipeline import from_pretrained

from toys import TINY as BASE_TINY

TINY = BASE_TINY + ["train.lr=0.003"]
CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
          "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
          "First Citizen:\nLet us kill him, and we'll have corn at our own price.\n"
          "Is't a verdict?\n\nAll:\nNo more talking on't; let it be done: away, away!\n\n") * 30
EVAL_KEYS = ("nll", "stderr", "perplexity", "bits_per_token", "bits_per_char")



def write_corpus(directory: Path) -> Path:
    path = directory / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


def train_args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", *TINY, "data.dataset=text", f"data.path={corpus}", f"run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny mdlm run and one tiny ar run (3 steps each), trained through the CLI."""
    root = tmp_path_factory.mktemp("cli-runs")
    corpus = write_corpus(root)
    out = {"corpus": corpus}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNMASK_CACHE", str(root / "cache"))
        threads = torch.get_num_threads()
        for family in ("mdlm", "ar"):
            run = root / family
            assert main(train_args(corpus, run, f"family={family}", "train.steps=3")) == 0
            out[family] = run
        torch.set_num_threads(threads)
    return out


def error_line(capsys) -> str:
    """The single stderr line of a failed command."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("unmask: error: "), lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- train

def test_train_prints_the_checkpoint(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    run = tmp_path / "run"
    assert main(train_args(corpus, run, "train.steps=2")) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"checkpoint: {run / 'checkpoints' / 'step_00000002'}"
    assert Checkpoint(run).step == 2
    assert (run / "metrics.jsonl").is_file() and (run / "config.yaml").is_file()


def test_train_with_options_between_overrides(tmp_path, capsys):
    """`unmask train key=value --fresh key=value`: the overrides after the option count too."""
    corpus = write_corpus(tmp_path)
    run = tmp_path / "run"
    assert main(train_args(corpus, run, "train.steps=3")) == 0
    args = train_args(corpus, run)
    assert main([*args[:3], "--fresh", *args[3:], "train.steps=1"]) == 0
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000001"]
    with pytest.raises(SystemExit) as info:  # a real unknown option is still refused (argparse usage error)
        main(["train", f"run_dir={run}", "--bogus"])
    assert info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_train_from_a_yaml_file_with_overrides(tmp_path):
    corpus = write_corpus(tmp_path)
    run = tmp_path / "run"
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(f"family: ar\nrun_dir: {run}\nmodel:\n  preset: nano\n  hidden: 32\n  blocks: 1\n"
                           f"  heads: 2\n  cond_dim: 16\ndata:\n  dataset: text\n  path: {corpus}\n  length: 32\n"
                           "train:\n  steps: 5\n  batch_size: 4\n  progress: false\n  threads: 1\n")
    assert main(["train", str(config_file), "train.steps=2", "model.hidden=16"]) == 0
    cfg = load_config(run / "config.yaml")
    assert cfg == load_config(config_file, ["train.steps=2", "model.hidden=16"])
    assert (cfg.family, cfg.model.hidden, cfg.model.blocks, cfg.train.steps) == ("ar", 16, 1, 2)
    assert Checkpoint(run).step == 2


def test_configs_lists_the_packaged_configs(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^quickstart\s+Quickstart", out, re.M)


# ----------------------------------------------------------------------------- eval

def test_quantize_on_the_command_line(runs, tmp_path, capsys):
    """``eval``/``sample --quantize int8`` (and ``eval --quantize int8-dynamic``) run and record it (the bound
    within 2 % of fp32's on a trained tiny model, and not equal to it); int4, unknown schemes and a missing
    torchao are one-line errors."""
    scored = ["eval", str(runs["mdlm"]), "eval.max_sequences=8", "eval.mc_samples=2"]
    assert main(scored) == 0
    exact = json.loads(capsys.readouterr().out)
    out = tmp_path / "eval.json"
    assert main([*scored, "--quantize", "int8", "--json", str(out)]) == 0
    quantized = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == quantized
    assert (exact["quantize"], quantized["quantize"]) == ("none", "int8")
    assert quantized["nll"] != exact["nll"] and quantized["nll"] == pytest.approx(exact["nll"], rel=0.02)
    assert main(["sample", str(runs["mdlm"]), "--quantize", "int8", "sample.num_samples=1", "sample.steps=4"]) == 0
    assert capsys.readouterr().out.strip()
    assert main([*scored, "--quantize", "int8-dynamic"]) == 0
    dynamic = json.loads(capsys.readouterr().out)
    assert dynamic["quantize"] == "int8-dynamic" and dynamic["nll"] == pytest.approx(exact["nll"], rel=0.02)
    for bad in (["--quantize", "int4"], ["sample.quantize=int4"]):
        if bad[0] == "--quantize":  # argparse's choices: exit 2
            with pytest.raises(SystemExit, match="2"):
                main(["sample", str(runs["mdlm"]), *bad])
        else:
            assert main(["sample", str(runs["mdlm"]), *bad]) == 2
        assert "quantize" in capsys.readouterr().err.strip().splitlines()[-1]  # argparse prints its usage first
    with pytest.raises(QuantizeError, match="int4"):
        quantize_weights(nn.Linear(4, 4), "int4")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torchao.quantization", None)
        assert main(["sample", str(runs["mdlm"]), "--quantize", "int8"]) == 2
    assert "pip install 'unmask[quantize]'" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_decoding_gives_the_eager_tokens(runs, monkeypatch):
    """``sample.compile=true``: first-hitting through ``torch.compile`` gives the tokens of eager decoding (the
    other paths are measured in BENCHMARKS.md: a compilation each would cost this suite seconds)."""
    lm = from_pretrained(runs["mdlm"])
    eager = lm.generate(num_samples=3, batch_size=3, seed=1, sampler="first_hitting")
    compiles, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiles.append(kw) or compile(model, **kw))
    compiled = lm.generate(num_samples=3, batch_size=3, seed=1, compile=True, sampler="first_hitting")
    assert compiles == [{"dynamic": True}]
    assert compiled.ids == eager.ids and compiled.nfe == eager.nfe



def test_eval_prints_json_and_a_readable_line(runs, tmp_path, capsys):
    json_file = tmp_path / "result.json"
    assert main(["eval", str(runs["mdlm"]), "eval.max_sequences=8", "eval.mc_samples=2",
                 "--json", str(json_file)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert json.loads(json_file.read_text()) == result
    for key in EVAL_KEYS:
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"]))
    assert result["bits_per_token"] == pytest.approx(result["nll"] / math.log(2))
    assert result["bits_per_char"] > result["bits_per_token"]  # BOS/EOS count as tokens, not characters
    assert result["stderr"] > 0
    assert (result["family"], result["bound"], result["split"]) == ("mdlm", "nelbo", "test")
    assert (result["sequences"], result["mc_samples"], result["tokens"], result["step"]) == (8, 2, 8 * 32, 3)
    assert result["checkpoint"] == str(runs["mdlm"] / "checkpoints" / "step_00000003") and result["ema"] is True
    # a freshly initialised model is at about log(vocab): the bound of a real model cannot be far below 0
    assert 0 < result["nll"] < 2 * math.log(Checkpoint(runs["mdlm"]).tokenizer.vocab_size)
    readable = re.search(r"mdlm test: nll <= (\d+\.\d+) ± (\d+\.\d+) nats/token, ppl <= .*bits/char "
                         r"\(8 seqs, 256 tokens, K=2", captured.err)
    assert readable, captured.err
    assert float(readable.group(1)) == pytest.approx(result["nll"], abs=1e-4)

    # same seed, same number; the raw weights give another one
    assert main(["eval", str(runs["mdlm"]), "eval.max_sequences=8", "eval.mc_samples=2"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["nll"] == result["nll"]
    assert main(["eval", str(runs["mdlm"]), "eval.max_sequences=8", "eval.mc_samples=2", "eval.use_ema=false"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw["ema"] is False and raw["nll"] != result["nll"]


def test_eval_of_an_ar_run_is_exact(runs, capsys):
    assert main(["eval", str(runs["ar"]), "eval.max_sequences=8", "eval.split=valid"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert (result["family"], result["bound"], result["split"], result["mc_samples"]) == ("ar", "exact", "valid", 1)
    assert result["stderr"] == 0.0
    assert re.search(r"ar valid: nll = \d+\.\d+ nats/token", captured.err)


# ----------------------------------------------------------------------------- sample

@pytest.mark.parametrize("family", ["mdlm", "ar"])
def test_sample_starts_with_the_prompt(runs, tmp_path, capsys, family):
    json_file = tmp_path / "samples.json"
    args = ["sample", str(runs[family]), "sample.num_samples=2", "sample.length=16", "sample.steps=16",
            "--prompt", "ab", "--json", str(json_file)]
    assert main(args) == 0
    out = capsys.readouterr().out
    tok = Checkpoint(runs[family]).tokenizer
    result = json.loads(json_file.read_text())
    assert len(result["ids"]) == 2 and result["summary"]["samples"] == 2
    assert result["summary"]["generated_tokens"] == 2 * (16 - 3)  # BOS and the prompt are not generated
    blocks = re.split(r"^--- sample \d+ \(\d+ NFE, \d+\.\d\d tokens per forward\)\n", out, flags=re.M)
    assert blocks[0] == "" and len(blocks) == 3
    blocks[-1], summary = blocks[-1].rsplit("--- 2 samples, 26 generated tokens in ", 1)
    assert "tokens/s" in summary
    for printed, ids, text, nfe in zip(blocks[1:], result["ids"], result["texts"], result["row_nfe"]):
        assert len(ids) == 16
        assert ids[0] == tok.bos_id and ids[1:3] == tok.encode("ab").tolist()
        assert tok.mask_id not in ids
        assert text == tok.decode(ids) and text.startswith("ab")
        assert printed == text + "\n"
        assert "[MASK]" not in printed
        if family == "ar":
            assert nfe == 16 - 3  # one network call per generated position (KV cache)
        else:
            assert 1 <= nfe <= 16
    # seeded: the same command gives the same samples, another seed others
    assert main(args) == 0
    assert json.loads(json_file.read_text())["ids"] == result["ids"]
    assert main([*args, "sample.seed=5"]) == 0
    assert json.loads(json_file.read_text())["ids"] != result["ids"]
    capsys.readouterr()


# ----------------------------------------------------------------------------- errors

def test_train_errors(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    run = tmp_path / "run"
    cases = [
        (["data.dataset=nope"], ["unknown dataset 'nope'"]),
        (["data.dataset=tinyshakespear"], ["did you mean 'tinyshakespeare'"]),
        (["model.preset=huge"], ["unknown model preset 'huge'", "nano"]),
        (["data.path=" + str(tmp_path / "missing.txt")], ["not found", "missing.txt"]),
        (["train.lrr=0.1"], ["'train.lrr'", "did you mean 'train.lr'"]),
        (["model.hiden=16"], ["'model.hiden'", "did you mean 'model.hidden'"]),
        (["train.steps=abc"], ["'train.steps'", "expected int", "'abc'"]),
        (["train.progress=maybe"], ["'train.progress'", "expected bool"]),
        (["data.length=64"], ["data.length=64", "model.length=32"]),
        (["family=gpt"], ["'family'", "mdlm, ar"]),
        (["train.steps"], ["override 'train.steps' is not of the form key=value"]),
    ]
    for extra, fragments in cases:
        code = main(train_args(corpus, run, "train.steps=1", *extra))
        line = error_line(capsys)
        assert code == 2, (extra, line)
        for fragment in fragments:
            assert fragment in line, (extra, line)
    # the shipped-corpus dataset with a data file that does not exist
    assert main(["train", *TINY, f"run_dir={run}", f"data.path={tmp_path / 'gone.txt.xz'}"]) == 2
    assert "data file not found" in error_line(capsys)
    assert not list_checkpoints(run / "checkpoints")


def test_text_outside_the_alphabet(tmp_path, capsys):
    corpus = tmp_path / "abc.txt"
    corpus.write_text("abcab cab" + "z" + "abc" * 400)
    code = main(["train", *TINY, "data.dataset=text", f"data.path={corpus}", "data.alphabet='abc '",
                 f"run_dir={tmp_path / 'run'}", "train.steps=1"])
    line = error_line(capsys)
    assert code == 2
    assert "'z'" in line and f"{corpus}:1:10" in line and "alphabet" in line  # character 9 = line 1, column 10


@pytest.mark.parametrize("content, fragment", [
    ("train:\n  lr: [1, 2\n", "not valid YAML"),
    ("train:\n\tsteps: 3\n", "not valid YAML"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("train: 3\n", "config section 'train' must be a mapping"),
])
def test_malformed_config_file(tmp_path, capsys, content, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert main(["train", str(path), f"run_dir={tmp_path / 'run'}"]) == 2
    line = error_line(capsys)
    assert fragment in line
    if "YAML" in fragment:
        assert str(path) in line


def test_unknown_config_name(tmp_path, capsys):
    assert main(["train", "no-such-config", f"run_dir={tmp_path / 'run'}"]) == 2
    line = error_line(capsys)
    assert "'no-such-config'" in line and "quickstart" in line


def test_eval_and_sample_errors(runs, tmp_path, capsys):
    run = str(runs["mdlm"])
    cases = [
        (["eval", str(tmp_path / "nothing")], ["model not found", "nothing"]),
        (["eval", str(tmp_path)], ["no complete checkpoint"]),
        (["eval", run, "data.length=64"], ["data.length=64", "model.length=32"]),
        (["eval", run, "train.steps=5"], ["only eval.*, sample.* and data.*", "'train'"]),
        (["eval", run, "eval.split=dev"], ["'eval.split'", "train, valid, test"]),
        (["eval", run, "eval.mc_sample=2"], ["'eval.mc_sample'", "did you mean 'eval.mc_samples'"]),
        (["eval", run, "eval.mc_samples"], ["not of the form key=value"]),
        (["sample", run, "sample.length=64"], ["canvas of 64 tokens (sample.length)", "32", "sample.window"]),
        (["sample", run, "sample.length=8", "--prompt", "abcdefgh"], ["prompt of 9 tokens", "canvas of 8"]),
        (["sample", run, "sample.sampler=ar"], ["for autoregressive language models", "uses ancestral"]),
        (["sample", run, "sample.sampler=first_hitting", "sample.tokens_per_step=99"], ["larger than the canvas"]),
        (["sample", run, "sample.top_p=0"], ["sample.top_p=0"]),
        (["sample", run, "sample.steps=0"], ["sample.steps"]),
        (["sample", run, "--template", "ab[MASK*3]", "--prompt", "a"], ["prompts or a template"]),
        (["sample", run, "--prompt", "~"], ["'~'", "alphabet"]),
    ]
    for args, fragments in cases:
        code = main(args)
        line = error_line(capsys)
        assert code == 2, (args, line)
        for fragment in fragments:
            assert fragment in line, (args, line)


def test_checkpoint_of_a_different_shape(runs, tmp_path, capsys):
    wide = tmp_path / "wide"
    assert main(train_args(runs["corpus"], wide, "train.steps=1", "model.hidden=48")) == 0
    capsys.readouterr()
    victim = tmp_path / "victim"
    shutil.copytree(runs["mdlm"], victim)
    target = list_checkpoints(victim / "checkpoints")[-1]
    source = list_checkpoints(wide / "checkpoints")[-1]
    for name in ("model.safetensors", "ema.safetensors"):
        shutil.copy(source / name, target / name)
    assert main(["eval", str(victim)]) == 2  # the recorded checksums catch the swap first
    line = error_line(capsys)
    assert "SHA-256 differs" in line and str(target / "ema.safetensors") in line, line
    (target / "checksums.json").unlink()  # as a checkpoint written before checksums existed
    for command in ("eval", "sample"):
        assert main([command, str(victim)]) == 2
        line = error_line(capsys)
        assert "'vocab_embed.embedding'" in line and ", 48)" in line and ", 32)" in line, line
        assert str(target) in line


def test_corrupt_checkpoint_via_cli(runs, tmp_path, capsys):
    victim = tmp_path / "victim"
    shutil.copytree(runs["ar"], victim)
    weights = list_checkpoints(victim / "checkpoints")[-1] / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    assert main(["eval", str(victim)]) == 2
    line = error_line(capsys)
    assert "corrupt" in line and str(weights) in line


def test_python_dash_m_exit_codes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "unmask", "train", f"run_dir={tmp_path / 'run'}", "train.bogus=1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "unmask: error: unknown config key 'train.bogus'"
    assert proc.stdout == ""


def test_quickstart_on_the_shipped_corpus(tmp_path, capsys):
    run = tmp_path / "qs"
    code = main(["quickstart", f"run_dir={run}", "train.steps=2", "model.hidden=32", "model.blocks=1",
                 "model.heads=2", "model.cond_dim=16", "data.length=32", "eval.max_sequences=8", "eval.mc_samples=2",
                 "sample.num_samples=1", "sample.steps=8", "train.progress=false", "train.threads=1"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"training a mdlm model (nano preset) on tinyshakespeare; run folder {run}\n")
    assert re.search(r"^mdlm test: nll <= \d+\.\d+ ± \d+\.\d+ nats/token.*\(8 seqs, 256 tokens, K=2", out, re.M)
    assert re.search(r"^--- sample 0 \(\d+ NFE, \d+\.\d\d tokens per forward\)", out, re.M) and "--- sample 1" not in out
    assert f"checkpoint: {run / 'checkpoints' / 'step_00000002'}" in out
    ck = Checkpoint(run)
    assert ck.step == 2 and ck.config.data.dataset == "tinyshakespeare" and ck.config.train.lr_schedule == "cosine"
    assert ck.tokenizer.vocab_size == 65 + 4  # tiny-shakespeare's 65 symbols
