"""Sharded training (FSDP2 on CPU with gloo): two processes make the update of one, sharded checkpoints
resume exactly after a kill and on another number of processes, and activation checkpointing changes
nothing but memory."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from unmask.checkpoints.checkpoint import Checkpoint, CheckpointError, join_shards, list_checkpoints, shard_name
from unmask.config import ConfigError
from unmask.data.tasks import write_arithmetic_task
from unmask.runtime import Distributed
from unmask.train.loop import train
from unmask.train.optim import EMA, parameter_groups
from unmask.train.parallel import restore

from runs import EXACT, SOFT_MASK, child_pids, config, max_diff, records, running, step_records, torchrun, weights

pytestmark = pytest.mark.slow

FSDP = ["train.parallel=fsdp"]


def assert_same_steps(run: Path, reference: Path, rel: float) -> None:
    a, b = step_records(run), step_records(reference)
    assert sorted(a) == sorted(b)
    for s in a:
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=rel, abs=rel), (run.name, s)
        assert a[s]["grad_norm"] == pytest.approx(b[s]["grad_norm"], rel=rel), (run.name, s)


@pytest.mark.parametrize("family,extra", [("mdlm", []), ("ar", []), ("mdlm", SOFT_MASK)],
                         ids=["mdlm", "ar", "soft_mask"])
def test_two_fsdp_processes_make_the_update_of_one(tmp_path, corpus, family, extra):
    """Same global batch: same losses, gradient norms, weights, EMA and optimizer state (to float
    rounding: the shards reduce in another order), with gradient accumulation and activation
    checkpointing on the sharded run; the soft-mask scalars stay whole and are averaged."""
    common = [*EXACT, f"family={family}", "train.steps=3", "train.batch_size=8", "train.lr=0.003", "train.ema=0.9",
              *extra]
    fsdp, single = tmp_path / "fsdp", tmp_path / "single"
    torchrun(fsdp, *common, *FSDP, "train.micro_batch_size=2", "train.activation_checkpointing=true", corpus=corpus)
    train(config(corpus, single, *common))

    start = records(fsdp)[0]
    assert (start["world"], start["parallel"], start["accumulation"]) == (2, "fsdp", 2)
    assert [r["step"] for r in records(fsdp) if "loss" in r] == [1, 2, 3]
    assert_same_steps(fsdp, single, 1e-5)
    ckpt = Checkpoint(fsdp)
    assert ckpt.shards == 2 and not (ckpt.path / "model.safetensors").exists()
    assert all((ckpt.path / shard_name(kind, r, 2)).is_file() for kind in ("model", "ema", "optimizer") for r in (0, 1))
    for kind in ("model", "ema", "optimizer"):
        assert max_diff(weights(fsdp, kind), weights(single, kind)) < 1e-5, kind
    assert max_diff(weights(fsdp, "model"), weights(fsdp, "ema")) > 1e-4  # the EMA is its own average
    # a sharded checkpoint builds the whole model for sampling and evaluation
    model = ckpt.build()
    assert max_diff(model.state_dict(), Checkpoint(single).build().state_dict()) < 1e-5


def test_sharded_resume_is_exact_after_a_kill_and_continues_on_another_world_size(tmp_path, corpus):
    steps = 8
    common = [*EXACT, *FSDP, f"train.steps={steps}", "train.batch_size=8", "train.lr=0.003", "train.ema=0.9",
              "train.save_every=2", "train.keep_checkpoints=0"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    torchrun(whole, *common, corpus=corpus)

    proc = torchrun(killed, *common, wait=False, corpus=corpus)
    deadline = time.monotonic() + 180
    try:
        while not list_checkpoints(killed / "checkpoints"):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.005)
        workers = child_pids(proc.pid)
        assert len(workers) == 2, workers
        for pid in workers:  # frozen first, so the kill lands before the last step whatever the machine's load
            os.kill(pid, signal.SIGSTOP)
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's group; each worker is in a session of its own
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    gone_by = time.monotonic() + 10  # the workers die with their launcher (they went on training before)
    while any(running(pid) for pid in workers) and time.monotonic() < gone_by:
        time.sleep(0.05)
    assert not any(running(pid) for pid in workers), workers
    resumed_from = Checkpoint(list_checkpoints(killed / "checkpoints")[-1]).step
    assert resumed_from < steps, "the kill came too late to test a resume"
    torchrun(killed, *common, corpus=corpus)
    a, b = step_records(whole), step_records(killed)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for s in a:
        assert a[s]["loss"] == b[s]["loss"] and a[s]["grad_norm"] == b[s]["grad_norm"], s
    for kind in ("model", "ema", "optimizer"):
        assert max_diff(weights(whole, kind), weights(killed, kind)) == 0, kind

    # the two-process run continued by one process from its step-4 checkpoint
    expected = {kind: weights(whole, kind) for kind in ("model", "ema", "optimizer")}
    for later in list_checkpoints(whole / "checkpoints")[2:]:
        shutil.rmtree(later)
    train(config(corpus, whole, *common))
    starts = [r for r in records(whole) if r.get("event") == "start"]
    assert [(r["step"], r["world"]) for r in starts] == [(0, 2), (4, 1)]
    assert Checkpoint(whole).shards == 1
    again = step_records(whole)
    for s in range(5, steps + 1):
        assert again[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5), s
    for kind in ("model", "ema", "optimizer"):
        assert max_diff(weights(whole, kind), expected[kind]) < 1e-5, kind


def test_shards_must_tile_each_tensor():
    rows = torch.arange(10.0).reshape(5, 2)
    bias = torch.ones(3)
    good = [({"w": rows[:3], "b": bias}, {"w": [0, 5]}), ({"w": rows[3:], "b": bias}, {"w": [3, 5]})]
    joined = join_shards(good, "test")
    assert torch.equal(joined["w"], rows) and torch.equal(joined["b"], bias)
    for pieces in ([good[0]],  # a missing shard
                   [good[0], ({"w": rows[2:]}, {"w": [2, 5]})],  # overlapping
                   [good[0], ({"w": rows[3:]}, {"w": [3, 6]})],  # another row count
                   [good[0], ({"b": bias}, {})]):  # a shard without the tensor
        with pytest.raises(CheckpointError):
            join_shards(pieces, "test")


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path, corpus):
    common = [*EXACT, "train.steps=3", "train.lr=0.003"]
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    train(config(corpus, plain, *common))
    train(config(corpus, recomputed, *common, "train.activation_checkpointing=true"))
    assert_same_steps(recomputed, plain, 1e-6)
    assert max_diff(weights(plain, "model"), weights(recomputed, "model")) < 1e-6


@pytest.mark.parametrize("extra", [
    ["family=ilm", "data.layout=pad", "data.documents=line"],
    ["family=bd3lm", "model.block_size=8"],
    ["model.soft_mask_top_k=2", "diffusion.soft_mask_prob=0.5"],  # soft-masking: two passes per step
], ids=["ilm", "bd3lm", "soft_mask"])
def test_every_objective_trains_the_same_when_sharded(tmp_path, corpus, extra):
    """A process group of one through fully_shard: the same losses as the plain model (FSDP's own path
    for every objective; the two-process equality is tested above for mdlm and ar)."""
    common = [*EXACT, "train.steps=3", "train.lr=0.003", "train.ema=0.9", *extra]
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    train(config(corpus, plain, *common))
    train(config(corpus, sharded, *common, *FSDP))
    assert_same_steps(sharded, plain, 1e-5)
    assert max_diff(weights(sharded, "model"), weights(plain, "model")) < 1e-5


def test_cpu_offload_is_for_cuda(tmp_path, corpus):
    with pytest.raises(ConfigError, match="CUDA"):
        train(config(corpus, tmp_path / "run", *EXACT, *FSDP, "train.cpu_offload=true", "train.steps=1"))


def test_a_whole_model_reads_whole_tensors_from_shards_of_its_own_world_size(tmp_path, corpus):
    """DDP resuming a two-process FSDP checkpoint with two processes: every process needs the joined
    tensors, not its own shard (it holds the whole model)."""
    run = tmp_path / "run"
    train(config(corpus, run, *EXACT, "train.steps=1", "train.ema=0.9"))
    ckpt = Checkpoint(run)
    asked = []

    class TwoShards:  # the checkpoint as a two-process FSDP run would have written it
        shards, path, step, state = 2, ckpt.path, ckpt.step, ckpt.state

        def tensors(self, kind, rank=None):
            asked.append(rank)
            return ckpt.tensors(kind)

        def optimizer_state(self, rank=None):
            asked.append(rank)
            return ckpt.optimizer_state()

        def ema_state(self, rank=None):
            asked.append(rank)
            return ckpt.ema_state()

    model = ckpt.build(ema=False)
    cfg = ckpt.config
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg))
    restore(TwoShards(), model, optimizer, EMA(model, 0.9), Distributed(rank=1, world=2))
    assert asked and set(asked) == {None}
    assert max_diff(model.state_dict(), ckpt.weights(ema=False)) == 0


@pytest.mark.parametrize("backbone", ["gpt2", "llama"])
def test_a_sharded_run_with_tied_embeddings_resumes_exactly(tmp_path, corpus, backbone):
    """GPT-2 ties its output layer to the embedding (as does llama with model.tie_embeddings): the
    checkpoint stores the matrix once and resuming fills in the other name."""
    common = [*EXACT, *FSDP, f"model.backbone={backbone}", "model.tie_embeddings=true", "train.lr=0.003",
              "train.ema=0.9", "train.save_every=2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(config(corpus, whole, *common, "train.steps=4"))
    train(config(corpus, split, *common, "train.steps=2"))
    train(config(corpus, split, *common, "train.steps=4"))
    a, b = step_records(whole), step_records(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(a[s]["loss"] == b[s]["loss"] for s in a)


@pytest.mark.parametrize("method", ["trajectory", "sdtt"])
def test_two_fsdp_processes_distill_as_one(tmp_path, method):
    """A trajectory-distillation student sharded over two processes makes the updates of one process on the same
    global batch (the main process records the teacher's decodings, the other opens them). An SDTT student trains
    sharded too, each process calling the teacher itself; its teacher steps draw from each process's own stream,
    so the sharded run is an SDTT run of its own, not the single process's to float rounding."""
    data = tmp_path / "task"
    write_arithmetic_task(data, operands=2, digits=2, train=24, valid=4, test=4)
    task = ["data.prompt_field=prompt", "data.layout=pad", "data.pad_with_eos=true", "data.length=20",
            "model.length=20", f"data.cache_dir={tmp_path}/cache", "data.alphabet=0123456789+-=,"]
    common = [*EXACT, *task, "train.steps=2", "train.batch_size=8", "train.lr=0.003"]
    teacher = tmp_path / "teacher"
    train(config(data / "train.jsonl", teacher, *common))
    student = [*common, f"distill.method={method}", f"distill.teacher={teacher}", f"train.init_from={teacher}",
               "distill.teacher_sample=[steps=4]", "distill.student_steps=4"]
    fsdp, single = tmp_path / "fsdp", tmp_path / "single"
    torchrun(fsdp, *student, *FSDP, corpus=data / "train.jsonl")
    train(config(data / "train.jsonl", single, *student))
    assert records(fsdp)[0]["world"] == 2
    if method == "sdtt":
        assert sorted(step_records(fsdp)) == [1, 2] and all(r["loss"] > -1e-6 for r in step_records(fsdp).values())
    else:
        assert_same_steps(fsdp, single, 1e-5)
