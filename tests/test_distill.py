"""Parallelism distillation objectives on cases small enough to work out by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from unmask.cli import main
from unmask.objectives.base import Noise
from unmask.objectives.distill import ParallelDistillation, StepDistillation, block_masks, visible_in_block
from unmask.objectives.mdlm import MaskedDiffusion
from unmask.objectives.schedules import LogLinear
from unmask.train.trajectories import Trajectories

from toys import TINY, random_dit

MASK = 2  # tokens 0 and 1, then the mask


class PositionLogits(torch.nn.Module):
    """Logits ``[0, log 3, 5]`` at every position (p = 1/4, 3/4 once the mask is excluded); records its inputs."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.inputs = []

    def forward(self, ids, sigma=None, positions=None):
        self.inputs.append(ids.clone())
        row = torch.tensor([0.0, math.log(3), 5.0]) * self.scale
        return row.expand(ids.numel(), 3)[positions]


def test_blocks_cut_each_answer_in_order_and_the_drawn_one_is_followed_by_hidden_ones():
    counted = torch.tensor([[False, False, True, True, True, True, True, True, True]] * 3)
    in_block, after = block_masks(counted, torch.tensor([0.5, 0.99, 0.0]), 3)  # blocks 2-4, 5-7, 8
    assert in_block[0].nonzero()[:, 0].tolist() == [5, 6, 7] and after[0].nonzero()[:, 0].tolist() == [8]
    assert in_block[1].nonzero()[:, 0].tolist() == [8] and not after[1].any()
    assert in_block[2].nonzero()[:, 0].tolist() == [2, 3, 4] and after[2].sum() == 4
    whole, none = block_masks(counted, torch.tensor([0.7, 0.7, 0.7]), 0)
    assert torch.equal(whole, counted) and not none.any()


def test_the_trajectory_keeps_what_the_teacher_revealed_first():
    in_block = torch.tensor([[False, True, True, True, True]] * 3)
    steps = torch.tensor([[-1, 3, 0, 2, 0]] * 3)
    visible = visible_in_block(in_block, torch.tensor([0.5, 0.3, 0.8]), steps, torch.zeros(3, 5))
    # keep floor((1 - r) 4) = 2, 2, 0 of the block: the two revealed at step 0, then none
    assert visible.tolist() == [[False, False, True, False, True]] * 2 + [[False] * 5]
    u = torch.tensor([[0.9, 0.1, 0.6, 0.4, 0.5]] * 3)
    assert visible_in_block(in_block, torch.tensor([0.5, 0.5, 0.5]), None, u)[0].tolist() == [False, False, True,
                                                                                               False, True]


def test_the_mask_ratio_rises_with_training_progress():
    objective = ParallelDistillation(MaskedDiffusion(LogLinear(), MASK), "certainty", min_mask_ratio=0.2,
                                     max_mask_ratio=0.8)
    r = objective.mask_ratio(torch.tensor([0.0, 1.0, 0.5, 0.0]), torch.tensor([0.0, 0.3, 0.5, 1.0]))
    assert r.tolist() == pytest.approx([0.2, 0.8, 0.5 + 0.5 * 0.3, 0.8])


def test_the_loss_is_cross_entropy_on_both_masks_and_entropy_where_right():
    objective = ParallelDistillation(MaskedDiffusion(LogLinear(), MASK), "trajectory", min_mask_ratio=0.6,
                                     max_mask_ratio=0.6, entropy_weight=2.0, entropy_temperature=0.5)
    x0 = torch.tensor([[0, 1, 0, 1, 1, 0, 1, 1]])
    counted = torch.tensor([[False, False, False, True, True, True, True, True]])
    steps = torch.tensor([[-1, -1, -1, 2, 0, 1, 0, 3]])
    model = PositionLogits()
    noise = Noise(torch.tensor([0.37]), torch.rand(1, 8))
    loss = objective.loss(model, x0, counted, noise, progress=torch.tensor([0.25]), reveal_step=steps)
    # r = 0.6 keeps floor(0.4 x 5) = 2 visible, those revealed at step 0 (positions 4 and 6): masked 3, 5, 7
    first, second = model.inputs
    assert (first == MASK).nonzero()[:, 1].tolist() == [3, 5, 7] and (second == MASK).nonzero()[:, 1].tolist() == [4, 6]
    entropy = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))  # softmax([0, log 3] / 0.5) = (1/10, 9/10)
    ce = -math.log(0.75) - math.log(0.25) - math.log(0.75)  # targets 1, 0, 1 at p(1) = 3/4
    complement = -2 * math.log(0.75)  # positions 4 and 6, both 1
    assert loss.item() == pytest.approx(ce + complement + 2.0 * 2 * entropy, rel=1e-6)  # right at 3 and 7
    loss.sum().backward()
    assert model.scale.grad is not None and torch.isfinite(model.scale.grad)


def test_a_real_network_trains_on_it_and_bad_settings_are_refused():
    net = random_dit(length=12, vocab=MASK + 1)
    objective = ParallelDistillation(MaskedDiffusion(LogLinear(), MASK), "trajectory", block_size=4)
    x0 = torch.randint(0, 2, (3, 12))
    counted = torch.zeros(3, 12, dtype=torch.bool)
    counted[:, 4:] = True
    steps = torch.where(counted, torch.randint(0, 5, (3, 12)), torch.full((3, 12), -1))
    loss = objective.loss(net, x0, counted, Noise(torch.rand(3), torch.rand(3, 12)), progress=torch.full((3,), 0.5),
                          reveal_step=steps)
    assert loss.shape == (3,) and torch.isfinite(loss).all() and (loss > 0).all()
    loss.sum().backward()
    with pytest.raises(ValueError, match="reveal steps"):
        objective.loss(net, x0, counted, Noise(torch.rand(3), torch.rand(3, 12)), progress=torch.zeros(3))
    for bad in ({"method": "sdtt-ish"}, {"min_mask_ratio": 0.9, "max_mask_ratio": 0.5}, {"entropy_temperature": 0}):
        with pytest.raises(ValueError):
            ParallelDistillation(MaskedDiffusion(LogLinear(), MASK), **{"method": "certainty", **bad})


@pytest.fixture(scope="module")
def arithmetic_teacher(tmp_path_factory):
    """A tiny arithmetic task and a teacher trained on it for a few steps (the CLI, as a user runs it)."""
    root = tmp_path_factory.mktemp("distill")
    data = root / "arith"
    assert main(["task", "arithmetic", "--operands", "2", "--digits", "2", "--out", str(data), "--train", "48",
                 "--valid", "8", "--test", "8"]) == 0
    common = [*TINY, "train.steps=2", f"data.path={data}/train.jsonl", f"data.valid_path={data}/valid.jsonl",
              f"data.test_path={data}/test.jsonl", f"data.cache_dir={root}/cache", "data.length=20",
              "model.length=20"]
    assert main(["train", "arithmetic", f"run_dir={root}/teacher", *common]) == 0
    return root, common


@pytest.mark.parametrize("method", ["trajectory", "certainty", "sdtt"])
def test_distillation_trains_saves_resumes_and_loads_through_the_cli(arithmetic_teacher, method, capsys):
    root, common = arithmetic_teacher
    run = root / f"student-{method}"
    student = ["train", "arithmetic", f"run_dir={run}", *common, f"distill.method={method}",
               f"distill.teacher={root}/teacher", f"train.init_from={root}/teacher", "distill.teacher_batch=20",
               "distill.teacher_sample=[steps=4]", "distill.student_steps=4"]
    assert main(student) == 0
    folders = list((root / "cache").glob("trajectories-*"))
    if method != "sdtt":  # SDTT calls its teacher at every step instead of reading its decodings
        assert len(folders) == 1  # both methods (and the resume) read the one recording of this teacher
        assert len(Trajectories.open(folders[0])) == 48
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in losses if "loss" in r]
    # a student that starts as its SDTT teacher starts at KL 0
    assert len(losses) == 2 and all(loss > (-1e-6 if method == "sdtt" else 0) for loss in losses)
    assert main([*student, "train.steps=3"]) == 0  # resumes at step 2
    assert "resuming" in capsys.readouterr().out
    assert main(["sample", str(run), "--prompt", "12+3=", "sample.length=20", "sample.steps=4"]) == 0
    assert "tokens per forward" in capsys.readouterr().out


def test_distillation_refuses_what_it_cannot_learn_from(arithmetic_teacher, tmp_path, capsys):
    root, common = arithmetic_teacher
    student = ["train", "arithmetic", *common, "distill.method=trajectory", f"distill.teacher={root}/teacher"]
    cases = [
        (["data.alphabet=0123456789+-=,x"], "another tokenizer"),
        (["family=ar"], "a mdlm model"),
        (["data.length=24", "model.length=24"], "teacher's context"),
        (["distill.teacher=", "distill.method=certainty"], "distill.teacher"),
        (["distill.method=sdtt", "data.length=24", "model.length=24"], "teacher's context"),
        ([f"distill.prompts={tmp_path}/empty.jsonl"], "no prompt/answer pairs"),
    ]
    (tmp_path / "empty.jsonl").write_text("")
    for i, (extra, message) in enumerate(cases):
        run = tmp_path / f"bad{i}"
        assert main([*student, f"run_dir={run}", *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not list(run.glob("checkpoints/*")), extra


def test_a_text_teacher_is_distilled_from_its_unconditional_decodings(tmp_path, capsys):
    """Without prompts the teacher decodes ``distill.max_prompts`` unconditional rows, as its training rows begin
    (no BOS for unframed text); without either the run is refused before anything is written."""
    common = [*TINY, "train.steps=2", "data.length=20", "model.length=20", f"data.cache_dir={tmp_path}/cache"]
    assert main(["train", "quickstart", f"run_dir={tmp_path}/teacher", *common]) == 0
    student = ["train", "quickstart", *common, "distill.method=certainty", f"distill.teacher={tmp_path}/teacher",
               "distill.teacher_sample=[sampler=ancestral,steps=4]"]
    assert main([*student, f"run_dir={tmp_path}/student", "distill.max_prompts=6"]) == 0
    (folder,) = (tmp_path / "cache").glob("trajectories-*")
    recorded = Trajectories.open(folder)
    assert len(recorded) == 6 and (recorded.prompt_lengths == 0).all() and (recorded.reveal_step >= 0).all()
    capsys.readouterr()
    assert main([*student, f"run_dir={tmp_path}/refused"]) == 2
    assert "distill.max_prompts=N" in capsys.readouterr().err
    assert not list((tmp_path / "refused").glob("checkpoints/*"))

class ConstantLogits(torch.nn.Module):
    """The same logits at every position of every canvas (a teacher or student whose prediction ignores the state)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, ids, sigma=None, positions=None):
        out = self.logits.expand(*ids.shape, -1)
        return out if positions is None else out.reshape(-1, out.shape[-1])[positions]


def test_step_distillation_is_the_kl_to_the_teachers_prediction_and_its_steps_unmask_as_the_schedule_says():
    base = MaskedDiffusion(LogLinear(eps=0.0), MASK)
    p, q = [math.log(0.2), math.log(0.8), 0.0], [math.log(0.5), math.log(0.5), 0.0]
    objective = StepDistillation(base, ConstantLogits(p), student_steps=4, per_step=2)
    x0 = torch.zeros(8, 400, dtype=torch.long)
    counted = torch.ones_like(x0, dtype=torch.bool)
    noise = Noise(torch.full((8,), 0.75), torch.rand(8, 400))
    loss = objective.loss(ConstantLogits(q), x0, counted, noise)
    t, _ = base.times_and_weights(noise.time_u, exact=False)  # (training times: t_min + (t_max - t_min) u)
    masked = (base.mask(x0, t, noise.mask_u, counted) == MASK).sum(1)
    kl = 0.2 * math.log(0.2 / 0.5) + 0.8 * math.log(0.8 / 0.5)  # a constant teacher: its every step predicts p
    torch.testing.assert_close(loss, masked.float() * kl, rtol=1e-5, atol=1e-4)
    assert objective.loss(ConstantLogits(p), x0, counted, noise).abs().max() < 1e-4  # the student is the teacher
    # two steps of dt = 1/8 from t = 3/4 keep a mask with probability (1 - alpha(1/2)) / (1 - alpha(3/4)) = 2/3
    xt = torch.full((8, 400), MASK)
    _, updated = objective.teacher_targets(xt, torch.full((8,), 0.75, dtype=torch.float64))
    share, expected = updated.float().mean().item(), 1 / 3
    assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / updated.numel())
    with pytest.raises(ValueError):
        StepDistillation(base, ConstantLogits(p), student_steps=4, per_step=1)
