"""The MDLM objective against closed forms: factorized data (NELBO of the optimal denoiser = true
NLL), SUBS invariants, forward-process statistics, antithetic times, discrete -> continuous."""

import math

import numpy as np
import pytest
import torch

from unmask.config import DataConfig
from unmask.data.tokenization import CharTokenizer
from unmask.eval.likelihood import likelihood_of_rows
from unmask.objectives import base
from unmask.objectives.ar import Autoregressive
from unmask.objectives.base import (
    IGNORED,
    Noise,
    SoftmaxCrossEntropy,
    draw_noise,
    masked_cross_entropy,
    stratified_uniform,
)
from unmask.objectives.mdlm import MaskedDiffusion, subs_log_probs
from unmask.objectives.schedules import Cosine, Geometric, LogLinear

from toys import (
    LENGTH,
    MASK,
    V_TOKENS,
    ArrayRows,
    FactorizedModel,
    factorized_problem,
    tiny_dit,
)


def run_eval(model, objective, rows, k, seed=0, tokenizer=None):
    tok = tokenizer or CharTokenizer("abcde")
    return likelihood_of_rows(model, objective, rows, DataConfig(), tok, mc_samples=k, batch_size=64, seed=seed)


@pytest.mark.parametrize("schedule,t_min,steps", [
    (LogLinear(0.0), 1e-3, 0), (LogLinear(0.0), 0.05, 0), (Cosine(0.0), 1e-3, 0), (Cosine(0.0), 0.1, 0),
    (LogLinear(0.0), 1e-3, 10), (Cosine(0.0), 1e-3, 3),
])
def test_optimal_denoiser_nelbo_equals_true_nll_for_factorized_data(schedule, t_min, steps):
    """For factorized data E_t[w(t) (1 - alpha_t)] integrates to alpha(0) - alpha(1) = 1, so the
    evaluation bound of the optimal denoiser is the exact NLL, for any schedule ending at 0, any
    t_min (reconstruction term included) and any number of discrete steps."""
    probs, x, true_nll = factorized_problem()
    objective = MaskedDiffusion(schedule, MASK, t_min=t_min, discrete_steps=steps)
    r = run_eval(FactorizedModel(probs), objective, ArrayRows(x), k=16)
    assert r["stderr"] < 0.05 * true_nll  # the test has power
    assert abs(r["nll"] - true_nll) < 4 * r["stderr"], (r["nll"], true_nll, r["stderr"])


def test_a_wrong_model_is_not_within_error_of_the_true_nll():
    """Power check for the test above: a slightly wrong denoiser is detected (and bounds above)."""
    probs, x, true_nll = factorized_problem()
    wrong = torch.softmax(probs.log() + 1.0 * torch.randn(probs.shape, generator=torch.Generator().manual_seed(5)), -1)
    r = run_eval(FactorizedModel(wrong), MaskedDiffusion(LogLinear(0.0), MASK), ArrayRows(x), k=16)
    assert r["nll"] - true_nll > 4 * r["stderr"]


def test_training_estimator_omits_the_region_below_t_min():
    """MDLM's training draw t in [t_min, 1] integrates E[w(t)(1-alpha)] to (alpha(t_min)-alpha(1))/(1-t_min)
    = 1 for loglinear, without the reconstruction term: it matches the exact estimator's mean."""
    probs, x, true_nll = factorized_problem(n=200)
    objective = MaskedDiffusion(LogLinear(0.0), MASK, t_min=0.2)
    model = FactorizedModel(probs)
    x0 = torch.from_numpy(x).repeat(8, 1)
    counted = torch.ones_like(x0, dtype=torch.bool)
    noise = draw_noise(x0.shape[0], LENGTH, torch.Generator().manual_seed(1))
    train_mean = float(objective.loss(model, x0, counted, noise, exact=False).sum()) / x0.numel()
    # with t ~ U[0.2, 1] and weight 1/t: E = integral_0.2^1 (1/t) t dt / 0.8 = 1 -> unbiased here too
    assert train_mean == pytest.approx(true_nll, rel=0.05)


def test_stderr_matches_the_spread_of_repeated_estimates():
    probs, x, _ = factorized_problem(n=100)
    objective = MaskedDiffusion(LogLinear(0.0), MASK)
    runs = [run_eval(FactorizedModel(probs), objective, ArrayRows(x), k=4, seed=s) for s in range(12)]
    spread = float(np.std([r["nll"] for r in runs], ddof=1))
    reported = float(np.mean([r["stderr"] for r in runs]))
    assert 0.5 < spread / reported < 2.0


def test_stratified_uniform_covers_unit_interval_evenly():
    n = 64
    u = stratified_uniform(n, torch.Generator().manual_seed(0))
    strata = torch.floor(u * n)
    assert torch.equal(strata, torch.arange(n, dtype=torch.float64))
    plain = stratified_uniform(n, torch.Generator().manual_seed(0), antithetic=False)
    assert not torch.equal(torch.floor(plain * n), torch.arange(n, dtype=torch.float64))
    # low discrepancy: the batch mean is much closer to 1/2 than for iid draws
    means = torch.stack([stratified_uniform(n, torch.Generator().manual_seed(s)).mean() for s in range(200)])
    assert float(means.std()) < 0.2 * math.sqrt(1 / 12 / n)


def test_forward_process_masks_at_rate_one_minus_alpha_and_spares_uncounted():
    objective = MaskedDiffusion(Cosine(0.0), MASK)
    x0 = torch.randint(0, V_TOKENS, (4, 50_000), generator=torch.Generator().manual_seed(0))
    counted = torch.ones_like(x0, dtype=torch.bool)
    counted[:, :100] = False
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    xt = objective.mask(x0, t, torch.rand(x0.shape, generator=torch.Generator().manual_seed(1)), counted)
    rate = (xt[:, 100:] == MASK).double().mean(dim=1)
    expected = 1 - Cosine(0.0).alpha(t)
    assert torch.all((rate - expected).abs() < 4 * torch.sqrt(expected * (1 - expected) / 49_900))
    assert not (xt[:, :100] == MASK).any()
    unmasked = xt != MASK
    assert torch.equal(xt[unmasked], x0[unmasked])


def test_subs_parameterization_invariants():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, V_TOKENS + 1, generator=g)
    xt = torch.randint(0, V_TOKENS + 1, (3, 10), generator=g)
    xt[0, :3] = MASK
    logp = subs_log_probs(logits, xt, MASK)
    probs = logp.exp()
    assert torch.allclose(probs.sum(-1), torch.ones(3, 10))
    assert torch.all(probs[..., MASK] == 0)  # never predicts the mask
    unmasked = xt != MASK
    assert torch.all(probs[unmasked].gather(-1, xt[unmasked][:, None]) == 1)  # carry-over
    masked = ~unmasked
    reference = torch.log_softmax(logits[..., :MASK], -1)
    assert torch.allclose(logp[masked][:, :MASK], reference[masked], atol=1e-6)
    targets = torch.randint(0, V_TOKENS, (int(masked.sum()),), generator=g)
    ce = masked_cross_entropy(logits[masked], targets, MASK)
    assert torch.allclose(ce, -logp[masked].gather(-1, targets[:, None])[:, 0], atol=1e-6)


def test_masked_cross_entropy_scores_only_the_valid_rows_and_leaves_the_mask_column_without_gradient():
    g = torch.Generator().manual_seed(4)
    weights = torch.randn(5, V_TOKENS + 1, generator=g, requires_grad=True)
    logits = weights * 1.0  # a non-leaf, as a network's output
    targets = torch.randint(0, V_TOKENS, (5,), generator=g)
    ce = masked_cross_entropy(logits, targets, MASK, valid=3)
    reference = -torch.log_softmax(weights.detach()[:, :MASK], -1).gather(-1, targets[:, None])[:, 0]
    assert torch.allclose(ce[:3], reference[:3], atol=1e-6) and torch.all(ce[3:] == 0)
    ce.sum().backward()
    assert torch.all(weights.grad[3:] == 0) and torch.all(weights.grad[:, MASK] == 0)
    expected = torch.softmax(weights.detach()[:3, :MASK], -1) - torch.nn.functional.one_hot(targets[:3], MASK)
    assert torch.allclose(weights.grad[:3, :MASK], expected, atol=1e-6)


@pytest.mark.parametrize("chunk", [1 << 18, 7 * 33])  # one chunk; 7 rows per chunk, the last one short
def test_the_cpu_cross_entropy_equals_torch_in_value_and_gradient(monkeypatch, chunk):
    """SoftmaxCrossEntropy against F.cross_entropy in float64: per-row values and the gradient of a weighted
    sum, with ignored rows, a -inf column and extreme logits, chunked or not."""
    monkeypatch.setattr(base, "CROSS_ENTROPY_CHUNK", chunk)
    g = torch.Generator().manual_seed(5)
    weights = (torch.randn(30, 33, generator=g, dtype=torch.float64) * 20).requires_grad_()
    targets = torch.randint(0, 32, (30,), generator=g)
    targets[[2, 17, 29]] = IGNORED
    upstream = torch.rand(30, generator=g, dtype=torch.float64)
    grads = []
    for loss in (SoftmaxCrossEntropy.apply, lambda x, t: torch.nn.functional.cross_entropy(
            x, t, reduction="none", ignore_index=IGNORED)):
        logits = weights * 1.0
        logits.detach()[:, 32] = float("-inf")
        value = loss(logits, targets)
        (value * upstream).sum().backward()
        grads.append((value.detach(), weights.grad.clone()))
        weights.grad = None
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-12, atol=1e-12)
    assert torch.all(grads[0][0][[2, 17, 29]] == 0) and torch.all(grads[0][1][[2, 17, 29]] == 0)


def test_the_cpu_cross_entropy_refuses_a_second_backward():
    logits = torch.randn(4, 9, requires_grad=True)
    loss = SoftmaxCrossEntropy.apply(logits * 1.0, torch.tensor([0, 3, 8, 1])).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()


def test_mdlm_loss_equals_a_direct_computation():
    model = tiny_dit()
    objective = MaskedDiffusion(Geometric(1e-4, 20.0), MASK, t_min=1e-3)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, V_TOKENS, (6, 24), generator=g)
    counted = torch.rand(6, 24, generator=g) < 0.9
    noise = draw_noise(6, 24, g)
    with torch.no_grad():
        got = objective.loss(model, x0, counted, noise, exact=False)
        t = 1e-3 + (1 - 1e-3) * noise.time_u
        xt = torch.where((noise.mask_u < (1 - torch.exp(-Geometric(1e-4, 20.0).sigma(t))).float()[:, None]) & counted,
                         torch.full_like(x0, MASK), x0)
        logp = subs_log_probs(model(xt), xt, MASK)
        nll = -logp.gather(-1, x0[..., None])[..., 0] * (xt == MASK)
        w = Geometric(1e-4, 20.0).weight(t)
        expected = (nll.sum(1).double() * w).float()
    assert torch.allclose(got, expected, rtol=1e-5)


def test_discrete_time_loss_converges_to_continuous():
    """Common random numbers: one sequence, a fine grid of times, the same mask uniforms for every
    time (nested masks). The grid mean approximates each T's NELBO with the same quadrature, so the
    gap |L_T - L_inf| must shrink as T grows."""
    model = tiny_dit(seed=1)
    m, length = 2048, 32
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, V_TOKENS, (1, length), generator=g).repeat(m, 1)
    counted = torch.ones_like(x0, dtype=torch.bool)
    noise = Noise((torch.arange(m, dtype=torch.float64) + 0.5) / m,
                  torch.rand(1, length, generator=g).repeat(m, 1))

    def value(steps):
        objective = MaskedDiffusion(LogLinear(0.0), MASK, t_min=0.0, discrete_steps=steps)
        with torch.no_grad():
            return float(objective.loss(model, x0, counted, noise, exact=True).mean())

    continuous = value(0)
    gaps = [abs(value(steps) - continuous) / continuous for steps in (4, 16, 64, 256)]
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 0.02 and gaps[0] > 0.05


def test_autoregressive_loss_is_teacher_forced_nll_of_every_counted_token():
    model = tiny_dit(causal=True, seed=2)
    bos = V_TOKENS  # reuse the mask slot id as BOS for this check; excluded class is passed separately
    objective = Autoregressive(bos_id=bos, mask_id=MASK)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randint(0, V_TOKENS, (3, 12), generator=g)
    counted = torch.ones_like(x0, dtype=torch.bool)
    counted[1, -3:] = False
    with torch.no_grad():
        got = objective.loss(model, x0, counted)
        inputs = torch.cat([torch.full((3, 1), bos), x0[:, :-1]], 1)
        logits = model(inputs)
        logits[..., MASK] = float("-inf")
        nll = -torch.log_softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
        expected = (nll * counted).sum(1)
    assert torch.allclose(got, expected, rtol=1e-5)
    # causal: changing the last token does not change the loss of the others
    x1 = x0.clone()
    x1[:, -1] = (x1[:, -1] + 1) % V_TOKENS
    only_prefix = counted.clone()
    only_prefix[:, -1] = False
    with torch.no_grad():
        assert torch.allclose(objective.loss(model, x0, only_prefix), objective.loss(model, x1, only_prefix))


# --- uniform-noise diffusion (UDLM's bound) -----------------------------------------------------------------------

def _udlm_paper_form(p_theta, x0, zt, alpha, alpha_prime):
    """UDLM's continuous-time integrand as the paper writes it (Schiff et al. 2024, section 4), float64:
    alpha'/(N alpha) [N/xbar_i - N/xbar_theta_i - sum_j (xbar_j/xbar_i) log(xbar_theta_i xbar_j / (xbar_theta_j xbar_i))]."""
    n = p_theta.shape[-1]
    onehot = torch.nn.functional.one_hot(x0, n).double()
    xbar = n * alpha[:, None] * onehot + (1 - alpha[:, None])
    xbar_theta = n * alpha[:, None] * p_theta + (1 - alpha[:, None])
    i = zt[:, None]
    xi, xti = xbar.gather(1, i), xbar_theta.gather(1, i)
    inner = (xbar / xi * torch.log(xti * xbar / (xbar_theta * xi))).sum(1)
    return alpha_prime / (n * alpha) * (n / xi[:, 0] - n / xti[:, 0] - inner)


def test_the_uniform_noise_bound_matches_the_papers_form_and_its_closed_forms():
    from unmask.objectives.uniform import uniform_nelbo_integrand

    g = torch.Generator().manual_seed(0)
    n, count = 5, 400
    logits = torch.randn(count, n, generator=g, dtype=torch.float64) * 2
    x0, zt = torch.randint(0, n, (count,), generator=g), torch.randint(0, n, (count,), generator=g)
    alpha = torch.rand(count, generator=g, dtype=torch.float64) * 0.98 + 0.01
    ours = uniform_nelbo_integrand(logits.log_softmax(-1), x0, zt, alpha, -torch.ones(count, dtype=torch.float64))
    paper = _udlm_paper_form(logits.softmax(-1), x0, zt, alpha, -torch.ones(count, dtype=torch.float64))
    assert torch.allclose(ours, paper, rtol=1e-8, atol=1e-12) and bool((ours >= 0).all())
    # a model that knows the clean token pays nothing
    perfect = torch.nn.functional.one_hot(x0, n).double().clamp_min(1e-300).log()
    assert float(uniform_nelbo_integrand(perfect, x0, zt, alpha, -torch.ones(count, dtype=torch.float64)).abs().max()) < 1e-12
    # a uniform model: the bound is exact, log N (alpha = 1 - t; E over z_t enumerated, t by Gauss-Legendre on
    # geometric pieces of [0, 1]: the integrand has a log(1/t) singularity at 0)
    nodes, w = np.polynomial.legendre.leggauss(40)
    edges = [0.0] + [10.0 ** -k for k in range(16, -1, -1)]
    t = torch.tensor(np.concatenate([lo + (hi - lo) * (nodes + 1) / 2 for lo, hi in zip(edges, edges[1:])]))
    weights = np.concatenate([(hi - lo) * w for lo, hi in zip(edges, edges[1:])])
    total = 0.0
    for x in range(n):
        for z in range(n):
            a = 1 - t
            q = a * (z == x) + (1 - a) / n  # q_t(z | x)
            f = uniform_nelbo_integrand(torch.full((len(t), n), -math.log(n), dtype=torch.float64),
                                        torch.full((len(t),), x), torch.full((len(t),), z), a, -torch.ones_like(t))
            total += float((torch.tensor(weights / 2) * q * f).sum()) / n
    assert abs(total - math.log(n)) < 1e-9


def test_the_uniform_noise_bound_has_finite_gradients_at_the_ends_of_time():
    """t = 1 (alpha = 0: the integrand's limit 0) and t so small that alpha rounds to 1 in float32 give finite
    values and gradients (float32 model outputs, float64 times)."""
    from unmask.objectives.uniform import uniform_nelbo_integrand

    torch.manual_seed(0)
    logits = torch.randn(4, 7, requires_grad=True)
    x0, zt = torch.tensor([2, 2, 3, 3]), torch.tensor([2, 5, 3, 6])
    alpha = torch.tensor([0.0, 1 - 1e-9, 1 - 1e-12, 0.5], dtype=torch.float64)
    f = uniform_nelbo_integrand(logits.log_softmax(-1), x0, zt, alpha, -torch.ones(4, dtype=torch.float64))
    f.sum().backward()
    assert bool(torch.isfinite(f).all()) and bool(torch.isfinite(logits.grad).all())
    assert float(f[0]) == 0 and float(f[1]) > 1e6  # a rare corruption seen at t near 0 weighs ~ 1 / (1 - alpha)
