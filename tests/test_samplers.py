"""Samplers against distributions whose conditionals are known exactly: the joint of complete
samples (chi-square), batch invariance, fixed tokens, float32 truncation, bad input."""

import math

import numpy as np
import pytest
import torch

from unmask import rng
from unmask.config import SampleConfig
from unmask.data.tokenization import CharTokenizer
from unmask.objectives.ar import Autoregressive
from unmask.objectives.mdlm import MaskedDiffusion
from unmask.objectives.schedules import Cosine, LogLinear
from unmask.pipeline import encode_template, generate_rows, make_canvas
from unmask.samplers.ancestral import AncestralSampler
from unmask.samplers.ar import AutoregressiveSampler
from unmask.samplers.base import (
    SamplingError,
    categorical_probs,
    confidence_scores,
    row_seeds,
    sample_categorical,
    sample_exponential_race_float32,
    top_index,
)
from unmask.samplers.confidence import ConfidenceSampler, reveal_schedule
from unmask.samplers.first_hitting import FirstHittingSampler
from unmask.samplers.registry import make_sampler
from unmask.samplers.semi_ar import SemiAutoregressiveSampler

from toys import (
    CHI2_999,
    MASK,
    V_TOKENS,
    EnumeratedModel,
    FactorizedModel,
    chi_square,
    markov_chain,
    random_joint,
    tiny_dit,
)


def joint_counts(tokens: torch.Tensor, vocab: int) -> np.ndarray:
    codes = (tokens * vocab ** torch.arange(tokens.shape[1] - 1, -1, -1)).sum(dim=1)
    return np.bincount(codes.numpy(), minlength=vocab ** tokens.shape[1])


def seeds(n, base=0):
    return row_seeds(base, n)


# ----------------------------------------------------------------------------- random numbers

def test_counter_based_uniforms_match_the_reference_and_are_uniform():
    parts = (torch.tensor([0, 1, 2, 12345678901234, -5]), 7, torch.tensor([3, 0, 9, 1, 2]))
    got = rng.uniform(*parts)
    for i in range(5):
        assert got[i].item() == rng.reference_uniform(int(parts[0][i]), 7, int(parts[2][i]))
    u = rng.uniform(42, torch.arange(200_000)).numpy()
    assert u.min() >= 0 and u.max() < 1
    # Kolmogorov-Smirnov against U(0, 1): critical value at 0.1% is 1.95 / sqrt(n)
    ks = np.max(np.abs(np.sort(u) - np.arange(1, len(u) + 1) / len(u)))
    assert ks < 1.95 / math.sqrt(len(u))
    # neighbouring counters are uncorrelated
    v = rng.uniform(42, torch.arange(1, 200_001)).numpy()
    assert abs(np.corrcoef(u, v)[0, 1]) < 4 / math.sqrt(len(u))
    w = rng.to_uniform32(rng.stream(rng.hash64(3), torch.arange(100_000)))
    assert w.dtype == torch.float32 and float(w.min()) >= 0 and float(w.max()) <= 1 - 2 ** -24
    assert abs(float(w.double().mean()) - 0.5) < 4 * math.sqrt(1 / 12 / 100_000)


def test_numpy_and_tensor_hashing_give_the_same_bits(monkeypatch):
    """The CPU's NumPy uint64 arithmetic and the int64 tensor arithmetic other devices run agree bit for bit."""
    keys = torch.tensor([0, 1, -1, 2 ** 63 - 1, -2 ** 63, 12345678901234, -5])
    index = torch.arange(len(keys)) * 977 - 3
    def draws():
        z = rng.absorb(rng.hash64(keys), 11, index)
        return (z, rng.hash64(42, index), rng.to_uniform(z), rng.to_uniform32(z),
                rng.stream(z[:, None], torch.arange(4)))
    numpy_bits = draws()
    monkeypatch.setattr(rng, "_on_cpu", lambda *values: False)
    for a, b in zip(numpy_bits, draws(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


# ----------------------------------------------------------------------------- the primitive

def test_inverse_cdf_draws_follow_the_weights():
    weights = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.04, 0.01], dtype=torch.float64) * 3.0
    n = 60_000
    draws = sample_categorical(weights.expand(n, -1), rng.uniform(1, torch.arange(n)))
    assert chi_square(np.bincount(draws.numpy(), minlength=6), weights / weights.sum()) < CHI2_999[5]


def test_float32_exponential_race_follows_ordinary_weights():
    weights = torch.tensor([0.5, 0.3, 0.2])
    n = 60_000
    u = rng.to_uniform32(rng.stream(rng.hash64(torch.arange(n))[:, None], torch.arange(3)))
    draws = sample_exponential_race_float32(weights.expand(n, -1), u)
    assert chi_square(np.bincount(draws.numpy(), minlength=3), weights) < CHI2_999[2]


def test_float32_race_is_truncated_and_float64_is_not():
    """float32 uniforms are at most 1 - 2^-24, so -log u >= 5.96e-8 and -log u <= 16.6: a category
    whose weight is below 5.96e-8 / 16.6 of another's can never win the race. The float64 inverse
    CDF draws it whenever u falls in its interval."""
    weights = torch.tensor([[1.0, 3e-9]], dtype=torch.float64)
    big = torch.cat([torch.arange(1, 1001, dtype=torch.float32) * 2.0 ** -24,  # the smallest uniforms
                     torch.linspace(0.001, 1 - 2 ** -24, 1000, dtype=torch.float32)])
    lucky = torch.full_like(big, 1 - 2 ** -24)  # the tiny category at its luckiest
    u = torch.stack([big, lucky], dim=1)
    assert not bool((sample_exponential_race_float32(weights.expand(len(u), -1), u) == 1).any())
    # with float64 uniforms the same race picks it: u = 1 - 1e-12 makes -log u = 1e-12
    u64 = torch.tensor([[0.5, 1 - 1e-12]], dtype=torch.float64)
    assert int((weights / -torch.log(u64)).argmax()) == 1
    assert int(sample_categorical(weights, torch.tensor([1 - 1e-9], dtype=torch.float64))[0]) == 1


def test_temperature_top_k_top_p_and_greedy():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]]))
    assert torch.allclose(categorical_probs(logits), torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]], dtype=torch.float64))
    assert torch.allclose(categorical_probs(logits, temperature=2.0), torch.softmax(logits.double() / 2, -1))
    assert torch.allclose(categorical_probs(logits, top_k=2), torch.tensor([[4 / 7, 3 / 7, 0, 0, 0]], dtype=torch.float64))
    assert torch.allclose(categorical_probs(logits, top_p=0.75), torch.tensor([[4 / 9, 3 / 9, 2 / 9, 0, 0]], dtype=torch.float64))
    assert torch.allclose(categorical_probs(logits, top_p=0.7), torch.tensor([[4 / 7, 3 / 7, 0, 0, 0]], dtype=torch.float64))
    assert torch.equal(categorical_probs(logits, temperature=0), torch.tensor([[1.0, 0, 0, 0, 0]], dtype=torch.float64))
    excluded = categorical_probs(logits, exclude=0)
    assert excluded[0, 0] == 0 and torch.isclose(excluded.sum(), torch.tensor(1.0, dtype=torch.float64))
    for tiny in (1e-300, 5e-324):  # logits / T overflowed to +inf and gave NaN: samplers then looped
        assert torch.equal(categorical_probs(logits, temperature=tiny), categorical_probs(logits, temperature=0))
        assert torch.equal(categorical_probs(logits, temperature=tiny, exclude=0),
                           torch.tensor([[0, 1.0, 0, 0, 0]], dtype=torch.float64))


# ----------------------------------------------------------------------------- exactness on known joints

JOINT_L, JOINT_V = 3, 3


def joint_problem():
    states, probs = random_joint(JOINT_L, JOINT_V)
    diffusion = MaskedDiffusion(LogLinear(0.0), JOINT_V)
    return EnumeratedModel(states, probs, JOINT_V), diffusion, probs


def product_of_marginals(probs):
    table = probs.reshape([JOINT_V] * JOINT_L)
    marg = [table.sum(dim=tuple(d for d in range(JOINT_L) if d != i)) for i in range(JOINT_L)]
    return torch.einsum("a,b,c->abc", *marg).reshape(-1)


@pytest.mark.parametrize("k", [1])
def test_first_hitting_sampler_draws_the_exact_joint(k):
    model, diffusion, probs = joint_problem()
    n = 6000
    out = FirstHittingSampler(diffusion, tokens_per_step=k).sample(model, torch.full((n, JOINT_L), JOINT_V), seeds(n))
    assert torch.equal(out.row_nfe, torch.full((n,), JOINT_L))  # NFE = number of masks
    assert chi_square(joint_counts(out.tokens, JOINT_V), probs) < CHI2_999[26]


def test_ancestral_with_many_steps_draws_the_joint_and_one_step_the_product_of_marginals():
    model, diffusion, probs = joint_problem()
    n = 6000
    canvas = torch.full((n, JOINT_L), JOINT_V)
    many = AncestralSampler(diffusion, steps=512).sample(model, canvas, seeds(n))
    assert chi_square(joint_counts(many.tokens, JOINT_V), probs) < CHI2_999[26]
    one = AncestralSampler(diffusion, steps=1).sample(model, canvas, seeds(n, 1))
    product = product_of_marginals(probs)
    assert chi_square(joint_counts(one.tokens, JOINT_V), product) < CHI2_999[26]
    assert chi_square(joint_counts(one.tokens, JOINT_V), probs) > 3 * CHI2_999[26]  # the test has power


def test_cached_ancestral_gives_the_same_samples_with_fewer_evaluations():
    model, diffusion, _ = joint_problem()
    n = 500
    canvas = torch.full((n, JOINT_L), JOINT_V)
    plain = AncestralSampler(diffusion, steps=64, cache=False).sample(model, canvas, seeds(n, 2))
    cached = AncestralSampler(diffusion, steps=64).sample(model, canvas, seeds(n, 2))  # the default
    assert torch.equal(plain.tokens, cached.tokens)
    assert cached.row_nfe.max() <= JOINT_L  # one evaluation per change of the row, at most
    # per row, not per batch: the whole batch is almost never unchanged, yet rows are skipped
    assert cached.row_nfe.sum() < 0.2 * plain.row_nfe.sum()


def test_time_conditioned_models_are_evaluated_at_every_step_despite_the_cache():
    model, diffusion, _ = joint_problem()
    canvas = torch.full((50, JOINT_L), JOINT_V)
    plain = AncestralSampler(diffusion, steps=32, cache=False).sample(model, canvas, seeds(50))
    model.time_conditioning = True  # its prediction would change with t even on an unchanged canvas
    cached = AncestralSampler(diffusion, steps=32).sample(model, canvas, seeds(50))
    assert torch.equal(cached.row_nfe, plain.row_nfe) and torch.equal(cached.tokens, plain.tokens)
    model.time_conditioning = False
    assert AncestralSampler(diffusion, steps=32).sample(model, canvas, seeds(50)).row_nfe.sum() < plain.row_nfe.sum()


def test_parallel_first_hitting_uses_ceil_masks_over_k_evaluations():
    model, diffusion, _ = joint_problem()
    canvas = torch.full((4, 7), JOINT_V)
    canvas[0, :3] = 1  # ragged: 4, 7, 7, 7 masks
    states, probs = random_joint(7, 3)
    out = FirstHittingSampler(diffusion, tokens_per_step=3).sample(EnumeratedModel(states, probs, 3), canvas, seeds(4))
    assert out.row_nfe.tolist() == [2, 3, 3, 3]
    assert not (out.tokens == JOINT_V).any() and torch.equal(out.tokens[0, :3], torch.ones(3, dtype=torch.long))


def test_semi_autoregressive_with_exact_inner_sampler_draws_the_markov_chain():
    """A stationary Markov chain: any window's marginal is the chain's, and overlapping windows
    carry the last state, so semi-AR generation of 5 tokens in windows of 3 is exact."""
    window, total, vocab = 3, 5, 3
    states, probs, pi, transition = markov_chain(window, vocab)
    model = EnumeratedModel(states, probs, vocab)
    inner = FirstHittingSampler(MaskedDiffusion(LogLinear(0.0), vocab))
    n = 6000
    out = SemiAutoregressiveSampler(inner, window=window, stride=1).sample(model, torch.full((n, total), vocab), seeds(n))
    x = out.tokens
    assert not (x == vocab).any()
    assert chi_square(np.bincount(x[:, 4].numpy(), minlength=vocab), pi) < CHI2_999[2]
    pairs = np.bincount((x[:, 3] * vocab + x[:, 4]).numpy(), minlength=vocab * vocab)
    assert chi_square(pairs, (pi[:, None] * transition).reshape(-1)) < CHI2_999[8]
    # the last position depends on the first only through the chain: P(x4 | x0) = (P^4)[x0]
    p4 = torch.linalg.matrix_power(transition, 4)
    first = x[:, 0] == 0
    assert chi_square(np.bincount(x[first, 4].numpy(), minlength=vocab), p4[0]) < CHI2_999[2]


def test_semi_autoregressive_stops_at_eos_and_pads_the_rest():
    eos, pad, mask = 1, 2, 3
    states = torch.tensor([[0, 1, 0], [0, 0, 0]])
    model = EnumeratedModel(states, torch.tensor([0.5, 0.5]), 3)
    inner = AncestralSampler(MaskedDiffusion(LogLinear(0.0), mask), steps=8)
    sampler = SemiAutoregressiveSampler(inner, window=3, stride=2, eos_id=eos, pad_id=pad)
    out = sampler.sample(model, torch.full((200, 9), mask), seeds(200)).tokens
    for row in out.tolist():
        if eos in row:
            first = row.index(eos)
            assert all(t == pad for t in row[first + 1:])
        assert mask not in row
    assert any(eos in row for row in out.tolist()) and any(eos not in row for row in out.tolist())


def test_autoregressive_sampler_draws_the_exact_joint():
    states, probs = random_joint(JOINT_L, JOINT_V)
    model = EnumeratedModel(states, probs, JOINT_V, causal=True)
    n = 6000
    sampler = AutoregressiveSampler(bos_id=JOINT_V, mask_id=JOINT_V, kv_cache=False)
    out = sampler.sample(model, torch.full((n, JOINT_L), JOINT_V), seeds(n))
    assert out.nfe == JOINT_L
    assert chi_square(joint_counts(out.tokens, JOINT_V), probs) < CHI2_999[26]


def test_kv_cache_matches_full_recomputation():
    model = tiny_dit(causal=True, seed=4)
    ids = torch.randint(0, V_TOKENS, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(3)
        parts = [model(ids[:, :7], cache=cache), model(ids[:, 7:8], cache=cache), model(ids[:, 8:20], cache=cache)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    canvas = torch.full((3, 20), MASK)
    canvas[1, :4] = 2
    with_cache = AutoregressiveSampler(MASK, MASK).sample(model, canvas, seeds(3))
    without = AutoregressiveSampler(MASK, MASK, kv_cache=False).sample(model, canvas, seeds(3))
    assert torch.equal(with_cache.tokens, without.tokens)
    with pytest.raises(ValueError, match="causal"):
        tiny_dit()(ids, cache=cache)


# ----------------------------------------------------------------------------- confidence decoding

def test_reveal_schedules():
    total = torch.tensor([10, 7, 0])
    assert reveal_schedule("linear", total, 1, 5).tolist() == [8, 5, 0]
    assert reveal_schedule("cosine", total, 1, 4).tolist() == [9, 6, 0]
    assert reveal_schedule("linear", total, 5, 5).tolist() == [0, 0, 0]


@pytest.mark.parametrize("score", ["confidence", "margin", "entropy", "random"])
def test_confidence_sampler_reveals_on_schedule_and_keeps_fixed_tokens(score):
    model, diffusion, _ = joint_problem()
    states, probs = random_joint(6, 3, seed=3)
    model = EnumeratedModel(states, probs, 3)
    canvas = torch.full((5, 6), 3)
    canvas[2, 1] = 0
    sampler = ConfidenceSampler(diffusion, steps=3, score=score, reveal="linear")
    out = sampler.sample(model, canvas, seeds(5))
    assert not (out.tokens == 3).any() and out.tokens[2, 1] == 0
    assert out.row_nfe.tolist() == [3, 3, 3, 3, 3]


def test_greedy_confidence_decoding_reveals_the_most_confident_position_first():
    """Given nothing, position 0 is certain (p=1), position 1 is 2 with p=.8, position 2 is even:
    greedy decoding one token per step reveals 0, then position 1 = 2, then position 2 = its argmax
    given that (1, p=.625)."""
    states = torch.tensor([[0, 1, 2], [0, 2, 1], [0, 2, 2]])
    seen = []

    class Spy(EnumeratedModel):
        def forward(self, ids, sigma=None, positions=None, cache=None):
            seen.append(ids.clone())
            return super().forward(ids, sigma, positions)

    spy = Spy(states, torch.tensor([0.2, 0.5, 0.3]), 3)
    diffusion = MaskedDiffusion(LogLinear(0.0), 3)
    out = ConfidenceSampler(diffusion, steps=3, temperature=0).sample(spy, torch.full((1, 3), 3), seeds(1))
    assert [s.tolist() for s in seen] == [[[3, 3, 3]], [[0, 3, 3]], [[0, 2, 3]]]
    assert out.tokens.tolist() == [[0, 2, 1]]


def test_remasking_revises_generated_tokens_but_never_fixed_ones():
    states, probs = random_joint(6, 3, seed=4)
    seen = []

    class Spy(EnumeratedModel):
        def forward(self, ids, sigma=None, positions=None, cache=None):
            seen.append(ids.clone())
            return super().forward(ids, sigma, positions)

    canvas = torch.full((50, 6), 3)
    canvas[:, 0] = 1
    diffusion = MaskedDiffusion(LogLinear(0.0), 3)
    out = ConfidenceSampler(diffusion, steps=6, remask=0.5).sample(Spy(states, probs, 3), canvas, seeds(50))
    assert torch.all(out.tokens[:, 0] == 1) and not (out.tokens == 3).any()
    assert all(torch.all(x[:, 0] == 1) for x in seen)
    # some position that was revealed in one step is masked again in the next
    assert any(bool(((a != 3) & (b == 3)).any()) for a, b in zip(seen, seen[1:]) if a.shape == b.shape)
    plain = ConfidenceSampler(diffusion, steps=6).sample(Spy(states, probs, 3), canvas, seeds(50))
    assert not (plain.tokens == 3).any()


# ----------------------------------------------------------------------------- batch invariance, canvases

def sampler_zoo(diffusion):
    return {
        "ancestral": AncestralSampler(diffusion, steps=16, cache=False),
        "cached": AncestralSampler(diffusion, steps=16),
        "first_hitting": FirstHittingSampler(diffusion),
        "parallel_first_hitting": FirstHittingSampler(diffusion, tokens_per_step=3),
        "confidence": ConfidenceSampler(diffusion, steps=5, score="margin"),
        "semi_ar": SemiAutoregressiveSampler(FirstHittingSampler(diffusion), window=8, stride=4),
        "float32": AncestralSampler(diffusion, steps=16, precision="float32"),
    }


def test_fixed_tokens_are_kept_and_infills_have_exactly_their_length():
    tok = CharTokenizer("abcdefgh ")
    ids = encode_template(tok, "ab[MASK*3]cd[MASK]e")
    assert ids == [0, 1, tok.mask_id, tok.mask_id, tok.mask_id, 2, 3, tok.mask_id, 4]
    model = tiny_dit(vocab=tok.vocab_size, seed=8)
    diffusion = MaskedDiffusion(Cosine(0.0), tok.mask_id)
    canvas = make_canvas(tok, [ids, ids[:4]], length=12)
    for name, sampler in sampler_zoo(diffusion).items():
        out = sampler.sample(model, canvas, seeds(2)).tokens
        given = canvas != tok.mask_id
        assert torch.equal(out[given], canvas[given]), name
        assert not (out == tok.mask_id).any(), name
        assert out.max() < tok.vocab_size
    text = tok.decode(out[0, :9])
    assert text.startswith("ab") and text[5:7] == "cd" and text[8] == "e" and len(text) == 9


def test_bad_requests_are_clear_errors():
    diffusion = MaskedDiffusion(LogLinear(0.0), MASK)
    model = tiny_dit()
    with pytest.raises(SamplingError, match="steps must be >= 1"):
        AncestralSampler(diffusion, steps=0)
    with pytest.raises(SamplingError, match="top_p"):
        AncestralSampler(diffusion, steps=4, top_p=1.5)
    with pytest.raises(SamplingError, match="top_p"):
        ConfidenceSampler(diffusion, steps=4, top_p=0.0)
    with pytest.raises(SamplingError, match="larger than the canvas"):
        FirstHittingSampler(diffusion, tokens_per_step=9).sample(model, torch.full((1, 8), MASK), seeds(1))
    tok = CharTokenizer("abc")
    with pytest.raises(SamplingError, match="does not fit"):
        make_canvas(tok, [[0, 1, 2, 0]], length=3)
    with pytest.raises(SamplingError, match="nothing to generate"):
        make_canvas(tok, [[0, 1, 2]], length=3)
    with pytest.raises(SamplingError, match="empty"):
        make_canvas(tok, [], length=3)
    with pytest.raises(SamplingError, match="non-empty"):
        AncestralSampler(diffusion, steps=2).sample(model, torch.zeros((0, 4), dtype=torch.long), seeds(0))
    from unmask.data.tokenization import ByteTokenizer

    class WithMaskText(ByteTokenizer):
        def encode(self, text, offset=0):
            return torch.tensor([self.mask_id, 1]).numpy()

    with pytest.raises(SamplingError, match="mask token itself"):
        encode_template(WithMaskText(), "x")


def test_generate_from_config_counts_generated_tokens_only():
    tok = CharTokenizer("abcdefgh ")
    model = tiny_dit(vocab=tok.vocab_size, seed=9)
    diffusion = MaskedDiffusion(LogLinear(0.0), tok.mask_id)
    cfg = SampleConfig(sampler="first_hitting", num_samples=3, batch_size=2, seed=5)
    gen = generate_rows(model, diffusion, tok, cfg, length=10, model_length=40, prompts=["abc", "a"])
    assert len(gen.texts) == 6 and gen.generated == 3 * 7 + 3 * 9
    assert all(t.startswith("abc") for t in gen.texts[:3]) and gen.row_nfe[:3] == [7, 7, 7]
    again = generate_rows(model, diffusion, tok, SampleConfig(sampler="first_hitting", num_samples=3, batch_size=6,
                                                          seed=5), length=10, model_length=40, prompts=["abc", "a"])
    assert again.texts == gen.texts  # batch size does not change the samples
    long_cfg = SampleConfig(sampler="ancestral", steps=8, window=16, stride=8, num_samples=2)
    long = generate_rows(model, diffusion, tok, long_cfg, length=50, model_length=40)
    assert all(len(ids) == 50 for ids in long.ids) and tok.mask_id not in sum(long.ids, [])
    with pytest.raises(SamplingError, match="window"):
        generate_rows(model, diffusion, tok, SampleConfig(), length=50, model_length=40)
    with pytest.raises(SamplingError, match="for autoregressive language models"):
        make_sampler(SampleConfig(sampler="ar"), diffusion, tok, 40)


def test_float32_ancestral_sampling_lowers_entropy_and_float64_does_not():
    """Zheng et al. 2024, section 5: at step i of T the ancestral race compares a token of
    probability p (weight p/i) with staying masked (weight (i-1)/i). With float32 uniforms a token
    with p/i below ~6e-8 can never win, so positions that unmask early cannot take rare tokens.
    Target: one token of probability 0.95 and 500 of 1e-4 each (mass 0.05), T = 6000 steps: the
    float32 race reaches the rare tokens only below step ~1700. Deterministic seeds."""
    rare, steps, n = 500, 6000, 300
    probs = torch.tensor([[0.95] + [0.05 / rare] * rare])
    model = FactorizedModel(probs)
    diffusion = MaskedDiffusion(LogLinear(0.0), rare + 1)
    canvas = torch.full((n, 1), rare + 1)
    exact = AncestralSampler(diffusion, steps, precision="float64").sample(model, canvas, seeds(n))
    truncated = AncestralSampler(diffusion, steps, precision="float32").sample(model, canvas, seeds(n))
    exact_rare = int((exact.tokens > 0).sum())
    truncated_rare = int((truncated.tokens > 0).sum())
    assert chi_square([n - exact_rare, exact_rare], [0.95, 0.05]) < CHI2_999[1]
    assert truncated_rare < 0.4 * 0.05 * n  # without truncation this fails with probability > 0.99

    def entropy(tokens):
        counts = np.bincount(tokens.reshape(-1).numpy(), minlength=rare + 1) / tokens.numel()
        return -(counts[counts > 0] * np.log(counts[counts > 0])).sum()

    assert entropy(truncated.tokens) < 0.5 * entropy(exact.tokens)


# ----------------------------------------------------------------------------- guidance and streaming

def test_guided_sampling_draws_the_tilted_conditional():
    """SMDM eq. 7 on an exact denoiser: with fixed tokens x_0 = c and x_2 = 0 (both the prompt) and one
    masked position, first-hitting draws x_1 from p(x_1 | c, 0)^{1+w} / p(x_1)^w, normalized (chi-square)."""
    model, diffusion, probs = joint_problem()
    table = probs.reshape([JOINT_V] * JOINT_L)
    c, n, w = 1, 6000, 1.5
    canvas = torch.full((n, JOINT_L), JOINT_V)
    canvas[:, 0] = c
    canvas[:, 2] = 0
    conditional = table[c, :, 0] / table[c, :, 0].sum()
    unconditional = table.sum(dim=(0, 2))
    tilted = conditional ** (1 + w) / unconditional ** w
    tilted = tilted / tilted.sum()
    out = FirstHittingSampler(diffusion, guidance=w).sample(model, canvas, seeds(n))
    counts = np.bincount(out.tokens[:, 1].numpy(), minlength=JOINT_V)
    assert chi_square(counts, tilted) < CHI2_999[2]
    assert chi_square(counts, conditional) > 50  # and the tilt is visible


class RecordingModel(torch.nn.Module):
    """Wraps a model and records the canvases it is called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.inputs = inner, []
        self.time_conditioning, self.soft_mask = False, None  # the denoiser interface of a binary DiT

    def forward(self, ids, sigma=None, positions=None, **kw):
        self.inputs.append(ids.clone())
        return self.inner(ids, sigma, positions=positions, **kw)


def test_unconditional_branch_masks_exactly_the_prompt_and_combines_the_logits():
    from unmask.samplers.denoiser import Denoiser
    from unmask.samplers.engine import DecodingEngine

    model = RecordingModel(tiny_dit(seed=3))
    diffusion = MaskedDiffusion(LogLinear(0.0), MASK)
    canvas = torch.full((2, 8), MASK)
    canvas[0, :3] = torch.tensor([1, 2, 3])  # row 0: a prompt; row 1: none
    x = canvas.clone()
    x[0, 5] = 4  # a token generated earlier is not part of the prompt
    x[1, 2] = 0
    positions = x == MASK
    w = 0.7
    engine = DecodingEngine(model)
    half = torch.full((2,), 0.5, dtype=torch.float64)
    guided = engine.denoise([Denoiser(model, diffusion, canvas, guidance=w)(x, half, positions, torch.arange(2))])[0]
    conditional_in, unconditional_in = model.inputs
    assert torch.equal(conditional_in[:2], x)
    expected = x.clone()
    expected[0, :3] = MASK
    assert torch.equal(unconditional_in[:2], expected)
    with torch.no_grad():
        l_c = model.inner(x)[positions].float()
        l_u = model.inner(expected)[positions].float()
    rows = positions.nonzero()[:, 0]
    manual = torch.where((rows == 0)[:, None], l_u + (1 + w) * (l_c - l_u), l_c)
    assert torch.allclose(guided, manual, atol=1e-5)
    model.inputs.clear()  # with w = 0 the unconditional pass does not run at all
    plain = engine.denoise([Denoiser(model, diffusion, canvas)(x, half, positions, torch.arange(2))])[0]
    assert len(model.inputs) == 1 and torch.equal(plain, l_c)


def test_linear_guidance_schedule_fades_with_time():
    from unmask.samplers.denoiser import guidance_weight

    t = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    assert guidance_weight(2.0, "linear", t).tolist() == [2.0, 1.0, 0.0]
    assert guidance_weight(2.0, "constant", t).tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(SamplingError, match="guidance schedule"):
        AncestralSampler(MaskedDiffusion(LogLinear(0.0), MASK), steps=4, guidance_schedule="cubic")


@pytest.mark.parametrize("name", list(sampler_zoo(MaskedDiffusion(LogLinear(0.0), MASK))))
def test_guidance_zero_is_the_plain_sampler_and_guided_rows_stay_batch_invariant(name):
    model = tiny_dit(seed=7)
    diffusion = MaskedDiffusion(LogLinear(0.0), MASK)
    canvas = torch.full((5, 12), MASK)
    canvas[1, :5] = 2
    canvas[3, 8:] = 1
    canvas[4, :2] = 3
    all_seeds = seeds(5, 3)
    plain = sampler_zoo(diffusion)[name]
    zero = sampler_zoo(diffusion)[name]
    guided = sampler_zoo(diffusion)[name]
    for s, w in ((zero, 0.0), (guided, 2.0)):
        target = getattr(s, "inner", s)
        target.guidance = w
    reference = plain.sample(model, canvas, all_seeds)
    same = zero.sample(model, canvas, all_seeds)
    assert torch.equal(same.tokens, reference.tokens) and same.nfe == reference.nfe
    out = guided.sample(model, canvas, all_seeds).tokens
    if name != "semi_ar":  # (in later semi-AR windows the earlier rounds are the condition)
        assert torch.equal(out[[0, 2]], reference.tokens[[0, 2]])  # rows without a prompt: no guidance
    assert not torch.equal(out[[1, 3, 4]], reference.tokens[[1, 3, 4]])
    alone = guided.sample(model, canvas[3:4], all_seeds[3:4]).tokens
    assert torch.equal(alone[0], out[3])


@pytest.mark.parametrize("name", list(sampler_zoo(MaskedDiffusion(LogLinear(0.0), MASK))))
def test_step_callback_streams_every_step_and_ends_at_the_result(name):
    model = tiny_dit(seed=7)
    sampler = sampler_zoo(MaskedDiffusion(LogLinear(0.0), MASK))[name]
    canvas = torch.full((3, 12), MASK)
    canvas[1, :4] = 2
    frames = []
    result = sampler.sample(model, canvas, seeds(3, 5), on_step=lambda x: frames.append(x.clone()))
    assert len(frames) >= 2 and all(f.shape == canvas.shape for f in frames)
    assert torch.equal(frames[-1], result.tokens)
    fixed = canvas != MASK
    assert all(torch.equal(f[fixed], canvas[fixed]) for f in frames)
    if name != "semi_ar":
        masks = [int((f == MASK).sum()) for f in frames]
        assert masks == sorted(masks, reverse=True) and masks[0] < int((canvas == MASK).sum())


def test_ar_sampler_streams_and_refuses_guidance():
    tok = CharTokenizer("abcd")
    model = tiny_dit(vocab=tok.vocab_size, causal=True, seed=2)
    frames = []
    out = AutoregressiveSampler(tok.bos_id, tok.mask_id).sample(model, torch.full((2, 5), tok.mask_id), seeds(2),
                                                                 on_step=lambda x: frames.append(x.clone()))
    assert len(frames) == 5 and torch.equal(frames[-1], out.tokens)
    assert [int((f == tok.mask_id).sum()) for f in frames] == [8, 6, 4, 2, 0]
    with pytest.raises(SamplingError, match="guidance"):
        make_sampler(SampleConfig(sampler="ar", guidance=1.0), Autoregressive(tok.bos_id, tok.mask_id), tok, 40)


def test_confidence_scores_in_closed_form():
    """The one place every sampler's scores come from: p(draw), top-1 minus top-2, sum p log(p + 1e-10)
    (Dream's negative entropy), or given random keys."""
    probs = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]], dtype=torch.float64)
    draws = torch.tensor([1, 0])
    assert torch.allclose(confidence_scores(probs, draws, "confidence"), torch.tensor([0.3, 1.0], dtype=torch.float64))
    assert torch.allclose(confidence_scores(probs, draws, "margin"), torch.tensor([0.2, 1.0], dtype=torch.float64))
    negative_entropy = 0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)
    assert torch.allclose(confidence_scores(probs, draws, "entropy"), torch.tensor([negative_entropy, 0.0],
                                                                                   dtype=torch.float64), atol=1e-9)
    keys = torch.tensor([0.7, 0.1], dtype=torch.float64)
    assert confidence_scores(probs, draws, "random", keys) is keys
    for score, given in (("random", None), ("bogus", keys)):
        with pytest.raises(SamplingError):
            confidence_scores(probs, draws, score, given)


def test_top_index_is_argmax_with_ties_infinities_and_nan():
    """The samplers' greedy and Gumbel-max choices use ``max(-1).indices`` (about 3x faster than argmax over a
    vocabulary): the same first index of the largest entry, ties, -inf and NaN included."""
    g = torch.Generator().manual_seed(0)
    for v in (2, 37, 32000):
        x = torch.randint(0, 3, (9, v), generator=g).double()
        x[0] = 0.0  # a row of ties
        x[1, : v // 2] = float("-inf")
        x[2, v - 1] = float("nan")
        for values in (x, x.float()):
            assert torch.equal(top_index(values), values.argmax(-1))
