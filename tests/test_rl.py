"""GRPO / Co-GRPO: advantages, the schedule policy's density, learning signals, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from unmask.cli import main
from unmask.config import ConfigError, load_config
from unmask.data.tokenization import CharTokenizer
from unmask.objectives.mdlm import MaskedDiffusion
from unmask.objectives.schedules import LogLinear
from unmask.samplers.base import row_seeds
from unmask.samplers.scheduled import ScheduledSampler
from unmask.train.rl import (
    Rollouts,
    SchedulePolicy,
    group_advantages,
    load_reward,
    model_loss,
)

from toys import TINY


def test_advantages_are_zero_mean_and_unit_std_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0, 0.2, 0.4, 0.9, 0.1])
    a = group_advantages(rewards, 4).reshape(3, 4)
    assert torch.allclose(a.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(a[[0, 2]].std(1, unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-4)
    assert torch.equal(a[1], torch.zeros(4, dtype=torch.float64))  # equal rewards: no signal
    assert a[0, 0] > 0 > a[0, 1]


def test_schedule_log_density_is_the_closed_form_gaussian():
    policy = SchedulePolicy(4, ("reveal", "temperature", "guidance"), temperature=0.7, guidance=0.5, std=0.4)
    with torch.no_grad():
        policy.mean.add_(torch.randn_like(policy.mean))
        policy.log_std.copy_(torch.tensor([-1.0, 0.2, -0.3]))
    k = torch.tensor([0, 1, 3, 2, 2])
    z = torch.randn(5, 3)
    expected = torch.distributions.Normal(policy.mean[k].detach(), policy.log_std.exp().detach()).log_prob(z).sum(-1)
    assert torch.allclose(policy.log_prob(k, z), expected, atol=1e-5)
    manual = sum(-0.5 * ((z[:, d] - policy.mean[k, d]) / policy.log_std[d].exp()) ** 2 - policy.log_std[d]
                 - 0.5 * math.log(2 * math.pi) for d in range(3))
    assert torch.allclose(policy.log_prob(k, z), manual, atol=1e-5)
    draws = torch.stack([policy.sample(1, 20000, torch.Generator().manual_seed(0))]).squeeze(0)
    assert torch.allclose(draws.mean(0), policy.mean[1].detach(), atol=0.03)
    assert torch.allclose(draws.std(0), policy.log_std.exp().detach(), atol=0.03)


def test_the_initial_schedule_is_the_fixed_one():
    policy = SchedulePolicy(4, ("reveal", "temperature"), temperature=0.8, std=0.0)
    summary = policy.summary()
    assert summary["reveal"] == [0.25, round(1 / 3, 4), 0.5, 1.0]
    assert summary["temperature"] == [0.8] * 4 and summary["guidance"] == [0.0] * 4
    assert policy.deterministic


class Fixed(torch.nn.Module):
    """A denoiser with fixed logits (V,) at every position, plus a learnable bias (for updates)."""

    def __init__(self, logits):
        super().__init__()
        self.bias = torch.nn.Parameter(logits.clone())

    def forward(self, x, sigma=None):
        return self.bias.expand(*x.shape, -1)


V, MASK, BOS = 4, 3, 2  # tokens 0, 1; BOS 2; mask 3
DIFFUSION = MaskedDiffusion(LogLinear(), MASK)


def rollouts_of(model, policy, canvas, rewards_fn, seed=0):
    sampler = ScheduledSampler(DIFFUSION, policy, torch.Generator().manual_seed(seed))
    result = sampler.sample(model, canvas, row_seeds(seed, len(canvas)))
    t = sampler.trajectory
    assert torch.equal(result.tokens, t.canvases[:, -1]) and result.generated == int((canvas == MASK).sum())
    canvases, z, temperature, guidance, old = t.canvases, t.z, t.temperature, t.guidance, t.log_probs
    rewards = rewards_fn(canvases[:, -1])
    old_schedule = None
    if not policy.deterministic:
        n, k = z.shape[:2]
        old_schedule = policy.log_prob(torch.arange(k).repeat(n), z.reshape(n * k, -1)).reshape(n, k).detach()
    return Rollouts(canvases, z, temperature, guidance, old, old_schedule, canvas != MASK, [], rewards, 8)


def test_equal_reveal_counts_and_recorded_log_probs():
    model = Fixed(torch.tensor([0.3, -0.2, 0.0, 0.0]))
    policy = SchedulePolicy(4, ("reveal",), std=0.0)
    canvas = torch.tensor([[BOS] + [MASK] * 8] * 3)
    r = rollouts_of(model, policy, canvas, lambda x: torch.zeros(len(x)))
    masked = (r.canvases == MASK).sum(2)
    assert masked[0].tolist() == [8, 6, 4, 2, 0]
    # the recorded log-probabilities are those of the revealed tokens under the model at temperature 1
    log_p = torch.log_softmax(torch.tensor([0.3, -0.2, 0.0, float("-inf")]), 0)  # SUBS: only the mask is excluded
    for k in range(4):
        rev = r.revealed(k, MASK)
        assert torch.allclose(r.old_log_probs[:, k][rev], log_p[r.canvases[:, k + 1][rev]], atol=1e-6)
        assert (r.old_log_probs[:, k][~rev] == 0).all()


def test_a_reward_for_one_token_raises_its_probability():
    model = Fixed(torch.tensor([0.0, 0.0, 0.0, 0.0]))
    reference = Fixed(torch.tensor([0.0, 0.0, 0.0, 0.0])).requires_grad_(False)
    policy = SchedulePolicy(1, (), std=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    canvas = torch.tensor([[BOS, MASK]] * 32)

    def p_one():
        return float(torch.softmax(model.bias.detach()[:2], 0)[1])

    before = p_one()
    for it in range(10):
        r = rollouts_of(model, policy, canvas, lambda x: (x[:, 1] == 1).double(), seed=it)
        loss, info = model_loss(model, reference, DIFFUSION, r, group_advantages(r.rewards, 8), [0], 0.2, 0.01)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert p_one() > before + 0.2


def test_schedule_grpo_lowers_the_temperature_when_greedy_answers_win():
    # the model prefers the right token (1) at every position; sampling hot makes mistakes, so the
    # schedule policy should learn to cool down
    model = Fixed(torch.tensor([0.0, 1.0, 0.0, 0.0])).requires_grad_(False)
    policy = SchedulePolicy(1, ("temperature",), temperature=2.0, std=0.5)
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.1)
    canvas = torch.tensor([[BOS] + [MASK] * 6] * 64)
    from unmask.train.rl import schedule_loss

    before = policy.summary()["temperature"][0]
    for it in range(15):
        r = rollouts_of(model, policy, canvas, lambda x: (x[:, 1:] == 1).all(1).double() + (x[:, 1:] == 1).double().mean(1), seed=it)
        loss, _ = schedule_loss(policy, r, group_advantages(r.rewards, 8), 0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert policy.summary()["temperature"][0] < 0.7 * before


def pairs_file(path, n=12):
    rows = [{"prompt": "ab:" if i % 2 else "ba:", "text": "ab" if i % 2 else "ba"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def tiny_mdlm(tmp_path):
    data = pairs_file(tmp_path / "pairs.jsonl")
    run = tmp_path / "mdlm"
    overrides = [o for o in TINY if not o.startswith(("data.length", "model.length"))]
    assert main(["train", f"run_dir={run}", *overrides, "model.length=8", "data.length=8", "train.steps=2",
                 "data.dataset=text", f"data.path={data}", f"data.valid_path={data}", f"data.test_path={data}",
                 "data.prompt_field=prompt", "data.layout=pad", "data.pad_with_eos=true",
                 f"data.cache_dir={tmp_path}/cache"]) == 0
    return run, data


def test_a_zero_variance_schedule_reduces_co_grpo_to_grpo(tmp_path):
    from unmask.checkpoints.checkpoint import Checkpoint, list_checkpoints, load_model
    from unmask.train.rl import rl_train

    run, data = tiny_mdlm(tmp_path)
    ckpt = Checkpoint(list_checkpoints(run / "checkpoints")[-1])
    weights = {}
    for mode in ("model", "co"):
        cfg = load_config(run / "config.yaml", [f"run_dir={tmp_path}/rl-{mode}", f"rl.prompts={data}",
                                                f"rl.mode={mode}", "rl.schedule_std=0", "rl.iterations=3",
                                                "rl.prompts_per_step=2", "rl.group_size=4", "rl.lr=1e-2",
                                                "rl.sample_steps=2", "rl.alternate_every=1", "rl.reward=prefix_match"])
        model, objective = load_model(ckpt)
        rl_train(cfg, model, objective, ckpt.tokenizer)
        weights[mode] = model.state_dict()
        records = [json.loads(line) for line in (tmp_path / f"rl-{mode}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["phase"] for r in records] == ["model"] * 3
    assert all(torch.equal(weights["model"][k], weights["co"][k]) for k in weights["model"])
    start = load_model(ckpt)[0].state_dict()
    assert any(not torch.equal(start[k], weights["model"][k]) for k in start)


def test_rl_through_the_cli_alternates_and_saves_a_usable_model(tmp_path, capsys):
    run, data = tiny_mdlm(tmp_path)
    out = tmp_path / "co"
    assert main(["rl", str(run), f"run_dir={out}", f"rl.prompts={data}", f"rl.eval_prompts={data}",
                 "rl.iterations=4", "rl.prompts_per_step=2", "rl.group_size=2", "rl.sample_steps=2",
                 "rl.alternate_every=2", "rl.eval_every=2", "rl.schedule=[reveal,temperature,guidance]"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("event") != "eval"]
    assert [r["phase"] for r in train] == ["model", "model", "schedule", "schedule"]
    assert [r["iteration"] for r in records if r.get("event") == "eval"] == [0, 2, 4]
    assert set(json.loads((out / "schedule.json").read_text())) >= {"reveal", "temperature", "guidance", "std"}
    assert "held-out reward" in capsys.readouterr().out
    assert main(["eval", str(out), "eval.metric=exact_match", f"data.test_path={data}"]) == 0
    # model-only GRPO on rollouts of any sampler
    assert main(["rl", str(run), f"run_dir={tmp_path}/fh", f"rl.prompts={data}", "rl.mode=model",
                 "rl.sampler=first_hitting", "rl.iterations=1", "rl.prompts_per_step=2", "rl.group_size=2"]) == 0
    capsys.readouterr()
    assert main(["rl", str(run), f"run_dir={tmp_path}/bad", f"rl.prompts={data}", "rl.mode=co",
                 "rl.sampler=ancestral"]) == 2
    assert "only rl.sampler=scheduled" in capsys.readouterr().err
    assert main(["rl", str(run), f"rl.prompts={data}"]) == 2
    assert "run_dir" in capsys.readouterr().err


def test_rewards_and_config_errors():
    assert load_reward("exact_match")(["p"], ["ab", "b"], ["ab", "a"]) == [1.0, 0.0]
    assert load_reward("prefix_match")(["p"], ["abc"], ["abd"]) == [pytest.approx(2 / 3)]
    assert load_reward("unmask.train.rl:exact_match_reward") is load_reward("exact_match")
    with pytest.raises(ConfigError, match="unknown reward"):
        load_reward("accuracy")
    with pytest.raises(ConfigError, match="cannot be imported"):
        load_reward("nowhere:fn")
    with pytest.raises(ConfigError, match="group_size"):
        load_config(None, ["rl.group_size=1"])
    with pytest.raises(ConfigError, match="rl.mode"):
        load_config(None, ["rl.mode=both"])


def test_trainer_rejects_a_schedule_only_run_without_a_schedule(tmp_path):
    from unmask.train.rl import rl_train

    cfg = load_config(None, ["rl.mode=schedule", "rl.schedule_std=0", f"rl.prompts={pairs_file(tmp_path / 'p.jsonl')}"])
    tok = CharTokenizer("ab:")
    with pytest.raises(ConfigError, match="needs a schedule to learn"):
        rl_train(cfg, Fixed(torch.zeros(tok.vocab_size)), MaskedDiffusion(LogLinear(), tok.mask_id), tok)


def test_rl_with_lora_trains_adapters_against_the_base_under_them(tmp_path, capsys):
    from unmask.checkpoints.checkpoint import Checkpoint
    from unmask.checkpoints.pretrained import AdapterCheckpoint, open_source
    from unmask.models.adapters import adapters_disabled

    run, data = tiny_mdlm(tmp_path)
    out = tmp_path / "lora"
    assert main(["rl", str(run), f"run_dir={out}", f"rl.prompts={data}", "rl.mode=model", "rl.iterations=3",
                 "rl.prompts_per_step=2", "rl.group_size=4", "rl.sample_steps=2", "rl.kl=0.5", "rl.lr=0.05",
                 "rl.reward=prefix_match", "adapter.kind=lora", "adapter.rank=2",
                 "adapter.targets=[attention,mlp]"]) == 0
    saved = Checkpoint(out).tensors("model")
    assert saved and all("lora_" in k for k in saved)
    assert max(float(v.abs().max()) for k, v in saved.items() if "lora_B" in k) > 0  # the adapters moved
    source = open_source(out)
    assert isinstance(source, AdapterCheckpoint) and source.config.train.init_from == str(run)
    adapted = source.with_adapters()
    ids = torch.randint(0, 3, (2, 8))
    with torch.no_grad():
        with adapters_disabled(adapted):  # the reference the KL term used: exactly the source model
            base = adapted(ids, torch.full((2,), 0.5))
        tuned = adapted(ids, torch.full((2,), 0.5))
        source_logits = open_source(run).build()(ids, torch.full((2,), 0.5))
    assert torch.equal(base, source_logits) and not torch.equal(tuned, base)
    assert main(["eval", str(out), "eval.metric=exact_match", f"data.test_path={data}"]) == 0
