"""The soft-mask feedback module: lambda's closed form and where it vanishes, convex combinations of
embedding rows, gradients, and exact reduction to the binary model when w_s = 0."""

import math

import pytest
import torch

from unmask.softmask import OMEGA_A_INIT, OMEGA_B_INIT, OMEGA_S_INIT, SoftMask

from toys import MASK, V_TOKENS, tiny_dit

V = V_TOKENS + 1


def canvas_and_logits(seed=0, b=3, length=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V_TOKENS, (b, length), generator=g)
    ids[torch.rand(b, length, generator=g) < 0.5] = MASK
    return ids, 3 * torch.randn(b, length, V, generator=g)


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
    lam = module.mixing_weight(logits, MASK).detach()
    for row, value in zip(logits, lam):
        p = torch.softmax(row[:MASK].double(), 0)  # the mask class excluded
        entropy = float(-(p * p.log()).sum())
        expected = 0.6 / (1 + math.exp(-2.0 * (-entropy + 0.5)))
        assert float(value) == pytest.approx(expected, rel=1e-5)
    assert lam[1] > lam[0]  # confident -> larger lambda


def test_lambda_vanishes_on_unmasked_positions_and_the_first_step():
    model = tiny_dit()
    table = model.vocab_embed.embedding.detach()
    ids, logits = canvas_and_logits()
    module = SoftMask(omega_s=0.9)
    out = module(table, ids, logits, MASK)
    clean = ids != MASK
    assert torch.equal(out[clean], table[ids[clean]])
    assert torch.equal(module(table, ids, None, MASK), table[ids])


def test_soft_embedding_is_a_convex_combination_of_embedding_rows():
    table = torch.randn(V, 8, dtype=torch.float64)
    ids, logits = canvas_and_logits(seed=1)
    module = SoftMask(top_k=2, omega_s=0.7)
    out = module(table, ids, logits.double(), MASK)
    masked = ids == MASK
    prev = logits[masked].double()
    prev[:, MASK] = -math.inf
    lam = module.mixing_weight(prev, MASK).double()
    top_logits, top_ids = prev.topk(2, dim=-1)
    weights = torch.zeros(len(prev), V, dtype=torch.float64)
    weights[:, MASK] = 1 - lam
    weights.scatter_add_(1, top_ids, lam[:, None] * top_logits.softmax(-1))
    assert torch.allclose(weights.sum(1), torch.ones(len(prev), dtype=torch.float64))
    assert (weights >= 0).all()
    assert torch.allclose(out[masked], weights @ table)


def test_gradients_reach_the_three_scalars_and_the_backbone():
    model = tiny_dit()
    module = SoftMask(omega_s=0.3)
    ids, logits = canvas_and_logits(seed=2)
    embeds = module(model.vocab_embed.embedding, ids, logits, MASK)
    out = model(inputs_embeds=embeds)
    out.square().mean().backward()
    for p in (module.a, module.b, module.c, model.vocab_embed.embedding, model.blocks[0].attn_qkv.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_omega_s_zero_reproduces_the_binary_model_exactly():
    model = tiny_dit()
    module = SoftMask(omega_s=0.0)
    ids, logits = canvas_and_logits(seed=3)
    with torch.no_grad():
        soft = model(inputs_embeds=module(model.vocab_embed.embedding, ids, logits, MASK))
        binary = model(ids)
    assert torch.equal(soft, binary)
