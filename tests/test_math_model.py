"""The DiT backbone: MDLM's parameter layout and count, attention direction, time conditioning,
rotary embeddings, the positions/inputs_embeds paths."""

import pytest
import torch

import unmask.models.dit as dit
from unmask.config import MODEL_PRESETS, ModelConfig, load_config
from unmask.models.common import FIRST_TABLE, Rotary, apply_rotary, bucketed_positions, count_parameters
from unmask.models.dit import DiT, biased_linear
from unmask.models.gpt2 import GPT2
from unmask.models.llama import Transformer

MDLM_BLOCK_KEYS = ["norm1.weight", "attn_qkv.weight", "attn_out.weight", "norm2.weight", "mlp.0.weight",
                   "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "adaLN_modulation.weight", "adaLN_modulation.bias"]


def test_small_preset_matches_mdlm_parameter_count_and_keys():
    with torch.device("meta"):
        model = DiT(ModelConfig(**MODEL_PRESETS["small"]), 50258)
    assert count_parameters(model) == 169_627_218
    assert count_parameters(model, exclude_embeddings=True) == 92_380_672
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 131
    expected = {
        "vocab_embed.embedding": (50258, 768), "sigma_map.mlp.0.weight": (128, 256), "sigma_map.mlp.0.bias": (128,),
        "sigma_map.mlp.2.weight": (128, 128), "sigma_map.mlp.2.bias": (128,), "rotary_emb.inv_freq": (32,),
        "blocks.11.attn_qkv.weight": (2304, 768), "blocks.0.adaLN_modulation.weight": (4608, 128),
        "blocks.3.mlp.0.weight": (3072, 768), "output_layer.norm_final.weight": (768,),
        "output_layer.linear.weight": (50258, 768), "output_layer.linear.bias": (50258,),
        "output_layer.adaLN_modulation.weight": (1536, 128),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    for i in range(12):
        for k in MDLM_BLOCK_KEYS:
            assert f"blocks.{i}.{k}" in shapes


def tiny(causal=False, time_conditioning=False, seed=0, vocab=11):
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden=32, blocks=2, heads=4, cond_dim=16, dropout=0.0, length=40,
                      time_conditioning=time_conditioning)
    model = DiT(cfg, vocab, causal=causal)
    with torch.no_grad():  # move away from the zero init so every path matters
        for p in model.parameters():
            if p.dim() >= 1 and float(p.abs().sum()) == 0:
                p.normal_(0, 0.2)
    return model.eval()


def test_zero_init_outputs_uniform_logits():
    torch.manual_seed(0)
    model = DiT(ModelConfig(hidden=32, blocks=2, heads=4, cond_dim=16, length=40), 11)
    out = model(torch.randint(0, 11, (2, 9)))
    assert out.shape == (2, 9, 11)
    assert torch.all(out == 0)


def test_bidirectional_vs_causal_attention():
    ids = torch.randint(0, 10, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 10
    with torch.no_grad():
        bi = tiny()
        assert not torch.allclose(bi(ids)[:, :10], bi(changed)[:, :10])
        ar = tiny(causal=True)
        assert torch.allclose(ar(ids)[:, :10], ar(changed)[:, :10], atol=1e-6)
        assert not torch.allclose(ar(ids)[:, 10:], ar(changed)[:, 10:])


def test_time_conditioning_switch():
    ids = torch.randint(0, 10, (2, 8), generator=torch.Generator().manual_seed(1))
    s1, s2 = torch.tensor([0.1, 0.2]), torch.tensor([3.0, 4.0])
    with torch.no_grad():
        off = tiny(time_conditioning=False)
        assert torch.equal(off(ids, s1), off(ids, s2))
        assert torch.equal(off(ids, s1), off(ids, torch.zeros(2)))
        on = tiny(time_conditioning=True)
        assert not torch.allclose(on(ids, s1), on(ids, s2))


def test_positions_and_inputs_embeds_paths_agree_with_full_forward():
    model = tiny()
    ids = torch.randint(0, 10, (3, 12), generator=torch.Generator().manual_seed(2))
    positions = torch.rand(3, 12, generator=torch.Generator().manual_seed(3)) < 0.4
    with torch.no_grad():
        full = model(ids)
        assert torch.allclose(model(ids, positions=positions), full[positions], atol=1e-6)
        index, n = bucketed_positions(positions, buckets=4)
        assert torch.allclose(model(ids, positions=index)[:n], full[positions], atol=1e-6)
        embeds = model.vocab_embed.embedding[ids]
        assert torch.allclose(model(inputs_embeds=embeds), full, atol=1e-6)
    with pytest.raises(ValueError):
        model()


def test_rotary_scores_depend_only_on_relative_position():
    d, length = 8, 20
    cos, sin = Rotary(d)(length, torch.device("cpu"))
    q = torch.randn(d).expand(1, 1, length, d)
    k = torch.randn(d).expand(1, 1, length, d)
    qr, kr = apply_rotary(q, cos, sin)[0, 0], apply_rotary(k, cos, sin)[0, 0]
    scores = qr @ kr.T
    # score(i, j) = score(i + s, j + s)
    assert torch.allclose(scores[2, 5], scores[9, 12], atol=1e-5)
    assert torch.allclose(scores[7, 3], scores[15, 11], atol=1e-5)
    assert not torch.allclose(scores[2, 5], scores[2, 6], atol=1e-3)
    # rotation preserves norms
    assert torch.allclose(qr.norm(dim=-1), q[0, 0].norm(dim=-1), atol=1e-5)


def test_rotary_equals_the_rotate_half_definition():
    """The implementation rolls x and signs sin; the definition is x cos + [-x2, x1] sin."""
    cos, sin = Rotary(16)(7, torch.device("cpu"))
    x = torch.randn(3, 2, 7, 16, generator=torch.Generator().manual_seed(1))
    x1, x2 = x.chunk(2, dim=-1)
    assert torch.equal(apply_rotary(x, cos, sin), x * cos + torch.cat([-x2, x1], dim=-1) * sin)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_training_and_inference_paths_compute_the_same_function(time_conditioning, monkeypatch):
    """While a gradient is taken, constant modulation folds into layer-norm and linear weights; without
    one, the output is scaled and the constant rows come from a cache. Same function either way, and
    the gradients match the unfolded formula's (the rows recomputed and applied by hand)."""
    model = tiny(time_conditioning=time_conditioning, seed=3)
    ids = torch.randint(0, 10, (3, 12), generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.1, 1.0, 3.0])
    with torch.no_grad():
        cached = model(ids, sigma)
    training = model(ids, sigma)
    assert torch.allclose(training, cached, atol=1e-5)
    training.square().sum().backward()
    folded = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(dit, "gated_linear", lambda linear, x, gate: gate * linear(x))
    model(ids, sigma).square().sum().backward()
    for (name, p), g in zip(model.named_parameters(), folded):
        if p.grad is not None:
            assert torch.allclose(g, p.grad, atol=1e-4, rtol=1e-4), name


def test_constant_modulation_is_cached_until_the_weights_change():
    model = tiny(seed=4)
    ids = torch.randint(0, 10, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first = model(ids)
        rows = model._constant_modulations[1]
        assert torch.equal(model(ids), first) and model._constant_modulations[1] is rows  # reused
        model.blocks[1].adaLN_modulation.bias.add_(0.5)  # an optimizer step or a checkpoint load
        changed = model(ids)
    assert not torch.allclose(changed, first) and model._constant_modulations[1] is not rows
    fresh = tiny(seed=4)
    with torch.no_grad():
        fresh.blocks[1].adaLN_modulation.bias.add_(0.5)
        assert torch.equal(fresh(ids), changed)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # another precision: other rows
            model(ids)
    assert model._constant_modulations[1][0].dtype == torch.bfloat16


def test_sequence_longer_than_model_length_is_an_error():
    model = tiny()
    with pytest.raises(ValueError, match="exceeds the model's maximum 40"):
        model(torch.zeros(1, 41, dtype=torch.long))


def test_bf16_autocast_close_to_fp32():
    model = tiny()
    ids = torch.randint(0, 10, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids).float()
    assert (low - ref).norm() / ref.norm() < 3e-2


def test_bucketed_positions_pad_to_few_shapes():
    g = torch.Generator().manual_seed(5)
    sizes = set()
    for p in torch.linspace(0, 1, 50):
        mask = torch.rand(4, 16, generator=g) < p
        index, n = bucketed_positions(mask, buckets=8)
        assert n == int(mask.sum())
        assert torch.equal(index[:n], mask.reshape(-1).nonzero()[:, 0])  # the real ones, in order
        assert torch.all(index[n:] == 0) and len(index) % 8 == 0 and len(index) >= max(n, 8)
        sizes.add(len(index))
    assert len(sizes) <= 8


def test_the_rotary_table_is_built_once_per_model_not_per_cached_step():
    """A KV-cached decoder asks for one more position every step; the table is built once (it was
    rebuilt for the whole prefix at every token: quadratic work over a sample) and its rows are the
    same as a table built for exactly that length."""
    cfg = load_config(None, ["model.hidden=32", "model.blocks=1", "model.heads=2", "model.cond_dim=8",
                             "model.length=24", "data.length=24"]).model
    model = DiT(cfg, 10, causal=True).eval()
    cache = model.new_cache(2)
    with torch.no_grad():
        model(torch.randint(0, 10, (2, 4)), cache=cache)
        for _ in range(20):
            model(torch.randint(0, 10, (2, 1)), cache=cache)
    assert model.rotary_emb.builds == 1
    cos, sin = model.rotary_emb(13, torch.device("cpu"))
    exact_cos, exact_sin = Rotary(16)(13, torch.device("cpu"))
    assert torch.equal(cos, exact_cos) and torch.equal(sin, exact_sin)
    with torch.no_grad():
        model.rotary_emb.inv_freq.mul_(2.0)  # as loading other weights does: the table follows
    assert not torch.equal(model.rotary_emb(13, torch.device("cpu"))[0], cos) and model.rotary_emb.builds == 2


def test_a_model_allowing_10_to_the_8_positions_builds_the_rotary_rows_it_is_asked_for():
    """The table was built for every position the config allows at the first call: 8.5 GB for a released
    config stating max_sequence_length=10^8, before an allocation traceback."""
    cpu = torch.device("cpu")
    rotary = Rotary(16, max_length=10 ** 8)
    cos, sin = rotary(16, cpu)
    assert rotary._cache[1] == FIRST_TABLE and torch.equal(cos, Rotary(16)(16, cpu)[0])
    longer, _ = rotary(FIRST_TABLE + 1, cpu)  # doubled, not rebuilt for each new position
    rotary(FIRST_TABLE + 2, cpu)
    assert rotary.builds == 2 and rotary._cache[1] == 2 * FIRST_TABLE
    assert torch.equal(longer, Rotary(16)(FIRST_TABLE + 1, cpu)[0])


@pytest.mark.parametrize("backbone", ["dit", "llama", "gpt2"])
def test_a_rows_logits_do_not_depend_on_the_other_rows_of_its_forward(backbone):
    """Batch invariance at its root: Intel's MKL computed small matrix products with other kernels than
    large ones, so a row's logits alone and among three others differed by ~1e-8 (a cached five-token
    block gave a LLaDA row other tokens alone than batched); unmask sets MKL's strict mode on import."""
    cfg = load_config(None, [f"model.backbone={backbone}", "model.hidden=64", "model.heads=4", "model.blocks=2",
                             "model.cond_dim=16", "model.length=32", "data.length=32", "model.dropout=0"]).model
    network = {"dit": DiT, "llama": Transformer, "gpt2": GPT2}[backbone]
    torch.manual_seed(0)
    model = network(cfg, 50).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for tokens in (1, 5, 16):
            ids = torch.randint(0, 50, (4, tokens))
            together = model(ids, torch.zeros(4))
            for r in range(4):
                assert torch.equal(model(ids[r:r + 1], torch.zeros(1))[0], together[r]), (tokens, r)


def test_the_output_layer_as_one_product_equals_the_linear_layer():
    """``[x, 1] [W, b]^T`` (the training path of the DiT's output layer) gives ``x W^T + b`` and its gradients
    (float64), and leaves a layer without gradient or without bias to ``nn.Linear`` itself."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 40).double()
    x = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    fused, plain = biased_linear(x, layer), layer(x)
    g = torch.randn_like(plain)
    for got, want in zip(torch.autograd.grad((fused * g).sum(), (x, layer.weight, layer.bias)),
                         torch.autograd.grad((plain * g).sum(), (x, layer.weight, layer.bias))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    assert fused.grad_fn.name() == "MmBackward0" and plain.grad_fn.name() == "AddmmBackward0"
    with torch.no_grad():
        assert torch.equal(biased_linear(x, layer), layer(x))
