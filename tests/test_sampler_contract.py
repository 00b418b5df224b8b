"""The contract of every registered sampler, on every family that decodes with it (and the cached and
wrapped variants): a row's tokens depend only on its seed (batched = alone, reordered, ragged prompts),
the same seeds give the same tokens, fixed tokens are kept and nothing stays masked, NFE counts the
network's forward passes, decodings interleaved in one engine give what each gives alone, and malformed
requests are refused with a :class:`SamplingError`. The cases come from the registries: a sampler or
family added there is checked here without a line of this file changing."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import yaml

from unmask.config import (
    SAMPLE_KEYS,
    ConfigError,
    SampleConfig,
    config_keys,
    dump_config,
    forget_sample_settings,
    load_config,
    register_sample_settings,
)
from unmask.data.tokenization import CharTokenizer
from unmask.families import FAMILIES, build_model, build_objective
from unmask.samplers.base import PURPOSES, TOKEN, RowStreams, SamplingError, categorical_probs, row_seeds
from unmask.samplers.denoiser import DenoiseSettings, DiffusionSampler
from unmask.samplers.engine import DecodingEngine, Frame, Outcome, Sampler
from unmask.samplers.registry import (
    SAMPLERS,
    SamplerSpec,
    make_sampler,
    register_sampler,
    samplers_for,
    unregister_sampler,
    values,
)

from toys import TINY, TINY_CANVAS, CountingModel

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTH = 16
TOKENIZER = CharTokenizer("abcdefghij ")
# settings that keep every sampler short on a 16-position canvas (a sampler ignores the keys it does not read)
SHORT = dict(steps=8, block_length=8)
# variants beyond each sampler's defaults: caches on and off (ancestral, Fast-dLLM's, KV), float32 draws,
# parallel first-hitting, remasking, semi-autoregressive windows, guidance
VARIANTS = {
    ("mdlm", "llada"): [dict(block_cache="prefix"), dict(block_cache="dual", threshold=0.3)],
    ("mdlm", "dream"): [dict(block_cache="dual", block_length=8, score="confidence")],
    ("mdlm", "ancestral"): [dict(cache=False), dict(precision="float32"), dict(window=8, stride=4),
                            dict(guidance=1.0)],
    ("mdlm", "first_hitting"): [dict(tokens_per_step=3)],
    ("mdlm", "confidence"): [dict(score="margin", remask=0.2)],
    ("ar", "ar"): [dict(kv_cache=False)],
    ("bd3lm", "ancestral"): [dict(kv_cache=False)],
}


def cases() -> list:
    out = []
    for family, spec in FAMILIES.items():
        for name in samplers_for(spec.decoding):
            for extra in [{}] + VARIANTS.get((family, name), []):
                label = ",".join(f"{k}={v}" for k, v in extra.items())
                out.append(pytest.param(family, name, extra, id=f"{family}-{name}" + (f"-{label}" if label else "")))
    return out


def setup(family: str, name: str, extra: dict):
    overrides = [*TINY, f"family={family}"] + (["model.block_size=4"] if family == "bd3lm" else []) \
        + (["data.layout=pad"] if family == "ilm" else []) + (TINY_CANVAS if family == "udlm" else [])
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = build_model(cfg, TOKENIZER).eval()
    with torch.no_grad():  # away from the zero initialisation: outputs depend on the inputs
        for p in model.parameters():
            p.normal_(0, 0.05)
        if hasattr(model, "stop_head"):  # an insertion model that inserts a few tokens before it stops
            model.stop_head.bias.fill_(-2.0)
    objective = build_objective(cfg, TOKENIZER)
    sampler = make_sampler(SampleConfig(sampler=name, **{**SHORT, **extra}), objective, TOKENIZER, cfg.model.length)
    return model, sampler, FAMILIES[family].decoding


def canvases(decoding: str, prompts: list[int]) -> torch.Tensor:
    """Rows with prompts of the given lengths: masks to generate after them (insertion: one gap after the
    prompt, then room to grow)."""
    t = TOKENIZER
    x = torch.full((len(prompts), LENGTH), t.mask_id)
    for r, p in enumerate(prompts):
        prompt = [(r + j) % 10 for j in range(p)]
        if decoding == "insertion":
            x[r] = t.pad_id
            x[r, :p + 2] = torch.tensor([t.bos_id, *prompt, t.mask_id])
        else:
            x[r, :p] = torch.tensor(prompt)
    return x


def shared_start(extra: dict, sampler) -> bool:
    """Fast-dLLM's cached decoding and a sampler that decodes its rows together (a reference's literal mode) need
    rows whose generated parts start together."""
    return extra.get("block_cache", "none") != "none" or sampler.coupled


@pytest.mark.parametrize("family, name, extra", cases())
def test_every_sampler_keeps_the_contract(family, name, extra):
    model, sampler, decoding = setup(family, name, extra)
    prompts = [3, 3, 3, 3] if shared_start(extra, sampler) else [0, 5, 2, 3]
    x, seeds = canvases(decoding, prompts), row_seeds(11, 4)
    counted = CountingModel(model)
    batch = sampler.sample(counted, x, seeds)
    tokens = batch.tokens
    # NFE counts the forward passes (guidance's second pass is part of its call; an encoder-decoder's encoder
    # passes are counted apart, as its reference counts)
    if extra.get("guidance"):
        assert batch.nfe <= counted.forwards <= 2 * batch.nfe
    else:
        assert batch.nfe + batch.extra_calls == counted.forwards > 0
    assert int(batch.row_nfe.max()) <= batch.nfe and batch.generated > 0
    # nothing stays masked (a row the diffusers pipeline stopped at its EOS keeps the masks after it); fixed tokens
    # are kept where they were (an insertion model keeps them in order)
    for row in tokens:
        eos = (row == TOKENIZER.eos_id).nonzero()[:, 0]
        end = int(eos[0]) if sampler.coupled and len(eos) else len(row)
        assert not bool((row[:end] == TOKENIZER.mask_id).any())
    if decoding == "insertion":
        assert bool((tokens[:, 0] == TOKENIZER.bos_id).all())
    else:
        fixed = x != TOKENIZER.mask_id
        assert torch.equal(tokens[fixed], x[fixed])
    # the same seeds give the same tokens; a row's tokens depend only on its own seed
    assert torch.equal(sampler.sample(model, x, seeds).tokens, tokens)
    if sampler.coupled:  # diffusers' LLaDA2 pipeline decides when a block ends over the batch (documented)
        return
    for r in range(4):
        alone = sampler.sample(model, x[r:r + 1], seeds[r:r + 1])
        assert torch.equal(alone.tokens[0], tokens[r]), r
    flipped = sampler.sample(model, x.flip(0), seeds.flip(0)).tokens
    assert torch.equal(flipped.flip(0), tokens)
    others = sampler.sample(model, x, row_seeds(12, 4)).tokens
    assert not torch.equal(others, tokens)
    # interleaved with another decoding of itself in one engine: the same tokens and NFE as alone
    engine = DecodingEngine(model)
    first, second = engine.add(sampler, x[:2], seeds[:2]), engine.add(sampler, x[2:], seeds[2:])
    engine.run()
    assert torch.equal(torch.cat([first.result.tokens, second.result.tokens]), tokens)
    assert first.result.nfe == sampler.sample(model, x[:2], seeds[:2]).nfe


@pytest.mark.parametrize("family, name, extra", cases())
def test_every_sampler_refuses_malformed_requests(family, name, extra):
    model, sampler, decoding = setup(family, name, extra)
    x = canvases(decoding, [2, 2])
    for canvas, seeds in ((x[:0], row_seeds(0, 0)), (x[0], row_seeds(0, 1)), (x, row_seeds(0, 3))):
        with pytest.raises(SamplingError):
            sampler.sample(model, canvas, seeds)
    if shared_start(extra, sampler):
        with pytest.raises(SamplingError, match="same position|one prompt length"):
            sampler.sample(model, canvases(decoding, [1, 4]), row_seeds(0, 2))


@dataclass(frozen=True)
class EdgeSettings(DenoiseSettings):  # guidance, soft-mask feedback and the draw's keys come with it
    edge: str = "left"  # the end of each row's masked positions revealed first: left or right

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"edge": ("left", "right")}


class EdgeSampler(DiffusionSampler):
    """A new sampler, written as the docs' "Adding a sampler" page says: each step reveals the leftmost (or
    rightmost) masked position of every row, drawn from the model."""

    def __init__(self, diffusion, edge: str = "left", **settings):
        super().__init__(diffusion, **settings)
        self.edge = edge

    def start(self, model, canvas, seeds):
        self.check(canvas, seeds)
        return self._decode(canvas, RowStreams(seeds), self.denoiser(model, canvas))

    def _decode(self, canvas, streams, denoise):
        x, step = canvas.clone(), 0
        row_nfe = torch.zeros(len(x), dtype=torch.long)
        while (x == self.mask_id).any():
            masked = x == self.mask_id
            rows = masked.any(dim=1).nonzero()[:, 0]
            ends = masked[rows] if self.edge == "left" else masked[rows].flip(1)
            first = ends.float().argmax(dim=1)
            first = first if self.edge == "left" else x.shape[1] - 1 - first
            at = torch.zeros_like(masked[rows])
            at[torch.arange(len(rows)), first] = True
            logits = yield denoise(x[rows], masked[rows].double().mean(dim=1), at, rows)
            probs = categorical_probs(logits, self.temperature, self.top_k, self.top_p, exclude=self.mask_id)
            x[rows, first] = streams.categorical(probs, rows, step * PURPOSES + TOKEN, first)
            row_nfe[rows] += 1
            step += 1
            yield Frame(x)
        return Outcome(x, row_nfe)


def test_a_new_sampler_is_one_module_with_its_settings_and_one_registry_entry():
    spec = SamplerSpec("edge", "diffusion", EdgeSettings,
                       lambda settings, objective, tokenizer: EdgeSampler(objective, **values(settings)),
                       "the leftmost (or rightmost) masked position of every row per step")
    register_sampler(spec)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_sampler(spec)
        cfg = load_config(None, [*TINY, "sample.sampler=edge", "sample.edge=right", "sample.guidance=0.5"])
        assert any(k.key == "sample.edge" and "left | right" in k.help for k in config_keys())
        with pytest.raises(ConfigError, match="sample.edge.*not one of left, right"):
            load_config(None, [*TINY, "sample.edge=middle"])
        model, _, _ = setup("mdlm", "ancestral", {})
        sampler = make_sampler(cfg.sample, build_objective(cfg, TOKENIZER), TOKENIZER, LENGTH)
        assert (sampler.edge, sampler.guidance) == ("right", 0.5)
        x, seeds = canvases("diffusion", [0, 5, 2]), row_seeds(3, 3)
        frames = []
        out = sampler.sample(model, x, seeds, on_step=lambda frame: frames.append(frame.clone()))
        assert out.nfe == LENGTH and not bool((out.tokens == TOKENIZER.mask_id).any())
        assert bool((frames[0][:, -1] != TOKENIZER.mask_id).all())  # the right end first
        assert bool((frames[0][:, :-1] == x[:, :-1]).all())
        assert torch.equal(sampler.sample(model, x[1:2], seeds[1:2]).tokens[0], out.tokens[1])
        with pytest.raises(SamplingError, match="is for masked diffusion"):  # the registry keeps it to its family's decoding
            make_sampler(cfg.sample, build_objective(load_config(None, [*TINY, "family=ar"]), TOKENIZER), TOKENIZER,
                         LENGTH)
    finally:
        unregister_sampler("edge")
    for key in ("sample.sampler=edge", "sample.edge=left"):
        with pytest.raises(ConfigError, match="edge"):
            load_config(None, [*TINY, key])


def test_each_sampler_reads_its_own_settings_from_the_flat_sample_keys(tmp_path):
    model_cfg = load_config(None, TINY)
    objective = build_objective(model_cfg, TOKENIZER)
    build = lambda **keys: make_sampler(SampleConfig(**keys), objective, TOKENIZER, LENGTH)  # noqa: E731
    for name, spec in SAMPLERS.items():  # every key of a sampler reaches it, under the name it is registered by
        if spec.decoding == "diffusion":
            assert isinstance(build(sampler=name, **SHORT), Sampler)
    assert build(sampler="dream", score="origin").score == "origin"
    with pytest.raises(SamplingError, match="score='origin' is not one of confidence, margin, entropy, random"):
        build(sampler="confidence", score="origin")  # Dream's score only
    assert build(sampler="first_hitting", steps=64).k == 1  # another sampler's key is ignored...
    with pytest.raises(SamplingError, match="sample.factor does not apply to the 'ancestral' sampler"):
        build(sampler="ancestral", factor=0.5)  # ...unless it asks for a behaviour
    ar = build_objective(load_config(None, [*TINY, "family=ar"]), TOKENIZER)
    with pytest.raises(SamplingError, match="sample.window does not apply to the 'ar' sampler"):
        make_sampler(SampleConfig(window=8), ar, TOKENIZER, LENGTH)
    assert make_sampler(SampleConfig(window=0, guidance=0.0), ar, TOKENIZER, LENGTH).kv_cache  # at the default
    with pytest.raises(SamplingError, match="unknown key sample.stepz"):
        build(stepz=3)
    with pytest.raises(ConfigError, match="did you mean 'sample.steps'"):
        load_config(None, [*TINY, "sample.stepz=3"])
    cfg = load_config(None, [*TINY, "sample.steps=7"])  # the saved config holds every key, given or default
    dump_config(cfg, tmp_path / "c.yaml")
    saved = yaml.safe_load((tmp_path / "c.yaml").read_text())["sample"]
    assert saved["steps"] == 7 and saved["temperature"] == 1.0 and set(SAMPLE_KEYS) <= set(saved)
    assert load_config(tmp_path / "c.yaml") == cfg and SampleConfig(steps=128) == SampleConfig() != cfg.sample


def test_a_key_means_one_type_default_and_range_across_samplers():
    @dataclass(frozen=True)
    class Clashing(DenoiseSettings):
        steps: int = 5  # another default than every other sampler's steps

    with pytest.raises(ValueError, match="sample.steps is declared with another type, default or range"):
        register_sample_settings("clashing", Clashing)
    forget_sample_settings("clashing")
    assert SAMPLE_KEYS["steps"].default == 128 and "clashing" not in SAMPLE_KEYS["steps"].readers


def test_the_config_module_alone_knows_every_registered_key():
    """``unmask.config`` imported by itself loads the registries that declare keys before reading a config."""
    code = ("from unmask.config import load_config, ConfigError\n"
            "assert load_config(None, ['sample.steps=3', 'sample.score=margin']).sample.steps == 3\n"
            "try:\n    load_config(None, ['family=bogus'])\nexcept ConfigError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "'family' = 'bogus' is not one of" in out.stdout, out.stderr[-2000:]
