"""Soft-masking: lambda's closed form and where it vanishes, convex combinations of embedding rows,
gradients, the two-pass training recipe, continued pretraining, sampler feedback, and exact reduction
to the binary model when w_s = 0."""

import math

import pytest
import torch

from unmask.config import ConfigError, ModelConfig, load_config
from unmask.models.dit import DiT
from unmask.models.softmask import (
    OMEGA_A_INIT,
    OMEGA_B_INIT,
    OMEGA_S_INIT,
    SoftFeedback,
    SoftMask,
    entropy_without_mask,
)
from unmask.objectives.base import Noise, draw_noise
from unmask.objectives.mdlm import MaskedDiffusion
from unmask.objectives.schedules import LogLinear
from unmask.samplers.ancestral import AncestralSampler
from unmask.samplers.confidence import ConfidenceSampler
from unmask.samplers.denoiser import Denoiser
from unmask.samplers.engine import DecodingEngine
from unmask.samplers.first_hitting import FirstHittingSampler
from unmask.samplers.semi_ar import SemiAutoregressiveSampler

from toys import MASK, TINY, V_TOKENS, tiny_dit

V = V_TOKENS + 1


def canvas_and_logits(seed=0, b=3, length=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V_TOKENS, (b, length), generator=g)
    ids[torch.rand(b, length, generator=g) < 0.5] = MASK
    return ids, 3 * torch.randn(b, length, V, generator=g)


def full_feedback(ids, logits, k=3, dtype=torch.float32):
    """Feedback at every position of ``ids`` from dense logits (B, L, V)."""
    where = torch.ones_like(ids, dtype=torch.bool)
    feedback = SoftFeedback.from_logits(logits.reshape(-1, logits.shape[-1]), where, MASK, k)
    feedback.top_probs = feedback.top_probs.to(dtype)
    return feedback


def soft_dit(omega_s=None, seed=0, k=2, vocab=V):
    """``tiny_dit`` with a soft-mask module (same backbone weights as ``tiny_dit(seed=seed)``)."""
    binary = tiny_dit(vocab=vocab, seed=seed)
    model = DiT(ModelConfig(hidden=32, blocks=2, heads=2, cond_dim=16, dropout=0.0, length=64, soft_mask_top_k=k),
                vocab, mask_id=vocab - 1)
    state = dict(binary.state_dict())
    state.update({k_: v for k_, v in model.state_dict().items() if k_.startswith("soft_mask.")})
    model.load_state_dict(state)
    if omega_s is not None:
        with torch.no_grad():
            model.soft_mask.a.fill_(math.log(omega_s / (1 - omega_s)) if omega_s > 0 else -math.inf)
    return model.eval(), binary


def test_initial_parameters_follow_the_paper():
    w_s, w_a, w_b = (w.detach() for w in SoftMask().omegas)
    assert float(w_s) == pytest.approx(OMEGA_S_INIT) and float(w_a) == pytest.approx(OMEGA_A_INIT)
    assert float(w_b) == pytest.approx(OMEGA_B_INIT)
    with pytest.raises(ValueError):
        SoftMask(omega_b=0.5)
    with pytest.raises(ValueError):
        SoftMask(top_k=0)


def test_mixing_weight_closed_form():
    module = SoftMask(omega_s=0.6, omega_a=2.0, omega_b=-0.5)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 9.0], [5.0, 0.0, 0.0, 0.0, 0.0, -3.0]])
    entropy = entropy_without_mask(logits, MASK)
    lam = module.mixing_weight(entropy).detach()
    for row, h, value in zip(logits, entropy, lam):
        p = torch.softmax(row[:MASK].double(), 0)  # the mask class excluded, however large its logit
        expected_h = float(-(p * p.log()).sum())
        assert float(h) == pytest.approx(expected_h, rel=1e-5)
        assert float(value) == pytest.approx(0.6 / (1 + math.exp(-2.0 * (-expected_h + 0.5))), rel=1e-5)
    assert float(entropy[0]) == pytest.approx(math.log(5), rel=1e-6)
    assert lam[1] > lam[0]  # confident -> larger lambda


def test_feedback_keeps_entropy_and_renormalized_top_k():
    ids, logits = canvas_and_logits(seed=4)
    feedback = full_feedback(ids, logits, k=2)
    flat = logits.reshape(-1, V).double()
    flat[:, MASK] = -math.inf
    p = flat.softmax(-1)
    top_p, top_ids = p.topk(2, dim=-1)
    assert torch.equal(feedback.top_ids.reshape(-1, 2), top_ids)
    assert torch.allclose(feedback.top_probs.reshape(-1, 2).double(), top_p / top_p.sum(1, keepdim=True), atol=1e-6)
    assert not (feedback.top_ids == MASK).any()
    # storing new feedback for some rows replaces theirs and only theirs
    where = torch.zeros_like(ids, dtype=torch.bool)
    where[1, :3] = True
    before = feedback.entropy.clone()
    feedback.store(torch.tensor([1]), where[1:2], torch.zeros(3, V), MASK)
    assert torch.equal(feedback.valid[1], where[1]) and feedback.valid[[0, 2]].all()
    assert torch.allclose(feedback.entropy[1, :3], torch.full((3,), math.log(V_TOKENS)))
    assert torch.equal(feedback.entropy[[0, 2]], before[[0, 2]])


def test_lambda_vanishes_on_unmasked_positions_the_first_step_and_without_feedback():
    model = tiny_dit()
    table = model.vocab_embed.embedding.detach()
    ids, logits = canvas_and_logits()
    module = SoftMask(omega_s=0.9)
    feedback = full_feedback(ids, logits)
    out = module(table, ids, feedback, MASK)
    clean = ids != MASK
    assert torch.equal(out[clean], table[ids[clean]])
    assert torch.equal(module(table, ids, None, MASK), table[ids])  # first step: plain masks
    feedback.valid[0] = False  # a row without feedback keeps plain masks
    assert torch.equal(module(table, ids, feedback, MASK)[0], table[ids[0]])
    masked = ids == MASK
    assert (out[masked] - table[MASK]).abs().amax(-1).min() > 0  # and the others moved


def test_soft_embedding_is_a_convex_combination_of_embedding_rows():
    table = torch.randn(V, 8, dtype=torch.float64)
    ids, logits = canvas_and_logits(seed=1)
    module = SoftMask(top_k=2, omega_s=0.7).double()
    feedback = full_feedback(ids, logits.double(), k=2, dtype=torch.float64)
    out = module(table, ids, feedback, MASK)
    masked = ids == MASK
    prev = logits[masked].double()
    prev[:, MASK] = -math.inf
    p = prev.softmax(-1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    lam = (0.7 * torch.sigmoid(module.omegas[1] * (-entropy - module.omegas[2]))).detach()
    top_logits, top_ids = prev.topk(2, dim=-1)
    weights = torch.zeros(len(prev), V, dtype=torch.float64)
    weights[:, MASK] = 1 - lam
    weights.scatter_add_(1, top_ids, lam[:, None] * top_logits.softmax(-1))
    assert torch.allclose(weights.sum(1), torch.ones(len(prev), dtype=torch.float64))
    assert (weights >= 0).all() and (lam > 0.01).all()
    assert torch.allclose(out[masked], weights @ table, atol=1e-6)


def test_gradients_reach_the_three_scalars_and_the_backbone_through_the_two_pass_loss():
    model, _ = soft_dit(omega_s=0.3)
    model.train()
    diffusion = MaskedDiffusion(LogLinear(0.0), MASK, soft_mask_top_k=2, soft_mask_prob=1.0)
    x0 = torch.randint(0, V_TOKENS, (4, 16), generator=torch.Generator().manual_seed(0))
    counted = torch.ones_like(x0, dtype=torch.bool)
    noise = draw_noise(4, 16, torch.Generator().manual_seed(1))
    diffusion.loss(model, x0, counted, noise).sum().backward()
    sm = model.soft_mask
    for p in (sm.a, sm.b, sm.c, model.vocab_embed.embedding, model.blocks[0].attn_qkv.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # without soft rows the scalars get exactly zero gradient, but stay in the graph (DDP needs that)
    model.zero_grad()
    MaskedDiffusion(LogLinear(0.0), MASK, soft_mask_top_k=2, soft_mask_prob=0.0).loss(
        model, x0, counted, noise).sum().backward()
    assert sm.a.grad is not None and float(sm.a.grad) == 0.0


def test_soft_rows_follow_their_uniforms_and_evaluation_uses_every_row():
    model, _ = soft_dit(omega_s=0.5)
    calls = []
    forward = model.forward

    def spy(*args, **kw):
        calls.append((args[0].shape[0], kw.get("feedback")))
        return forward(*args, **kw)

    model.forward = spy
    diffusion = MaskedDiffusion(LogLinear(0.0), MASK, soft_mask_top_k=2, soft_mask_prob=0.5)
    x0 = torch.randint(0, V_TOKENS, (4, 16), generator=torch.Generator().manual_seed(0))
    counted = torch.ones_like(x0, dtype=torch.bool)
    noise = Noise(torch.tensor([0.3, 0.5, 0.7, 0.9]), torch.rand(4, 16), torch.tensor([0.1, 0.9, 0.4, 0.6]))
    with torch.no_grad():
        diffusion.loss(model, x0, counted, noise)
        assert calls[0][0] == 2  # the first pass runs on the two rows with soft_u < 0.5 only
        assert calls[1][1].valid.any(1).tolist() == [True, False, True, False]
        calls.clear()
        diffusion.loss(model, x0, counted, noise, exact=True)
        assert calls[0][0] == 4 and calls[1][1].valid.any(1).all()


def test_omega_s_zero_reproduces_the_binary_model_exactly():
    model, binary = soft_dit(omega_s=0.0)
    ids, logits = canvas_and_logits(seed=3)
    diffusion = MaskedDiffusion(LogLinear(0.0), MASK, soft_mask_top_k=2, soft_mask_prob=1.0)
    plain = MaskedDiffusion(LogLinear(0.0), MASK)
    with torch.no_grad():
        assert torch.equal(model(ids, feedback=full_feedback(ids, logits, k=2)), binary(ids))
        x0 = torch.randint(0, V_TOKENS, (4, 16), generator=torch.Generator().manual_seed(0))
        counted = torch.ones_like(x0, dtype=torch.bool)
        noise = draw_noise(4, 16, torch.Generator().manual_seed(1))
        assert torch.equal(diffusion.loss(model, x0, counted, noise), plain.loss(binary, x0, counted, noise))
    # and w_s > 0 does change the model
    model.soft_mask.a.data.fill_(0.0)
    with torch.no_grad():
        assert not torch.equal(model(ids, feedback=full_feedback(ids, logits, k=2)), binary(ids))


def soft_sampler_zoo(diffusion):
    return {
        "ancestral": AncestralSampler(diffusion, steps=12, cache=False),
        "cached": AncestralSampler(diffusion, steps=12),
        "first_hitting": FirstHittingSampler(diffusion),
        "parallel_first_hitting": FirstHittingSampler(diffusion, tokens_per_step=3),
        "confidence": ConfidenceSampler(diffusion, steps=4, score="margin", remask=0.2),
        "semi_ar": SemiAutoregressiveSampler(FirstHittingSampler(diffusion, tokens_per_step=2), window=8, stride=4),
    }


def mixed_canvas():
    canvas = torch.full((5, 12), MASK)
    canvas[1, :5] = 2  # ragged prompts
    canvas[3, 8:] = 1  # a suffix
    return canvas, torch.arange(5) * 7 + 1


@pytest.mark.parametrize("name", list(soft_sampler_zoo(MaskedDiffusion(LogLinear(0.0), MASK))))
def test_samplers_with_omega_s_zero_reproduce_the_binary_model_exactly(name):
    diffusion = MaskedDiffusion(LogLinear(0.0), MASK)
    sampler = soft_sampler_zoo(diffusion)[name]
    model, binary = soft_dit(omega_s=0.0, seed=5)
    canvas, seeds = mixed_canvas()
    soft = sampler.sample(model, canvas, seeds)
    plain = sampler.sample(binary, canvas, seeds)
    assert torch.equal(soft.tokens, plain.tokens) and torch.equal(soft.row_nfe, plain.row_nfe), name
    # the feedback is used: with w_s near 1 the samples change, and a row still depends only on its seed
    model.soft_mask.a.data.fill_(4.0)
    other = sampler.sample(model, canvas, seeds).tokens
    assert not torch.equal(other, plain.tokens), name
    assert torch.equal(sampler.sample(model, canvas[3:4], seeds[3:4]).tokens[0], other[3]), name
    getattr(sampler, "inner", sampler).soft_mask = False  # the switch off: binary inputs again
    assert torch.equal(sampler.sample(model, canvas, seeds).tokens, plain.tokens)


def test_denoiser_feeds_back_the_rows_previous_pass():
    model, _ = soft_dit(omega_s=0.5, seed=2)
    seen = []
    forward = model.forward

    def spy(ids, sigma=None, positions=None, feedback=None):
        seen.append(None if feedback is None else SoftFeedback(*(v.clone() for v in (
            feedback.entropy, feedback.top_ids, feedback.top_probs, feedback.valid))))
        return forward(ids, sigma, positions=positions, feedback=feedback)

    model.forward = spy
    diffusion = MaskedDiffusion(LogLinear(0.0), MASK)
    canvas = torch.full((2, 6), MASK)
    denoise, engine = Denoiser(model, diffusion, canvas), DecodingEngine(model)
    t = torch.ones(2, dtype=torch.float64)
    first = engine.denoise([denoise(canvas, t, canvas == MASK, torch.arange(2))])[0]
    assert not seen[0].valid.any()  # the first evaluation has no feedback
    x = canvas.clone()
    x[0, :2] = 1  # two positions of row 0 unmask
    only_some = torch.zeros_like(x, dtype=torch.bool)
    only_some[0, 3] = True  # the sampler asks for one position (first-hitting)...
    out = engine.denoise([denoise(x[:1], t[:1], only_some[:1], torch.tensor([0]))])[0]
    assert out.shape == (1, V)
    fb = seen[1]
    assert fb.valid[0].all()  # the previous pass covered every position of row 0...
    assert (fb.valid[0] & (x[0] == MASK)).tolist() == [False, False, True, True, True, True]  # ...used where masked
    expected = entropy_without_mask(first[:6], MASK)
    assert torch.allclose(fb.entropy[0, 2:], expected[2:])
    # ...but the feedback of every masked position of row 0 is refreshed; row 1 keeps its own
    assert denoise.feedback.valid[0].tolist() == [False, False, True, True, True, True]
    assert torch.allclose(denoise.feedback.entropy[1], entropy_without_mask(first[6:], MASK))


def test_soft_mask_config_is_checked():
    with pytest.raises(ConfigError, match="soft_mask_top_k"):
        load_config(None, [*TINY, "model.soft_mask_top_k=-1"])
    with pytest.raises(ConfigError, match="masked diffusion"):
        load_config(None, [*TINY, "family=ar", "model.soft_mask_top_k=3"])
    with pytest.raises(ConfigError, match="soft_mask_prob"):
        load_config(None, [*TINY, "model.soft_mask_top_k=3", "diffusion.soft_mask_prob=1.5"])
    with pytest.raises(ValueError, match="soft_mask_top_k"):
        DiT(ModelConfig(hidden=32, blocks=1, heads=2, length=8, soft_mask_top_k=6), 6, mask_id=5)
    with pytest.raises(ValueError, match="feedback"):
        tiny_dit()(torch.zeros(1, 4, dtype=torch.long), feedback=SoftFeedback.empty(1, 4, 2))
