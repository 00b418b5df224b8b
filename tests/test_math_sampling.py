"""Sampling: the float64 categorical primitive (statistical tests), truncation, and the ancestral and
autoregressive samplers on a factorized target."""

import numpy as np
import pytest
import torch

from unmask.diffusion import MaskedDiffusion
from unmask.sampling import (AncestralSampler, AutoregressiveSampler, categorical_probs, make_canvas,
                             sample_categorical)
from unmask.schedules import Cosine, LogLinear
from unmask.tokenization import CharTokenizer

from toys import LENGTH, MASK, V_TOKENS, FactorizedModel, factorized_problem, tiny_dit

# chi-square 99.9% quantiles for the degrees of freedom used below
CHI2_999 = {4: 18.47, 5: 20.52, 7: 24.32}


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_categorical_draws_follow_the_weights(precision):
    weights = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.04, 0.01], dtype=torch.float64) * 3.0  # unnormalised
    n = 60_000
    draws = sample_categorical(weights.expand(n, -1), torch.Generator().manual_seed(0), precision)
    counts = np.bincount(draws.numpy(), minlength=6)
    assert chi_square(counts, (weights / weights.sum()).numpy()) < CHI2_999[5]


def test_categorical_never_draws_zero_weight_and_is_seeded():
    weights = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0]], dtype=torch.float64).expand(20_000, -1)
    a = sample_categorical(weights, torch.Generator().manual_seed(1))
    assert set(a.unique().tolist()) == {1, 3}
    assert torch.equal(a, sample_categorical(weights, torch.Generator().manual_seed(1)))


def test_float64_primitive_resolves_tiny_probabilities():
    """A category of probability 1e-6 appears at its rate (float64 inverse CDF)."""
    p = torch.tensor([1 - 1e-6, 1e-6], dtype=torch.float64)
    n = 4_000_000
    hits = int((sample_categorical(p.expand(n, -1), torch.Generator().manual_seed(2)) == 1).sum())
    assert abs(hits - 4) <= 4 * 2 + 1  # Poisson(4): well inside 4 sd


def test_temperature_top_k_top_p():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]]))
    assert torch.allclose(categorical_probs(logits), torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]], dtype=torch.float64))
    hot = categorical_probs(logits, temperature=2.0)
    ref = torch.softmax(logits.double() / 2, -1)
    assert torch.allclose(hot, ref)
    k2 = categorical_probs(logits, top_k=2)
    assert torch.allclose(k2, torch.tensor([[4 / 7, 3 / 7, 0, 0, 0]], dtype=torch.float64))
    # top-p 0.75: 0.4 + 0.3 = 0.7 < 0.75, so the third token is needed
    p75 = categorical_probs(logits, top_p=0.75)
    assert torch.allclose(p75, torch.tensor([[4 / 9, 3 / 9, 2 / 9, 0, 0]], dtype=torch.float64))
    p70 = categorical_probs(logits, top_p=0.7)
    assert torch.allclose(p70, torch.tensor([[4 / 7, 3 / 7, 0, 0, 0]], dtype=torch.float64))
    excluded = categorical_probs(logits, exclude=0)
    assert excluded[0, 0] == 0 and torch.isclose(excluded.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("schedule,steps", [(LogLinear(0.0), 16), (Cosine(0.0), 5), (LogLinear(0.0), 1)])
def test_ancestral_sampler_draws_the_factorized_marginals(schedule, steps):
    probs, _, _ = factorized_problem()
    sampler = AncestralSampler(MaskedDiffusion(schedule, MASK), steps=steps)
    canvas = torch.full((4000, LENGTH), MASK)
    out = sampler.sample(FactorizedModel(probs), canvas, torch.Generator().manual_seed(3))
    assert not (out.tokens == MASK).any()
    assert out.nfe <= steps and out.generated == canvas.numel()
    for pos in (0, 3, LENGTH - 1):
        counts = np.bincount(out.tokens[:, pos].numpy(), minlength=V_TOKENS)
        assert chi_square(counts, probs[pos].numpy()) < CHI2_999[4]


def test_ancestral_unmasking_follows_the_schedule():
    """After the first of T steps, a position is unmasked with probability alpha(1-1/T)."""
    probs, _, _ = factorized_problem()
    schedule = Cosine(0.0)
    unmask, stay = AncestralSampler.transition(schedule, 1.0, 0.75)
    alpha_s = float(schedule.alpha(torch.tensor(0.75, dtype=torch.float64)))
    assert unmask == pytest.approx(alpha_s) and stay == pytest.approx(1 - alpha_s)
    sampler = AncestralSampler(MaskedDiffusion(schedule, MASK), steps=4)

    class Captured(Exception):
        pass

    class OneStep(FactorizedModel):
        calls = 0

        def forward(self, ids, sigma=None, positions=None):
            OneStep.calls += 1
            if OneStep.calls > 1:
                raise Captured(ids.clone())
            return super().forward(ids, sigma, positions)

    with pytest.raises(Captured) as caught:
        sampler.sample(OneStep(probs), torch.full((2000, LENGTH), MASK), torch.Generator().manual_seed(4))
    x = caught.value.args[0]
    rate = float((x != MASK).double().mean())
    assert abs(rate - alpha_s) < 4 * np.sqrt(alpha_s * (1 - alpha_s) / x.numel())


def test_given_tokens_are_never_overwritten_and_rows_are_independent_of_batch():
    model = tiny_dit(seed=3)
    sampler = AncestralSampler(MaskedDiffusion(LogLinear(0.0), MASK), steps=8)
    canvas = torch.full((3, 20), MASK)
    canvas[0, :5] = torch.tensor([1, 2, 3, 4, 0])  # prefix
    canvas[1, -4:] = 2  # suffix
    canvas[2, 6:9] = 1  # a span in the middle
    out = sampler.sample(model, canvas, torch.Generator().manual_seed(5)).tokens
    given = canvas != MASK
    assert torch.equal(out[given], canvas[given])
    assert not (out == MASK).any()
    assert out.max() < V_TOKENS


def test_autoregressive_sampler_draws_the_model_distribution():
    """A causal model that ignores its inputs is a factorized distribution: check the marginals."""
    probs, _, _ = factorized_problem()
    sampler = AutoregressiveSampler(bos_id=MASK, mask_id=MASK)

    class Causal(FactorizedModel):
        def forward(self, ids, sigma=None, positions=None):
            return self.logits[: ids.shape[1]].expand(ids.shape[0], -1, -1)

    out = sampler.sample(Causal(probs), torch.full((4000, LENGTH), MASK), torch.Generator().manual_seed(6))
    assert out.nfe == LENGTH and not (out.tokens == MASK).any()
    for pos in (0, LENGTH - 1):
        counts = np.bincount(out.tokens[:, pos].numpy(), minlength=V_TOKENS)
        assert chi_square(counts, probs[pos].numpy()) < CHI2_999[4]


def test_make_canvas():
    tok = CharTokenizer("abc")
    c = make_canvas(tok, 2, 6, prompt="ab", bos=True)
    assert c.tolist()[0] == [tok.bos_id, 0, 1, tok.mask_id, tok.mask_id, tok.mask_id]
    with pytest.raises(ValueError, match="nothing to generate"):
        make_canvas(tok, 1, 3, prompt="abc")
