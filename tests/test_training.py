"""The training loop: it learns, writes its run folder, resumes exactly after a real kill, gives the
same update on one process, with gradient accumulation, and on two DDP processes, stops on its time
budget, and follows its learning-rate schedule."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from unmask.checkpoints.checkpoint import Checkpoint, list_checkpoints
from unmask.checkpoints.pretrained import initialize_from
from unmask.config import ConfigError, load_config
from unmask.data.readers import DataError
from unmask.families import build_model
from unmask.models.common import count_parameters
from unmask.train.loop import micro_batching, train
from unmask.train.optim import EMA, learning_rate, parameter_groups

from runs import EXACT, SOFT_MASK, config, final_tensors, free_port, max_diff, overrides, records, step_records
from toys import TINY


@pytest.mark.parametrize("family", ["mdlm", "ar"])
def test_short_run_learns_and_writes_its_run_folder(tmp_path, corpus, family):
    run = tmp_path / "run"
    cfg = config(corpus, run, f"family={family}", "train.steps=30", "train.lr=0.003", "train.batch_size=16")
    final = train(cfg)

    assert final == run / "checkpoints" / "step_00000030"
    assert load_config(run / "config.yaml") == cfg
    assert (run / "tokenizer" / "unmask_tokenizer.json").is_file()

    recs = records(run)
    assert recs[0]["event"] == "start" and recs[0]["step"] == 0 and recs[0]["world"] == 1
    assert recs[0]["precision"] in ("fp32", "bf16") and recs[0]["accumulation"] == 1
    assert recs[-1]["event"] == "end" and recs[-1]["step"] == 30
    steps = step_records(run)
    assert sorted(steps) == list(range(1, 31))
    assert all(math.isfinite(r["loss"]) and r["lr"] == 0.003 for r in steps.values())

    ck = Checkpoint(run)
    assert ck.path == final and ck.step == 30 and ck.config == cfg
    vocab = ck.tokenizer.vocab_size
    assert vocab == len(set(corpus.read_text())) + 4
    model = build_model(cfg, ck.tokenizer)
    assert recs[0]["parameters"] == count_parameters(model)

    # the untrained model (zero output layer) is uniform over the vocabulary without the mask: log(V - 1)
    # nats per token, exactly for ar and in expectation for mdlm; 30 steps go well below log(V)
    first = steps[1]["loss"]
    if family == "ar":
        assert first == pytest.approx(math.log(vocab - 1), abs=1e-3)
    else:
        assert abs(first - math.log(vocab - 1)) < 1.0, first
    last = sum(steps[s]["loss"] for s in range(21, 31)) / 10
    margin = 0.5 if family == "mdlm" else 1.0
    assert last < math.log(vocab) - margin, (last, math.log(vocab))

    # the checkpoint holds trained weights, an EMA of them and the optimizer's state
    raw, ema = ck.weights(ema=False), ck.ema_state()
    assert ema is not None and max_diff(raw, ema) > 0
    assert ck.state["ema_updates"] == 30 and ck.state["rows_seen"] == 30 * 16
    opt = ck.optimizer_state()
    assert all(float(s["step"]) == 30 for s in opt["state"].values())


def test_rerunning_a_finished_run_does_not_train_again(tmp_path, corpus):
    run = tmp_path / "run"
    cfg = config(corpus, run, "train.steps=3")
    train(cfg)
    weights = final_tensors(run, "model.safetensors")
    n_records = len(step_records(run))
    before = (run / "checkpoints" / "step_00000003" / "trainer_state.json").stat()
    final = train(cfg)
    assert final.name == "step_00000003"
    # the checkpoint is left as it is (re-writing it would replace it non-atomically for nothing)
    after = (final / "trainer_state.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(step_records(run)) == n_records == 3
    assert max_diff(final_tensors(run, "model.safetensors"), weights) == 0
    assert [r["step"] for r in records(run) if r.get("event") == "start"] == [0, 3]


def test_resume_refuses_a_different_model_and_fresh_starts_over(tmp_path, corpus):
    run = tmp_path / "run"
    train(config(corpus, run, "train.steps=2"))
    with pytest.raises(ConfigError, match=r"trained with other settings \(model.hidden: 32 -> 48\)"):
        train(config(corpus, run, "train.steps=4", "model.hidden=48"))
    final = train(config(corpus, run, "train.steps=1", "model.hidden=48"), fresh=True)
    assert final.name == "step_00000001"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000001"]
    assert [r["step"] for r in records(run) if r.get("event") == "start"] == [0]


# ----------------------------------------------------------------------------- exact resume

@pytest.mark.parametrize("threads", ["1", "0"])
def test_resume_after_sigkill_is_exact(tmp_path, corpus, capsys, threads):
    """Bit-identical, also with the default thread count (0: every core), with deterministic kernels."""
    n = 60
    common = [*EXACT, "train.steps=60", "train.save_every=2", "train.keep_checkpoints=2", "train.lr=0.003",
              "train.ema=0.9", f"train.threads={threads}"]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    train(config(corpus, run_a, *common))

    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = open(tmp_path / "b.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "unmask", "train", *overrides(corpus, run_b, *common)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while not list_checkpoints(run_b / "checkpoints"):
            assert proc.poll() is None, f"run B ended before its first checkpoint: {(tmp_path / 'b.log').read_text()}"
            assert time.monotonic() < deadline, "run B wrote no checkpoint in time"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    killed = list_checkpoints(run_b / "checkpoints")
    resumed_from = Checkpoint(killed[-1]).step
    assert 2 <= resumed_from < n, "the kill came too late to test a resume"

    capsys.readouterr()
    final_b = train(config(corpus, run_b, *common))
    assert f"resuming {run_b} from step {resumed_from}" in capsys.readouterr().out
    assert final_b.name == f"step_{n:08d}"
    starts = [r["step"] for r in records(run_b) if r.get("event") == "start"]
    assert starts == [0, resumed_from]

    a, b = step_records(run_a), step_records(run_b)
    assert sorted(a) == sorted(b) == list(range(1, n + 1))
    lines = records(run_b)
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, n + 1))  # the steps redone are not repeated
    second_start = max(i for i, r in enumerate(lines) if r.get("event") == "start")
    assert [r["step"] for r in lines[second_start:] if "loss" in r] == list(range(resumed_from + 1, n + 1))
    for s in a:  # the killed run's steps and the resumed run's steps alike
        assert a[s]["loss"] == b[s]["loss"], (s, a[s]["loss"], b[s]["loss"])
        assert a[s]["grad_norm"] == b[s]["grad_norm"], s
        assert a[s]["lr"] == b[s]["lr"] and a[s]["epoch"] == b[s]["epoch"]
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        assert max_diff(final_tensors(run_a, name), final_tensors(run_b, name)) == 0, name
    state_a, state_b = Checkpoint(run_a).state, Checkpoint(run_b).state
    for key in ("ema_updates", "rows_seen", "epoch", "step"):
        assert state_a[key] == state_b[key], key


def test_extending_a_run_matches_the_uninterrupted_run(tmp_path, corpus):
    """Train to 4 steps (checkpoints at 2 and 4), then continue the same run to 8 steps: the same losses
    and weights as 8 steps at once (warm-up then constant learning rate, which does not depend on
    train.steps)."""
    common = [*EXACT, "train.save_every=2", "train.lr=0.003", "train.ema=0.9", "train.warmup_steps=3"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(config(corpus, whole, *common, "train.steps=8"))
    train(config(corpus, split, *common, "train.steps=4"))
    assert [p.name for p in list_checkpoints(split / "checkpoints")] == ["step_00000002", "step_00000004"]
    train(config(corpus, split, *common, "train.steps=8"))
    a, b = step_records(whole), step_records(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in a:
        assert a[s]["loss"] == b[s]["loss"] and a[s]["lr"] == b[s]["lr"], s
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        assert max_diff(final_tensors(whole, name), final_tensors(split, name)) == 0, name


# ----------------------------------------------------------------------------- data parallel



@pytest.mark.parametrize("variant", [[], SOFT_MASK], ids=["binary", "soft_mask"])
def test_ddp_and_accumulation_match_one_process(tmp_path, corpus, variant):
    steps = 3
    common = [*EXACT, f"train.steps={steps}", "train.batch_size=8", "train.lr=0.003", "train.ema=0", *variant]
    ddp, single, micro = tmp_path / "ddp", tmp_path / "single", tmp_path / "micro"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "unmask", "train", *overrides(corpus, ddp, *common)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    train(config(corpus, single, *common))
    train(config(corpus, micro, *common, "train.micro_batch_size=2"))

    starts = {name: records(run)[0] for name, run in (("ddp", ddp), ("single", single), ("micro", micro))}
    assert (starts["ddp"]["world"], starts["ddp"]["micro_batch"], starts["ddp"]["accumulation"]) == (2, 4, 1)
    assert (starts["single"]["world"], starts["single"]["micro_batch"], starts["single"]["accumulation"]) == (1, 8, 1)
    assert (starts["micro"]["world"], starts["micro"]["micro_batch"], starts["micro"]["accumulation"]) == (1, 2, 4)
    # only the main process logs: one record per step
    assert [r["step"] for r in records(ddp) if "loss" in r] == list(range(1, steps + 1))

    reference = step_records(single)
    for run in (ddp, micro):
        other = step_records(run)
        assert sorted(other) == sorted(reference)
        for s in reference:
            # same global loss normalisation: same loss and same gradient norm (a wrong scale shows here,
            # even where Adam would hide it in the weights)
            assert other[s]["loss"] == pytest.approx(reference[s]["loss"], rel=1e-5, abs=1e-6), (run.name, s)
            assert other[s]["grad_norm"] == pytest.approx(reference[s]["grad_norm"], rel=1e-5), (run.name, s)
        assert not (list_checkpoints(run / "checkpoints")[-1] / "ema.safetensors").exists()
        diff = max_diff(final_tensors(run, "model.safetensors"), final_tensors(single, "model.safetensors"))
        assert diff < 1e-5, (run.name, diff)
    # and the runs did move away from the initialisation
    init = build_model(Checkpoint(single).config, Checkpoint(single).tokenizer)
    assert max_diff(final_tensors(single, "model.safetensors"),
                    {k: v for k, v in init.state_dict().items()}) > 1e-3


# ----------------------------------------------------------------------------- budget, schedule, batching

def test_max_minutes_stops_early_and_saves(tmp_path, corpus):
    run = tmp_path / "run"
    cfg = config(corpus, run, "train.steps=100000", "train.max_minutes=0.005", "train.log_every=100000")
    start = time.monotonic()
    final = train(cfg)
    assert time.monotonic() - start < 60
    ck = Checkpoint(run)
    assert ck.path == final
    assert 1 <= ck.step < 100000
    assert ck.state["elapsed_seconds"] >= 0.005 * 60
    steps = step_records(run)
    assert list(steps) == [ck.step]  # the stop is logged although log_every was not reached
    assert (records(run)[-1]["event"], records(run)[-1]["step"]) == ("end", ck.step)


def lr_config(*extra: str):
    return load_config(None, ["train.lr=0.01", "train.steps=20", *extra])


def test_learning_rate_warmup_then_constant():
    cfg = lr_config("train.warmup_steps=4", "train.lr_schedule=constant")
    lrs = [learning_rate(cfg, s) for s in range(25)]
    assert lrs[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert all(lr == 0.01 for lr in lrs[4:])
    cfg = lr_config("train.warmup_steps=0")
    assert all(learning_rate(cfg, s) == 0.01 for s in range(25))


def test_learning_rate_cosine_reaches_min_at_the_end():
    cfg = lr_config("train.warmup_steps=4", "train.lr_schedule=cosine", "train.min_lr_ratio=0.1")
    lrs = [learning_rate(cfg, s) for s in range(21)]
    assert lrs[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert lrs[4] == pytest.approx(0.01)
    # the decay spans the trained steps 4..19, so step 19 (the last one trained) is at the floor
    assert lrs[12] == pytest.approx(0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 15))))
    assert lrs[19] == pytest.approx(0.001, abs=1e-12)
    assert lrs[18] > 0.001 + 1e-6
    assert lrs[20] == pytest.approx(0.001, abs=1e-12)
    assert learning_rate(cfg, 30) == pytest.approx(0.001, abs=1e-12)  # stays at the floor
    decay = lrs[4:20]
    assert all(x > y for x, y in zip(decay, decay[1:]))
    assert min(lrs) >= 0.001 - 1e-12


def test_training_applies_the_schedule(tmp_path, corpus):
    run = tmp_path / "run"
    cfg = config(corpus, run, "train.steps=6", "train.lr=0.01", "train.warmup_steps=2",
                 "train.lr_schedule=cosine", "train.min_lr_ratio=0.2")
    train(cfg)
    logged = {s: r["lr"] for s, r in step_records(run).items()}
    assert logged == {s: pytest.approx(learning_rate(cfg, s - 1)) for s in range(1, 7)}
    assert logged[1] == pytest.approx(0.005)
    assert Checkpoint(run).optimizer_state()["param_groups"][0]["lr"] == pytest.approx(learning_rate(cfg, 5))


def test_micro_batching():
    def cfg(batch, micro=None):
        extra = [f"train.micro_batch_size={micro}"] if micro else []
        return load_config(None, [f"train.batch_size={batch}", *extra])

    assert micro_batching(cfg(8), 1) == (8, 1)
    assert micro_batching(cfg(8), 2) == (4, 1)
    assert micro_batching(cfg(8, 2), 1) == (2, 4)
    assert micro_batching(cfg(8, 2), 2) == (2, 2)
    assert micro_batching(cfg(12, 2), 3) == (2, 2)
    with pytest.raises(ConfigError, match="train.batch_size=8 is not divisible by the 3 processes"):
        micro_batching(cfg(8), 3)
    with pytest.raises(ConfigError, match="micro_batch_size=3"):
        micro_batching(cfg(8, 3), 1)
    with pytest.raises(ConfigError, match="per-process batch 4"):
        micro_batching(cfg(8, 3), 2)
    with pytest.raises(ConfigError, match="micro_batch_size=16"):
        micro_batching(cfg(8, 16), 1)
    assert micro_batching(load_config(None, ["train.batch_size=8", "train.micro_batch_size=0"]), 2) == (4, 1)
    with pytest.raises(ConfigError, match=r"micro_batch_size=-2 is out of range: it must lie in \[0, inf\)"):
        cfg(8, -2)  # was accepted: a negative accumulation count, no update at all


def test_train_rejects_indivisible_micro_batch(tmp_path, corpus):
    with pytest.raises(ConfigError, match="micro_batch_size=3"):
        train(config(corpus, tmp_path / "run", "train.steps=2", "train.micro_batch_size=3"))
    assert not list_checkpoints(tmp_path / "run" / "checkpoints")


def test_ema_follows_the_mdlm_warmup_of_its_decay():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    expected = 0.0
    for n in range(1, 30):
        with torch.no_grad():
            model.weight.fill_(float(n))
        ema.update(model)
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * n
        assert float(ema.shadow[0][0, 0]) == pytest.approx(expected, rel=1e-6)
    assert ema.updates == 29
    state = ema.state_dict(model)
    assert float(state["weight"][0, 0]) == pytest.approx(expected, rel=1e-6)
    assert float(model.weight.detach()[0, 0]) == 29.0  # the model itself is untouched
    other = EMA(model, decay=0.9)
    other.load(state, 29)
    assert torch.equal(other.shadow[0], ema.shadow[0]) and other.updates == 29


def test_log_window_and_log_every_zero(tmp_path, corpus):
    """A record averages the loss over its window; log_every=0 logs the final step only (it used to
    divide by zero after the first step)."""
    every, never, third = tmp_path / "every", tmp_path / "never", tmp_path / "third"
    common = [*EXACT, "train.steps=5"]
    train(config(corpus, every, *common))
    train(config(corpus, never, *common, "train.log_every=0"))
    train(config(corpus, third, *common, "train.log_every=3"))
    per_step = step_records(every)
    assert list(step_records(never)) == [5]
    assert list(step_records(third)) == [3, 5]
    # wrap rows all count the same number of tokens, so a window's loss is the mean of its steps
    mean = lambda steps: sum(per_step[s]["loss"] for s in steps) / len(steps)  # noqa: E731
    assert step_records(never)[5]["loss"] == pytest.approx(mean(range(1, 6)), rel=1e-6)
    assert step_records(third)[3]["loss"] == pytest.approx(mean(range(1, 4)), rel=1e-6)
    assert step_records(third)[5]["loss"] == pytest.approx(mean(range(4, 6)), rel=1e-6)
    assert max_diff(final_tensors(every, "model.safetensors"), final_tensors(never, "model.safetensors")) == 0


def test_validation_during_training_does_not_change_training(tmp_path, corpus):
    plain, with_eval = tmp_path / "plain", tmp_path / "with_eval"
    common = [*EXACT, "train.steps=4", "train.ema=0.9", "eval.mc_samples=2"]
    train(config(corpus, plain, *common))
    train(config(corpus, with_eval, *common, "train.eval_every=2", "train.eval_sequences=8"))
    evals = [r for r in records(with_eval) if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["split"] == "valid" and all(math.isfinite(r[k]) for k in ("nll", "perplexity", "bits_per_token"))
        assert r["perplexity"] == pytest.approx(math.exp(r["nll"]))
    assert not any(r.get("event") == "eval" for r in records(plain))
    a, b = step_records(plain), step_records(with_eval)
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in b]
    for name in ("model.safetensors", "ema.safetensors"):
        assert max_diff(final_tensors(plain, name), final_tensors(with_eval, name)) == 0, name


# ----------------------------------------------------------------------------- continued pretraining

def test_continued_pretraining_starts_a_soft_mask_run_from_a_binary_one(tmp_path, corpus):
    binary = tmp_path / "binary"
    train(config(corpus, binary, *EXACT, "train.steps=4", "train.lr=0.003"))
    source = Checkpoint(list_checkpoints(binary / "checkpoints")[-1])
    soft = tmp_path / "soft"
    cfg = config(corpus, soft, *EXACT, *SOFT_MASK, "train.steps=3", "train.lr=0.003", f"train.init_from={binary}")

    model = build_model(cfg, source.tokenizer)
    init_scalars = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("soft_mask.")}
    initialize_from(model, str(binary), cfg, source.tokenizer)
    ema = source.weights(ema=True)
    for name, value in model.state_dict().items():
        expected = init_scalars[name] if name.startswith("soft_mask.") else ema[name]
        assert torch.equal(value, expected), name
    groups = parameter_groups(model, cfg)
    assert [len(g["params"]) for g in groups] == [len(ema) - 1, 3]  # the state also holds the rotary buffer
    assert groups[1]["lr"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert groups[1]["lr_scale"] == pytest.approx(0.05 / 0.003)

    train(cfg)
    assert Checkpoint(soft).config.train.init_from == str(binary)  # the resolved config records it
    final = final_tensors(soft, "model.safetensors")
    state = Checkpoint(list_checkpoints(soft / "checkpoints")[-1]).optimizer_state()
    assert [g["lr"] for g in state["param_groups"]] == pytest.approx([0.003, 0.05])
    assert all(float(state["state"][i]["exp_avg_sq"]) > 0 for i in state["param_groups"][1]["params"])
    # resuming the finished run does not initialize again
    train(cfg)
    assert torch.equal(final_tensors(soft, "model.safetensors")["soft_mask.a"], final["soft_mask.a"])


def test_continued_training_reads_new_data_with_the_source_tokenizer(tmp_path, corpus):
    binary = tmp_path / "binary"
    train(config(corpus, binary, "train.steps=1"))
    other_corpus = tmp_path / "other.txt"
    other_corpus.write_text("abc abc cab " * 500)
    common = [*TINY, "data.dataset=text", f"data.path={other_corpus}", f"train.init_from={binary}", "train.steps=1"]
    train(load_config(None, [*common, f"run_dir={tmp_path / 'x'}"]))  # a smaller alphabet: the source's is used
    assert Checkpoint(tmp_path / "x").tokenizer.fingerprint() == Checkpoint(binary).tokenizer.fingerprint()
    other_corpus.write_text("abc ~~~ cab " * 500)  # a symbol the source model does not know
    with pytest.raises(DataError, match="'~'"):
        train(load_config(None, [*common, f"run_dir={tmp_path / 'y'}"]))
    train(load_config(None, [*common, f"run_dir={tmp_path / 'z'}", "data.oov=replace"]))
    with pytest.raises(ConfigError, match="mdlm model"):
        train(config(corpus, tmp_path / "ar", "family=ar", "train.steps=1", f"train.init_from={binary}"))
