"""Checkpoints: exact round trips, newest-checkpoint resolution, pruning, atomic saves and clear errors
for corrupt, incomplete or mis-shaped checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import unmask.checkpoints.checkpoint as ckpt_mod
from unmask.checkpoints.checkpoint import (
    Checkpoint,
    CheckpointError,
    flatten_optimizer,
    list_checkpoints,
    load_model,
    load_tensors,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
    unflatten_optimizer,
)
from unmask.config import load_config
from unmask.data.tokenization import CharTokenizer, load_tokenizer
from unmask.families import build_model

from toys import TINY


def tiny_config(tmp_path: Path, *extra: str):
    return load_config(None, [*TINY, f"run_dir={tmp_path / 'run'}", "data.dataset=text",
                              f"data.path={tmp_path / 'corpus.txt'}", *extra])


def tokenizer() -> CharTokenizer:
    return CharTokenizer("abcdefgh ,.\n", oov="replace", oov_replacement=" ")


def trained_state(cfg, tok, seed: int = 0, steps: int = 3, betas=(0.8, 0.95)):
    """A model and an AdamW optimizer with real state after a few steps (weight decay on)."""
    torch.manual_seed(seed)
    model = build_model(cfg, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=betas, eps=1e-7, weight_decay=0.05)
    ids = torch.randint(0, len(tok.alphabet), (2, 16))
    for _ in range(steps):
        loss = model(ids).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def ema_of(model) -> dict[str, torch.Tensor]:
    return {k: (v * 0.5 + 0.25 if v.is_floating_point() else v).clone() for k, v in model.state_dict().items()}


def save(root: Path, step: int, cfg, tok, seed: int = 0, keep: int = 0, **kw) -> Path:
    model, opt = trained_state(cfg, tok, seed)
    return save_checkpoint(root, step, model.state_dict(), cfg, tok, opt.state_dict(), ema_of(model),
                           {"elapsed_seconds": 1.25, "ema_updates": step}, keep=keep, **kw)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- round trip

def test_round_trip_is_exact(tmp_path):
    cfg, tok = tiny_config(tmp_path, "train.lr=0.002", "train.betas=[0.8, 0.95]"), tokenizer()
    model, opt = trained_state(cfg, tok)
    ema = ema_of(model)
    path = save_checkpoint(tmp_path / "ckpts", 7, model.state_dict(), cfg, tok, opt.state_dict(), ema,
                           {"elapsed_seconds": 3.5, "ema_updates": 6, "epoch": 0.25}, keep=0)
    assert path == tmp_path / "ckpts" / "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == ["checksums.json", "config.yaml", "ema.safetensors",
                                                     "model.safetensors", "optimizer.safetensors", "tokenizer",
                                                     "trainer_state.json"]

    ck = Checkpoint(path)
    assert ck.step == 7 and ck.path == path
    assert ck.state["elapsed_seconds"] == 3.5 and ck.state["ema_updates"] == 6 and ck.state["epoch"] == 0.25
    # weights: raw and EMA, bit for bit
    assert_same_tensors(ck.weights(ema=False), model.state_dict())
    assert_same_tensors(ck.weights(ema=True), ema)
    assert_same_tensors(ck.ema_state(), ema)
    # config and tokenizer
    assert ck.config == cfg
    assert ck.tokenizer.describe() == tok.describe()
    assert ck.tokenizer.vocab_size == tok.vocab_size and ck.tokenizer.mask_id == tok.mask_id
    text = "bad cafe, hedge.\n"
    assert ck.tokenizer.encode(text).tolist() == tok.encode(text).tolist()
    assert load_tokenizer(path / "tokenizer").describe() == tok.describe()

    # optimizer: every state tensor, every hyper-parameter (betas back as a tuple)
    original = opt.state_dict()
    loaded = ck.optimizer_state()
    assert loaded["param_groups"] == original["param_groups"]
    assert isinstance(loaded["param_groups"][0]["betas"], tuple)
    assert loaded["param_groups"][0]["betas"] == (0.8, 0.95)
    assert loaded["param_groups"][0]["weight_decay"] == 0.05 and loaded["param_groups"][0]["eps"] == 1e-7
    assert sorted(loaded["state"]) == sorted(original["state"])
    for index, entries in original["state"].items():
        assert sorted(loaded["state"][index]) == sorted(entries)
        for name, value in entries.items():
            assert torch.equal(loaded["state"][index][name], value), (index, name)
            assert loaded["state"][index][name].dtype == value.dtype

    # a fresh optimizer loaded from the checkpoint continues exactly like the original
    model2 = build_model(cfg, tok)
    load_weights(model2, ck.weights(ema=False))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5, betas=(0.1, 0.2))
    opt2.load_state_dict(loaded)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and opt2.param_groups[0]["lr"] == 1e-2
    ids = torch.randint(0, 8, (2, 16), generator=torch.Generator().manual_seed(3))
    for m, o in ((model, opt), (model2, opt2)):
        m(ids).float().logsumexp(-1).mean().backward()
        o.step()
    assert_same_tensors(model.state_dict(), model2.state_dict())


def test_optimizer_flattening_keeps_non_tensor_state():
    state = {"state": {0: {"step": 3, "exp_avg": torch.arange(4.0)}, 2: {"step": torch.tensor(5.0)}},
             "param_groups": [{"lr": 0.1, "betas": (0.5, 0.25), "params": [0, 1, 2], "foreach": None}]}
    tensors, rest = flatten_optimizer(state)
    assert sorted(tensors) == ["state.0.exp_avg", "state.2.step"]
    rest = json.loads(json.dumps(rest))  # what trainer_state.json holds
    back = unflatten_optimizer(tensors, rest)
    assert back["state"][0]["step"] == 3 and torch.equal(back["state"][0]["exp_avg"], torch.arange(4.0))
    assert torch.equal(back["state"][2]["step"], torch.tensor(5.0))
    assert back["param_groups"] == state["param_groups"]


def test_checkpoint_without_ema_or_optimizer(tmp_path):
    cfg, tok = tiny_config(tmp_path), tokenizer()
    model, _ = trained_state(cfg, tok)
    path = save_checkpoint(tmp_path / "c", 1, model.state_dict(), cfg, tok)
    assert not (path / "ema.safetensors").exists() and not (path / "optimizer.safetensors").exists()
    ck = Checkpoint(path)
    assert ck.ema_state() is None and ck.optimizer_state() is None
    assert_same_tensors(ck.weights(ema=True), model.state_dict())  # falls back to the raw weights
    loaded, objective = load_model(ck)
    assert not loaded.training and objective.family == "mdlm"
    assert_same_tensors(loaded.state_dict(), model.state_dict())


def test_load_model_uses_ema_by_default(tmp_path):
    cfg, tok = tiny_config(tmp_path, "family=ar"), tokenizer()
    path = save(tmp_path / "c", 2, cfg, tok)
    ck = Checkpoint(path)
    with_ema, objective = load_model(ck)
    raw, _ = load_model(ck, ema=False)
    assert objective.family == "ar" and with_ema.causal
    assert_same_tensors(with_ema.state_dict(), ck.ema_state())
    assert_same_tensors(raw.state_dict(), ck.weights(ema=False))


# ----------------------------------------------------------------------------- resolution and pruning

def test_resolve_newest_and_keep_prunes(tmp_path):
    cfg, tok = tiny_config(tmp_path), tokenizer()
    run = tmp_path / "run"
    root = run / "checkpoints"
    for step in (1, 2, 9, 10, 100):
        save(root, step, cfg, tok, seed=step, keep=3)
    assert [p.name for p in list_checkpoints(root)] == ["step_00000009", "step_00000010", "step_00000100"]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000009", "step_00000010", "step_00000100"]
    # a run folder, its checkpoints folder and a checkpoint folder all resolve
    assert resolve_checkpoint(run) == root / "step_00000100"
    assert resolve_checkpoint(root) == root / "step_00000100"
    assert resolve_checkpoint(root / "step_00000010") == root / "step_00000010"
    assert Checkpoint(run).step == 100
    assert_same_tensors(Checkpoint(run).weights(ema=False), trained_state(cfg, tok, seed=100)[0].state_dict())
    # keep=1 leaves only the newest; keep=0 keeps everything
    save(root, 101, cfg, tok, keep=1)
    assert [p.name for p in list_checkpoints(root)] == ["step_00000101"]
    for step in (102, 103, 104):
        save(root, step, cfg, tok, keep=0)
    assert len(list_checkpoints(root)) == 4


def test_resave_of_same_step_replaces_it(tmp_path):
    cfg, tok = tiny_config(tmp_path), tokenizer()
    root = tmp_path / "c"
    save(root, 5, cfg, tok, seed=1)
    save(root, 5, cfg, tok, seed=2)
    assert [p.name for p in root.iterdir()] == ["step_00000005"]
    assert_same_tensors(Checkpoint(root).weights(ema=False), trained_state(cfg, tok, seed=2)[0].state_dict())


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Checkpoint(tmp_path / "empty")


def test_missing_trainer_state_means_incomplete(tmp_path):
    cfg, tok = tiny_config(tmp_path), tokenizer()
    root = tmp_path / "run" / "checkpoints"
    save(root, 1, cfg, tok, seed=1)
    newest = save(root, 2, cfg, tok, seed=2)
    (newest / "trainer_state.json").unlink()
    assert list_checkpoints(root) == [root / "step_00000001"]
    assert resolve_checkpoint(tmp_path / "run") == root / "step_00000001"
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Checkpoint(newest)
    (root / "step_00000001" / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Checkpoint(tmp_path / "run")


def test_corrupt_trainer_state(tmp_path):
    cfg, tok = tiny_config(tmp_path), tokenizer()
    path = save(tmp_path / "c", 1, cfg, tok)
    (path / "trainer_state.json").write_text('{"step": 1, "optim')
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        Checkpoint(path)


# ----------------------------------------------------------------------------- atomicity

@pytest.mark.parametrize("target", ["_save_tensors", "save_file"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, target):
    cfg, tok = tiny_config(tmp_path), tokenizer()
    root = tmp_path / "run" / "checkpoints"
    first = save(root, 2, cfg, tok, seed=2)
    expected = Checkpoint(first).weights(ema=False)

    real = getattr(ckpt_mod, target)
    calls = []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, target, crashing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save(root, 4, cfg, tok, seed=4)
    assert len(calls) == 2
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and "step_00000004" in leftovers[0]
    assert not (root / "step_00000004").exists()
    # the previous checkpoint is still the newest complete one, and loads
    assert list_checkpoints(root) == [first]
    assert resolve_checkpoint(tmp_path / "run") == first
    ck = Checkpoint(tmp_path / "run")
    assert ck.step == 2
    assert_same_tensors(ck.weights(ema=False), expected)
    assert ck.optimizer_state() is not None

    monkeypatch.setattr(ckpt_mod, target, real)
    third = save(root, 6, cfg, tok, seed=6)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000006"]
    assert Checkpoint(root).path == third


def test_leftover_tmp_folder_is_ignored_and_removed(tmp_path):
    cfg, tok = tiny_config(tmp_path), tokenizer()
    root = tmp_path / "c"
    save(root, 1, cfg, tok)
    # a complete-looking temporary folder of a newer step, as a killed save would leave it
    leftover = root / ".tmp-step_00000009-12345"
    shutil.copytree(root / "step_00000001", leftover)
    assert list_checkpoints(root) == [root / "step_00000001"]
    assert resolve_checkpoint(root).name == "step_00000001"
    save(root, 2, cfg, tok)
    assert not leftover.exists()
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002"]


# ----------------------------------------------------------------------------- corrupt files

@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights_raise_checkpoint_error_naming_the_file(tmp_path, damage):
    cfg, tok = tiny_config(tmp_path), tokenizer()
    path = save(tmp_path / "c", 1, cfg, tok)
    target = path / "model.safetensors"
    data = target.read_bytes()
    target.write_bytes({"truncate": data[:len(data) // 2], "garbage": b"\xff" * 64 + data[64:],
                        "empty": b""}[damage])
    ck = Checkpoint(path)  # metadata still loads; the weights do not
    with pytest.raises(CheckpointError) as info:
        ck.weights(ema=False)
    assert str(target) in str(info.value) and "corrupt" in str(info.value)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(ck, ema=False)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_tensors(target)


def test_corrupt_optimizer_and_missing_weights(tmp_path):
    cfg, tok = tiny_config(tmp_path), tokenizer()
    path = save(tmp_path / "c", 1, cfg, tok)
    opt_file = path / "optimizer.safetensors"
    opt_file.write_bytes(opt_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        Checkpoint(path).optimizer_state()
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors, recorded in checksums.json when it was written, is missing"):
        Checkpoint(path).weights(ema=False)


def test_weights_of_a_different_shape_name_the_tensor_and_shapes(tmp_path):
    tok = tokenizer()
    small = tiny_config(tmp_path)
    wide = tiny_config(tmp_path, "model.hidden=48", "model.heads=2")
    wide_weights = trained_state(wide, tok)[0].state_dict()
    model = build_model(small, tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_weights(model, wide_weights, "some/checkpoint")
    message = str(info.value)
    v = tok.vocab_size
    assert "some/checkpoint" in message and "'vocab_embed.embedding'" in message
    assert f"({v}, 48)" in message and f"({v}, 32)" in message
    assert_same_tensors(model.state_dict(), before)  # nothing was half-loaded

    # a checkpoint that claims the small config but holds the wide weights
    path = save_checkpoint(tmp_path / "c", 1, wide_weights, small, tok)
    with pytest.raises(CheckpointError, match=r"vocab_embed\.embedding.*\(\d+, 48\).*\(\d+, 32\)"):
        load_model(Checkpoint(path))

    # a different vocabulary is a shape mismatch too
    other_tok = CharTokenizer("abc")
    with pytest.raises(CheckpointError, match=rf"\(7, 32\).*\({v}, 32\)"):
        load_weights(model, build_model(small, other_tok).state_dict())


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    tok = tokenizer()
    two = build_model(tiny_config(tmp_path), tok)
    three = build_model(tiny_config(tmp_path, "model.blocks=3"), tok)
    with pytest.raises(CheckpointError, match=r"missing \['blocks\.2\."):
        load_weights(three, two.state_dict())
    with pytest.raises(CheckpointError, match=r"missing \[\], unexpected \['blocks\.2\."):
        load_weights(two, three.state_dict())


def test_sigkill_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path, corpus):
    """A real kill -9 while a checkpoint is half written (the second save pauses after its first file):
    the previous checkpoint stays the newest complete one, and training resumes from it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    overrides = [*TINY, "data.dataset=text", f"data.path={corpus}", f"run_dir={run}", "train.steps=6",
                 "train.save_every=2"]
    script = ("import sys, time; import unmask.checkpoints.checkpoint as c; real = c._save_tensors; calls = []\n"
              "def slow(*a, **k):\n"
              "    real(*a, **k); calls.append(1)\n"
              "    if len(calls) == 4: time.sleep(60)\n"  # the second checkpoint, after its first file
              "c._save_tensors = slow\n"
              "from unmask.cli import main; sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, "train", *overrides], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    root = run / "checkpoints"
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".tmp-step_00000004") and (p / "model.safetensors").exists()
                      for p in (root.iterdir() if root.is_dir() else [])):
            assert proc.poll() is None and time.monotonic() < deadline, "the save never started"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002"]
    Checkpoint(root).verify()
    from unmask.cli import main

    assert main(["train", *overrides]) == 0
    assert [p.name for p in list_checkpoints(root)] == ["step_00000004", "step_00000006"]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
