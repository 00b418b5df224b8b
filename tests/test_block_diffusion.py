"""Block diffusion (BD3-LM): the two-stream loss against BD3-LM's own numbers
(``../shared/reference/vectors/bd3lm_loss.safetensors``), the structure of the bound, and block-wise
decoding with the exact KV cache of committed blocks (cached = uncached, batched = one row at a time)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import pytest
import torch

from unmask.cli import main
from unmask.config import ConfigError, ModelConfig, SampleConfig, load_config
from unmask.data.tokenization import CharTokenizer
from unmask.models.common import BlockCache, Layout, attend, two_stream_layout
from unmask.models.dit import DiT
from unmask.models.registry import build_backbone
from unmask.objectives.base import Noise, draw_noise
from unmask.objectives.block_diffusion import BlockDiffusion
from unmask.objectives.mdlm import MaskedDiffusion, subs_log_probs
from unmask.objectives.schedules import LogLinear
from unmask.pipeline import from_pretrained
from unmask.samplers.ancestral import AncestralSampler
from unmask.samplers.base import RowStreams, SamplingError, row_seeds
from unmask.samplers.block_diffusion import BlockDiffusionSampler
from unmask.samplers.confidence import ConfidenceSampler
from unmask.samplers.first_hitting import FirstHittingSampler
from unmask.samplers.llada import LLaDASampler
from unmask.samplers.registry import make_sampler

from released_folders import SENTINEL_BOUND, assert_matches, tensor_runs, vectors
from toys import random_dit

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_model(v: dict, meta: dict) -> DiT:
    """The reference's DiT (README section 9), its shape from the metadata config, its vocabulary (the
    tokenizer's ids and the mask) and mask id from the metadata; the stored rotary frequencies are loaded."""
    m, algo = meta["config"]["model"], meta["config"]["algo"]
    assert algo["backbone"] == "dit" and m["type"] == "ddit", "README section 9: the DIT backbone"
    cfg = ModelConfig(hidden=m["hidden_size"], heads=m["n_heads"], blocks=m["n_blocks"], cond_dim=m["cond_dim"],
                      length=m["length"], dropout=m["dropout"], time_conditioning=algo["time_conditioning"])
    model = DiT(cfg, meta["model_vocab"], False, meta["mask_index"])
    state = {k[len("state.backbone."):]: t for k, t in v.items() if k.startswith("state.backbone.")}
    model.load_state_dict(state)
    return model.eval()


def test_the_two_stream_forward_and_loss_match_bd3lm():
    """Every run of ``bd3lm_loss`` (found by its tensor names): a run with ``eps_b`` draws antithetic block
    times (README section 9, run b), the others are given their times (run a). Shapes, ids and settings come
    from the metadata, tolerances from README section 10."""
    name = "bd3lm_loss"
    v, meta = vectors(name)
    config = meta["config"]
    algo, training = config["algo"], config["training"]
    # the configuration README section 9 documents, which this test implements
    assert (algo["name"], algo["parameterization"], config["noise"]["type"]) == ("bd3lm", "subs", "loglinear")
    assert algo["cross_attn"] and not algo["time_conditioning"] and not algo["mdlm_loss_scale"]
    assert training["antithetic_sampling"] and not training["resample"]
    model, x0 = reference_model(v, meta), v["x0"]
    mask_id, block, length = meta["mask_index"], config["block_size"], config["model"]["length"]
    assert x0.shape[1] == length and not (x0 == mask_id).any() and model.vocab_size == meta["model_vocab"]
    layout = two_stream_layout(length, block, "cpu")
    assert torch.equal(layout.allowed, v["block_diff_mask"].bool())
    counted = torch.ones_like(x0, dtype=torch.bool)
    if algo["ignore_bos"]:
        counted[:, 0] = False  # BOS is never masked
    runs = tensor_runs(v)
    assert runs and all(f"{run}.backbone_logits" in v for run in runs)
    for run in runs:
        with torch.no_grad():
            logits = model(v[f"{run}.x_input"], layout=layout)[:, :length]
        assert_matches(logits, v, name, f"{run}.backbone_logits")
        if f"{run}.eps_b" not in v:
            # run (a): the block times given; t_min = 0 makes the training draw t = u exactly
            assert torch.equal(v[f"{run}.sigma_backbone"], torch.zeros_like(v[f"{run}.sigma_backbone"]))
            if "t_per_block" in meta.get(run, {}):
                given = torch.tensor(meta[run]["t_per_block"]).repeat_interleave(block, 1)
                torch.testing.assert_close(v[f"{run}.t"], given)
            objective = BlockDiffusion(LogLinear(), mask_id, block, t_min=0.0)
            noise = Noise(v[f"{run}.t"][:, ::block].double(), v[f"{run}.uniform"])
            xt, weight = objective.noised(x0, counted, noise, exact=False)
            assert torch.equal(xt, v[f"{run}.xt"]) and torch.equal(torch.cat([xt, x0], 1), v[f"{run}.x_input"])
            torch.testing.assert_close(weight.float(), 1 / v[f"{run}.t"])
            log_probs, ref = subs_log_probs(logits, xt, mask_id), v[f"{run}.log_probs"]
            finite = ref.abs() < SENTINEL_BOUND
            assert torch.equal(finite, log_probs.isfinite())
            assert_matches(log_probs, v, name, f"{run}.log_probs", where=finite)
            with torch.no_grad():
                nats = objective.loss(model, x0, counted, noise)
            assert_matches(nats, {f"{run}.loss": v[f"{run}.loss"].sum(1)}, name, f"{run}.loss", summed=length)
            continue
        # run (b): antithetic block times from eps_b, t clipped to [sampling_eps_min, sampling_eps_max]; train
        # and eval differ by BOS's count
        objective = BlockDiffusion(LogLinear(), mask_id, block, t_min=training["sampling_eps_min"],
                                   t_max=training["sampling_eps_max"])
        eps = v[f"{run}.eps_b"].double()
        assert eps.shape == (len(x0), length // block)
        u = (eps + torch.arange(eps.numel(), dtype=torch.float64).view_as(eps)) / eps.numel()
        noise = Noise(u, v[f"{run}.uniform"])
        t, _ = objective.times_and_weights(u, exact=False)
        torch.testing.assert_close(t.repeat_interleave(block, 1).float(), v[f"{run}.t"])
        xt, _ = objective.noised(x0, counted, noise, exact=False)
        assert torch.equal(torch.cat([xt, x0], 1), v[f"{run}.x_input"])
        with torch.no_grad():
            nats = objective.loss(model, x0, counted, noise)
        assert_matches(nats, {f"{run}.nlls": v[f"{run}.nlls"].sum(1)}, name, f"{run}.nlls", summed=length)
        token_nll = nats.sum() / v[f"{run}.token_mask"].sum()
        assert_matches(token_nll, v, name, f"{run}.token_nll")


def test_antithetic_block_times_are_stratified_over_the_global_batch():
    """draw_noise(blocks=n): block k of the flattened batch lies in [k/N, (k+1)/N), as BD3-LM's sampler."""
    noise = draw_noise(3, 16, torch.Generator().manual_seed(0), blocks=4)
    assert noise.time_u.shape == (3, 4)
    k = torch.arange(12, dtype=torch.float64).view(3, 4)
    assert bool(((noise.time_u >= k / 12) & (noise.time_u < (k + 1) / 12)).all())


def test_a_block_is_scored_given_the_clean_blocks_before_it_only():
    """The bound's factorisation: changing the noise of other blocks leaves a block's term alone, and with
    block size 1 each term is -log p(x_l | x_<l) / t (an autoregressive model)."""
    model, mask_id = random_dit(), 20
    x0 = torch.randint(0, 20, (2, 16))
    counted = torch.ones_like(x0, dtype=torch.bool)
    objective = BlockDiffusion(LogLinear(), mask_id, 4, t_min=0.0)
    u = torch.tensor([[0.9, 0.6, 0.99, 0.7], [0.8, 0.95, 0.5, 0.85]], dtype=torch.float64)
    mask_u = torch.rand(2, 16)
    only = counted.clone()
    only[:, 4:] = False  # block 0's term alone
    with torch.no_grad():
        first = objective.loss(model, x0, only, Noise(u, mask_u))
        other = mask_u.clone()
        other[:, 4:] = torch.rand(2, 12)
        u2 = u.clone()
        u2[:, 1:] = torch.rand(2, 3, dtype=torch.float64)
        assert torch.allclose(objective.loss(model, x0, only, Noise(u2, other)), first, atol=1e-5)
        # block size 1: the masked token sees only the clean tokens before it
        ar = BlockDiffusion(LogLinear(), mask_id, 1, t_min=0.0)
        t = torch.rand(2, 16, dtype=torch.float64) * 0.9 + 0.1
        nats = ar.loss(model, x0, counted, Noise(t, mask_u))
        everything = torch.full_like(x0, mask_id)
        logits = model(torch.cat([everything, x0], 1), layout=two_stream_layout(16, 1, "cpu"))[:, :16]
        nll = -subs_log_probs(logits, everything, mask_id).gather(-1, x0[..., None])[..., 0]
        expected = (nll / t.float() * (mask_u < t.float())).sum(1)
    torch.testing.assert_close(nats, expected, atol=1e-4, rtol=1e-5)


def test_block_size_l_is_mdlm():
    """One block over the whole row: the x_t half never sees x_0, so the loss is MDLM's with the same noise."""
    model, mask_id = random_dit(), 20
    x0 = torch.randint(0, 20, (3, 16))
    counted = torch.ones_like(x0, dtype=torch.bool)
    noise = Noise(torch.tensor([0.2, 0.55, 0.9], dtype=torch.float64), torch.rand(3, 16))
    with torch.no_grad():
        block = BlockDiffusion(LogLinear(), mask_id, 16).loss(model, x0, counted, noise)
        mdlm = MaskedDiffusion(LogLinear(), mask_id).loss(model, x0, counted, noise)
    torch.testing.assert_close(block, mdlm, atol=1e-4, rtol=1e-5)


def test_a_short_last_block_leaves_the_blocks_before_it_alone():
    """A row whose length is not a multiple of the block size ends with a shorter block: the blocks before
    it score what they score without it, and the short block adds its own (positive) term."""
    model, mask_id = random_dit(), 20
    objective = BlockDiffusion(LogLinear(), mask_id, 4)
    x0 = torch.randint(0, 20, (2, 14))
    counted = torch.ones_like(x0, dtype=torch.bool)
    noise = Noise(torch.rand(2, 4, dtype=torch.float64), torch.rand(2, 14))
    noise.mask_u[:, 12:] = 0.0  # the short block's two tokens are masked
    with torch.no_grad():
        whole = objective.loss(model, x0, counted, noise)
        head = objective.loss(model, x0[:, :12], counted[:, :12], Noise(noise.time_u[:, :3], noise.mask_u[:, :12]))
        tail_only = counted.clone()
        tail_only[:, :12] = False
        tail = objective.loss(model, x0, tail_only, noise)
    torch.testing.assert_close(whole, head + tail, atol=1e-4, rtol=1e-5)
    assert bool((tail > 0).all())


def test_the_logits_of_a_block_model_see_only_earlier_clean_blocks():
    """``objective.logits`` (what the one-shot greedy check of continuation likelihoods reads): changing a
    later block of x_0 leaves earlier blocks' logits alone; block size L gives the plain network's."""
    model, mask_id = random_dit(), 20
    xt = torch.full((1, 16), mask_id)
    x0 = torch.randint(0, 20, (1, 16))
    other = x0.clone()
    other[:, 8:] = torch.randint(0, 20, (1, 8))
    objective = BlockDiffusion(LogLinear(), mask_id, 4)
    with torch.no_grad():
        a, b = objective.logits(model, xt, x0, None), objective.logits(model, xt, other, None)
        torch.testing.assert_close(a[:, :12], b[:, :12])
        assert not torch.allclose(a[:, 12:], b[:, 12:])
        full = BlockDiffusion(LogLinear(), mask_id, 16).logits(model, xt, x0, None)
        torch.testing.assert_close(full, model(xt), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length,block,kv_heads", [(16, 1, 4), (30, 4, 2), (24, 24, 4), (28, 8, 1)])
def test_the_tiled_two_stream_attention_equals_the_dense_mask(length, block, kv_heads):
    """The tiles of the two-stream pattern give the values and gradients of one SDPA call with the whole
    2L x 2L mask, with and without the last block's clean tokens, for grouped-query attention too."""
    torch.manual_seed(length + block)
    for clean in (length, block * ((length - 1) // block)):
        layout = two_stream_layout(length, block, "cpu", clean)
        n = length + clean
        assert layout.tiles and sum(t.queries.stop - t.queries.start for t in layout.tiles) == n
        assert sum(t.allowed.numel() if t.allowed is not None else 0 for t in layout.tiles) < n * n
        q = torch.randn(2, 4, n, 8, dtype=torch.float64, requires_grad=True)
        k, v = (torch.randn(2, kv_heads, n, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
        g = torch.randn(2, 4, n, 8, dtype=torch.float64)
        tiled = attend(q, k, v, False, layout.tiles)
        grads = torch.autograd.grad((tiled * g).sum(), (q, k, v))
        dense = attend(q, k, v, False, layout.allowed)
        expected = torch.autograd.grad((dense * g).sum(), (q, k, v))
        torch.testing.assert_close(tiled, dense, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backbone", ["dit", "llama", "gpt2"])
def test_the_training_pass_equals_the_full_two_stream_pass(backbone):
    """The loss's pass (tiles, the last block's clean tokens left out, the last layer computing the x_t half
    only) gives the loss and the gradients of the plain pass: all 2L tokens, the dense mask, every output."""
    mask_id, length, block = 20, 30, 8
    if backbone == "dit":
        model = random_dit(length=32)
    else:
        torch.manual_seed(0)
        shape = ModelConfig(backbone=backbone, hidden=32, heads=4, blocks=2, intermediate=64, length=32, dropout=0.0,
                            kv_heads=2 if backbone == "llama" else 0)
        model = build_backbone(shape, 21, False, mask_id)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
    objective = BlockDiffusion(LogLinear(), mask_id, block, t_min=0.0)
    x0 = torch.randint(0, 20, (3, length))
    counted = torch.ones_like(x0, dtype=torch.bool)
    noise = draw_noise(3, length, torch.Generator().manual_seed(2))
    fast = objective.loss(model, x0, counted, noise)
    fast_grads = torch.autograd.grad(fast.sum(), list(model.parameters()))
    xt, weight = objective.noised(x0, counted, noise, False)
    full = two_stream_layout(length, block, "cpu")
    dense = Layout(full.positions, full.allowed, full.span)
    logits = model(torch.cat([xt, x0], 1), torch.zeros(3), layout=dense)[:, :length]
    never_mask = logits.index_fill(-1, torch.tensor([mask_id]), float("-inf"))  # SUBS: x_0 is never the mask
    nll = -never_mask.log_softmax(-1).gather(-1, x0[..., None])[..., 0]
    plain = (nll.double() * weight * (xt == mask_id)).sum(1)
    plain_grads = torch.autograd.grad(plain.sum(), list(model.parameters()))
    torch.testing.assert_close(fast.double(), plain, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))  # fp32 sums


def inner_samplers(objective):
    return {"ancestral": AncestralSampler(objective, 8), "first_hitting": FirstHittingSampler(objective),
            "confidence": ConfidenceSampler(objective, 4),
            "threshold": LLaDASampler(objective, 4, 4, threshold=0.3)}


@pytest.mark.parametrize("inner", ["ancestral", "first_hitting", "confidence", "threshold"])
@pytest.mark.parametrize("backbone", ["dit", "llama", "gpt2"])
def test_the_kv_cache_of_committed_blocks_is_exact(inner, backbone):
    """Cached decoding gives the tokens of uncached decoding (the prefix fed again at every call), for every
    inner sampler and backbone; a batch of ragged prompts (10 rows: the denoiser pads the rows it
    evaluates) gives what each row gets alone; EOS stops a row."""
    mask_id, eos, pad = 20, 7, 19
    if backbone == "dit":
        model = random_dit()
    else:
        torch.manual_seed(0)
        shape = ModelConfig(backbone=backbone, hidden=32, heads=4, blocks=2, intermediate=64, length=32, dropout=0.0)
        model = build_backbone(shape, 21, False, mask_id).eval()
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
    objective = BlockDiffusion(LogLinear(), mask_id, 4)
    sampler = inner_samplers(objective)[inner]
    canvas = torch.full((10, 30), mask_id)
    for row, prompt in enumerate([5, 9, 1, 4, 2, 8, 12, 1, 3, 6]):
        canvas[row, :prompt] = (torch.arange(prompt) * (row + 1)) % 19
    seeds = row_seeds(5, 10)
    cached = BlockDiffusionSampler(sampler, 4, True, eos, pad).sample(model, canvas, seeds)
    plain = BlockDiffusionSampler(sampler, 4, False, eos, pad).sample(model, canvas, seeds)
    assert torch.equal(cached.tokens, plain.tokens)
    assert cached.nfe > plain.nfe  # row 6's prompt fills block 2: the blocks before it are committed by a call
    alone = torch.cat([BlockDiffusionSampler(sampler, 4, True, eos, pad).sample(model, canvas[i:i + 1],
                                                                               row_seeds(5, 1, i)).tokens
                       for i in range(10)])
    assert torch.equal(alone, cached.tokens)
    fixed = canvas != mask_id
    assert torch.equal(cached.tokens[fixed], canvas[fixed]) and not bool((cached.tokens == mask_id).any())


def test_stopping_at_eos_pads_the_rest_and_stops_evaluating_the_row():
    model, mask_id, eos, pad = random_dit(), 20, 7, 19
    objective = BlockDiffusion(LogLinear(), mask_id, 4)
    canvas = torch.full((4, 32), mask_id)
    canvas[:, 0] = 3
    stopped = BlockDiffusionSampler(FirstHittingSampler(objective), 4, True, eos, pad).sample(
        model, canvas, row_seeds(1, 4))
    free = BlockDiffusionSampler(FirstHittingSampler(objective), 4, True).sample(model, canvas, row_seeds(1, 4))
    hits = 0
    for row, full in zip(stopped.tokens.tolist(), free.tokens.tolist()):
        if eos in row[1:]:
            hits += 1
            first = row.index(eos, 1)
            assert row[:first + 1] == full[:first + 1] and set(row[first + 1:]) <= {pad}
        else:
            assert row == full
    assert hits > 0 and int(stopped.row_nfe.sum()) < int(free.row_nfe.sum())
    plain = BlockDiffusionSampler(FirstHittingSampler(objective), 4, False).sample(model, canvas, row_seeds(1, 4))
    assert torch.equal(plain.tokens, free.tokens) and plain.nfe == free.nfe  # every commit rides on a block's call


def test_a_stop_list_stops_a_row_at_the_first_of_its_ids():
    """EOS and ``sample.stop_ids`` (SDAR's ``stopping_criteria_idx``): a row stops at the first of any of them."""
    model, mask_id, pad = random_dit(), 20, 19
    objective = BlockDiffusion(LogLinear(), mask_id, 4)
    tokenizer = CharTokenizer("abcdefghijklmnop")  # (its EOS: 17)
    canvas = torch.full((4, 32), mask_id)
    canvas[:, 0] = 3
    free = BlockDiffusionSampler(FirstHittingSampler(objective), 4, True).sample(model, canvas, row_seeds(1, 4))
    stops = (tokenizer.eos_id, 5, 11)
    stopped = BlockDiffusionSampler(FirstHittingSampler(objective), 4, True, stops, pad).sample(
        model, canvas, row_seeds(1, 4))
    hits = 0
    for row, full in zip(stopped.tokens.tolist(), free.tokens.tolist()):
        first = next((i for i in range(1, len(full)) if full[i] in stops), None)
        hits += first is not None
        assert row == (full if first is None else full[:first + 1] + [pad] * (len(full) - first - 1))
    assert hits > 0
    cfg = SampleConfig(sampler="first_hitting", stop_at_eos=True, stop_ids=[5, 11])
    assert make_sampler(cfg, objective, tokenizer, 32).eos_id == stops
    for bad, words in (({"stop_at_eos": False}, "need sample.stop_at_eos=true"),
                       ({"stop_ids": [tokenizer.vocab_size]}, "is not a token id")):
        with pytest.raises(SamplingError, match=words):
            make_sampler(dataclasses.replace(cfg, **bad), objective, tokenizer, 32)


def test_what_does_not_apply_to_block_diffusion_is_refused():
    model, mask_id = random_dit(), 20
    objective = BlockDiffusion(LogLinear(), mask_id, 4)
    tokenizer = CharTokenizer("abcdefghijklmnop")
    for knobs in (dict(guidance=1.0), dict(window=8), dict(sampler="llada", block_cache="dual")):
        with pytest.raises(SamplingError):
            make_sampler(SampleConfig(**knobs), objective, tokenizer, 32)
    with pytest.raises(SamplingError, match="factor"):
        make_sampler(SampleConfig(sampler="confidence", factor=1.0), objective, tokenizer, 32)
    with pytest.raises(ValueError, match="count estimator"):
        objective.loss_by_count(model, torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.bool),
                                Noise(torch.rand(1, dtype=torch.float64), torch.rand(1, 8)))


def test_fast_dllm_caches_refuse_time_conditioned_dits():
    cfg = ModelConfig(hidden=32, heads=4, blocks=1, cond_dim=16, length=32, dropout=0.0, time_conditioning=True)
    model = DiT(cfg, 21, False, 20).eval()
    sampler = LLaDASampler(MaskedDiffusion(LogLinear(), 20), 8, 8, threshold=0.9, block_cache="dual")
    with pytest.raises(SamplingError, match="time-conditioned"):
        sampler.sample(model, torch.full((1, 16), 20), row_seeds(0, 1))


def test_bad_block_diffusion_configs_are_one_line_errors(tmp_path):
    for overrides, message in ((["family=bd3lm"], "model.block_size"),
                               (["model.block_size=4"], "family bd3lm"),
                               (["family=bd3lm", "model.block_size=4", "model.time_conditioning=true"],
                                "time per block"),
                               (["diffusion.t_min=0.5", "diffusion.t_max=0.2"], "t_min")):
        with pytest.raises(ConfigError, match=message):
            load_config("quickstart", overrides)


# --- Fast-dLLM decoding of the MDLM DiT -------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_the_dit_takes_fast_dllm_caches_exact_on_an_unchanged_canvas(mode):
    """Fast-dLLM's caches are approximate only because the canvas changes after the recording: on the
    recorded canvas a cached call gives the full forward's logits."""
    model, mask_id = random_dit(), 20
    x = torch.randint(0, 20, (2, 24))
    x[:, 10:] = mask_id
    with torch.no_grad():
        full = model(x)
        cache = BlockCache(mode)
        torch.testing.assert_close(model(x, cache=cache), full)
        cache.recording, cache.length = False, 8
        chunk = x[:, 8:16] if mode == "dual" else x[:, 8:]
        torch.testing.assert_close(model(chunk, cache=cache), full[:, 8:8 + chunk.shape[1]], atol=1e-5, rtol=1e-5)


def test_the_factor_rule_reveals_the_ranks_whose_confidence_clears_its_bar():
    """factor f: the n-th most confident is revealed while c_(n) >= 1 - f / (n + 1); the best always."""
    mask_id, vocab = 5, 6
    objective = MaskedDiffusion(LogLinear(), mask_id)

    def revealed(confidences, factor):
        sampler = LLaDASampler(objective, 4, 8, factor=factor, temperature=0.0)
        c = torch.tensor(confidences, dtype=torch.float64)
        logits = torch.full((len(c), vocab), float("-inf"), dtype=torch.float64)
        logits[:, 0] = c.log()
        logits[:, 1:4] = ((1 - c) / 3).log()[:, None]
        x = torch.full((1, len(c)), mask_id)
        todo = x == mask_id
        sampler._reveal(x, logits.float(), RowStreams(row_seeds(0, 1)), torch.tensor([0]), todo, 1,
                        torch.zeros(1, dtype=torch.long), None)
        return (x[0] != mask_id).tolist()

    # bars: rank 2 -> 1 - 1/3, rank 3 -> 0.75, rank 4 -> 0.8
    assert revealed([0.5, 0.99, 0.8, 0.9], 1.0) == [False, True, True, True]
    assert revealed([0.5, 0.99, 0.7, 0.9], 1.0) == [False, True, False, True]
    assert revealed([0.3, 0.4, 0.2, 0.35], 1.0) == [False, True, False, False]  # the best always
    assert revealed([0.3, 0.4, 0.2, 0.35], 4.0) == [True, True, True, True]  # f >= n + 1: every bar <= 0
    with pytest.raises(SamplingError):
        LLaDASampler(objective, 4, 8, factor=1.0, threshold=0.9)


# --- end to end ---------------------------------------------------------------------------------------------

def test_train_eval_sample_and_serve_a_block_diffusion_model(tmp_path, corpus):
    """`unmask train` a tiny bd3lm, then `unmask eval` (a bound), `unmask sample` with EOS stops and the
    server: block diffusion goes through every command like the other families."""
    def unmask(*args) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = main([str(a) for a in args])
        return code, out.getvalue()

    run = tmp_path / "bd3"
    code, _ = unmask("train", "quickstart", f"run_dir={run}", "family=bd3lm", "model.block_size=8", "data.dataset=text",
                     f"data.path={corpus}", "data.length=32", "model.length=32", "model.hidden=32", "model.blocks=1",
                     "model.heads=2", "model.cond_dim=16", "train.steps=3", "train.batch_size=4", "train.progress=false",
                     "train.threads=1")
    assert code == 0
    code, out = unmask("eval", run, "eval.max_sequences=4", "eval.mc_samples=2")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["family"] == "bd3lm" and result["bound"] == "nelbo" and result["nll"] > 0
    code, out = unmask("sample", run, "--prompt", "ROMEO:", "sample.num_samples=2", "sample.sampler=first_hitting",
                       "sample.stop_at_eos=true")
    assert code == 0 and out.count("ROMEO:") == 2
    code, _ = unmask("sample", run, "sample.window=16")
    assert code == 2
    httpx = pytest.importorskip("httpx")  # the server's optional dependencies
    from unmask.serve.app import running_server
    from unmask.serve.service import ModelService

    service = ModelService(from_pretrained(run))
    with running_server(service) as url:
        reply = httpx.post(f"{url}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 10, "seed": 3}, timeout=60)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert "".join(choice["tokens"][:6]) == "ROMEO:" and len(choice["text"]) == 10 and choice["nfe"] >= 2
    service.close()
