"""LLaDA and Dream checkpoints in their released layouts: the backbone and the loaders against the
reference implementations' own numbers (``../shared/reference/vectors``), and on random tiny folders.

Every fact about the vector set (shapes, special ids, layer count, runs and their settings) comes from the
vector files' ``oracle`` metadata, every tolerance from the README's section 10 (``released_folders``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from unmask.checkpoints.checkpoint import CheckpointError
from unmask.checkpoints.open_weights import LAYOUTS, SMDM_SIZES, OpenWeights, save_released
from unmask.checkpoints.pretrained import Pretrained, export, open_source
from unmask.config import ConfigError, ModelConfig, SampleConfig, load_config
from unmask.data.tokenization import CharTokenizer
from unmask.eval.likelihood import continuation_loglikelihoods
from unmask.families import build_model, build_objective
from unmask.models.common import count_parameters
from unmask.models.llama import Transformer
from unmask.models.registry import build_backbone
from unmask.pipeline import from_pretrained
from unmask.samplers.base import ORDER, PURPOSES, TIME, TOKEN, RowStreams, row_seeds
from unmask.samplers.dream import DreamSampler
from unmask.samplers.llada import LLaDASampler
from unmask.samplers.registry import make_sampler

from released_folders import (
    CHAT_TEMPLATE,
    assert_matches,
    forward_with_hidden_states,
    random_folder,
    readme_run_row,
    reference_folder,
    run_of,
    run_params,
    special_tokens,
    tokenizer_files,
    vectors,
    write_folder,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# README section 1: the files that hold a model's weights, input, logits and hidden states
FORWARD_FILES = ["llada_forward", "dream_forward"]
# the config's special ids and the tokenizer attribute that must hold each
SPECIAL_ROLES = {"mask_token_id": "mask_id", "eos_token_id": "eos_id", "pad_token_id": "pad_id", "bos_token_id": "bos_id"}


def check_special_ids(tokenizer, config: dict) -> None:
    """The loaded tokenizer has every special id the config states, and the config's vocabulary."""
    assert tokenizer.vocab_size == config["vocab_size"]
    for key, attr in SPECIAL_ROLES.items():
        if config.get(key) is not None:
            assert getattr(tokenizer, attr) == config[key], key


@pytest.mark.parametrize("name", FORWARD_FILES)
def test_forward_pass_matches_the_reference(tmp_path, name):
    ref = reference_folder(tmp_path, name)
    t = ref.t
    lm = from_pretrained(ref.folder)  # sharded safetensors + index, read through the public loader
    check_special_ids(lm.tokenizer, ref.config)
    logits, hidden = forward_with_hidden_states(lm.model, t["input_ids"], ref.layers)
    stored = sorted((k for k in t if k.startswith("hidden_states.")), key=lambda k: int(k.split(".")[1]))
    assert stored == [f"hidden_states.{i}" for i in range(ref.layers + 1)] and sorted(hidden) == sorted(stored)
    for key in stored:  # hidden_states.0 (the embeddings): bit-exact
        assert_matches(hidden[key], t, name, key)
    # LLaDA predicts in place; Dream (the file with shifted logits) scores position i with the logit at i - 1,
    # and the model applies the shift
    shifted = "logits_shifted" in t
    assert lm.config.model.logit_shift == shifted
    assert_matches(logits, t, name, "logits_shifted" if shifted else "logits")
    if shifted:
        assert_matches(logits[:, 1:], {"logits": t["logits"][:, :-1]}, name, "logits")
        assert torch.equal(t["logits_shifted"][:, 1:], t["logits"][:, :-1])


@pytest.mark.parametrize("layout", ["llada", "dream"])
def test_a_released_folder_loads_lazily_in_its_own_dtype(tmp_path, layout):
    folder = random_folder(tmp_path / layout, layout)
    source = open_source(folder)
    assert isinstance(source, OpenWeights) and source.config.model.backbone == "llama"
    model = source.build(dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters()) and not model.rotary_emb.inv_freq.is_meta
    full = source.build()
    ids = torch.randint(0, 37, (2, 9))
    with torch.no_grad():
        assert (model(ids).float() - full(ids)).abs().max() < 0.1 * full(ids).abs().max()


def test_a_broken_folder_is_a_one_line_error(tmp_path):
    folder = random_folder(tmp_path / "llada", "llada")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("model.transformer.ln_f.weight")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lacks 1 parameters.*ln_f"):
        open_source(folder).build()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "block_type": "sequential"}))
    with pytest.raises(CheckpointError, match="block_type='sequential' is not supported"):
        open_source(folder)


class RecordedStreams(RowStreams):
    """The reference's own random draws: ``slabs[purpose]`` (steps, B, L[, V]), indexed by (step, row,
    position), for the draws of that purpose (TOKEN, TIME, ORDER of ``unmask.samplers.base``)."""

    def __init__(self, seeds, slabs: dict[int, torch.Tensor]):
        super().__init__(seeds)
        self.slabs = slabs

    def _slab(self, counter):
        assert counter % PURPOSES in self.slabs, f"a draw of purpose {counter % PURPOSES} that was not recorded"
        return self.slabs[counter % PURPOSES][counter // PURPOSES]

    def uniform(self, rows, counter, index):
        return self._slab(counter)[rows, index].double()

    def uniforms(self, rows, counter, index, n):
        return self._slab(counter)[rows, index].double()


# README sections 5 and 8.2: the recorded random draws of a run (tensor ``<run>.<name>``) and which of
# unmask's draws each replaces
LLADA_RECORDED = {"remask_uniform": ORDER, "gumbel_uniform": TOKEN}  # remasking='random' scores, Gumbel noise
LLADA_REMASKING = {"low_confidence": "confidence", "random": "random"}  # LLaDA's remasking -> unmask's score


def start_canvas(prompt: torch.Tensor, new_tokens: int, mask_id: int) -> torch.Tensor:
    assert not (prompt == mask_id).any()
    return torch.cat([prompt, torch.full((len(prompt), new_tokens), mask_id)], dim=1)


@contextlib.contextmanager
def recorded_calls(model):
    """The input ids of every call of ``model`` inside the ``with`` block."""
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(args[0].clone()))
    try:
        yield calls
    finally:
        hook.remove()


def check_llada_decoding(lm, t: dict[str, torch.Tensor], spec: dict) -> None:
    """LLaDA's ``generate`` run ``spec`` (metadata ``runs[*]``) of the vectors ``t`` on ``lm``: every output
    token, the NFE and the input of every model call (README section 5)."""
    run, kwargs = spec["name"], spec["kwargs"]
    mask_id = kwargs["mask_id"]
    assert mask_id == lm.tokenizer.mask_id
    # README section 5: the *_eos_* options cannot be used with a tiny vocabulary; no padding
    assert not spec.get("logits_eos_inf") and not spec.get("confidence_eos_eot_inf")
    assert spec.get("attention_mask") in (None, "ones")
    prompt = t["prompt"]
    b = len(prompt)
    canvas = start_canvas(prompt, kwargs["gen_length"], mask_id)
    sampler = LLaDASampler(lm.objective, kwargs["steps"], kwargs["block_length"],
                           score=LLADA_REMASKING[kwargs["remasking"]], temperature=kwargs["temperature"],
                           guidance=kwargs["cfg_scale"])
    slabs = {purpose: t[f"{run}.{name}"] for name, purpose in LLADA_RECORDED.items() if f"{run}.{name}" in t}
    assert bool(kwargs["temperature"]) == (TOKEN in slabs) and (kwargs["remasking"] == "random") == (ORDER in slabs)
    if slabs:
        sampler.streams = lambda seeds: RecordedStreams(seeds, slabs)
    with recorded_calls(lm.model) as calls:
        out = sampler.sample(lm.model, canvas, row_seeds(0, b))
    assert torch.equal(out.tokens, t[f"{run}.output"]), run
    assert out.nfe == int(t[f"{run}.nfe"]) == kwargs["steps"], run  # section 5: no early exit
    per_step = 2 if kwargs["cfg_scale"] else 1  # guidance: the conditional pass, then the unconditional one
    assert len(calls) == per_step * out.nfe
    inputs = torch.stack([torch.cat(calls[s:s + per_step]) for s in range(0, len(calls), per_step)])
    assert torch.equal(inputs, t[f"{run}.canvases"]), run


@pytest.mark.parametrize("run", run_params("llada_generate"))
def test_llada_decoding_matches_the_reference(tmp_path, run):
    ref = reference_folder(tmp_path, "llada_generate")
    lm = from_pretrained(ref.folder)
    spec = run_of(ref.meta, run)
    assert spec["kwargs"]["mask_id"] == ref.config["mask_token_id"]
    check_llada_decoding(lm, ref.t, spec)


def relabelling(config: dict, rows: int) -> torch.Tensor:
    """A permutation of the ``rows`` token ids (new id -> old id) that moves the special ids the config
    states together into the middle of the tokenizer's ids (about half way, or a third of the way when
    they are there already) and reverses the order of the others."""
    specials = sorted(special_tokens(config))
    others = [i for i in reversed(range(rows)) if i not in specials]
    free = config["vocab_size"] - len(specials)
    for start in (free // 2, free // 3):
        order = torch.tensor(others[:start] + specials + others[start:])
        if int(order[start]) != start:  # the first special id moves
            return order
    raise AssertionError(f"no relabelling moves the special ids {specials}")


# README section 4: the state-dict keys with one row per token id (input embedding, output head)
LLADA_VOCAB_ROWS = ("model.transformer.wte.weight", "model.transformer.ff_out.weight")


def test_the_reference_holds_with_the_special_ids_inside_the_vocabulary(tmp_path):
    """The LLaDA forward vectors relabelled by a permutation of the token ids that puts the mask, EOS and PAD
    ids in the middle of the vocabulary (embedding and output rows, input ids, the logits' last axis and the
    config's special ids permuted alike): the folder loads with the moved ids and reproduces the moved
    logits (and LLaDA's decoding runs, relabelled alike, their relabelled tokens), so nothing in the loader,
    the model or the sampler takes the mask or the special tokens to be the last ids."""
    t, meta = vectors("llada_forward")
    config = meta["config"]
    rows = config.get("embedding_size") or config["vocab_size"]
    order = relabelling(config, rows)
    new = torch.empty_like(order)
    new[order] = torch.arange(rows)  # old id -> new id
    moved_ids = {key: int(new[value]) for key, value in config.items() if key.endswith("_token_id")
                 and isinstance(value, int)}
    count = len(set(moved_ids.values()))
    assert all(0 < i < config["vocab_size"] - count for i in moved_ids.values()), moved_ids  # at neither end
    assert moved_ids["mask_token_id"] != config["mask_token_id"]

    def relabel(config, state):
        assert all(state[k].shape[0] == rows for k in LLADA_VOCAB_ROWS)
        return {**config, **moved_ids}, {k: v[order] if k in LLADA_VOCAB_ROWS else v for k, v in state.items()}

    ref = reference_folder(tmp_path, "llada_forward", relabel)
    lm = from_pretrained(ref.folder)
    check_special_ids(lm.tokenizer, ref.config)
    assert lm.tokenizer.mask_id == moved_ids["mask_token_id"]
    moved = {**t, "input_ids": new[t["input_ids"]], "logits": t["logits"][..., order]}
    assert int((moved["input_ids"] == lm.tokenizer.mask_id).sum()) == int((t["input_ids"] == config["mask_token_id"]).sum()) > 0
    assert not torch.equal(moved["logits"], t["logits"])
    logits, hidden = forward_with_hidden_states(lm.model, moved["input_ids"], ref.layers)
    assert_matches(logits, moved, "llada_forward", "logits")
    for key in hidden:  # the hidden states do not depend on the ids' names
        assert_matches(hidden[key], moved, "llada_forward", key)
    # LLaDA's decoding runs (on these weights, README section 1) relabelled alike: the samplers too find the
    # mask by its id
    g, g_meta = vectors("llada_generate")
    assert g_meta["config"] == config
    relabelled = {k: new[v] if k == "prompt" or k.endswith((".canvases", ".output")) else
                  v[..., order] if k.endswith(".gumbel_uniform") else v for k, v in g.items()}
    for spec in g_meta["runs"]:
        check_llada_decoding(lm, relabelled, {**spec, "kwargs": {**spec["kwargs"], "mask_id": lm.tokenizer.mask_id}})


def dream_run(tmp_path, name: str, run: str):
    """The model, tensors, call arguments and mask id of a Dream decoding run (top-k/top-p never set)."""
    ref = reference_folder(tmp_path, name)
    t, kwargs = ref.t, run_of(ref.meta, run)["kwargs"]
    lm = from_pretrained(ref.folder)
    mask_id = kwargs["mask_token_id"]
    assert mask_id == ref.config["mask_token_id"] == lm.tokenizer.mask_id
    assert kwargs["top_p"] is None and kwargs["top_k"] is None
    return ref, t, kwargs, lm, mask_id


@pytest.mark.parametrize("run", run_params("dream_generate"))
def test_dream_decoding_matches_the_reference(tmp_path, run):
    ref, t, kwargs, lm, mask_id = dream_run(tmp_path, "dream_generate", run)
    prompt = t[readme_run_row(run, "prompt") or "prompt"]  # README section 8.2's table names each run's prompt
    b = len(prompt)
    canvas = start_canvas(prompt, kwargs["max_new_tokens"], mask_id)
    alg = "maskgit_plus" if kwargs["alg"] == "confidence_threshold" else kwargs["alg"]
    sampler = DreamSampler(lm.objective, kwargs["steps"], alg, alg_temp=kwargs["alg_temp"] or 0.0,
                           eps=kwargs["eps"], threshold=kwargs.get("threshold") or 0.0,
                           temperature=kwargs["temperature"])
    history = t[f"{run}.history"]
    if f"{run}.origin_uniform_flat" in t:  # the reference's uniforms: one per masked position, row-major, per step
        flat, counts = t[f"{run}.origin_uniform_flat"], t[f"{run}.origin_uniform_counts"].tolist()
        slab = torch.zeros(len(counts), *canvas.shape)
        before = torch.cat([canvas[None], history[:-1]])
        for step, (chunk, state) in enumerate(zip(flat.split(counts), before)):
            slab[step][state == mask_id] = chunk
        sampler.streams = lambda seeds: RecordedStreams(seeds, {TIME: slab})
    steps = []
    out = sampler.sample(lm.model, canvas, row_seeds(0, b), on_step=lambda x: steps.append(x.clone()))
    assert out.nfe == int(t[f"{run}.nfe"]) == len(steps)
    if kwargs["alg_temp"]:  # torch's multinomial draws cannot be replayed: the structure (README section 8.2)
        grid = torch.linspace(1, kwargs["eps"], kwargs["steps"] + 1)  # float32
        prev = canvas
        for step, state in enumerate(steps):
            revealed = (prev == mask_id) & (state != mask_id)
            masks = (prev == mask_id).sum().float() / b  # the batch's average mask count
            n = int(masks * (1 - grid[step + 1] / grid[step])) if step < kwargs["steps"] - 1 else int(masks)
            assert revealed.sum(dim=1).tolist() == [n] * b
            with torch.no_grad():
                argmax = lm.model(prev).argmax(-1)
            assert torch.equal(state[revealed], argmax[revealed])
            prev = state
        assert torch.equal(prev, out.tokens) and not (out.tokens == mask_id).any()
        assert torch.equal(out.tokens[:, :prompt.shape[1]], prompt)
        return
    assert torch.equal(out.tokens, t[f"{run}.output"])
    assert torch.equal(torch.stack(steps), history)


def test_llada_log_likelihood_matches_the_reference_and_its_expectation(tmp_path):
    """LLaDA's ``get_log_likelihood`` is the count estimator: k masked answer tokens (k uniform on 1..n),
    weight n/k. On the reference's own masked batches the same formula gives its value; unmask's
    stratified estimator converges to the exact expectation (every subset enumerated)."""
    ref = reference_folder(tmp_path, "llada_loglik")
    t, kwargs = ref.t, ref.meta["kwargs"]
    lm = from_pretrained(ref.folder)
    objective, model = lm.objective, lm.model
    mask_id = kwargs["mask_id"]
    assert mask_id == ref.config["mask_token_id"] == lm.tokenizer.mask_id == objective.mask_id
    assert not kwargs["cfg_scale"]  # README section 7: cfg_scale = 0
    x0 = torch.cat([t["prompt"], t["answer"]])[None]
    prompt = len(t["prompt"])
    assert t["perturbed"].shape == (kwargs["mc_num"] // kwargs["batch_size"], kwargs["batch_size"], x0.shape[1])
    assert (t["perturbed"][..., :prompt] == t["prompt"]).all()  # the prompt is never masked
    counted = torch.zeros_like(x0, dtype=torch.bool)
    counted[:, prompt:] = True
    sigma = torch.zeros(1)
    per_row, logits = [], []
    with torch.no_grad():
        for batch, p_mask in zip(t["perturbed"], t["p_mask"]):
            logits.append(model(batch))
            nll = objective.masked_nll(model, x0.expand(len(batch), -1), batch, sigma.expand(len(batch)))
            per_row.append(nll / p_mask[:, 0])
    assert_matches(torch.stack(logits), t, "llada_loglik", "logits")
    assert_matches(-torch.cat(per_row).double().mean(), t, "llada_loglik", "log_likelihood")

    n = int(counted.sum())
    exact = 0.0
    with torch.no_grad():
        subsets = torch.tensor([[(s >> j) & 1 for j in range(n)] for s in range(1, 2 ** n)], dtype=torch.bool)
        masked = torch.zeros(len(subsets), x0.shape[1], dtype=torch.bool)
        masked[:, prompt:] = subsets
        xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
        nll = objective.masked_nll(model, x0.expand(len(xt), -1), xt, torch.zeros(len(xt)))
        k = subsets.sum(1)
        sizes = torch.bincount(k, minlength=n + 1).double()
        exact = -float((nll.double() * n / k / n / sizes[k]).sum())  # E_k E_{|M|=k} (n/k) sum CE
    sequence = x0[0].tolist()
    (estimate, stderr, _), = continuation_loglikelihoods(model, objective, [sequence], [prompt],
                                                         mc_samples=280, estimator="count")
    assert abs(estimate - exact) < 0.5  # stratified draws: far closer than the i.i.d. stderr (about 1.5)


@pytest.mark.parametrize("layout", ["llada", "dream"])
def test_export_writes_the_released_layout_back(tmp_path, layout):
    folder = random_folder(tmp_path / "in", layout)
    source = open_source(folder)
    out = export(source, tmp_path / "out", to=layout)
    again = open_source(out)
    original, written = json.loads((folder / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert LAYOUTS[layout].model(written) == LAYOUTS[layout].model(original)
    assert {k: written[k] for k in ("mask_token_id", "eos_token_id", "model_type")} == \
        {k: original[k] for k in ("mask_token_id", "eos_token_id", "model_type")}
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    a, b = source.build(), again.build()
    ids = torch.randint(0, 37, (2, 11))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    sharded = save_released(source, tmp_path / "sharded", layout, weights=source.weights(), shard_bytes=20_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    with torch.no_grad():
        assert torch.equal(open_source(sharded).build()(ids), a(ids))
    with pytest.raises(CheckpointError, match="not empty"):
        export(source, tmp_path / "out", to=layout)  # never replaces what is there
    other = "dream" if layout == "llada" else "llada"
    with pytest.raises(CheckpointError, match="does not fit"):
        export(source, tmp_path / "other", to=other)


def test_our_own_format_holds_llama_backbone_models(tmp_path):
    source = open_source(random_folder(tmp_path / "in", "dream"))
    lm = from_pretrained(tmp_path / "in")
    out = lm.save_pretrained(tmp_path / "ours")
    again = from_pretrained(out)
    assert again.config.model.backbone == "llama" and again.config.model.logit_shift
    ids = torch.randint(0, 37, (2, 11))
    with torch.no_grad():
        assert torch.equal(again.model(ids), source.build()(ids))


MEMORY_PROBE = """
import json, sys
import torch
from unmask.checkpoints.pretrained import open_source
from unmask.config import ModelConfig
from unmask.families import build_model, build_objective
from unmask.models.common import count_parameters
from unmask.models.llama import Transformer
from unmask.models.registry import build_backbone

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

source = open_source(sys.argv[1])
with torch.device("meta"):  # the first model made on the meta device imports torch's meta kernels (~80 MB)
    Transformer(ModelConfig(backbone="llama", hidden=8, blocks=1, heads=2), 8)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident size (VmHWM) starts again from the current one
before = status("VmRSS")
model = source.build()
growth = status("VmHWM") - before
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"growth": growth, "weights": weights, "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
"""


def test_loading_holds_the_weights_once_in_their_own_dtype(tmp_path):
    """A 33M-parameter bf16 checkpoint in five shards: the load's peak memory grows by the bf16 weights plus
    at most one shard's pages, never by an fp32 copy (which alone would be twice the weights)."""
    cfg = ModelConfig(backbone="llama", hidden=512, blocks=8, heads=8, kv_heads=4, intermediate=1536, length=256,
                      qkv_bias=True, logit_shift=True, dropout=0.0)
    with torch.device("meta"):
        shape = Transformer(cfg, 8000, causal=False, mask_id=7999)
    g = torch.Generator().manual_seed(0)
    state = {LAYOUTS["dream"].to_theirs(k): (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16)
             for k, v in shape.state_dict().items()}
    config = {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 4, "num_hidden_layers": 8,
              "intermediate_size": 1536, "vocab_size": 8000, "max_position_embeddings": 256, "rope_theta": 1e6,
              "rms_norm_eps": 1e-6, "hidden_act": "silu", "mask_token_id": 7999, "eos_token_id": 7997,
              "bos_token_id": 7998, "pad_token_id": 7997}
    folder = write_folder(tmp_path / "big", "dream", config, state, shards=5,
                          specials={7997: "<|endoftext|>", 7998: "<|start|>", 7999: "<|mask|>"})
    cfg_json = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg_json, "torch_dtype": "bfloat16"}))
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("this system cannot reset the peak resident size (/proc/self/clear_refs)")
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(folder)], capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["dtypes"] == ["torch.bfloat16"] and r["weights"] > 60e6
    assert r["weights"] <= r["growth"] < 1.35 * r["weights"] + 20e6, r


def test_the_released_presets_have_the_released_sizes():
    """LLaDA-8B: 8.02B parameters, Dream-7B (Qwen2.5-7B): 7.62B; built on the meta device (no memory)."""
    sizes = {}
    for preset, vocab in (("llada-8b", 126464), ("dream-7b", 152064)):
        cfg = load_config(None, [f"model.preset={preset}"])
        with torch.device("meta"):
            model = Transformer(cfg.model, vocab, causal=False)
        sizes[preset] = sum(p.numel() for p in model.parameters())
    assert sizes == {"llada-8b": 8_015_581_184, "dream-7b": 7_615_616_512}


def test_dream_style_soft_masking_on_the_llama_backbone(tmp_path):
    """A Dream-layout model with a soft-mask module (k = 1, the feedback from its shifted logits): at the
    initial w_s ~ 0 it samples as the binary model; with w_s ~ 1 the feedback changes the samples."""
    source = open_source(random_folder(tmp_path / "dream", "dream"))
    config = dataclasses.replace(source.config, model=dataclasses.replace(source.config.model, soft_mask_top_k=1))
    tokenizer, objective = source.tokenizer, build_objective(source.config, source.tokenizer)
    model = build_model(config, tokenizer).eval()
    missing = model.load_state_dict(source.weights(), strict=False).missing_keys
    assert sorted(missing) == ["soft_mask.a", "soft_mask.b", "soft_mask.c"]
    canvas = torch.full((6, 16), tokenizer.mask_id)
    canvas[:, :3] = torch.tensor([1, 2, 3])

    def sample(soft: bool):
        sampler = make_sampler(SampleConfig(sampler="ancestral", steps=16, soft_mask=soft), objective, tokenizer, 64)
        return sampler.sample(model, canvas, row_seeds(0, 6)).tokens

    with torch.no_grad():
        model.soft_mask.a.fill_(-30.0)  # w_s = sigmoid(a) ~ 1e-13
    assert torch.equal(sample(True), sample(False))
    with torch.no_grad():
        model.soft_mask.a.fill_(8.0)  # w_s ~ 1, and w_b = -10 so that lambda ~ 1 even at a random model's
        model.soft_mask.c.fill_(10.0)  # entropy: the masked inputs become the previous step's predictions
    assert not torch.equal(sample(True), sample(False))
    soft = Pretrained(source.path, config, tokenizer, 0, model.state_dict())
    with pytest.raises(CheckpointError, match="no place for the soft-mask module"):
        save_released(soft, tmp_path / "out", "dream")


def test_an_smdm_checkpoint_loads_with_its_fused_attention_split(tmp_path):
    """SMDM's release is a bare lit-gpt state dict: fused q/k/v rows grouped per key/value head (the
    group's query heads, its key head, its value head), SwiGLU w1 = gate, w2 = up, w3 = down, a 32001-row
    embedding whose last row is the mask and a head without it. Written here from a model of ours by
    that spec, it loads back to the same function."""
    cfg = ModelConfig(backbone="llama", hidden=64, blocks=2, heads=4, intermediate=96, length=64, dropout=0.0)
    torch.manual_seed(0)
    ours = Transformer(cfg, 41, causal=False, mask_id=40).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
        ours.lm_head.weight[40] = 0.0  # SMDM's head has no mask row: its logit is 0
    state, d = ours.state_dict(), 16
    lit = {"transformer.wte.weight": state["model.embed_tokens.weight"], "lm_head.weight": state["lm_head.weight"][:40],
           "transformer.ln_f.weight": state["model.norm.weight"]}
    for i in range(2):
        p = f"model.layers.{i}."
        q, k, v = (state[p + f"self_attn.{n}_proj.weight"].view(4, d, 64) for n in "qkv")
        fused = torch.stack([q, k, v], dim=1).reshape(3 * 64, 64)  # per head: [q_h; k_h; v_h]
        lit.update({f"transformer.h.{i}.attn.attn.weight": fused,
                    f"transformer.h.{i}.attn.proj.weight": state[p + "self_attn.o_proj.weight"],
                    f"transformer.h.{i}.norm_1.weight": state[p + "input_layernorm.weight"],
                    f"transformer.h.{i}.norm_2.weight": state[p + "post_attention_layernorm.weight"],
                    f"transformer.h.{i}.mlp.swiglu.w1.weight": state[p + "mlp.gate_proj.weight"],
                    f"transformer.h.{i}.mlp.swiglu.w2.weight": state[p + "mlp.up_proj.weight"],
                    f"transformer.h.{i}.mlp.swiglu.w3.weight": state[p + "mlp.down_proj.weight"]})
    (tmp_path / "smdm").mkdir()
    save_file({k: v.contiguous() for k, v in lit.items()}, str(tmp_path / "smdm" / "mdm-tiny.safetensors"))
    tokenizer_files(tmp_path / "smdm", 40, {37: "<unk>", 38: "<s>", 39: "</s>"})  # no mask: appended as 40
    with pytest.raises(CheckpointError, match="head count"):
        open_source(tmp_path / "smdm" / "mdm-tiny.safetensors")
    lm = from_pretrained(tmp_path / "smdm" / "mdm-tiny.safetensors", heads=4)
    assert lm.tokenizer.mask_id == 40 and lm.config.model.backbone == "llama"
    ids = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        assert torch.allclose(lm.model(ids), ours(ids), atol=1e-5)
    out = lm.generate(["w1 w2"], sampler="first_hitting", length=10, num_samples=2)
    assert all(t.startswith("w1 w2") for t in out.texts)
    written = export(lm.source, tmp_path / "back", to="smdm")  # SMDM's own layout again, for its code
    back = load_file(str(written / "model.safetensors"))
    assert back.keys() == lit.keys() and all(torch.equal(back[k], lit[k]) for k in lit)
    assert not (written / "config.json").exists() and (written / "tokenizer.json").is_file()


def test_smdm_sizes_count_what_their_names_say():
    """SMDM names its sizes by non-embedding parameters: every entry of the table (and the two presets)
    built on the meta device must count that many millions."""
    for name, (blocks, heads, hidden, width) in SMDM_SIZES.items():
        with torch.device("meta"):
            model = Transformer(ModelConfig(backbone="llama", hidden=hidden, blocks=blocks, heads=heads,
                                            intermediate=width, length=2048), 32001)
        millions = count_parameters(model, exclude_embeddings=True) / 1e6
        assert abs(millions - int(name.removesuffix("M"))) < 0.6, name  # measured: within 0.46 for all 30
    for preset, size in (("smdm-170m", 170), ("smdm-1028m", 1028)):
        cfg = load_config(None, [f"model.preset={preset}"])
        with torch.device("meta"):
            model = Transformer(cfg.model, 32001)
        assert abs(count_parameters(model, exclude_embeddings=True) / 1e6 - size) < 0.6


def test_an_8b_model_is_refused_before_it_is_built_in_fp32(tmp_path):
    cfg = load_config(None, ["model.preset=llada-8b", "data.tokenizer=char"])
    with pytest.raises(ConfigError, match="GiB for its fp32 weights"):
        with mock.patch("unmask.families.memory_bytes", return_value=24 * 2 ** 30):
            build_model(cfg, CharTokenizer("abc"))


def test_a_key_padding_mask_makes_ragged_rows_exact():
    """A short row padded to the batch's length, its padding invisible (``keep``), gives the logits of
    the same row alone, on the Llama and the GPT-2 backbones."""
    for backbone in ("llama", "gpt2"):
        cfg = ModelConfig(backbone=backbone, hidden=32, blocks=2, heads=4, kv_heads=2 if backbone == "llama" else 0,
                          intermediate=64, length=32, dropout=0.0)
        torch.manual_seed(0)
        model = build_backbone(cfg, 20, causal=False, mask_id=19).eval()
        short, long_ = torch.randint(0, 19, (1, 5)), torch.randint(0, 19, (1, 9))
        batch = torch.cat([torch.cat([short, torch.full((1, 4), 0)], dim=1), long_])
        keep = torch.ones_like(batch, dtype=torch.bool)
        keep[0, 5:] = False
        with torch.no_grad():
            together = model(batch, keep=keep)
            assert torch.allclose(together[0, :5], model(short)[0], atol=1e-5), backbone
            assert torch.allclose(together[1], model(long_)[0], atol=1e-5), backbone
            assert not torch.allclose(model(batch)[0, :5], model(short)[0], atol=1e-3)  # without keep it differs




# README section 6: the Fast-dLLM function of a run -> unmask's block cache, and its calls' ``call_kind``
FAST_DLLM_CACHES = {"generate": "none", "generate_with_prefix_cache": "prefix", "generate_with_dual_cache": "dual"}
CALL_KINDS = {"none": 0, "prefix": 1, "dual": 2}  # 0: full canvas, 1: from the block on, 2: the block alone


def expected_call_kinds(calls: list[torch.Tensor], canvas: torch.Tensor, cache: str) -> list[int]:
    """Each call's kind by its input: the full canvas is kind 0, anything shorter the cache's kind."""
    return [0 if c.shape[1] == canvas.shape[1] else CALL_KINDS[cache] for c in calls]


def fast_dllm_llada(tmp_path, run: str, **knobs):
    """Fast-dLLM's LLaDA decoding of ``run`` (its function and settings from the metadata): the reference,
    the sampler, its start canvas, its outcome and the inputs of its model calls."""
    ref = reference_folder(tmp_path, "fastdllm_llada_generate")
    spec = run_of(ref.meta, run)
    kwargs, cache = spec["kwargs"], FAST_DLLM_CACHES[spec["function"]]
    lm = from_pretrained(ref.folder)
    mask_id = kwargs["mask_id"]
    assert mask_id == ref.config["mask_token_id"] == lm.tokenizer.mask_id
    assert kwargs["remasking"] == "low_confidence" and kwargs["temperature"] == 0  # README section 6
    canvas = start_canvas(ref.t["prompt"], kwargs["gen_length"], mask_id)
    threshold = kwargs["threshold"]
    assert threshold is None or threshold > 0  # unmask's threshold 0 means none
    sampler = LLaDASampler(lm.objective, kwargs["steps"], kwargs["block_length"], threshold=threshold or 0.0,
                           temperature=kwargs["temperature"], block_cache=cache, **knobs)
    with recorded_calls(lm.model) as calls:
        out = sampler.sample(lm.model, canvas, row_seeds(0, len(canvas)))
    t = ref.t
    assert torch.equal(out.tokens, t[f"{run}.output"])
    assert out.nfe == int(t[f"{run}.nfe"]) == spec.get("nfe", out.nfe) == len(calls)
    assert [c.shape[1] for c in calls] == t[f"{run}.call_lengths"].tolist()
    assert torch.equal(torch.cat(calls, dim=1), t[f"{run}.call_input_ids_flat"])
    assert expected_call_kinds(calls, canvas, cache) == t[f"{run}.call_kind"].tolist()
    return lm, sampler, canvas, out


@pytest.mark.parametrize("run", run_params("fastdllm_llada_generate", lambda r: r["function"] == "generate"))
def test_fast_dllm_threshold_decoding_matches_the_reference(tmp_path, run):
    """Fast-dLLM's ``generate`` (no cache): with a threshold every candidate at or above it is revealed,
    the best always, until the block is complete; without, LLaDA's schedule (float64 confidences). Every
    call sees the full canvas."""
    fast_dllm_llada(tmp_path, run)


@pytest.mark.parametrize("run", run_params("fastdllm_llada_generate", lambda r: r["function"] != "generate"))
def test_fast_dllm_cached_decoding_matches_the_reference(tmp_path, run):
    """Fast-dLLM's prefix and dual caches: every output token, the NFE (including Fast-dLLM's call after a
    block-completing full forward, in reference_compatible mode) and every call's input (full canvas at a
    block's start, then the canvas from the block on, or the block alone)."""
    lm, sampler, canvas, out = fast_dllm_llada(tmp_path, run, reference_compatible=True)
    assert sampler.block_cache != "none"
    sampler.reference_compatible = False  # unmask's default skips the call that can change nothing
    again = sampler.sample(lm.model, canvas, row_seeds(0, len(canvas)))
    assert torch.equal(again.tokens, out.tokens) and again.nfe <= out.nfe


@pytest.mark.parametrize("run", run_params("fastdllm_dream_block_generate"))
def test_fast_dllm_dream_block_decoding_matches_the_reference(tmp_path, run):
    ref, t, kwargs, lm, mask_id = dream_run(tmp_path, "fastdllm_dream_block_generate", run)
    assert not kwargs["alg_temp"]
    canvas = start_canvas(t["prompt"], kwargs["max_new_tokens"], mask_id)
    threshold = kwargs.get("threshold") or 0.0
    # README section 8.3: confidence_threshold scores by max p; any other alg takes the schedule branch,
    # which always uses negative entropy
    score = "confidence" if kwargs["alg"] == "confidence_threshold" else "entropy"
    cache = "dual" if kwargs["dual_cache"] else "prefix"
    sampler = DreamSampler(lm.objective, kwargs["steps"], score, threshold=threshold, eps=kwargs["eps"],
                           temperature=kwargs["temperature"], block_length=kwargs["block_length"], block_cache=cache)
    with recorded_calls(lm.model) as calls:
        out = sampler.sample(lm.model, canvas, row_seeds(0, len(canvas)))
    assert torch.equal(out.tokens, t[f"{run}.output"])
    assert out.nfe == int(t[f"{run}.nfe"]) == len(calls)
    assert [c.shape[1] for c in calls] == t[f"{run}.call_lengths"].tolist()
    assert torch.equal(torch.cat(calls, dim=1), t[f"{run}.call_input_ids_flat"])
    assert expected_call_kinds(calls, canvas, cache) == t[f"{run}.call_kind"].tolist()
