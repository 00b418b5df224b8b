"""LLaDA- and Dream-layout folders through every command: `unmask sample`, `unmask eval`, `unmask serve`
(completions and chat completions with the model's chat template) and lm-eval, on tiny random models
written in the released format by the tests themselves, their special tokens inside the vocabulary."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from unmask.checkpoints.checkpoint import CheckpointError
from unmask.cli import main
from unmask.config import SampleConfig
from unmask.data.chat import ChatTemplateError, render_chat
from unmask.pipeline import from_pretrained
from unmask.samplers.base import SamplingError
from unmask.samplers.registry import make_sampler

from released_folders import hf_causal_folder, random_folder
from runs import free_port

httpx = pytest.importorskip("httpx")
from unmask.serve.app import running_server  # noqa: E402
from unmask.serve.service import ModelService  # noqa: E402

# EOS = PAD, BOS and the mask inside the 40 ids (the words w36 .. w39 follow them, the prompts and texts below
# use w1 .. w30): no command may take the mask or the special tokens to be the last ids
SPECIALS_INSIDE = (33, 34, 35)
DIFFUSION_LAYOUTS = ("llada", "dream", "sdar", "llada2", "diffusiongemma")  # each with its own decoding by default
OWN_SAMPLER = {"diffusiongemma": "entropy_bound"}  # the layouts whose default sampler is not named after them


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return {layout: random_folder(root / layout, layout, special_ids=SPECIALS_INSIDE) for layout in DIFFUSION_LAYOUTS}


def unmask(*args) -> Run:
    """The command line, in this process (what `unmask ARGS` prints and returns)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return Run(code, out.getvalue(), err.getvalue())


@dataclasses.dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.mark.parametrize("layout, sampler", [*((layout, OWN_SAMPLER.get(layout, layout)) for layout in DIFFUSION_LAYOUTS),
                                             ("llada", "first_hitting")])
def test_unmask_sample_on_a_released_folder(folders, layout, sampler):
    out = unmask("sample", folders[layout], "--prompt", "w1 w2 w3", "--prompt", "w4", f"sample.sampler={sampler}",
                 "sample.length=24", "sample.num_samples=2", "sample.steps=16", "sample.block_length=8")
    assert out.returncode == 0, out.stderr
    texts = [line for line in out.stdout.splitlines() if line.startswith("w")]
    assert len(texts) == 4 and texts[0].startswith("w1 w2 w3") and texts[2].startswith("w4")


@pytest.mark.parametrize("layout", DIFFUSION_LAYOUTS)
def test_ragged_batches_give_each_row_what_it_gets_alone(folders, layout):
    """Rows of different prompt lengths in one batch, each with its own stream: batching changes nothing."""
    lm = from_pretrained(folders[layout])
    knobs = dict(length=24, steps=16, block_length=8, temperature=1.0, num_samples=3, seed=5)
    batched = lm.generate(["w1 w2 w3 w4 w5", "w4"], batch_size=6, **knobs)
    alone = lm.generate(["w1 w2 w3 w4 w5", "w4"], batch_size=1, **knobs)
    assert batched.ids == alone.ids
    assert len(set(map(tuple, batched.ids))) == 6  # temperature 1: the rows differ from each other


@pytest.mark.parametrize("layout", DIFFUSION_LAYOUTS)
def test_unmask_eval_scores_a_text_file(folders, tmp_path, layout):
    corpus = tmp_path / "words.txt"
    corpus.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 30 + 1}" for j in range(20)) for i in range(40)))
    out = unmask("eval", folders[layout], "data.dataset=text", f"data.path={corpus}", "data.length=24",
                 "eval.max_sequences=4", "eval.mc_samples=2", "--json", tmp_path / "out.json")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert 0 < result["nll"] < 10 and result["sequences"] >= 1


def test_chat_template_renders_in_the_sandbox():
    text = render_chat("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                       "{% if add_generation_prompt %}<assistant>{% endif %}", [{"role": "user", "content": "hi"}])
    assert text == "<user>hi<assistant>"
    with pytest.raises(ChatTemplateError, match="does not render"):  # the sandbox refuses Python internals
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(ChatTemplateError, match="role"):
        render_chat("x", [{"role": "root", "content": "hi"}])


@pytest.fixture(scope="module", params=DIFFUSION_LAYOUTS)
def server(folders, request):
    service = ModelService(from_pretrained(folders[request.param]))
    with running_server(service) as url:
        yield url, service, request.param
    service.close()


def test_serve_completions_use_the_models_own_sampler(server):
    url, service, layout = server
    sampler = OWN_SAMPLER.get(layout, layout)
    assert service.metadata()["default_sampler"] == sampler
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "w1 w2", "max_tokens": 8, "steps": 8, "seed": 3},
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    # block models decode whole blocks: at most the steps per block or one call per position, and a verification
    size, prompt = service.run.model.block_size, body["usage"]["prompt_tokens"]
    blocks = -(-(prompt + 8) // size) if size else 1
    bound = max(8 * blocks, blocks * size - prompt) + blocks if size else 8
    assert body["unmask"]["sampler"] == sampler and body["choices"][0]["nfe"] <= bound
    assert body["usage"]["completion_tokens"] == 8


def test_serve_chat_completions_apply_the_chat_template(server):
    url, service, _ = server
    messages = [{"role": "user", "content": "w5 w6"}]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "seed": 1},
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    prompt_ids = service.tokenizer.encode(render_chat(service.tokenizer.chat_template, messages))
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)  # the template places BOS itself (here: none)
    bad = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "x", "content": "y"}]}, timeout=60)
    assert bad.status_code in (400, 422) and "role" in bad.text
    lone = httpx.post(f"{url}/v1/chat/completions", content=json.dumps({"messages": [{"role": "user",
                      "content": "w1 \udfff"}]}), headers={"content-type": "application/json"}, timeout=60)
    assert lone.status_code == 400 and "a message holds a lone surrogate (U+DFFF" in lone.text, lone.text


@pytest.mark.parametrize("layout", ["llada", "dream", "diffusiongemma"])
def test_lm_eval_scores_a_released_folder(folders, layout):
    pytest.importorskip("lm_eval")
    from unmask.eval.lm_eval import UnmaskLM

    lm = UnmaskLM(pretrained=str(folders[layout]), mc_samples=4)
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, ("w1 w2", " w3"), 0), Instance("loglikelihood", {}, ("w1 w2", " w4"), 1)]
    results = lm.loglikelihood(requests)
    assert len(results) == 2 and all(r[0] < 0 for r in results)
    assert torch.isfinite(torch.tensor([r[0] for r in results])).all()


def test_unmask_rl_fine_tunes_a_released_folder(folders, tmp_path):
    """GRPO on a LLaDA-layout model, with LLaDA's own decoding as the rollout sampler."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"w{i} w{i + 1}", "text": f"w{i + 2} w{i + 3}"})
                              for i in range(1, 9)) + "\n")
    out = unmask("rl", folders["llada"], f"run_dir={tmp_path / 'rl'}", f"rl.prompts={data}", "rl.mode=model",
                 "rl.sampler=llada", "rl.iterations=2", "rl.prompts_per_step=2", "rl.group_size=2",
                 "rl.reward=prefix_match", "sample.block_length=2", "sample.temperature=1.0")
    assert out.returncode == 0, out.stderr
    tuned = from_pretrained(tmp_path / "rl")
    assert tuned.config.model.backbone == "llama" and tuned.config.sample.sampler == "llada"


@pytest.mark.parametrize("layout", ["llada", "diffusiongemma"])
def test_unmask_sample_chat_answers_in_the_chat_template(folders, layout):
    out = unmask("sample", folders[layout], "--chat", "--prompt", "w5 w6", "sample.length=24", "sample.steps=16",
                 "sample.block_length=8", "sample.num_samples=1")
    assert out.returncode == 0, out.stderr
    lm = from_pretrained(folders[layout])
    gen = lm.generate(["w5 w6"], chat=True, length=24, steps=16, block_length=8, num_samples=1)
    prompt = lm.tokenizer.encode(render_chat(lm.tokenizer.chat_template, [{"role": "user", "content": "w5 w6"}]))
    assert gen.ids[0][:len(prompt)] == prompt.tolist()  # the template's text, no BOS added before it
    generated = gen.ids[0][len(prompt):]
    special = lm.tokenizer.special_token_ids()
    cut = next((i for i, t in enumerate(generated) if t in special), len(generated))
    assert gen.texts[0] == lm.tokenizer.decode(generated[:cut])  # the answer ends at the first special token
    assert gen.texts[0] in out.stdout  # the command prints the same answer (same seed)
    with pytest.raises(SamplingError, match="chat takes"):
        lm.generate(None, chat=True)


def test_fast_dllm_cached_decoding_from_the_command_line(folders, tmp_path):
    common = ["sample.sampler=llada", "sample.length=24", "sample.block_length=8", "sample.steps=16",
              "sample.threshold=0.9", "sample.num_samples=2"]
    for mode in ("prefix", "dual"):
        out = unmask("sample", folders["llada"], "--prompt", "w1 w2 w3", *common, f"sample.block_cache={mode}")
        assert out.returncode == 0, out.stderr
        assert sum(line.startswith("w1 w2 w3") for line in out.stdout.splitlines()) == 2
    ragged = unmask("sample", folders["llada"], "--prompt", "w1 w2 w3", "--prompt", "w4", *common,
                    "sample.block_cache=dual")
    assert ragged.returncode == 2 and "equal prompt lengths" in ragged.stderr
    dream = unmask("sample", folders["dream"], "--prompt", "w1 w2 w3", "sample.sampler=dream", "sample.length=24",
                   "sample.block_length=8", "sample.block_cache=prefix", "sample.threshold=0.9", "sample.score=confidence")
    assert dream.returncode == 0, dream.stderr


HOSTILE_TEMPLATES = {  # what each costs unbounded, and the one line it gets instead
    "nested loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "within"),
    "lipsum": ("{{ lipsum(10**6) }}", "within|MiB|characters"),
    "long output": ("{{ 'w1 ' * 2*10**6 }}", "characters"),
    "huge string": ("{{ 'w' * 10**10 }}", "MiB"),
    "recursion": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recurses"),
    "include": ("{% include 'other.jinja' %}", "includes or imports 'other.jinja'"),
}


@pytest.fixture
def quick_renders(monkeypatch):
    import unmask.data.chat

    monkeypatch.setattr(unmask.data.chat, "RENDER_SECONDS", 1.0)


@pytest.mark.parametrize("name", HOSTILE_TEMPLATES)
def test_a_hostile_chat_template_costs_a_bounded_time_and_one_line(name, quick_renders):
    template, message = HOSTILE_TEMPLATES[name]
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=message) as caught:
        render_chat(template, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 10 and "\n" not in str(caught.value)
    assert render_chat("{{ messages[0]['content'] }}!", [{"role": "user", "content": "hi"}]) == "hi!"  # renders go on


@pytest.fixture(scope="module")
def hostile_folder(folders, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile") / "llada"
    shutil.copytree(folders["llada"], folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": HOSTILE_TEMPLATES["nested loops"][0]}))
    return folder


def test_a_hostile_chat_template_is_one_line_at_every_chat_entry_point(hostile_folder, quick_renders):
    out = unmask("sample", hostile_folder, "--chat", "--prompt", "w5", "sample.length=24", "sample.num_samples=1")
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "chat template did not render within" in lines[0], out.stderr
    with pytest.raises(SamplingError, match="chat template did not render"):
        from_pretrained(hostile_folder).generate(["w5"], chat=True, length=24, num_samples=1)


def test_a_server_with_a_hostile_chat_template_keeps_answering_and_stops(hostile_folder, quick_renders):
    """Chat requests under a template that would run for hours, sent with ordinary completions: each chat
    request gets a 400 naming the template, the completions are answered within their timeout, /health
    stays truthful, and the server stops promptly afterwards."""
    import concurrent.futures

    service = ModelService(from_pretrained(hostile_folder))
    stop_started = None
    with running_server(service) as url:
        def post(path, body):
            return httpx.post(f"{url}{path}", json=body, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            chats = [pool.submit(post, "/v1/chat/completions", {"messages": [{"role": "user", "content": "w1"}],
                                                                 "max_tokens": 4}) for _ in range(4)]
            plain = [pool.submit(post, "/v1/completions", {"prompt": "w1 w2", "max_tokens": 4, "steps": 4,
                                                           "seed": i}) for i in range(4)]
            for future in plain:
                assert future.result().status_code == 200, future.result().text
            for future in chats:
                r = future.result()
                assert r.status_code == 400 and "chat template did not render" in r.text, r.text
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        stop_started = time.monotonic()
    assert time.monotonic() - stop_started < 15
    service.close()


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.float8_e4m3fn])
def test_weights_of_a_type_that_means_nothing_are_refused_at_every_entry_point(folders, tmp_path, dtype, corpus):
    """int64, uint8 or bool tensors of the right name and shape loaded as garbage numbers with exit 0, and
    fp8 was a NotImplementedError traceback: a one-line error naming the tensor and its type."""
    folder = tmp_path / "typed"
    shutil.copytree(folders["llada"], folder)
    shard = sorted(folder.glob("*.safetensors"))[0]
    tensors = load_file(str(shard))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, str(shard))
    words = f"' is stored as {dtype}, not float32, bfloat16 or float16"
    with pytest.raises(CheckpointError, match=re.escape(words)):
        from_pretrained(folder)
    for args in (["sample", folder, "sample.length=8", "sample.num_samples=1"], ["eval", folder],
                 ["train", f"run_dir={tmp_path / 'ft'}", "data.dataset=text", f"data.path={corpus}",
                  "data.tokenizer=hf", f"train.init_from={folder}", "train.steps=1", "data.length=16"]):
        out = unmask(*args)
        errors = [line for line in out.stderr.splitlines() if "unmask: error:" in line]  # after a progress bar
        assert out.returncode == 2 and len(errors) == 1 and "stored as" in errors[0], (args, out.stderr[-1500:])


@pytest.mark.parametrize("damage", ["header of 2^40 bytes", "cut in half"])
def test_a_broken_shard_is_one_line_at_every_entry_point(folders, tmp_path, damage, corpus):
    """A shard whose header length is 2^40, or cut in half, was a SafetensorError traceback (exit 1) and
    from_pretrained raised SafetensorError."""
    folder = tmp_path / "broken"
    shutil.copytree(folders["llada"], folder)
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 2 ** 40) + data[8:] if damage.startswith("header") else data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(shard))):
        from_pretrained(folder).model
    for args in (["sample", folder, "sample.length=8", "sample.num_samples=1"], ["eval", folder],
                 ["export", folder, tmp_path / "out", "--to", "llada"],
                 ["train", f"run_dir={tmp_path / 'ft'}", "data.dataset=text", f"data.path={corpus}",
                  "data.tokenizer=hf", f"train.init_from={folder}", "train.steps=1", "data.length=16"]):
        out = unmask(*args)
        errors = [line for line in out.stderr.splitlines() if "unmask: error:" in line]
        assert out.returncode == 2 and len(errors) == 1 and shard.name in errors[0], (args, out.stderr[-1500:])


def test_a_config_with_absurd_depth_is_refused_before_anything_is_built(folders, tmp_path):
    """config.json with 10^6 layers: sample ran for minutes with memory growing before."""
    folder = tmp_path / "deep"
    shutil.copytree(folders["llada"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_layers" if "n_layers" in config else "num_hidden_layers"] = 10 ** 9
    (folder / "config.json").write_text(json.dumps(config))
    start = time.monotonic()
    out = unmask("sample", folder, "sample.length=8", "sample.num_samples=1")
    errors = [line for line in out.stderr.splitlines() if "unmask: error:" in line]
    assert out.returncode == 2 and len(errors) == 1 and "GiB" in errors[0], out.stderr[-1500:]
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("stated", ["int8", ["bfloat16"], None])
def test_a_config_stating_an_unknown_weight_type_is_refused(folders, tmp_path, stated):
    """torch_dtype "int8" or a list used to be read as float32 without a word."""
    folder = tmp_path / "stated"
    shutil.copytree(folders["llada"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["torch_dtype"] = stated
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(f"torch_dtype={stated!r}")):
        from_pretrained(folder)
    out = unmask("sample", folder, "sample.length=8", "sample.num_samples=1")
    assert out.returncode == 2 and "torch_dtype" in out.stderr.strip().splitlines()[-1], out.stderr[-1500:]


@pytest.mark.parametrize("mask, words", [("eos", "is also the eos id"), (True, "mask_token_id=True is not a token id"),
                                         (5, "is the ordinary token 'w5'")])
def test_a_mask_id_that_is_not_a_token_of_its_own_is_refused(folders, tmp_path, mask, words):
    folder = tmp_path / "mask"
    shutil.copytree(folders["llada"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["mask_token_id"] = config["eos_token_id"] if mask == "eos" else mask
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(words)):
        from_pretrained(folder)


@pytest.mark.parametrize("layout", ["llada", "dream", "qwen2", "llama"])
def test_export_to_each_released_layout_reads_back_as_the_same_model(folders, tmp_path, layout):
    """`export --to LAYOUT` of a model of that layout gives a folder unmask reads back with the same logits."""
    source = folders[layout] if layout in folders else hf_causal_folder(tmp_path / "hf", layout)[0]
    out = unmask("export", source, tmp_path / "out", "--to", layout)
    assert out.returncode == 0, out.stderr
    ids = torch.randint(0, 33, (2, 9))
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path / "out").model(ids), from_pretrained(source).model(ids))


def _first_tensor(folder, edit):
    shard = sorted(folder.glob("*.safetensors"))[0]
    tensors = load_file(str(shard))
    name = sorted(tensors)[0]
    tensors[name] = edit(tensors[name])
    save_file(tensors, str(shard))


def _read_config(folder):
    return json.loads((folder / "config.json").read_text())


def _config(folder, **changes):
    """``config.json`` with ``changes``; a change of a nested object (DiffusionGemma's ``text_config``) is merged in."""
    config = _read_config(folder)
    for key, value in changes.items():
        nested = isinstance(value, dict) and isinstance(config.get(key), dict)
        config[key] = {**config[key], **value} if nested else value
    (folder / "config.json").write_text(json.dumps(config))


DAMAGES = {  # what a released folder holds -> (how to make it, words of the one-line error)
    "NaN weights": (lambda f: _first_tensor(f, lambda t: t * float("nan")), "holds NaN or infinite values"),
    "a wrong shape": (lambda f: _first_tensor(f, lambda t: t[:-1]), "has shape (31,)"),
    "a scalar": (lambda f: _first_tensor(f, lambda t: t.sum()), "has shape ()"),
    "int64 weights": (lambda f: _first_tensor(f, lambda t: t.long()), "is stored as torch.int64"),
    "fp8 weights": (lambda f: _first_tensor(f, lambda t: t.to(torch.float8_e4m3fn)), "8-bit float weights"),
    "a config the weights do not fit": (lambda f: _config(f, mlp_hidden_size=0), "has shape (64, 32)"),
    "an empty weight_map": (lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": {}}'),
                            "has no weight_map of parameter names"),
    "rms_norm_eps='abc'": (lambda f: _config(f, rms_norm_eps="abc"), "rms_norm_eps must be a number above 0"),
    "rope_theta='x'": (lambda f: _config(f, rope_theta="x"), "rope_theta must be a number above 1"),
    "kv heads that do not divide": (lambda f: _config(f, n_kv_heads=3), "is not a multiple of model.kv_heads=3"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_folder_is_one_line_at_sample_and_export_writes_nothing(folders, tmp_path, damage):
    """`export --to llada` wrote NaN, mis-shaped, scalar, integer and fp8 weights and config/weight mismatches
    with exit 0 (a folder unmask then refused), an empty weight_map was a StopIteration traceback, and config
    values of the wrong type or shape were ValueError tracebacks."""
    make, words = DAMAGES[damage]
    folder = tmp_path / "damaged"
    shutil.copytree(folders["llada"], folder)
    make(folder)
    for args in (["sample", folder, "sample.length=8", "sample.num_samples=1"],
                 ["export", folder, tmp_path / "out", "--to", "llada"]):
        out = unmask(*args)
        errors = [line for line in out.stderr.splitlines() if "unmask: error:" in line]
        assert out.returncode == 2 and len(errors) == 1, (args, out.stderr[-1500:])
        assert words in errors[0], errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]  # no folder, no .tmp-* left behind


def test_a_config_deeper_than_its_weights_is_refused_from_the_names(folders, tmp_path):
    """config.json with 100000 layers over the weights of 2: `convert` built the whole network (a minute and
    more) before it found the weights missing; `sample` ran for minutes."""
    causal, _ = hf_causal_folder(tmp_path / "hf", "qwen2")
    for folder, args in ((folders["llada"], ["sample", "sample.length=8", "sample.num_samples=1"]),
                         (causal, ["convert"])):
        deep = tmp_path / f"deep-{folder.name}"
        shutil.copytree(folder, deep)
        _config(deep, **{"n_layers" if "n_layers" in _read_config(deep) else "num_hidden_layers": 100000})
        start = time.monotonic()
        out = unmask(args[0], deep, *([tmp_path / "out"] if args == ["convert"] else args[1:]))
        errors = [line for line in out.stderr.splitlines() if "unmask: error:" in line]
        assert out.returncode == 2 and len(errors) == 1, out.stderr[-1500:]
        assert "states 100000 layers but the weights hold 2" in errors[0] and time.monotonic() - start < 20


def test_a_config_allowing_10_to_the_8_positions_samples_in_little_memory(folders, tmp_path):
    """max_sequence_length=10^8 built a rotary table of 10^8 rows (8.5 GB, then an allocation traceback)."""
    folder = tmp_path / "long"
    shutil.copytree(folders["llada"], folder)
    _config(folder, max_sequence_length=10 ** 8)
    out = unmask("sample", folder, "sample.length=8", "sample.num_samples=1")
    assert out.returncode == 0, out.stderr[-1500:]


def test_convert_refuses_a_vocabulary_the_weights_do_not_have(tmp_path):
    """A config.json vocab_size of 44 over embeddings of 48 rows was converted with exit 0 (the model took the
    weights' size and ignored the config)."""
    causal, _ = hf_causal_folder(tmp_path / "hf", "qwen2")
    _config(causal, vocab_size=44)
    out = unmask("convert", causal, tmp_path / "out")
    errors = [line for line in out.stderr.splitlines() if "unmask: error:" in line]
    assert out.returncode == 2 and len(errors) == 1 and "has shape (48, 32)" in errors[0], out.stderr[-1500:]
    assert not (tmp_path / "out").exists()


FINE_TUNE = ["family=bd3lm", "model.block_size=4", "train.steps=2", "train.batch_size=4", "train.log_every=1",
             "train.progress=false", "train.threads=1", "data.dataset=text", "data.documents=line", "data.length=16",
             "data.layout=pad"]


def word_lines(path: Path) -> Path:
    path.write_text("\n".join(" ".join(f"w{(i * 5 + j) % 30 + 1}" for j in range(12)) for i in range(40)))
    return path


def fine_tune(layout: str) -> list[str]:
    """The fine-tuning keys for a folder of ``layout``: its family (uniform-noise canvases for DiffusionGemma, whose
    canvas length then comes from the folder)."""
    if layout == "diffusiongemma":
        return ["family=udlm", *(k for k in FINE_TUNE[1:] if not k.startswith("model.block_size="))]
    return FINE_TUNE


@pytest.mark.parametrize("layout", ["sdar", "llada2", "diffusiongemma"])
def test_a_block_diffusion_folder_fine_tunes_with_lora_and_exports_back(folders, tmp_path, layout):
    """LoRA on every linear layer of an SDAR, LLaDA2 or DiffusionGemma folder (LLaDA2: its routed and shared
    experts too), as a run of its family with the architecture taken from the folder; the run samples, and
    exports back to its layout with the adapters merged, read back with the run's logits."""
    corpus, run = word_lines(tmp_path / "words.txt"), tmp_path / "run"
    out = unmask("train", *fine_tune(layout), f"data.path={corpus}", f"run_dir={run}",
                 f"train.init_from={folders[layout]}", "adapter.kind=lora", "adapter.rank=4",
                 "adapter.targets=[attention,mlp]")
    assert out.returncode == 0, out.stderr
    assert unmask("sample", run, "--prompt", "w1 w2", "sample.length=12", "sample.num_samples=1").returncode == 0
    kept = from_pretrained(run).config.sample  # the run decodes as its source does
    released = from_pretrained(folders[layout]).config
    source = released.sample.settings
    assert kept.sampler == OWN_SAMPLER.get(layout, layout) and source
    assert {key: getattr(kept, key) for key in source} == source
    assert from_pretrained(run).config.model.block_size == (released.model.block_size if layout == "diffusiongemma"
                                                             else 4)  # the source's, unless the run chooses
    exported = unmask("export", run, tmp_path / "out", "--to", layout)
    assert exported.returncode == 0, exported.stderr
    ids = torch.randint(0, 30, (2, 8))
    inputs = {"clean": ids} if layout == "diffusiongemma" else {}
    with torch.no_grad():
        assert torch.allclose(from_pretrained(tmp_path / "out").model(ids, **inputs),
                              from_pretrained(run).model(ids, **inputs), atol=1e-5)


@pytest.mark.parametrize("layout", ["llada2", "diffusiongemma"])
def test_a_moe_folder_fine_tunes_with_fsdp_on_two_processes(folders, tmp_path, layout):
    """LLaDA2's and DiffusionGemma's mixtures of experts trained with FSDP2 on two gloo processes (each expert
    sharded with its block), from the folder's weights; the run samples."""
    corpus, run = word_lines(tmp_path / "words.txt"), tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "unmask", "train", *fine_tune(layout),
           f"data.path={corpus}", f"run_dir={run}", f"train.init_from={folders[layout]}", "train.parallel=fsdp"]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert unmask("sample", run, "--prompt", "w1 w2", "sample.length=12", "sample.num_samples=1").returncode == 0


BAD_VARIANTS = {  # a released folder's config edited -> the words of the one-line error
    ("llada2", "score_function"): ({"score_function": "softmax"}, "score_function='softmax' is not supported"),
    ("llada2", "norm_topk_prob"): ({"norm_topk_prob": False}, "norm_topk_prob=False is not supported"),
    ("llada2", "rope_scaling"): ({"rope_scaling": {"type": "yarn", "factor": 4}}, "rope_scaling="),
    ("llada2", "experts"): ({"num_experts": 6}, "model.layers.1.mlp.gate.weight"),
    ("llada2", "groups"): ({"n_group": 3}, "model.moe_*"),
    ("sdar", "sliding window"): ({"use_sliding_window": True}, "use_sliding_window=True is not supported"),
    ("sdar", "head_dim"): ({"head_dim": 12}, "has shape"),
    ("sdar", "no mask"): ({"mask_token_id": None}, "states the mask token"),
    ("diffusiongemma", "activation"): ({"text_config": {"hidden_activation": "gelu"}},
                                       "hidden_activation='gelu' is not supported"),
    ("diffusiongemma", "layer types"): ({"text_config": {"layer_types": ["full_attention"]}},
                                        "layer_types must list 2 sliding_attention or full_attention layers"),
    ("diffusiongemma", "rotary"): ({"text_config": {"rope_parameters": {"full_attention": {"rope_type": "yarn"}}}},
                                   "rope_parameters="),
    ("diffusiongemma", "window"): ({"text_config": {"sliding_window": 1}}, "model.sliding_window >= 2"),
    ("diffusiongemma", "no text model"): ({"text_config": None}, "has no text_config object"),
    ("diffusiongemma", "huge canvas"): ({"canvas_length": 10 ** 9}, "model.block_size=1000000000 (the canvas) exceeds"),
}


@pytest.mark.parametrize("layout, case", BAD_VARIANTS, ids=[f"{a}-{b}" for a, b in BAD_VARIANTS])
def test_an_unknown_variant_or_a_mismatch_is_one_line_naming_the_field(folders, tmp_path, layout, case):
    changes, words = BAD_VARIANTS[layout, case]
    folder = tmp_path / layout
    shutil.copytree(folders[layout], folder)
    _config(folder, **changes)
    out = unmask("sample", folder, "--prompt", "w1", "sample.length=8", "sample.num_samples=1")
    assert out.returncode == 2 and words in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_diffusiongemma_request_past_the_models_length_is_one_line(folders):
    """Whole canvases after the prompt must fit the model's positions: refused before any work."""
    limit = from_pretrained(folders["diffusiongemma"]).config.model.length
    out = unmask("sample", folders["diffusiongemma"], "--prompt", "w1", f"sample.length={limit - 1}",
                 "sample.num_samples=1")
    assert out.returncode == 2 and "exceed the model's length" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_diffusiongemma_frames_show_the_canvas_and_each_row_is_checked_on_its_own(folders):
    """Streamed frames have the request's width, masks where nothing is decided yet; the length check is per row
    (a batch whose rows each fit is served)."""
    lm = from_pretrained(folders["diffusiongemma"])
    size, limit, mask = lm.config.model.block_size, lm.config.model.length, lm.tokenizer.mask_id
    sampler = make_sampler(SampleConfig(sampler="entropy_bound", steps=2), lm.objective, lm.tokenizer, limit)
    length = limit - 1
    canvas = torch.full((2, length), mask)
    canvas[1, :size] = torch.arange(1, size + 1)  # row 1: a prompt of one canvas; row 0: none
    frames = []
    result = sampler.sample(lm.model, canvas, torch.arange(2), on_step=lambda x: frames.append(x.clone()))
    assert frames and all(f.shape == canvas.shape for f in frames)
    assert bool((frames[0][:, 2 * size:] == mask).all()) and not bool((result.tokens == mask).any())
    assert torch.equal(result.tokens[1, :size], canvas[1, :size])


def test_diffusiongemma_tied_copies_are_checked_against_what_they_copy(folders, tmp_path):
    """A folder may store the tied copies (the output layer, the encoder's weights): equal ones load, a copy that
    differs from the decoder tensor it stands for is a one-line error naming both."""
    folder = tmp_path / "dg"
    shutil.copytree(folders["diffusiongemma"], folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    originals = {}
    for shard in set(index["weight_map"].values()):
        originals.update(load_file(str(folder / shard)))
    copies = {"lm_head.weight": originals["model.decoder.embed_tokens.weight"],
              "model.encoder.language_model.layers.0.mlp.gate_proj.weight":
                  originals["model.decoder.layers.0.mlp.gate_proj.weight"]}

    def store(tensors):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "copies.safetensors"))
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {**index, "weight_map": {**index["weight_map"], **dict.fromkeys(tensors, "copies.safetensors")}}))

    store(copies)
    ids = torch.randint(0, 30, (1, 8))
    with torch.no_grad():
        assert torch.equal(from_pretrained(folder).model(ids, clean=ids),
                           from_pretrained(folders["diffusiongemma"]).model(ids, clean=ids))
    store({**copies, "model.encoder.language_model.layers.0.mlp.gate_proj.weight":
           torch.zeros_like(copies["model.encoder.language_model.layers.0.mlp.gate_proj.weight"])})
    out = unmask("sample", folder, "--prompt", "w1", "sample.length=8", "sample.num_samples=1")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "'model.encoder.language_model.layers.0.mlp.gate_proj.weight' is a tied copy of " \
           "'model.decoder.layers.0.mlp.gate_proj.weight' but differs" in out.stderr
