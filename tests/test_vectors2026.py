"""The 2026 open-weight block-diffusion models against their references' own numbers
(``../shared/reference/vectors2026``, skipped with the reason when absent): each model written as a folder
in its released layout from the vector file's weights and metadata config, loaded through
:func:`unmask.from_pretrained`, and run through unmask's own network and samplers. Every shape, id,
layer count, run and setting comes from the files' metadata, every tolerance from the README (section 11)
or its prose (see :data:`released_folders.V2026`).

SDAR (README sections 9 and 10): the forward pass with its block-causal mask (run a) and through the exact
block cache after a prefill (run b); ``block_diffusion_generate`` replayed with the reference's own Exp(1)
draws: every output token, the NFE, every network call's input ids, first position, key length and
whether it stored its keys, every step's block before and after and its commits, and the logits of every
denoising call.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from unmask import from_pretrained
from unmask.checkpoints.checkpoint import CheckpointError
from unmask.checkpoints.open_weights import LAYOUTS
from unmask.checkpoints.pretrained import export, open_source
from unmask.config import SampleConfig
from unmask.models.common import BlockDiffusionCache, Layout
from unmask.samplers.base import PURPOSES, TOKEN, RowStreams
from unmask.samplers.block_diffusion import BlockDiffusionSampler
from unmask.samplers.engine import commit
from unmask.samplers.registry import make_sampler
from unmask.samplers.sdar import SDARSampler

from released_folders import V2026, forward_with_hidden_states, write_folder

pytestmark = pytest.mark.usefixtures("one_thread")

SDAR_STRATEGIES = {"low_confidence_dynamic": "dynamic", "low_confidence_static": "static",
                   "sequential": "sequential"}  # SDAR's remasking_strategy -> sample.strategy


def weights_of(name: str) -> str:
    """The vector file whose ``state.*`` tensors ``name`` runs: itself, or the file its metadata's ``weights``
    names (README section 1: the generation files hold no weights)."""
    if V2026.holds_weights(name):
        return name
    stated = V2026.oracle(name)["weights"]
    source = stated.split(" of ")[-1].removesuffix(".safetensors")
    assert V2026.holds_weights(source), f"{name}: its weights are said to be in {source}, which holds none"
    return source


def released_folder(tmp_path: Path, name: str, layout: str) -> Path:
    """The model of vector file ``name`` as a folder in ``layout`` (two shards and an index; the tokenizer's
    special tokens at the ids the metadata config states)."""
    source = weights_of(name)
    w, _ = V2026.vectors(source)
    state = {k.removeprefix("state."): v for k, v in w.items() if k.startswith("state.")}
    return write_folder(tmp_path / f"{layout}-{name}", layout, V2026.oracle(name)["config"], state, shards=2)


# --- SDAR ---------------------------------------------------------------------------------------------------

def test_sdar_forward_with_its_block_mask_and_through_the_block_cache(tmp_path):
    t, meta = V2026.vectors("sdar_forward")
    config = meta["config"]
    lm = from_pretrained(released_folder(tmp_path, "sdar_forward", "sdar"))
    model, layers = lm.model, config["num_hidden_layers"]
    assert lm.config.family == "bd3lm" and lm.config.model.block_size == config["block_size"]
    assert lm.tokenizer.mask_id == config["mask_token_id"] and lm.config.model.head_size == config["head_dim"]
    ids = t["input_ids"]
    length = ids.shape[1]
    layout = Layout(torch.arange(length), t["block_attention_mask"].bool(), length)
    logits, hidden = forward_with_hidden_states(model, ids, layers, norm_index=layers + 1, layout=layout)
    V2026.assert_matches(logits, t, "sdar_forward", "a.logits")
    for name, value in hidden.items():
        V2026.assert_matches(value, t, "sdar_forward", f"a.{name}")
    # run b: a prefill of the blocks before the block stores their keys and values, then the block alone
    run_b = next(run for run in meta["runs"] if run["name"] == "b")
    prefix, end = (int(v) for v in re.fullmatch(r"input_ids\[:, (\d+):(\d+)\]", run_b["kwargs"]["input_ids"]).groups())
    assert run_b["kwargs"]["prefill"]["input_ids"] == f"input_ids[:, :{prefix}]"
    block = config["block_size"]
    cache = model.new_cache(len(ids), kind=BlockDiffusionCache, capacity=length)
    commit(model, cache, ids, torch.arange(len(ids)), 0, prefix, block)
    cache.rows, cache.length, cache.commit, cache.chunk_allowed = None, prefix, 0, None
    logits, hidden = forward_with_hidden_states(model, ids[:, prefix:end], layers, norm_index=layers + 1,
                                                cache=cache)
    V2026.assert_matches(logits, t, "sdar_forward", "b.logits")
    for name, value in hidden.items():
        V2026.assert_matches(value, t, "sdar_forward", f"b.{name}")


class ExponentialDraws(RowStreams):
    """The reference's recorded Exp(1) draws ``q`` [call, B, block, V], one slab per denoising call in the
    order the calls are made (across blocks: ``counter`` is shared by every block's streams); a sampler's
    uniforms ``u`` become ``exp(-q)``, so that its ``-log u`` is the reference's ``q``."""

    def __init__(self, seeds, slabs: torch.Tensor, counter: list[int]):
        super().__init__(seeds)
        self.slabs, self.counter = slabs, counter

    def uniforms(self, rows, counter, index, n):
        assert counter % PURPOSES == TOKEN, "SDAR draws tokens only"
        slab = self.slabs[self.counter[0]]
        self.counter[0] += 1
        assert slab.shape[-1] == n
        return torch.exp(-slab[rows, index].double())


@pytest.mark.parametrize("run", V2026.run_params("sdar_generate"))
def test_sdar_block_diffusion_generate_call_by_call(tmp_path, run):
    t, meta = V2026.vectors("sdar_generate")
    spec = next(r for r in meta["runs"] if r["name"] == run)
    kw = spec["kwargs"]
    lm = from_pretrained(released_folder(tmp_path, "sdar_generate", "sdar"))
    assert kw["mask_id"] == lm.tokenizer.mask_id
    prompt = t[f"{run}.prompt"]
    block = kw["block_length"]
    total = -(-(prompt.shape[1] + kw["gen_length"]) // block) * block  # README section 10: whole blocks
    canvas = torch.cat([prompt, torch.full((1, total - prompt.shape[1]), kw["mask_id"])], dim=1)
    stops = kw["stopping_criteria_idx"] or []  # SDAR's stop list: EOS and the rest as sample.stop_ids
    cfg = SampleConfig(sampler="sdar", steps=kw["denoising_steps"], strategy=SDAR_STRATEGIES[kw["remasking_strategy"]],
                       threshold=kw["confidence_threshold"], temperature=kw["temperature"], top_k=kw["top_k"],
                       top_p=kw["top_p"], block_size=block, commit_calls="separate", stop_at_eos=bool(stops),
                       stop_ids=[i for i in stops if i != lm.tokenizer.eos_id], after_stop="keep")
    sampler = make_sampler(cfg, lm.objective, lm.tokenizer, lm.config.model.length)
    assert isinstance(sampler, BlockDiffusionSampler) and isinstance(sampler.inner, SDARSampler)
    drawn = [0]
    sampler.inner.streams = lambda seeds: ExponentialDraws(seeds, t[f"{run}.exponential"], drawn)
    calls, frames = [], []

    def record(module, args, kwargs):
        cache = kwargs["cache"]
        calls.append((args[0].clone(), cache.length, cache.length + args[0].shape[1], cache.commit > 0))

    def output(module, args, kwargs, out):
        if not kwargs["cache"].commit:
            frames.append(("logits", out.detach().clone()))

    hooks = [lm.model.register_forward_pre_hook(record, with_kwargs=True),
             lm.model.register_forward_hook(output, with_kwargs=True)]
    try:
        result = sampler.sample(lm.model, canvas, torch.zeros(1, dtype=torch.long),
                                on_step=lambda x: frames.append(("canvas", x.clone())))
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(result.tokens, t[f"{run}.output"]) and result.nfe == int(t[f"{run}.nfe"]) == spec["nfe"]
    # every call: its input ids, first position, keys seen and whether it stored them
    assert [c[0].shape[1] for c in calls] == t[f"{run}.call_lengths"].tolist()
    assert torch.equal(torch.cat([c[0] for c in calls], dim=1), t[f"{run}.call_input_ids_flat"])
    assert [c[1] for c in calls] == t[f"{run}.call_position_start"].tolist()
    assert [c[2] for c in calls] == t[f"{run}.call_key_length"].tolist()
    assert [int(c[3]) for c in calls] == t[f"{run}.call_store_kv"].tolist()
    # every denoising step: the block before and after, the commits, the logits at the masked positions
    denoising = [c for c in calls if not c[3]]
    logits = [f[1] for f in frames if f[0] == "logits"]
    after = [f[1] for f in frames if f[0] == "canvas"]
    assert len(denoising) == len(logits) == len(after) == t[f"{run}.denoise_logits"].shape[0] == drawn[0]
    previous = canvas
    for s, (call, out, now) in enumerate(zip(denoising, logits, after)):
        where = slice(call[1], call[2])
        before_block, after_block = previous[:, where], now[:, where]
        assert torch.equal(before_block, t[f"{run}.step_block_before"][s])
        assert torch.equal(after_block, t[f"{run}.step_block_after"][s])
        committed = (before_block == kw["mask_id"]) & (after_block != kw["mask_id"])
        assert torch.equal(committed, t[f"{run}.step_transfer"][s].bool())
        masked = before_block == kw["mask_id"]
        expected = t[f"{run}.denoise_logits"][s][masked]
        got = out[:len(expected)]
        assert got.shape == expected.shape
        tolerance = V2026.atol("sdar_generate", "denoise_logits")
        assert float((got.double() - expected.double()).abs().max()) <= tolerance, f"step {s}: logits"
        previous = now


@pytest.mark.parametrize("name, layout", [("sdar_forward", "sdar"), ("llada2_forward", "llada2")])
def test_exported_back_to_its_layout_it_reads_back_as_the_same_model(tmp_path, name, layout):
    """``export --to LAYOUT`` of a folder of that layout gives the same config fields, special ids and logits;
    the layout refuses a model of another family and writes nothing."""
    folder = released_folder(tmp_path, name, layout)
    out = export(open_source(folder), tmp_path / "out", to=layout)
    original, written = (json.loads((f / "config.json").read_text()) for f in (folder, out))
    assert LAYOUTS[layout].model(written) == LAYOUTS[layout].model(original)
    assert {k: written[k] for k in ("mask_token_id", "eos_token_id", "head_dim")} == \
        {k: original[k] for k in ("mask_token_id", "eos_token_id", "head_dim")}
    ids = V2026.vectors(name)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(from_pretrained(out).model(ids), from_pretrained(folder).model(ids))
    with pytest.raises(CheckpointError, match="does not fit the llada layout"):
        export(open_source(folder), tmp_path / "llada", to="llada")
    assert not (tmp_path / "llada").exists()


# --- LLaDA2 ------------------------------------------------------------------------------------------------

def routed_forward(model, ids, layers: int, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, hidden states (2026 numbering) and every MoE layer's routing: ``router_logits.i``,
    ``router_topk_index.i`` and ``router_topk_weight.i`` (the experts of each token sorted, with their
    weights: the README compares the indices as sets per token)."""
    routed, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "expert_bias"):
            hooks.append(gate.register_forward_hook(lambda m, args, out, i=i: routed.__setitem__(i, out)))
    try:
        logits, hidden = forward_with_hidden_states(model, ids, layers, norm_index=layers + 1, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    for i, routing in routed.items():
        index, order = routing.index.sort(dim=1)
        hidden[f"router_logits.{i}"] = routing.logits
        hidden[f"router_topk_index.{i}"] = index
        hidden[f"router_topk_weight.{i}"] = routing.weight.gather(1, order)
    return logits, hidden


def test_llada2_forward_with_its_block_mask_and_bidirectional(tmp_path):
    t, meta = V2026.vectors("llada2_forward")
    config = meta["config"]
    lm = from_pretrained(released_folder(tmp_path, "llada2_forward", "llada2"))
    model, layers = lm.model, config["num_hidden_layers"]
    assert lm.config.family == "bd3lm" and lm.tokenizer.mask_id == config["mask_token_id"]
    dense = config["first_k_dense_replace"]
    ids = t["input_ids"]
    length = ids.shape[1]
    runs = {"a": {"layout": Layout(torch.arange(length), t["block_attention_mask"].bool(), length)}, "b": {}}
    for run, kwargs in runs.items():
        logits, hidden = routed_forward(model, ids, layers, **kwargs)
        V2026.assert_matches(logits, t, "llada2_forward", f"{run}.logits")
        routed = [k for k in t if k.startswith(f"{run}.router_topk_index.")]
        assert sorted(int(k.rsplit(".", 1)[1]) for k in routed) == list(range(dense, layers))
        for name, value in hidden.items():
            if name.startswith("router_topk_index."):
                assert torch.equal(value, t[f"{run}.{name}"].sort(dim=1).values), f"{run}.{name}"
            elif name.startswith("router_topk_weight."):
                order = t[f"{run}.router_topk_index.{name.rsplit('.', 1)[1]}"].argsort(dim=1)
                expected = {f"{run}.{name}": t[f"{run}.{name}"].gather(1, order)}
                V2026.assert_matches(value, expected, "llada2_forward", f"{run}.{name}")
            else:
                V2026.assert_matches(value, t, "llada2_forward", f"{run}.{name}")


class RecordedCalls:
    """The input ids of every call of ``model`` and, for the calls that return logits, the logits."""

    def __init__(self, model):
        self.inputs, self.outputs = [], []
        self.hooks = [model.register_forward_pre_hook(lambda m, args: self.inputs.append(args[0].clone())),
                      model.register_forward_hook(lambda m, args, out: self.outputs.append(out.detach().clone()))]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()


@pytest.mark.parametrize("run", V2026.run_params("llada2_generate"))
def test_llada2_official_generate_call_by_call(tmp_path, run):
    """LLaDA2.1's ``generate`` (threshold commits and token-to-token edits: the ``llada2`` sampler) and
    LLaDA2.0's (the same rule as SDAR's dynamic strategy at temperature 0: the ``sdar`` sampler) in block
    diffusion without a cache, as the references call the model (the window of every block so far): the final
    canvas, the output cut after its first EOS, the NFE, every call's window, every step's block before and
    after, its commits and edits, and the logits of the block; then with the exact block cache, the same
    tokens and NFE."""
    t, meta = V2026.vectors("llada2_generate")
    spec = next(r for r in meta["runs"] if r["name"] == run)
    kw = spec["kwargs"]
    lm = from_pretrained(released_folder(tmp_path, "llada2_generate", "llada2"))
    assert (kw["mask_id"], kw["eos_id"]) == (lm.tokenizer.mask_id, lm.tokenizer.eos_id)
    prompt, block = t[f"{run}.prompt"], kw["block_length"]
    total = -(-(prompt.shape[1] + kw["gen_length"]) // block) * block  # README section 7: whole blocks
    canvas = torch.cat([prompt, torch.full((1, total - prompt.shape[1]), kw["mask_id"])], dim=1)
    v21 = "LLaDA2.1" in spec["function"]
    assert v21 or "LLaDA2.0" in spec["function"]
    decoding = (dict(sampler="llada2", edit_threshold=kw["editing_threshold"], max_post_steps=kw["max_post_steps"])
                if v21 else dict(sampler="sdar", strategy="dynamic", steps=kw["steps"]))
    results = {}
    for cached in (False, True):
        cfg = SampleConfig(**decoding, threshold=kw["threshold"], temperature=kw["temperature"], block_size=block,
                           kv_cache=cached)
        sampler = make_sampler(cfg, lm.objective, lm.tokenizer, lm.config.model.length)
        if f"{run}.exponential" in t:
            drawn = [0]
            sampler.inner.streams = lambda seeds: ExponentialDraws(seeds, t[f"{run}.exponential"], drawn)
        frames = []
        with RecordedCalls(lm.model) as calls:
            results[cached] = sampler.sample(lm.model, canvas, torch.zeros(1, dtype=torch.long),
                                             on_step=lambda x: frames.append(x.clone()))
        if not cached:
            uncached_calls, uncached_frames = calls, frames
    result = results[False]
    assert torch.equal(result.tokens, t[f"{run}.final_canvas"]) and result.nfe == int(t[f"{run}.nfe"]) == spec["nfe"]
    generated = result.tokens[0, prompt.shape[1]:prompt.shape[1] + kw["gen_length"]]
    eos = (generated == kw["eos_id"]).nonzero()
    assert torch.equal(generated[:int(eos[0]) + 1] if len(eos) else generated, t[f"{run}.output"][0])
    assert torch.equal(results[True].tokens, result.tokens) and results[True].nfe == result.nfe
    calls = uncached_calls
    assert [c.shape[1] for c in calls.inputs] == t[f"{run}.call_lengths"].tolist()
    assert torch.equal(torch.cat(calls.inputs, dim=1), t[f"{run}.call_input_ids_flat"])
    previous, edits = canvas, 0
    for s, (window, out, now) in enumerate(zip(calls.inputs, calls.outputs, uncached_frames, strict=True)):
        where = slice(window.shape[1] - block, window.shape[1])
        before, after = previous[:, where], now[:, where]
        assert torch.equal(before, t[f"{run}.step_block_before"][s]) and torch.equal(after, t[f"{run}.step_block_after"][s])
        unmasked = (before == kw["mask_id"]) & (after != kw["mask_id"])
        edited = (before != kw["mask_id"]) & (after != before)
        assert torch.equal(unmasked, t[f"{run}.step_unmasked"][s].bool()), f"step {s}"
        assert torch.equal(edited, t[f"{run}.step_edited"][s].bool()), f"step {s}"
        edits += int(edited.sum())
        read = (canvas[:, where] == kw["mask_id"]) if v21 else (before == kw["mask_id"])
        expected = t[f"{run}.block_logits"][s][read]
        assert float((out[:len(expected)].double() - expected.double()).abs().max()) <= \
            V2026.atol("llada2_generate", "block_logits"), f"step {s}: logits"
        previous = now
    assert edits == spec["edits"]


class RecordedDraws(RowStreams):
    """The reference's Exp(1) draws [call, B, block, V] of a decoding of the whole batch, one slab per call with
    draws in call order (rows index the batch)."""

    def __init__(self, seeds, slabs: torch.Tensor, counter: list[int]):
        super().__init__(seeds)
        self.slabs, self.counter = slabs, counter

    def uniforms(self, rows, counter, index, n):
        slab = self.slabs[self.counter[0]]
        self.counter[0] += 1
        return torch.exp(-slab[rows, index].double())


@pytest.mark.parametrize("run", V2026.run_params("llada2_diffusers_generate"))
def test_llada2_diffusers_pipeline_call_by_call(tmp_path, run):
    """diffusers' LLaDA2Pipeline with its BlockRefinementScheduler (README section 8; a folder with the
    transformers-5 config of the file, ``rope_parameters``): the output, the NFE, every call's window and
    whether it attended causally (the pipeline's 2-D mask with zeros), every step's block before it and the
    block's logits; the first step of a sampled run uses the reference's own draws."""
    t, meta = V2026.vectors("llada2_diffusers_generate")
    spec = next(r for r in meta["runs"] if r["name"] == run)
    kw = spec["kwargs"]
    lm = from_pretrained(released_folder(tmp_path, "llada2_diffusers_generate", "llada2"))
    assert (kw["mask_token_id"], kw["eos_token_id"]) == (lm.tokenizer.mask_id, lm.tokenizer.eos_id)
    assert kw["eos_early_stop"] and kw["output_type"] == "seq"
    prompt, block, gen = t[f"{run}.prompt"], kw["block_length"], kw["gen_length"]
    canvas = torch.cat([prompt, torch.full((len(prompt), gen), kw["mask_token_id"])], dim=1)
    edit = kw["editing_threshold"] if kw["editing_threshold"] is not None else 1.0
    cfg = SampleConfig(sampler="llada2_pipeline", steps=kw["num_inference_steps"], block_length=block,
                       threshold=kw["threshold"], edit_threshold=edit, max_post_steps=kw.get("max_post_steps", 16),
                       temperature=kw["temperature"])
    sampler = make_sampler(cfg, lm.objective, lm.tokenizer, lm.config.model.length)
    assert sampler.coupled
    if f"{run}.exponential" in t:
        drawn = [0]
        sampler.streams = lambda seeds: RecordedDraws(seeds, t[f"{run}.exponential"], drawn)
    causal = []
    hook = lm.model.register_forward_pre_hook(lambda m, args, kwargs: causal.append("layout" in kwargs),
                                              with_kwargs=True)
    try:
        with RecordedCalls(lm.model) as calls:
            result = sampler.sample(lm.model, canvas, torch.zeros(len(prompt), dtype=torch.long))
    finally:
        hook.remove()
    assert torch.equal(result.tokens[:, prompt.shape[1]:], t[f"{run}.output"])
    assert result.nfe == int(t[f"{run}.nfe"]) == spec["nfe"]
    assert [c.shape[1] for c in calls.inputs] == t[f"{run}.call_lengths"].tolist()
    assert torch.equal(torch.cat(calls.inputs, dim=1), t[f"{run}.call_input_ids_flat"])
    masks = t[f"{run}.call_attention_mask_flat"].split(t[f"{run}.call_lengths"].tolist(), dim=1)
    assert causal == [not bool(m.all()) for m in masks]
    for s, (window, out) in enumerate(zip(calls.inputs, calls.outputs, strict=True)):
        where = slice(window.shape[1] - block, window.shape[1])
        assert torch.equal(window[:, where], t[f"{run}.step_block_before"][s]), f"step {s}"
        V2026.assert_matches(out.view(len(prompt), block, -1), {f"{run}.block_logits": t[f"{run}.block_logits"][s]},
                             "llada2_diffusers_generate", f"{run}.block_logits")


# --- DiffusionGemma ------------------------------------------------------------------------------------------

def gemma_folder(tmp_path: Path, name: str) -> Path:
    """The DiffusionGemma of vector file ``name`` as a released folder (its config nests the text model's fields
    and token ids in ``text_config``; the image ids lie outside the text vocabulary, so the tokenizer has only
    the text's special tokens)."""
    source = weights_of(name)
    w, _ = V2026.vectors(source)
    state = {k.removeprefix("state."): v for k, v in w.items() if k.startswith("state.")}
    return write_folder(tmp_path / f"diffusiongemma-{name}", "diffusiongemma", V2026.oracle(name)["config"], state)


def test_diffusiongemma_forward_encoder_and_decoder_with_and_without_self_conditioning(tmp_path):
    t, meta = V2026.vectors("diffusiongemma_forward")
    config, text = meta["config"], meta["config"]["text_config"]
    lm = from_pretrained(gemma_folder(tmp_path, "diffusiongemma_forward"))
    model, layers = lm.model, text["num_hidden_layers"]
    assert lm.config.family == "udlm" and lm.config.model.block_size == config["canvas_length"]
    assert lm.tokenizer.eos_id == text["eos_token_id"] and lm.tokenizer.pad_id == text["pad_token_id"]
    kinds = [(layer.self_attn.head_dim, layer.self_attn.kv_heads,
              "sliding_attention" if layer.self_attn.sliding else "full_attention") for layer in model.layers]
    assert kinds == [(v["head_dim"], v["num_key_value_heads"], v["layer_type"])
                     for _, v in sorted(meta["per_layer_resolved"].items(), key=lambda kv: int(kv[0]))]
    ids, canvas = t["input_ids"], t["decoder_input_ids"]
    for run in meta["runs"]:
        conditioning = run["kwargs"]["self_conditioning_logits"]
        run = run["name"]
        with torch.no_grad():
            cache = model.new_encoder_cache(len(ids), ids.device)
            encoded = model.encode(ids, cache)
            routed = {f"enc.router_topk_index.{i}": layer.routing for i, layer in enumerate(model.layers)}
            hidden = []
            logits = model.decode(canvas, cache, t[conditioning] if conditioning else None, hidden=hidden)
            routed.update({f"dec.router_topk_index.{i}": layer.routing for i, layer in enumerate(model.layers)})
            embedded = model.embed(canvas)
            pre_softcap = (hidden[-1] @ model.embed_tokens.weight.t()).float()  # the final norm times the tied E^T
        assert len(encoded) == len(hidden) == layers + 2
        for i, (enc, dec) in enumerate(zip(encoded, hidden)):
            V2026.assert_matches(enc, t, "diffusiongemma_forward", f"{run}.enc.hidden_states.{i}")
            V2026.assert_matches(dec, t, "diffusiongemma_forward", f"{run}.dec.hidden_states.{i}")
        V2026.assert_matches(embedded, t, "diffusiongemma_forward", f"{run}.dec.token_embeddings")
        V2026.assert_matches(logits, t, "diffusiongemma_forward", f"{run}.logits")
        V2026.assert_matches(pre_softcap, t, "diffusiongemma_forward", f"{run}.logits_pre_softcap")
        cap = lm.config.model.softcap
        assert cap == text["final_logit_softcapping"] and torch.allclose(logits, cap * torch.tanh(pre_softcap / cap))
        for name, (index, weight) in routed.items():  # the experts of each token as a set, with their weights
            stored = t[f"{run}.{name}"].view(-1, index.shape[1])
            assert torch.equal(index.sort(1).values, stored.sort(1).values), f"{run}.{name}"
            weights = f"{run}.{name.replace('index', 'weight')}"
            expected = {weights: t[weights].view(-1, index.shape[1]).gather(1, stored.argsort(1))}
            V2026.assert_matches(weight.gather(1, index.argsort(1)), expected, "diffusiongemma_forward", weights)


class GemmaDraws(RowStreams):
    """The reference's recorded draws, in the order they are made: ``canvas_init`` (one slab per canvas) and
    ``step_renoise_uniform`` (one per step) as integers, ``step_exponential`` (one per step) as the Exp(1) draws
    ``q`` of ``torch.multinomial``'s race ``argmax p / q``; each indexed by batch row and position."""

    def __init__(self, seeds, t: dict[str, torch.Tensor], run: str, steps: int):
        super().__init__(seeds)
        self.t, self.run, self.steps = t, run, steps
        self.taken = {"canvas_init": 0, "step_renoise_uniform": 0, "step_exponential": 0}

    def _next(self, name: str) -> torch.Tensor:
        slab = self.t[f"{self.run}.{name}"][self.taken[name]]
        self.taken[name] += 1
        return slab

    def integers(self, rows, counter, index, high):
        assert high == self.t[f"{self.run}.step_exponential"].shape[-1]
        first = (counter // PURPOSES) % (self.steps + 1) == 0  # draw 0 of a canvas: its initial noise
        return self._next("canvas_init" if first else "step_renoise_uniform")[rows, index]

    def categorical(self, weights, rows, counter, index, precision="float64"):
        assert counter % PURPOSES == TOKEN
        return (weights / self._next("step_exponential")[rows, index]).argmax(-1)  # torch.multinomial's race


@pytest.mark.parametrize("run", V2026.run_params("diffusiongemma_generate"))
def test_diffusiongemma_generate_step_by_step(tmp_path, run):
    t, meta = V2026.vectors("diffusiongemma_generate")
    kw = next(r for r in meta["runs"] if r["name"] == run)["kwargs"]
    lm = from_pretrained(gemma_folder(tmp_path, "diffusiongemma_generate"))
    assert (kw["eos_token_id"], kw["pad_token_id"]) == (lm.tokenizer.eos_id, lm.tokenizer.pad_id)
    prompt = t[f"{run}.prompt"]
    size = lm.config.model.block_size  # the reference generates whole canvases (README section 5): so does the canvas
    canvas = torch.cat([prompt, torch.full((len(prompt), -(-kw["max_new_tokens"] // size) * size), lm.tokenizer.mask_id)],
                       dim=1)
    adaptive = kw["stability_threshold"] is not None and kw["confidence_threshold"] is not None
    cfg = SampleConfig(sampler="entropy_bound", steps=kw["max_denoising_steps"],
                       entropy_bound=kw["sampler_config"]["entropy_bound"], temperature_max=kw["t_max"],
                       temperature_min=kw["t_min"], stable_steps=kw["stability_threshold"] or 0,
                       stop_entropy=kw["confidence_threshold"] if adaptive else 0.0)
    sampler = make_sampler(cfg, lm.objective, lm.tokenizer, lm.config.model.length)
    draws = []
    sampler.streams = lambda seeds: draws.append(GemmaDraws(seeds, t, run, kw["max_denoising_steps"])) or draws[-1]
    model, encoded, steps = lm.model, [], []
    encode, decode = model.encode, model.decode

    def recorded_encode(ids, cache, valid=None):
        starts = cache.length[valid.any(1)].unique()  # the rows still generating continue at one position
        assert len(starts) == 1
        encoded.append((ids[:, :int(valid.sum(1).max())].clone(), int(starts)))
        return encode(ids, cache, valid)

    def recorded_decode(x, cache, self_conditioning=None, rows=None, hidden=None):
        s = len(steps)
        forced = t[f"{run}.step_logits"][s - 1] / t[f"{run}.step_temperature"][s - 1] if self_conditioning is not None \
            else None  # teacher-forced: the reference's own previous tempered logits (rows still denoising)
        out = decode(x, cache, self_conditioning, rows, hidden)
        teacher = decode(x, cache, None if forced is None else forced[rows], rows)
        steps.append((x.clone(), rows.clone(), int(cache.length[rows].min()), teacher))
        return out

    model.encode, model.decode = recorded_encode, recorded_decode
    result = sampler.sample(model, canvas, torch.zeros(len(canvas), dtype=torch.long))
    expected = t[f"{run}.output"]
    assert torch.equal(result.tokens, expected)
    assert result.nfe == int(t[f"{run}.nfe"]) == len(steps)
    assert torch.equal(result.tokens_per_forward, t[f"{run}.tokens_per_forward"].float())
    # the encoder calls: the prompt, then each appended canvas, at the positions that follow
    lengths = t[f"{run}.encoder_call_lengths"].tolist()
    assert [e[0].shape[1] for e in encoded] == lengths
    assert torch.equal(torch.cat([e[0] for e in encoded], dim=1), t[f"{run}.encoder_call_input_ids_flat"])
    assert [e[1] for e in encoded] == t[f"{run}.encoder_call_position_start"].tolist()
    # every decoder call: the canvas of the rows still denoising, its positions, the teacher-forced logits (the rows
    # each call evaluates are pinned by tokens_per_forward: generated tokens over each row's own calls)
    tolerance = V2026.atol("diffusiongemma_generate", "step_logits")
    for s, (x, rows, start, logits) in enumerate(steps):
        assert torch.equal(x, t[f"{run}.step_canvas_in"][s][rows]), f"step {s}: canvas"
        assert start == int(t[f"{run}.step_position_ids"][s][0])
        diff = float((logits.double() - t[f"{run}.step_logits"][s][rows].double()).abs().max())
        assert diff <= tolerance, f"step {s}: logits differ by {diff:.3g}"
    assert draws[0].taken["step_exponential"] == len(steps)
