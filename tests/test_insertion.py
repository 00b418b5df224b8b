"""Insertion language models: targets, loss, sampler, and the star-graph task through the CLI."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from unmask.cli import main
from unmask.config import ConfigError, ModelConfig, load_config
from unmask.data.tasks import (
    STAR_VARIANTS,
    answer_of,
    star_graph,
    star_graph_path_checks,
    star_graph_text,
    write_star_graph_task,
)
from unmask.models.dit import DiT
from unmask.models.insertion import InsertionLM, stop_log_odds
from unmask.objectives.base import Noise, draw_noise
from unmask.objectives.ilm import InsertionObjective, forbidden_token_mask, joint_log_probs
from unmask.samplers.base import SamplingError, row_seeds
from unmask.samplers.insertion import InsertionSampler

from toys import CHI2_999, TINY, chi_square

A, B, C, D, E = range(5)
BOS, EOS, PAD, MASK = 5, 6, 7, 8
V = 9
SPECIAL = {BOS, EOS, PAD, MASK}


def objective():
    return InsertionObjective(BOS, EOS, PAD, MASK, SPECIAL, V)


def drop(x0, counted, n_fraction, mask_u):
    x0 = torch.tensor(x0)
    return objective().drop(x0, torch.tensor(counted, dtype=torch.bool), torch.tensor(n_fraction, dtype=torch.float64),
                            torch.tensor(mask_u, dtype=torch.float32))


def test_targets_of_a_hand_made_example_are_the_hand_counted_gaps():
    # row 0: [BOS] a b c d [EOS] [PAD]; n0 = 4, u = 0.5 -> n = floor(0.5 * 5) = 2; b and c have the
    # smallest keys, so [BOS] a d remains and both dropped tokens lie in the gap after a (index 1)
    # row 1: [BOS] a a b a [EOS] [PAD]; u = 0.7 -> n = 3: drop positions 1, 2 and 4 (keys 0.1, 0.2, 0.3)
    # -> [BOS] b: two a's in gap 0 (before b), one a in gap 1 (after b)
    batch = drop([[BOS, A, B, C, D, EOS, PAD], [BOS, A, A, B, A, EOS, PAD]],
                 [[0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 0]],
                 [0.5, 0.7], [[0.9, 0.8, 0.1, 0.2, 0.7, 0.0, 0.0], [0.9, 0.1, 0.2, 0.9, 0.3, 0.0, 0.0]])
    assert batch.dropped.tolist() == [2, 3]
    assert batch.ids.tolist() == [[BOS, A, D, PAD, PAD, PAD, PAD], [BOS, B, PAD, PAD, PAD, PAD, PAD]]
    assert batch.keep.sum(1).tolist() == [3, 2]
    expected = torch.zeros(2, 7, V, dtype=torch.float64)
    expected[0, 1, B] = expected[0, 1, C] = 1
    expected[1, 0, A] = 2
    expected[1, 1, A] = 1
    assert torch.equal(batch.counts(V), expected)
    assert batch.open_gaps.tolist() == [[True] * 3 + [False] * 4, [True] * 2 + [False] * 5]


def test_a_prompt_is_never_dropped_and_closes_its_inner_gaps():
    # [BOS] p q | a b [EOS]: the prompt (d e) is not counted; drop a (n = 1 of 2)
    batch = drop([[BOS, D, E, A, B, EOS]], [[0, 0, 0, 1, 1, 1]], [0.4], [[0, 0, 0, 0.1, 0.5, 0]])
    assert batch.ids.tolist() == [[BOS, D, E, B, PAD, PAD]]
    assert batch.open_gaps.tolist() == [[False, False, True, True, False, False]]
    expected = torch.zeros(1, 6, V, dtype=torch.float64)
    expected[0, 2, A] = 1  # after the last prompt token, before b
    assert torch.equal(batch.counts(V), expected)
    # nothing dropped: the only open gap is after the prompt, and the target is "stop"
    batch = drop([[BOS, D, E, A, B, EOS]], [[0, 0, 0, 1, 1, 1]], [0.0], [[0, 0, 0, 0.1, 0.5, 0]])
    assert batch.dropped.tolist() == [0]
    assert batch.open_gaps.tolist() == [[False, False, True, True, True, False]]


def test_dropped_counts_are_uniform_over_0_to_n0():
    x0 = torch.tensor([[BOS, A, B, C, EOS]] * 4000)
    counted = torch.tensor([[0, 1, 1, 1, 1]] * 4000, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    batch = objective().drop(x0, counted, torch.rand(4000, generator=g, dtype=torch.float64),
                             torch.rand(4000, 5, generator=g))
    freq = torch.bincount(batch.dropped, minlength=4).double() / 4000
    assert torch.allclose(freq, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03)
    # the dropped subset is uniform too: each token dropped with probability E[n]/n0 = 1/2
    hit = torch.zeros(4)
    hit.index_add_(0, batch.token, torch.ones(len(batch.token)))
    assert torch.allclose(hit[:3] / 4000, torch.full((3,), 0.5), atol=0.03)


class FixedLogits(torch.nn.Module):
    """A stand-in network with given insertion and stop logits (whatever the input)."""

    def __init__(self, logits, stop):
        super().__init__()
        self.logits, self.stop = logits, stop
        self.backbone = type("Backbone", (), {"vocab_size": logits.shape[-1]})()

    def forward(self, ids, keep):
        n, width = ids.shape
        return self.logits[:, :width].expand(n, -1, -1), self.stop.expand(n, -1)


def test_loss_is_the_joint_softmax_cross_entropy_against_t_over_n_plus_stop_bce():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 7, V, generator=g, dtype=torch.float64)
    stop = torch.tensor([[0.3]], dtype=torch.float64)
    x0 = torch.tensor([[BOS, A, B, C, D, EOS, PAD]] * 2)
    counted = torch.tensor([[0, 1, 1, 1, 1, 1, 0]] * 2, dtype=torch.bool)
    noise = Noise(torch.tensor([0.5, 0.0], dtype=torch.float64), torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.7, 0, 0]] * 2))
    losses = objective().loss(FixedLogits(logits, stop), x0, counted, noise)
    # reference in float64: kept [BOS] a d (gaps 0..2 open), T[1, b] = T[1, c] = 1, n = 2
    allowed = torch.zeros(7, V, dtype=torch.bool)
    allowed[:3, :5] = True
    flat = logits[0].masked_fill(~allowed, -math.inf).reshape(-1)
    log_p = (flat - flat.logsumexp(0)).reshape(7, V)
    insertion = -(log_p[1, B] + log_p[1, C]) / 2
    sig = torch.sigmoid(stop[0, 0])
    expected0 = insertion - torch.log(1 - sig)  # target "do not stop"
    expected1 = -torch.log(sig)  # nothing dropped: target "stop", no insertion term
    expected = torch.stack([expected0, expected1])
    assert torch.allclose(losses.double(), expected * (4 + 1) / 7, atol=1e-5)  # path weights: (n0 + 1) / L
    paper = InsertionObjective(BOS, EOS, PAD, MASK, SPECIAL, V, "paper")
    assert torch.allclose(paper.loss(FixedLogits(logits, stop), x0, counted, noise).double(), expected, atol=1e-5)


def test_a_count_head_is_scored_by_the_cross_entropy_of_the_missing_count_and_stops_with_p_of_zero():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 7, V, generator=g, dtype=torch.float64)
    counts = torch.randn(1, 7, generator=g, dtype=torch.float64)  # P(n) over n = 0..6
    x0 = torch.tensor([[BOS, A, B, C, D, EOS, PAD]] * 2)
    counted = torch.tensor([[0, 1, 1, 1, 1, 1, 0]] * 2, dtype=torch.bool)
    noise = Noise(torch.tensor([0.5, 0.0], dtype=torch.float64), torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.7, 0, 0]] * 2))
    binary = objective().loss(FixedLogits(logits, torch.zeros(1, 1, dtype=torch.float64)), x0, counted, noise)
    with_counts = objective().loss(FixedLogits(logits, counts), x0, counted, noise)
    # the same insertion term (row 0: n = 2; row 1: n = 0), the BCE (log 2 at logit 0) replaced by -log P(n)
    log_p = counts[0].log_softmax(0)
    expected = binary.double() + (torch.stack([-log_p[2], -log_p[0]]) - math.log(2)) * (4 + 1) / 7
    assert torch.allclose(with_counts.double(), expected, atol=1e-5)
    # the stop hazard is P(n = 0): its log-odds, also where a float32 sigmoid of a difference would lose it
    p0 = counts.softmax(1)[:, 0]
    assert torch.allclose(stop_log_odds(counts), torch.log(p0 / (1 - p0)), atol=1e-10)
    extreme = torch.tensor([[40.0, -60.0, -61.0], [-50.0, 10.0, 0.0]])
    assert torch.allclose(stop_log_odds(extreme).double(), torch.tensor([100.0 - math.log1p(math.exp(-1)),
                                                                         -60.0 - math.log1p(math.exp(-10))],
                                                                        dtype=torch.float64), atol=1e-4)
    model = InsertionLM(DiT(ModelConfig(hidden=32, blocks=1, heads=2, cond_dim=16, length=8), V), "count")
    assert model(torch.tensor([[BOS, A, PAD] + [PAD] * 5]), torch.arange(8)[None] < 2)[1].shape == (1, 8)
    with pytest.raises(ConfigError):
        load_config(None, ["family=ilm", "diffusion.ilm_stop_head=counts"])


def test_stop_noise_copies_substitute_text_tokens_only_and_add_their_stop_loss():
    # [BOS] d e | a b c [EOS], nothing dropped; the prompt d e is fixed. stop_noise f = 0.5:
    # row 0: u0 = 0.1 < f, rate 0.2: only position 3 (u = 0.1 < 0.2) is replaced, by ordinary token
    # floor(0.1 / 0.2 * 5) = 2 (c); row 1: u0 = 0.9, no copy; row 2: u0 = 0.49, rate 0.98: every text token
    x0 = torch.tensor([[BOS, D, E, A, B, C, EOS]] * 3)
    counted = torch.tensor([[0, 0, 0, 1, 1, 1, 1]] * 3, dtype=torch.bool)
    extra = torch.tensor([[0.1, 0.0, 0.0, 0.1, 0.5, 0.5, 0.0], [0.9, 0, 0, 0, 0, 0, 0], [0.49, 0, 0, 0.3, 0.5, 0.7, 0]])
    noise = Noise(torch.zeros(3, dtype=torch.float64), torch.rand(3, 7), None, extra)
    noisy = InsertionObjective(BOS, EOS, PAD, MASK, SPECIAL, V, stop_noise=0.5)
    rows, copies = noisy.stop_copies(noisy.drop(x0, counted, noise.time_u, noise.mask_u), extra)
    assert rows.tolist() == [0, 2]
    assert copies[0].tolist() == [BOS, D, E, C, B, C, PAD]
    ordinary = [A, B, C, D, E]  # token floor(u / 0.98 * 5): 1, 2, 3
    assert copies[1].tolist() == [BOS, D, E, ordinary[1], ordinary[2], ordinary[3], PAD]
    # a network blind to its input: each copy adds exactly its row's stop loss again, weighted as the row
    g = torch.Generator().manual_seed(2)
    net = FixedLogits(torch.randn(1, 7, V, generator=g, dtype=torch.float64),
                      torch.tensor([[0.3]], dtype=torch.float64))
    clean = objective().loss(net, x0, counted, noise)
    stop_bce = -torch.log(torch.sigmoid(torch.tensor(0.3, dtype=torch.float64))) * (3 + 1) / 7  # n0 = 3
    assert torch.allclose(noisy.loss(net, x0, counted, noise).double() - clean.double(),
                          torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) * stop_bce, atol=1e-6)
    # evaluation noise (no extra_u) makes no copies
    plain = Noise(noise.time_u, noise.mask_u)
    assert torch.allclose(noisy.loss(net, x0, counted, plain), clean)
    with pytest.raises(ValueError, match="stop noise"):
        InsertionObjective(BOS, EOS, PAD, MASK, SPECIAL, V, stop_noise=1.5)
    with pytest.raises(ConfigError):
        load_config(None, ["family=ilm", "diffusion.ilm_stop_noise=2"])


def test_joint_log_probs_normalise_over_open_gaps_and_allowed_tokens_only():
    logits = torch.randn(2, 4, V)
    open_gaps = torch.tensor([[True, True, False, False], [False, True, True, True]])
    forbidden = torch.zeros(V, dtype=torch.bool)
    forbidden[[BOS, MASK]] = True
    log_p = joint_log_probs(logits, open_gaps, forbidden)
    assert torch.allclose(log_p.exp().sum((1, 2)), torch.ones(2))
    assert (log_p[0, 2:] == -math.inf).all() and (log_p[:, :, BOS] == -math.inf).all()


def random_ilm(vocab=V, length=16, seed=0, stop_head="binary"):
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden=32, blocks=2, heads=2, cond_dim=16, dropout=0.0, length=length)
    model = InsertionLM(DiT(cfg, vocab), stop_head)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    return model.eval()


def test_padding_is_invisible_to_the_backbone():
    model = random_ilm()
    ids = torch.tensor([[BOS, A, B, C, PAD, PAD, PAD, PAD]])
    other = ids.clone()
    other[0, 4:] = torch.tensor([D, E, A, B])
    keep = torch.arange(8)[None] < 4
    l1, s1 = model(ids, keep)
    l2, s2 = model(other, keep)
    l3, s3 = model(ids[:, :4], keep[:, :4])
    assert torch.allclose(l1[:, :4], l2[:, :4], atol=1e-5) and torch.allclose(s1, s2, atol=1e-5)
    assert torch.allclose(l1[:, :4], l3, atol=1e-5) and torch.allclose(s1, s3, atol=1e-5)


def sampler(**kw):
    kw.setdefault("stop", "threshold" if "stop_threshold" in kw else "draw")
    return InsertionSampler(MASK, PAD, SPECIAL, **kw)


def test_sampler_keeps_fixed_tokens_and_never_inserts_into_closed_gaps_or_specials():
    model = random_ilm(length=12)
    # continuation after a prompt, and infilling between a and the suffix d e (one open gap)
    canvas = torch.tensor([[BOS, C, D, MASK, MASK, MASK, MASK, MASK, MASK, MASK],
                           [BOS, A, MASK, MASK, MASK, MASK, MASK, MASK, D, E]])
    for gap in ("greedy", "sample"):
        result = sampler(stop_threshold=1.0, gap=gap).sample(model, canvas, row_seeds(3, 2))
        out = result.tokens.tolist()
        # threshold 1.0 is never reached: rows grow to the full width of 10
        assert out[0][:3] == [BOS, C, D] and len(out[0]) == 10
        assert out[1][:2] == [BOS, A] and out[1][-2:] == [D, E]
        inserted = out[0][3:] + out[1][2:-2]
        assert all(t not in SPECIAL for t in inserted)
        assert result.generated == 7 + 6
        assert result.row_nfe.tolist() == [7, 6]


def test_stop_at_the_threshold():
    logits = torch.zeros(1, 8, V)
    canvas = torch.tensor([[BOS, A, MASK, MASK, MASK, MASK, MASK, MASK]])
    at_half = FixedLogits(logits, torch.tensor([[0.0]]))  # P(stop) = 0.5 exactly
    result = sampler(stop_threshold=0.5).sample(at_half, canvas, row_seeds(0, 1))
    assert result.tokens.tolist() == [[BOS, A] + [PAD] * 6] and result.nfe == 1 and result.generated == 0
    result = sampler(stop_threshold=0.51).sample(at_half, canvas, row_seeds(0, 1))
    assert result.generated == 6 and result.nfe == 6  # stops only because the row is full
    assert all(t in range(5) for t in result.tokens[0, 2:].tolist())


def test_stop_probability_is_read_at_every_step():
    class StopsAtLength(torch.nn.Module):
        """Stop (logit +20) once a row holds 5 tokens, continue (-20) before."""

        backbone = type("Backbone", (), {"vocab_size": V})()

        def forward(self, ids, keep):
            stop = torch.where(keep.sum(1) >= 5, 20.0, -20.0)[:, None]
            return torch.zeros(*ids.shape, V), stop

    canvas = torch.tensor([[BOS, MASK, MASK, MASK, MASK, MASK, MASK, MASK],
                           [BOS, A, B, C, MASK, MASK, MASK, MASK]])
    result = sampler().sample(StopsAtLength(), canvas, row_seeds(0, 2))
    assert (result.tokens != PAD).sum(1).tolist() == [5, 5]
    assert result.row_nfe.tolist() == [5, 2]


def test_batched_and_one_at_a_time_sampling_agree():
    binary, counting = random_ilm(length=12), random_ilm(length=12, stop_head="count")
    canvas = torch.tensor([[BOS, MASK, MASK, MASK, MASK, MASK, MASK, MASK, MASK, MASK, MASK, MASK],
                           [BOS, C, D, MASK, MASK, MASK, MASK, MASK, MASK, MASK, MASK, MASK],
                           [BOS, A, MASK, MASK, MASK, MASK, MASK, MASK, MASK, MASK, D, E],
                           [BOS, E, E, E, MASK, MASK, MASK, MASK, MASK, MASK, MASK, MASK]])
    seeds = row_seeds(11, 4)
    for model, gap, stop in ((counting, "sample", "draw"), (counting, "greedy", "count"),
                             (binary, "greedy", "threshold"), (binary, "sample", "threshold"), (binary, "sample", "draw")):
        s = sampler(stop=stop, stop_threshold=0.3, gap=gap, top_p=0.9)
        together = s.sample(model, canvas, seeds)
        alone = [s.sample(model, canvas[i:i + 1], seeds[i:i + 1]) for i in range(4)]
        assert torch.equal(together.tokens, torch.cat([r.tokens for r in alone]))
        assert together.row_nfe.tolist() == [int(r.row_nfe[0]) for r in alone]
    lengths = (together.tokens != PAD).sum(1)
    assert len(set(lengths.tolist())) > 1  # ragged: rows stopped at different lengths (the last: binary, draw)


def test_sampler_rejects_a_canvas_without_a_first_token():
    with pytest.raises(SamplingError, match="start with a fixed token"):
        sampler().sample(random_ilm(), torch.tensor([[MASK, MASK, A]]), row_seeds(0, 1))


def test_star_graphs_have_the_variant_shape_and_a_unique_path():
    for name, spec in STAR_VARIANTS.items():
        rng = np.random.default_rng(5)
        for _ in range(50):
            g = star_graph(spec, rng)
            edges = g["edges"]
            assert len(edges) == len({tuple(e) for e in edges})
            nodes = {v for e in edges for v in e}
            assert len(nodes) == len(edges) + 1  # a tree: arms share only the centre
            out = {}
            for a, b in edges:
                out.setdefault(a, []).append(b)
            path = g["path"]
            assert path[0] == g["source"] and path[-1] == g["goal"]
            assert all(b in out.get(a, []) for a, b in zip(path, path[1:]))
            assert spec.min_arm <= len(path) <= spec.max_arm
            branching = [a for a, bs in out.items() if len(bs) > 1]
            assert len(branching) <= 1 and (not branching or branching[0] in path)
            prompt, answer = star_graph_text(g)
            assert len(prompt) + len(answer) <= spec.max_text_length


def test_star_graph_files_are_seeded_and_test_prompts_are_unseen(tmp_path):
    a = write_star_graph_task(tmp_path / "a", "medium", train=300, valid=20, test=50, seed=3)
    write_star_graph_task(tmp_path / "b", "medium", train=300, valid=20, test=50, seed=3)
    assert (tmp_path / "a" / "test.jsonl").read_text() == (tmp_path / "b" / "test.jsonl").read_text()
    train = {json.loads(line)["prompt"] for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()}
    test = [json.loads(line) for line in (tmp_path / "a" / "test.jsonl").read_text().splitlines()]
    assert len(test) == 50 and not train & {t["prompt"] for t in test}
    assert a["suggested_length"] == 2 + STAR_VARIANTS["medium"].max_text_length
    with pytest.raises(ValueError, match="unknown star-graph variant"):
        write_star_graph_task(tmp_path / "c", "huge")
    write_star_graph_task(tmp_path / "a", "medium", train=30, valid=5, test=5, seed=4)  # its own files: replaced
    assert len((tmp_path / "a" / "test.jsonl").read_text().splitlines()) == 5
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.jsonl").write_text("the user's data\n")
    with pytest.raises(ValueError, match="nothing was replaced"):
        write_star_graph_task(tmp_path / "mine", "medium", train=30, valid=5, test=5)
    assert (tmp_path / "mine" / "train.jsonl").read_text() == "the user's data\n"


def test_path_checks_tell_a_wrong_arm_from_a_broken_path():
    prompt = "he ch jf la jc fl j>e:"  # arms j-c-h-e (the answer) and j-f-l-a
    checks = {g: star_graph_path_checks(prompt, g) for g in ("jche", "jfla", "jcla", "che", "jc")}
    assert checks["jche"] == {"starts": True, "first_step": True, "follows_edges": True, "reaches_goal": True}
    assert checks["jfla"] == {"starts": True, "first_step": True, "follows_edges": True, "reaches_goal": False}
    assert checks["jcla"]["first_step"] and not checks["jcla"]["follows_edges"]
    assert not any(checks["che"].values())
    assert checks["jc"]["follows_edges"] and not checks["jc"]["reaches_goal"]


def test_answer_is_read_after_the_prompt_up_to_the_first_special():
    from unmask.data.tokenization import CharTokenizer

    tok = CharTokenizer("abc>: ")
    ids = [tok.bos_id] + tok.encode("ab>c:").tolist() + tok.encode("cab").tolist() + [tok.eos_id, tok.encode("a")[0]]
    assert answer_of(ids, 5, tok) == "cab"


def test_ilm_needs_the_pad_layout():
    with pytest.raises(ConfigError, match="data.layout=pad"):
        load_config(None, ["family=ilm", "data.layout=wrap"])


@pytest.mark.parametrize("family", ["ilm", "mdlm", "ar"])
def test_star_graph_task_trains_and_scores_through_the_cli(tmp_path, family, capsys):
    data = tmp_path / "star"
    assert main(["task", "star-graph", "--variant", "easy", "--out", str(data), "--train", "64", "--valid", "8",
                 "--test", "16"]) == 0
    run = tmp_path / family
    overrides = [o for o in TINY if not o.startswith(("data.length", "model.length"))]
    assert main(["train", "star-graph", f"family={family}", f"run_dir={run}", *overrides, "model.length=48",
                 "data.length=47", "train.steps=3", f"data.path={data}/train.jsonl",
                 f"data.valid_path={data}/valid.jsonl", f"data.test_path={data}/test.jsonl",
                 f"data.cache_dir={tmp_path}/cache"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "eval.max_sequences=8", "sample.steps=8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 8 and 0 <= result["exact_match"] <= 1 and len(result["examples"]) == 5
    assert main(["eval", str(run), "eval.metric=likelihood", "eval.max_sequences=4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["family"] == family and (result.get("loss") or result.get("nll")) > 0


def test_training_with_stop_noise_adds_the_copies_stop_loss(tmp_path, capsys):
    """The training loop draws ``extra_u`` for an ILM with stop noise: with every row copied
    (``diffusion.ilm_stop_noise=1``) the first step's loss, same seed and drops, is larger by the copies'
    stop losses (a BCE is positive); without the draw it would be equal."""
    data = tmp_path / "star"
    assert main(["task", "star-graph", "--variant", "easy", "--out", str(data), "--train", "64", "--valid", "8",
                 "--test", "16"]) == 0
    overrides = [o for o in TINY if not o.startswith(("data.length", "model.length"))]
    losses = []
    for noise in (0, 1):
        run = tmp_path / f"noise{noise}"
        assert main(["train", "star-graph", "family=ilm", f"run_dir={run}", *overrides, "model.length=48",
                     "data.length=47", "train.steps=1", f"diffusion.ilm_stop_noise={noise}",
                     f"data.path={data}/train.jsonl", f"data.valid_path={data}/valid.jsonl",
                     f"data.test_path={data}/test.jsonl", f"data.cache_dir={tmp_path}/cache"]) == 0
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses.append(next(r["loss"] for r in records if "loss" in r))
    capsys.readouterr()
    assert losses[1] > losses[0] + 1e-4


def test_sorting_task_files(tmp_path, capsys):
    assert main(["task", "sorting", "--length", "5", "--alphabet", "abcd", "--out", str(tmp_path / "s"),
                 "--train", "50", "--valid", "5", "--test", "10"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "s" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    for r in rows:
        assert r["prompt"].endswith(":") and r["text"] == "".join(sorted(r["prompt"][:-1]))
    assert main(["task", "sorting", "--alphabet", "aa", "--out", str(tmp_path / "t")]) == 2
    assert "alphabet" in capsys.readouterr().err


def test_padding_in_a_canvas_is_room_without_an_open_gap():
    model = random_ilm(length=10)
    canvas = torch.tensor([[BOS, A, MASK, D, E, PAD, PAD, PAD, PAD, PAD]])
    result = sampler(stop_threshold=1.0).sample(model, canvas, row_seeds(2, 1))
    out = result.tokens[0].tolist()
    assert out[:2] == [BOS, A] and out[-2:] == [D, E]  # grew to the width, only between a and d
    assert result.generated == 6


def test_template_infilling_with_an_insertion_model(tmp_path):
    from unmask.config import SampleConfig
    from unmask.data.tokenization import CharTokenizer
    from unmask.pipeline import generate_rows

    tok = CharTokenizer("abcde")
    model = random_ilm(vocab=tok.vocab_size, length=12)
    objective = InsertionObjective(tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id, tok.special_ids, tok.vocab_size)
    gen = generate_rows(model, objective, tok, SampleConfig(num_samples=3, stop="threshold", stop_threshold=1.0), 12, 12,
                   template="ab[MASK]cd", bos=True)
    for text in gen.texts:
        assert text.startswith("ab") and text.endswith("cd") and len(text) == 11


# An enumerable toy: strings over {a, b} of length 0..3 in rows [BOS] x [EOS] [PAD]...
TOY = {(): 0.1, (A,): 0.2, (A, B): 0.3, (B, B, A): 0.25, (A, B, A): 0.15}
TOY_WIDTH = 6


def optimal_chain(weighting: str):
    """The minimisers of the expected ILM loss over every (sequence, n, dropped subset) of ``TOY``,
    drawn and weighted by the objective itself: per state (the kept tokens), P(stop), the insertion
    distribution {(gap, token): q} and a count head's P(n) {n: p}."""
    obj = InsertionObjective(BOS, EOS, PAD, MASK, SPECIAL, V, weighting)
    stop_num, mass, inserts, insert_mass, missing = {}, {}, {}, {}, {}
    for x, p in TOY.items():
        m = len(x)
        row = [BOS, *x, EOS] + [PAD] * (TOY_WIDTH - m - 2)
        for n in range(m + 1):
            for subset in itertools.combinations(range(m), n):
                keys = [1.0 if i - 1 not in subset else 0.5 for i in range(TOY_WIDTH)]
                batch = obj.drop(torch.tensor([row]), torch.tensor([[0] + [1] * (m + 1) + [0] * (TOY_WIDTH - m - 2)],
                                                                   dtype=torch.bool),
                                 torch.tensor([(n + 0.5) / (m + 1)], dtype=torch.float64), torch.tensor([keys]))
                assert int(batch.dropped[0]) == n
                w = p / (m + 1) / math.comb(m, n) * float(obj.row_weights(batch)[0])
                state = tuple(batch.ids[0, 1:int(batch.keep.sum())].tolist())
                mass[state] = mass.get(state, 0.0) + w
                stop_num[state] = stop_num.get(state, 0.0) + w * (n == 0)
                missing.setdefault(state, {})[n] = missing.get(state, {}).get(n, 0.0) + w
                if n:
                    insert_mass[state] = insert_mass.get(state, 0.0) + w
                    table = inserts.setdefault(state, {})
                    for gap, token in zip(batch.gap.tolist(), batch.token.tolist()):
                        table[gap, token] = table.get((gap, token), 0.0) + w / n
    stop = {s: stop_num[s] / mass[s] for s in mass}
    q = {s: {k: v / insert_mass[s] for k, v in table.items()} for s, table in inserts.items()}
    counts = {s: {n: v / mass[s] for n, v in table.items()} for s, table in missing.items()}
    return stop, q, counts


def chain_distribution(stop, q) -> dict:
    """The distribution over finished sequences of the chain: from the empty state, stop with
    P(stop), else insert (gap, token) with q (gap j: after the j-th kept token, 0 = after BOS)."""
    visit, out = {(): 1.0}, {}
    for length in range(TOY_WIDTH):
        for state in [s for s in visit if len(s) == length]:
            out[state] = out.get(state, 0.0) + visit[state] * stop[state]
            for (gap, token), p in q.get(state, {}).items():
                child = state[:gap] + (token,) + state[gap:]
                visit[child] = visit.get(child, 0.0) + visit[state] * (1 - stop[state]) * p
    return out


def test_optimal_ilm_with_path_weights_generates_exactly_the_data_distribution():
    path = chain_distribution(*optimal_chain("path")[:2])
    assert all(abs(p - TOY.get(x, 0.0)) < 1e-6 for x, p in path.items()) and set(TOY) <= set(path)
    # the paper's unweighted rows fit a distribution reweighted by 1/(n0 + 1): too much mass on short
    paper = chain_distribution(*optimal_chain("paper")[:2])
    assert paper[()] > TOY[()] + 0.02 and paper[(B, B, A)] < TOY[(B, B, A)] - 0.02


class TableILM(torch.nn.Module):
    """An ILM network that looks its outputs up in tables keyed by the state (the kept tokens): a
    binary stop head, or with ``counts`` a count head (log P(n) over n = 0..TOY_WIDTH-1)."""

    backbone = type("Backbone", (), {"vocab_size": V})()

    def __init__(self, stop, q, counts=None):
        super().__init__()
        self.stop, self.q, self.counts = stop, q, counts

    def forward(self, ids, keep):
        logits = torch.full((*ids.shape, V), float("-inf"))
        stops = torch.zeros(len(ids), 1 if self.counts is None else TOY_WIDTH)
        for i, row in enumerate(ids.tolist()):
            state = tuple(row[1:int(keep[i].sum())])
            if self.counts is not None:
                stops[i] = torch.tensor([math.log(self.counts[state].get(n, 1e-300)) for n in range(TOY_WIDTH)])
            else:
                p = min(max(self.stop[state], 1e-15), 1 - 1e-15)
                stops[i, 0] = math.log(p / (1 - p))
            for (gap, token), p in self.q.get(state, {}).items():
                logits[i, gap, token] = math.log(p)
        return logits, stops


def test_joint_sampling_with_drawn_stops_reproduces_the_data_and_a_threshold_does_not():
    model = TableILM(*optimal_chain("path")[:2])
    n = 3000
    canvas = torch.tensor([[BOS, MASK] + [PAD] * (TOY_WIDTH - 2)] * n)
    outcomes = list(TOY)

    def counts(result):
        seqs = [tuple(t for t in row if t != PAD)[1:] for row in result.tokens.tolist()]
        assert set(seqs) <= set(outcomes)
        return [seqs.count(x) for x in outcomes]

    drawn = sampler(gap="sample", stop="draw").sample(model, canvas, row_seeds(5, n))
    assert chi_square(counts(drawn), list(TOY.values())) < CHI2_999[4]
    thresholded = sampler(gap="sample", stop="threshold", stop_threshold=0.9).sample(model, canvas, row_seeds(5, n))
    assert chi_square(counts(thresholded), list(TOY.values())) > 100


def test_a_count_head_stops_exactly_with_drawn_stops_and_draws_the_data_lengths_with_the_count_rule():
    stop, q, counts = optimal_chain("path")
    model = TableILM(stop, q, counts)
    n = 3000
    canvas = torch.tensor([[BOS, MASK] + [PAD] * (TOY_WIDTH - 2)] * n)

    def finished(result):
        return [tuple(t for t in row if t != PAD)[1:] for row in result.tokens.tolist()]

    # the hazard P(n = 0 | x) read from the count head: the chain generates the data
    seqs = finished(sampler(gap="sample", stop="draw").sample(model, canvas, row_seeds(5, n)))
    assert chi_square([seqs.count(x) for x in TOY], list(TOY.values())) < CHI2_999[4]
    # stop=count: the number of insertions drawn once at the start from P(n | empty) has the data's
    # length distribution, but the text given the length is not the data's (mass outside its support)
    seqs = finished(sampler(gap="sample", stop="count").sample(model, canvas, row_seeds(6, n)))
    data_lengths = [sum(p for x, p in TOY.items() if len(x) == m) for m in range(4)]
    assert chi_square([sum(len(x) == m for x in seqs) for m in range(4)], data_lengths) < CHI2_999[3]
    assert sum(x not in TOY for x in seqs) > 0.02 * n
    # temperature 0: the most likely count (3, probability 0.4) in every row
    greedy = sampler(gap="sample", stop="count", temperature=0).sample(model, canvas[:8], row_seeds(7, 8))
    assert set(map(len, finished(greedy))) == {3} and greedy.row_nfe.tolist() == [3] * 8
    with pytest.raises(SamplingError, match="count stop head"):
        sampler(stop="count").sample(TableILM(stop, q), canvas[:2], row_seeds(0, 2))


def train_toy_ilm(weighting: str, stop_head: str = "binary", steps: int = 700) -> InsertionLM:
    """A tiny DiT ILM trained on rows drawn from ``TOY`` (AdamW, cosine decay to 0)."""
    torch.manual_seed(0)
    model = InsertionLM(DiT(ModelConfig(hidden=32, blocks=2, heads=2, cond_dim=16, dropout=0.0,
                                        length=TOY_WIDTH), V), stop_head)
    obj = InsertionObjective(BOS, EOS, PAD, MASK, SPECIAL, V, weighting)
    rows = torch.tensor([[BOS, *x, EOS] + [PAD] * (TOY_WIDTH - len(x) - 2) for x in TOY])
    counted = torch.tensor([[0] + [1] * (len(x) + 1) + [0] * (TOY_WIDTH - len(x) - 2) for x in TOY], dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = torch.multinomial(torch.tensor(list(TOY.values())), 256, replacement=True, generator=g)
        loss = obj.loss(model, rows[pick], counted[pick], draw_noise(256, TOY_WIDTH, g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    return model.eval()


@torch.no_grad()
def learned_distribution(model: InsertionLM) -> tuple[dict, float]:
    """The network's distribution over finished sequences, enumerated level by level from the empty
    state (paths below 1e-7 pruned) with every insertion the joint softmax allows, and the mass still
    unfinished at the width limit."""
    forbidden = forbidden_token_mask(V, SPECIAL)
    visit, out, unfinished = {(): 1.0}, {}, 0.0
    for length in range(TOY_WIDTH - 1):
        level = [s for s in visit if len(s) == length and visit[s] > 1e-7]
        ids = torch.tensor([[BOS, *s] + [PAD] * (TOY_WIDTH - len(s) - 1) for s in level])
        keep = torch.arange(TOY_WIDTH)[None] <= torch.tensor([len(s) for s in level])[:, None]
        logits, stop = model(ids, keep)
        stop, q = torch.sigmoid(stop_log_odds(stop).double()), joint_log_probs(logits, keep, forbidden).double().exp()
        for i, s in enumerate(level):
            out[s] = visit[s] * float(stop[i])
            go_on = visit[s] * (1 - float(stop[i]))
            if length == TOY_WIDTH - 2:
                unfinished += go_on
                continue
            for gap, token in (q[i] > 0).nonzero().tolist():
                child = s[:gap] + (token,) + s[gap:]
                visit[child] = visit.get(child, 0.0) + go_on * float(q[i, gap, token])
    return out, unfinished


@pytest.mark.parametrize("stop_head", ["binary", "count"])
def test_a_trained_ilm_generates_the_data_distribution_and_the_sampler_draws_from_it(one_thread, stop_head):
    model = train_toy_ilm("path", stop_head)
    learned, unfinished = learned_distribution(model)
    total_variation = 0.5 * (sum(abs(learned.get(x, 0.0) - p) for x, p in TOY.items())
                             + sum(p for x, p in learned.items() if x not in TOY) + unfinished)
    assert total_variation < 0.04
    # joint sampling with drawn stops draws from the network's own enumerated distribution
    n = 4000
    canvas = torch.tensor([[BOS, MASK] + [PAD] * (TOY_WIDTH - 2)] * n)
    result = sampler(gap="sample", stop="draw").sample(model, canvas, row_seeds(7, n))
    seqs = [tuple(t for t in row if t != PAD)[1:] for row in result.tokens.tolist()]
    outcomes = [x for x, p in learned.items() if p * n > 5]
    observed = [seqs.count(x) for x in outcomes] + [n - sum(seqs.count(x) for x in outcomes)]
    expected = [learned[x] for x in outcomes] + [1 - sum(learned[x] for x in outcomes)]
    assert chi_square(observed, expected) < CHI2_999[len(outcomes)]


def test_a_trained_ilm_with_the_papers_row_weights_learns_the_length_biased_distribution(one_thread):
    paper, _ = learned_distribution(train_toy_ilm("paper"))
    assert paper[()] > TOY[()] + 0.08 and paper[(B, B, A)] < TOY[(B, B, A)] - 0.06
