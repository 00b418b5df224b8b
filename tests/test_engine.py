"""The decoding engine: decodings of different samplers, canvases and step counts advanced together in one
engine give exactly what each gives alone (tokens, NFE, evaluations per row), for every class of network
call (plain denoiser calls, a causal KV cache, Fast-dLLM's block caches, block diffusion's exact cache), and
denoiser calls on canvases of one length share one forward."""

from __future__ import annotations

import pytest
import torch

from unmask.config import ModelConfig
from unmask.models.registry import build_backbone
from unmask.objectives.block_diffusion import BlockDiffusion
from unmask.objectives.mdlm import MaskedDiffusion
from unmask.objectives.schedules import LogLinear
from unmask.samplers.ancestral import AncestralSampler
from unmask.samplers.ar import AutoregressiveSampler
from unmask.samplers.base import row_seeds
from unmask.samplers.block_diffusion import BlockDiffusionSampler
from unmask.samplers.confidence import ConfidenceSampler
from unmask.samplers.dream import DreamSampler
from unmask.samplers.engine import DecodingEngine
from unmask.samplers.first_hitting import FirstHittingSampler
from unmask.samplers.llada import LLaDASampler
from unmask.samplers.semi_ar import SemiAutoregressiveSampler

from toys import CountingModel, random_dit

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 21
MASK = VOCAB - 1
BOS = 0


def canvas(rows: int, length: int, prompts: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.full((rows, length), MASK)
    for r, p in enumerate(prompts):
        x[r, :p] = torch.randint(1, MASK - 1, (p,), generator=g)
    return x


def requests(kind: str):
    """(model, [(sampler, canvas, seeds)]) of one class of network call, mixed samplers and shapes."""
    diffusion = MaskedDiffusion(LogLinear(), MASK)
    if kind == "plain":
        return random_dit(), [
            (AncestralSampler(diffusion, 8), canvas(3, 12, [2, 0, 5], 1), row_seeds(1, 3)),
            (AncestralSampler(diffusion, 6, cache=False, guidance=1.5), canvas(2, 12, [4, 3], 2), row_seeds(2, 2)),
            (FirstHittingSampler(diffusion, tokens_per_step=2), canvas(2, 12, [1, 6], 3), row_seeds(3, 2)),
            (ConfidenceSampler(diffusion, 5, score="margin", remask=0.2), canvas(1, 12, [3], 4), row_seeds(4, 1)),
            (LLaDASampler(diffusion, 8, 4, temperature=0.7), canvas(2, 16, [4, 2], 5), row_seeds(5, 2)),
            (DreamSampler(diffusion, 6, score="entropy", temperature=0.5), canvas(2, 10, [3, 3], 6), row_seeds(6, 2)),
            (SemiAutoregressiveSampler(FirstHittingSampler(diffusion), 8, 4), canvas(2, 20, [3, 5], 7),
             row_seeds(7, 2)),
        ]
    if kind == "fast_dllm":
        return random_dit(), [
            (LLaDASampler(diffusion, 8, 4, block_cache="prefix"), canvas(2, 16, [4, 4], 1), row_seeds(1, 2)),
            (LLaDASampler(diffusion, 8, 4, threshold=0.2, block_cache="dual"), canvas(3, 14, [2, 2, 2], 2),
             row_seeds(2, 3)),
            (DreamSampler(diffusion, 8, score="confidence", block_length=4, block_cache="dual", temperature=0.0),
             canvas(1, 16, [4], 3), row_seeds(3, 1)),
            (DreamSampler(diffusion, 4, score="confidence", threshold=0.3, block_length=4), canvas(2, 12, [4, 4], 4),
             row_seeds(4, 2)),
            (AncestralSampler(diffusion, 8), canvas(2, 16, [1, 3], 5), row_seeds(5, 2)),
        ]
    if kind == "causal":
        return random_dit(causal=True), [
            (AutoregressiveSampler(BOS, MASK), canvas(2, 9, [3, 3], 1), row_seeds(1, 2)),
            (AutoregressiveSampler(BOS, MASK, temperature=0.5), canvas(1, 13, [5], 2), row_seeds(2, 1)),
            (AutoregressiveSampler(BOS, MASK, kv_cache=False), canvas(2, 7, [2, 2], 3), row_seeds(3, 2)),
        ]
    assert kind == "block_diffusion"
    objective = BlockDiffusion(LogLinear(), MASK, 4)
    return random_dit(), [
        (BlockDiffusionSampler(LLaDASampler(objective, 4, 4, threshold=0.3), 4, True), canvas(3, 18, [5, 2, 9], 1),
         row_seeds(1, 3)),
        (BlockDiffusionSampler(AncestralSampler(objective, 6), 4, False), canvas(2, 12, [3, 4], 2), row_seeds(2, 2)),
        (BlockDiffusionSampler(FirstHittingSampler(objective), 4, True, 7, 19), canvas(2, 16, [1, 6], 3),
         row_seeds(3, 2)),
    ]


@pytest.mark.parametrize("kind", ["plain", "fast_dllm", "causal", "block_diffusion"])
def test_interleaved_decodings_give_what_each_gives_alone(kind):
    model, asked = requests(kind)
    alone = [sampler.sample(model, x, seeds) for sampler, x, seeds in asked]
    engine = DecodingEngine(model)
    handles = [engine.add(sampler, x, seeds) for sampler, x, seeds in asked]
    finished, steps = [], 0
    while engine.active:
        finished += engine.step()
        steps += 1
    assert sorted(map(id, finished)) == sorted(map(id, handles))
    for (sampler, x, _), h, a in zip(asked, handles, alone):
        assert torch.equal(h.result.tokens, a.tokens), type(sampler).__name__
        assert h.result.nfe == a.nfe and torch.equal(h.result.row_nfe, a.row_nfe), type(sampler).__name__
        assert not bool((h.result.tokens == MASK).any())
    assert steps == max(a.nfe for a in alone) or kind == "block_diffusion"  # one call per decoding per step


def test_denoiser_calls_on_canvases_of_one_length_share_a_forward():
    """Canvases of one length: their rows concatenated into one batch, one forward per step of the longest."""
    model = CountingModel(random_dit())
    diffusion = MaskedDiffusion(LogLinear(), MASK)
    asked = [(AncestralSampler(diffusion, 8, cache=False), canvas(2, 12, [3, 1], 1), row_seeds(1, 2)),
             (ConfidenceSampler(diffusion, 8), canvas(3, 12, [2, 2, 5], 2), row_seeds(2, 3)),
             (FirstHittingSampler(diffusion, tokens_per_step=4), canvas(1, 12, [4], 3), row_seeds(3, 1))]
    engine = DecodingEngine(model)
    handles = [engine.add(*a) for a in asked]
    results = engine.run()
    assert [r.nfe for r in results] == [8, 8, 2] and model.forwards == 8
    assert all(h.done for h in handles)


def test_a_decoding_added_later_joins_the_running_ones():
    model = random_dit()
    diffusion = MaskedDiffusion(LogLinear(), MASK)
    first = (AncestralSampler(diffusion, 8, cache=False), canvas(2, 12, [3, 1], 1), row_seeds(1, 2))
    later = (ConfidenceSampler(diffusion, 4, score="entropy"), canvas(1, 12, [2], 2), row_seeds(2, 1))
    engine = DecodingEngine(model)
    a = engine.add(*first)
    engine.step()
    engine.step()
    b = engine.add(*later)
    engine.run()
    assert engine.handles == []  # finished decodings leave the engine: a long-running one does not grow
    assert torch.equal(a.result.tokens, first[0].sample(model, first[1], first[2]).tokens)
    assert torch.equal(b.result.tokens, later[0].sample(model, later[1], later[2]).tokens)


def test_streaming_frames_come_from_the_engine_per_decoding():
    model = random_dit()
    diffusion = MaskedDiffusion(LogLinear(), MASK)
    frames = {0: [], 1: []}
    engine = DecodingEngine(model)
    x0, x1 = canvas(1, 12, [2], 1), canvas(2, 20, [3, 5], 2)
    h0 = engine.add(ConfidenceSampler(diffusion, 4), x0, row_seeds(1, 1), lambda x: frames[0].append(x.clone()))
    h1 = engine.add(SemiAutoregressiveSampler(FirstHittingSampler(diffusion), 8, 4), x1, row_seeds(2, 2),
                    lambda x: frames[1].append(x.clone()))
    engine.run()
    assert len(frames[0]) == 4 and torch.equal(frames[0][-1], h0.result.tokens)
    assert all(f.shape == x1.shape for f in frames[1]) and torch.equal(frames[1][-1], h1.result.tokens)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_ragged_canvases_share_forwards(time_conditioning):
    """Without time conditioning the DiT packs: canvases of 5, 9, 12 and 16 positions share every forward as
    one row of sequences, each attending to itself alone, so each gets exactly the logits (bit for bit) and the
    tokens it gets alone. A time-conditioned DiT cannot (its rows see different conditioning): canvases of one
    power-of-two bucket (9, 12, 16) share a forward, the shorter ones padded under a key padding mask (their
    logits equal to float rounding), and the canvas of 5 keeps its own forwards."""
    net = random_dit(time_conditioning=time_conditioning)
    assert net.packs != time_conditioning
    model = CountingModel(net)
    diffusion = MaskedDiffusion(LogLinear(), MASK)
    asked = [(AncestralSampler(diffusion, 6, cache=False), canvas(2, 12, [3, 1], 1), row_seeds(1, 2)),
             (AncestralSampler(diffusion, 6, cache=False, guidance=1.0), canvas(1, 9, [4], 2), row_seeds(2, 1)),
             (ConfidenceSampler(diffusion, 6), canvas(2, 16, [2, 5], 3), row_seeds(3, 2)),
             (AncestralSampler(diffusion, 4, cache=False), canvas(1, 5, [1], 4), row_seeds(4, 1))]
    alone = [sampler.sample(net, x, seeds) for sampler, x, seeds in asked]
    engine = DecodingEngine(model)
    handles = [engine.add(*a) for a in asked]
    engine.run()
    for h, a in zip(handles, alone):
        assert torch.equal(h.result.tokens, a.tokens) and h.result.nfe == a.nfe
    # one forward per step of the longest decoding of a group, plus the guided canvas's second pass at each step
    nfe = [a.nfe for a in alone]
    assert model.forwards == (max(nfe) + nfe[1] if net.packs else max(nfe[:3]) + nfe[1] + nfe[3])
    calls = [AncestralSampler(diffusion, 6).denoiser(net, x)(x, torch.full((len(x),), 0.5, dtype=torch.float64),
                                                             x == MASK, torch.arange(len(x)))
             for _, x, _ in asked]
    together = engine.denoise(calls if net.packs else calls[:3])
    for call, logits in zip(calls, together):
        if net.packs:
            assert torch.equal(logits, engine.denoise([call])[0])
        else:
            torch.testing.assert_close(logits, engine.denoise([call])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone,extra", [("dit", {}), ("llama", {}), ("gpt2", {}), ("llama", {"logit_shift": True}),
                                           ("dit", {"time_conditioning": True})])
def test_packed_canvases_get_the_logits_they_get_alone(backbone, extra):
    """Every backbone that ``packs`` runs canvases of 7, 12 and 16 positions (1-3 rows each) as one row of
    sequences: each row's logits equal, bit for bit, those of its canvas alone. Shifted logits (Dream) and time
    conditioning do not pack: the engine pads those under a key padding mask instead."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, hidden=32, heads=4, blocks=2, cond_dim=16, length=32, dropout=0.0,
                      intermediate=64, **extra)
    net = build_backbone(cfg, VOCAB, causal=False, mask_id=MASK).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    assert net.packs == (not extra)
    diffusion = MaskedDiffusion(LogLinear(), MASK)
    shapes = [(2, 12, [3, 1]), (1, 7, [2]), (3, 16, [4, 0, 9])]
    xs = [canvas(rows, length, prompts, seed) for seed, (rows, length, prompts) in enumerate(shapes)]
    calls = [AncestralSampler(diffusion, 4).denoiser(net, x)(x, torch.full((len(x),), 0.5, dtype=torch.float64),
                                                             x == MASK, torch.arange(len(x))) for x in xs]
    model = CountingModel(net)
    engine = DecodingEngine(model)
    together = engine.denoise(calls)
    assert model.forwards == 1
    for call, logits in zip(calls, together):
        alone = engine.denoise([call])[0]
        assert torch.equal(logits, alone) if net.packs else torch.allclose(logits, alone, atol=1e-5, rtol=1e-5)
    if net.packs:  # a row of many canvases (its padding never longer than the longest canvas, 16)
        many = engine.denoise(calls * 13)
        assert all(torch.equal(a, b) for a, b in zip(many, together * 13))


@pytest.mark.parametrize("kind", ["fast_dllm", "causal", "block_diffusion"])
def test_the_caches_a_decoding_holds_never_exceed_what_a_server_reserves_for_it(kind):
    """``unmask serve`` reserves keys and values of every canvas position (float32, every layer) for a request
    whose sampler holds a cache: measured after every step, no decoding holds more; samplers that say they
    hold none hold none."""
    from unmask.serve.service import cache_bytes_per_position

    model, asked = requests(kind)
    per_position = cache_bytes_per_position(model)
    engine = DecodingEngine(model)
    handles = [(engine.add(sampler, x, seeds), sampler, x) for sampler, x, seeds in asked]
    held = {id(h): 0 for h, _, _ in handles}
    while engine.active:
        engine.step()
        for h, _, _ in handles:
            held[id(h)] = max(held[id(h)], h.cache_bytes())
    for h, sampler, x in handles:
        assert held[id(h)] <= per_position * len(x) * sampler.cache_positions(x.shape[1]), type(sampler).__name__
        assert (held[id(h)] > 0) == sampler.holds_cache, type(sampler).__name__


def test_causal_decodings_that_share_a_prompt_prefix_reuse_its_keys_and_values():
    """With a prefix cache, a second decoding of a prompt that starts like an earlier one copies the stored
    whole blocks of that prefix instead of computing them, and gives the tokens it gives without the cache;
    other prompts, and rows that differ, reuse nothing; eviction keeps the cache within its budget."""
    from unmask.samplers.prefix_cache import PrefixCache

    model = CountingModel(random_dit(causal=True))
    sampler = AutoregressiveSampler(BOS, MASK, temperature=0.8)
    first = canvas(2, 26, [18, 18], 1)
    first[1, :18] = first[0, :18]  # one prompt, two rows (a request with n = 2)
    later = first.clone()
    later[:, 13:18] = torch.tensor([3, 4, 5, 6, 7])  # shares the first 13 tokens (BOS + 13: 3 blocks of 4)
    other = canvas(1, 26, [18], 9)
    prefixes = PrefixCache(budget=1 << 20, block=4)
    engine = DecodingEngine(model, prefixes)
    results = []
    for x, seed in ((first, 1), (later, 2), (first, 3), (other, 4)):
        plain = sampler.sample(random_dit(causal=True), x, row_seeds(seed, len(x)))
        handle = engine.add(sampler, x, row_seeds(seed, len(x)))
        engine.run()
        assert torch.equal(handle.result.tokens, plain.tokens)
        results.append((prefixes.reused, prefixes.computed))
    # prefill feeds BOS + 18 prompt tokens per row: first none reused; later 12 of the 14 shared (3 blocks);
    # first again 16 of 19 (whole blocks, one token left to feed); other nothing
    assert results[0] == (0, 2 * 19)
    assert results[1] == (2 * 12, 2 * 19 + 2 * 7)
    assert results[2] == (2 * 12 + 2 * 16, 2 * 19 + 2 * 7 + 2 * 3)
    assert results[3] == (2 * 12 + 2 * 16, 2 * 19 + 2 * 7 + 2 * 3 + 19)
    small = PrefixCache(budget=prefixes.bytes // 4, block=4)
    small_engine = DecodingEngine(model, small)
    for x, seed in ((first, 1), (other, 4)):
        small_engine.add(sampler, x, row_seeds(seed, len(x)))
        small_engine.run()
    assert 0 < small.bytes <= small.budget


@pytest.mark.parametrize("commit_calls", ["joint", "separate"])
def test_block_diffusion_decodings_that_share_prompt_blocks_reuse_their_keys_and_values(commit_calls):
    """Block diffusion with a prefix cache: the clean blocks before the first decoded block (a prompt shared by
    every row) come from the cache when an earlier decoding committed them, keyed by the block layout, and the
    tokens are those decoded without the cache."""
    from unmask.samplers.prefix_cache import PrefixCache

    objective = BlockDiffusion(LogLinear(), MASK, 4)
    sampler = BlockDiffusionSampler(LLaDASampler(objective, 4, 4, threshold=0.3), 4, True,
                                    commit_calls=commit_calls)
    first = canvas(2, 20, [10, 10], 1)
    first[1, :10] = first[0, :10]  # one prompt of 10 tokens: blocks [0, 4) and [4, 8) clean, [8, 12) decoded
    later = first.clone()
    later[:, 9] = (later[:, 9] % 5) + 1  # the same first two blocks, another token in the decoded block
    other = first.clone()
    other[:, 5] = (other[:, 5] % 5) + 1  # differs in the second block: only the first is reused
    prefixes = PrefixCache(budget=1 << 20)
    engine = DecodingEngine(random_dit(), prefixes)
    counts = []
    for x, seed in ((first, 1), (later, 2), (other, 3)):
        plain = sampler.sample(random_dit(), x, row_seeds(seed, 2))
        handle = engine.add(sampler, x, row_seeds(seed, 2))
        engine.run()
        assert torch.equal(handle.result.tokens, plain.tokens) and handle.result.nfe <= plain.nfe
        counts.append((prefixes.reused, prefixes.computed))
    assert counts == [(0, 2 * 8), (2 * 8, 2 * 8), (2 * 8 + 2 * 4, 2 * 8 + 2 * 4)]
