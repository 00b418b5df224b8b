"""Tiny open-weight folders in the released layouts (LLaDA, Dream), written by the tests themselves:
``config.json`` as the released models have it, sharded safetensors with an index file, a
``tokenizers`` tokenizer and a ``tokenizer_config.json`` with a chat template. Also the reference
vector sets ``../shared/reference/vectors`` and ``vectors2026`` (:class:`VectorSet`; skipped with a reason
when absent) and what their READMEs state: every shape, id, layer count, run and run setting of the
vectors is read from the files' own ``oracle`` metadata, and every tolerance from the README (section 10,
section 11 of the 2026 set), so that any vector set of the documented format can be checked, wherever its
special ids lie and however many layers it has."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from unmask.checkpoints.open_weights import INDEX, LAYOUTS
from unmask.config import ModelConfig
from unmask.models.diffusiongemma import DiffusionGemma
from unmask.models.llama import Transformer

CHAT_TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")


# --- the reference vectors and their metadata ------------------------------------------------------------

@dataclass
class Table:
    section: str  # "10", "8.2"
    header: list[str]
    rows: list[dict[str, str]]


@dataclass(frozen=True, eq=False)
class VectorSet:
    """A folder of reference vector files with the README that states their conventions: the tensors and
    ``oracle`` metadata of each file, its runs, and every tolerance (the "suggested atol (float32 port)"
    column of the table of README section ``section``, then the rules the README states in prose,
    ``prose(file, tensor)`` -> atol or None, always with rtol 0)."""

    root: Path
    section: str
    prose: object  # (VectorSet, file, tensor) -> float | None

    @property
    def readme(self) -> Path:
        return self.root / "README.md"

    def vectors(self, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        """The tensors and the ``oracle`` metadata of a reference vector file (skips when absent)."""
        path = self.root / f"{name}.safetensors"
        if not path.is_file():
            pytest.skip(f"reference vectors not found at {path} (../shared is absent)")
        return load_file(str(path)), self.oracle(name)

    @functools.lru_cache(maxsize=None)
    def header(self, name: str) -> tuple[dict, tuple[str, ...]] | None:
        """The ``oracle`` metadata and the tensor names of ``name`` (None when the file is absent)."""
        path = self.root / f"{name}.safetensors"
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["oracle"]), tuple(f.keys())

    def oracle(self, name: str) -> dict:
        """The ``oracle`` metadata of a vector file (a fresh copy: tests may change it)."""
        header = self.header(name)
        if header is None:
            pytest.skip(f"reference vectors not found at {self.root / name}.safetensors (../shared is absent)")
        return json.loads(json.dumps(header[0]))

    def run_params(self, name: str, where=lambda run: True) -> list:
        """pytest parameters: the names of the runs that ``name``'s metadata lists (``runs[*].name``) and
        ``where(run)`` accepts, read when the tests are collected; one skipped parameter when the file is
        absent."""
        header = self.header(name)
        if header is None:
            return [pytest.param(None, marks=pytest.mark.skip(reason=f"reference vectors {name} not found at "
                                                                      f"{self.root}"))]
        return [pytest.param(run["name"], id=run["name"]) for run in header[0]["runs"] if where(run)]

    def holds_weights(self, name: str) -> bool:
        return any(k.startswith("state.") for k in self.header(name)[1])

    @functools.lru_cache(maxsize=None)
    def tables(self) -> tuple[Table, ...]:
        """Every Markdown table of the README, with the number of the section it is in."""
        if not self.readme.is_file():
            pytest.skip(f"the vectors' README is not at {self.readme}")
        tables, section, current = [], "", None
        for line in self.readme.read_text(encoding="utf-8").splitlines():
            heading = re.match(r"#{2,}\s+(\d+(?:\.\d+)*)\.?\s", line)
            if heading:
                section = heading.group(1)
            if not line.startswith("|"):
                current = None
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = Table(section, cells, [])
                tables.append(current)
            elif not all(set(c) <= set("-: ") for c in cells):
                current.rows.append(dict(zip(current.header, cells)))
        return tuple(tables)

    def run_row(self, run: str, column: str) -> str | None:
        """The cell ``column`` of run ``run`` in the README's run tables (None: no table has it)."""
        cells = [row[column].strip("`") for table in self.tables() if "run" in table.header
                 and column in table.header for row in table.rows if row["run"].strip("`") == run]
        assert len(set(cells)) <= 1, f"the README gives run {run!r} several {column!r}: {cells}"
        return cells[0] if cells else None

    @functools.lru_cache(maxsize=None)
    def table_atol(self) -> dict[tuple[str, str], float]:
        """(file, tensor) -> atol: the "suggested atol (float32 port)" column of README section ``section``."""
        out = {}
        for table in self.tables():
            column = next((h for h in table.header if h.startswith("suggested atol")), None)
            if table.section != self.section or column is None:
                continue
            for row in table.rows:
                m = re.fullmatch(r"`([^`]+)\.safetensors` : `([^`]+)`", row[table.header[0]])
                assert m, f"README section {self.section}: unreadable row {row}"
                out[m.group(1), m.group(2)] = float(row[column])
        assert out, f"README section {self.section} has no table of suggested atol"
        return out

    def atol(self, file: str, tensor: str) -> float:
        """The atol of ``file``'s float tensor ``tensor``: the README's table, then its prose rules."""
        table = self.table_atol()
        if (file, tensor) in table:
            return table[file, tensor]
        found = self.prose(self, file, tensor)
        if found is None:
            pytest.fail(f"README section {self.section} gives no atol for {file}.safetensors : {tensor}")
        return found

    def assert_matches(self, actual: torch.Tensor, t: dict[str, torch.Tensor], file: str, tensor: str, where=None,
                       summed: int = 1) -> None:
        """``actual`` equals the vectors' ``tensor`` within its README atol (rtol 0); ``where``: only there;
        ``summed``: ``actual`` and the tensor are sums of that many terms (the atol grows as many times)."""
        expected = t[tensor]
        assert tuple(actual.shape) == tuple(expected.shape), \
            f"{tensor}: shape {tuple(actual.shape)}, not {tuple(expected.shape)}"
        if where is not None:
            actual, expected = actual[where], expected[where]
        tolerance = summed * self.atol(file, tensor)
        diff = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
        assert diff <= tolerance, f"{file}: {tensor} differs by {diff:.3g} > atol {tolerance:.3g} (README)"


# The tolerances that README section 10 of the 2025 set states in prose only, and the one rule that the tests
# add; every comparison of a float tensor with the vectors takes its atol from the set's ``atol``, always with
# rtol 0 ("use rtol 0", section 10).
PROSE_ATOL = {
    "hidden_states.0": 0.0,  # section 10: "`hidden_states.0` (embeddings) must match bit-exactly"
}
SENTINEL_BOUND = 1e5  # section 10 (and 9): "`log_probs` is compared only where |value| < 1e5 (the -1e6 sentinels are exact)"
SAME_ATOL_AS = {
    "logits_shifted": "logits",  # section 8.1: the shifted logits are the logits moved by one position
}
# Added by the tests: a run's tensor that the table has no row for (section 10 lists `b_train.nlls` of
# bd3lm_loss, not `b_eval.nlls`) takes the largest atol of the same quantity in the file's other runs
# (section 9: the runs share the backbone and the loss formula).


def _prose_2025(vs: VectorSet, file: str, tensor: str) -> float | None:
    table = vs.table_atol()
    if tensor in PROSE_ATOL:
        return PROSE_ATOL[tensor]
    if tensor in SAME_ATOL_AS:
        return vs.atol(file, SAME_ATOL_AS[tensor])
    run, _, quantity = tensor.partition(".")
    others = [v for (f, k), v in table.items() if f == file and quantity and k.partition(".")[2] == quantity
              and k.partition(".")[0] != run and not k.startswith("hidden_states.")]
    if others and not tensor.startswith("hidden_states."):
        return max(others)
    return None


# The 2026 set's README (section 11) in prose: embeddings 1e-6; the logits inside generation files take "the
# forward file's logits atol of the same family" (the smaller of its runs' rows: the tests take the stricter
# reading); sampled probabilities 1e-5. Added by the tests, where the README gives no figure: router weights
# and router logits 1e-5 (the measured float32 deviations are below 3e-6); entropies 1e-5; DiffusionGemma's final
# norms (enc/dec.hidden_states.4) the row of the stack's last layer (measured: 4.1e-6).
EMBEDDINGS_2026 = ("hidden_states.0", "dec.token_embeddings", "enc.hidden_states.0")
GENERATION_LOGITS_2026 = ("step_logits", "block_logits", "denoise_logits")
PROSE_2026 = {"sampled_probs": 1e-5, "router_topk_weight": 1e-5, "router_logits": 1e-5, "step_entropy": 1e-5,
              "step_mean_entropy": 1e-5}


def _prose_2026(vs: VectorSet, file: str, tensor: str) -> float | None:
    run, _, name = tensor.partition(".")
    quantity = re.sub(r"^(enc|dec)\.|\.\d+$", "", name or tensor)  # dec.router_logits.1: the stack and layer aside
    if name in EMBEDDINGS_2026:
        return 1e-6
    final = re.fullmatch(r"(enc|dec)\.hidden_states\.(\d+)", name)
    if final and (file, tensor) not in vs.table_atol():  # a stack's final norm: its last layer's row
        return vs.table_atol().get((file, f"{run}.{final.group(1)}.hidden_states.{int(final.group(2)) - 1}"))
    if quantity in PROSE_2026:
        return PROSE_2026[quantity]
    if quantity in GENERATION_LOGITS_2026:
        family = file.split("_")[0]
        rows = [v for (f, k), v in vs.table_atol().items() if f == f"{family}_forward" and k.endswith(".logits")]
        return min(rows) if rows else None
    return None


VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "vectors"
V2025 = VectorSet(VECTORS, "10", _prose_2025)
V2026 = VectorSet(VECTORS.with_name("vectors2026"), "11", _prose_2026)
README = V2025.readme

# the 2025 set's helpers by their old names
vectors, oracle, run_params, assert_matches = V2025.vectors, V2025.oracle, V2025.run_params, V2025.assert_matches
readme_tables, readme_run_row, readme_atol, atol = V2025.tables, V2025.run_row, V2025.table_atol, V2025.atol


def run_of(meta: dict, name: str) -> dict:
    """The metadata entry of run ``name``."""
    (run,) = [r for r in meta["runs"] if r["name"] == name]
    return run


# The reference model classes (README sections 4 and 8.1, ``cls`` in a forward file's metadata): unmask's
# layout of their released folders and the config key of their layer count.
REFERENCE_MODELS = {"LLaDAModelLM": ("llada", "n_layers"), "DreamModel": ("dream", "num_hidden_layers")}


@dataclass
class ReferenceModel:
    """The model that a vector file runs (its own weights, or those of the forward file of the same
    config: README section 1), with the file's own tensors and metadata."""

    folder: Path  # the released-layout folder written from the weights and the metadata config
    name: str  # the vector file
    t: dict[str, torch.Tensor]
    meta: dict
    layout: str  # llada or dream
    layers: int  # the config's layer count

    @property
    def config(self) -> dict:
        return self.meta["config"]


def weights_file(name: str) -> str:
    """The vector file that holds the weights ``name`` runs: itself when it has ``state.*`` tensors, else the
    one file that does and has the same model config (README section 1: the generation files reuse the
    weights of the matching forward file)."""
    meta, keys = V2025.header(name) or pytest.skip(f"reference vectors {name} not found at {VECTORS}")
    if V2025.holds_weights(name):
        return name
    found = [p.stem for p in sorted(VECTORS.glob("*.safetensors"))
             if V2025.holds_weights(p.stem) and V2025.header(p.stem)[0].get("config") == meta["config"]]
    assert len(found) == 1, f"{name}: {len(found)} vector files hold weights of its config ({found})"
    return found[0]


def reference_folder(tmp_path: Path, name: str, relabel=None) -> ReferenceModel:
    """The model of the reference vector file ``name`` as a released folder (two shards and an index, the
    tokenizer's special tokens at the ids the metadata config states). ``relabel`` (config, state) ->
    (config, state) changes both before they are written."""
    t, meta = vectors(name)
    source = weights_file(name)
    w = t if source == name else vectors(source)[0]
    layout, layers_key = REFERENCE_MODELS[oracle(source)["cls"]]
    config = meta["config"]
    state = {k.removeprefix("state."): v for k, v in w.items() if k.startswith("state.")}
    if relabel is not None:
        config, state = relabel(config, state)
    meta = {**meta, "config": config}
    folder = write_folder(tmp_path / f"{layout}-{name}", layout, config, state, shards=2)
    return ReferenceModel(folder, name, t, meta, layout, config[layers_key])


def tensor_runs(t: dict[str, torch.Tensor]) -> list[str]:
    """The run prefixes of a file's tensor names (``a``, ``b_eval`` of ``a.loss``, ``b_eval.nlls``), model
    parameters (``state.*``) and the per-layer ``hidden_states.*`` aside."""
    return sorted({k.split(".", 1)[0] for k in t if "." in k and not k.startswith(("state.", "hidden_states."))})


# --- released-layout folders ----------------------------------------------------------------------------

# the preferred order when one id plays several roles (Dream: bos = eos = pad)
SPECIAL_KEYS = ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id")


def special_tokens(config: dict) -> dict[int, str]:
    """id -> token string of every special token a model config states (``mask_token_id``,
    ``eos_token_id``, ``pad_token_id``, ``bos_token_id`` and any other ``*_token_id``), wherever the ids
    lie: ``<|mask|>``, ``<|eos|>``, ... (an id of several roles is named after the first of
    :data:`SPECIAL_KEYS`)."""
    keys = [k for k in SPECIAL_KEYS if k in config] + sorted(k for k in config if k.endswith("_token_id")
                                                             and k not in SPECIAL_KEYS)
    out: dict[int, str] = {}
    for key in keys:
        value = config[key]
        if isinstance(value, int) and not isinstance(value, bool):
            out.setdefault(value, f"<|{key.removesuffix('_token_id')}|>")
    return out


def tokenizer_files(folder: Path, vocab: int, specials: dict[int, str]) -> None:
    """A word-level tokenizer of ``vocab`` ids: the special tokens at their ids (anywhere), the words
    ``w{i}`` at every other id ``i``."""
    assert all(0 <= i < vocab for i in specials), f"special ids {sorted(specials)} outside a vocabulary of {vocab}"
    words = {specials.get(i, f"w{i}"): i for i in range(vocab)}
    unk = next(f"w{i}" for i in range(vocab) if i not in specials)
    tk = Tokenizer(models.WordLevel(words, unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([AddedToken(specials[i], special=True) for i in sorted(specials)])
    assert tk.get_vocab_size(with_added_tokens=True) == vocab
    assert all(tk.token_to_id(s) == i for i, s in specials.items())
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))


def write_folder(folder: Path, layout: str, config: dict, state: dict[str, torch.Tensor], shards: int = 2,
                 specials: dict[int, str] | None = None) -> Path:
    """A released-layout folder with ``state`` (their parameter names) cut into ``shards`` files; the
    tokenizer has ``config["vocab_size"]`` ids and the special tokens ``specials`` (default: those the
    config states, :func:`special_tokens`)."""
    folder.mkdir(parents=True, exist_ok=True)
    model_type = {"llada": "llada", "dream": "Dream", "qwen2": "qwen2", "llama": "llama", "sdar": "sdar",
                  "llada2": "llada2_moe", "diffusiongemma": "diffusion_gemma"}[layout]
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type, "torch_dtype": "float32"}))
    keys = sorted(state)
    if shards == 1:
        save_file({k: state[k].contiguous() for k in keys}, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[s::shards]
            save_file({k: state[k].contiguous() for k in part}, str(folder / name))
            weight_map.update({k: name for k in part})
        (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    text = config.get("text_config", config)  # DiffusionGemma nests the text model's fields
    vocab = text["vocab_size"]  # the tokenizer's ids (LLaDA may have more embedding rows than that)
    tokenizer_files(folder, vocab, special_tokens(text) if specials is None else specials)
    return folder


LLADA_TINY = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "mlp_hidden_size": 64,
              "vocab_size": 40, "embedding_size": 48, "max_sequence_length": 64, "rope_theta": 500000.0,
              "rms_norm_eps": 1e-5, "block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu",
              "rope": True, "weight_tying": False, "include_qkv_bias": False, "mask_token_id": 39,
              "eos_token_id": 37, "pad_token_id": 37, "bos_token_id": 38}
DREAM_TINY = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
              "intermediate_size": 64, "vocab_size": 40, "max_position_embeddings": 64, "rope_theta": 1000000.0,
              "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "mask_token_id": 39,
              "eos_token_id": 37, "pad_token_id": 37, "bos_token_id": 38, "rope_scaling": None}


SDAR_TINY = {**DREAM_TINY, "head_dim": 16, "block_size": 4, "attention_bias": False, "max_position_embeddings": 128}
LLADA2_TINY = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
               "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 40, "max_position_embeddings": 128,
               "rope_theta": 600000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
               "partial_rotary_factor": 0.5, "use_qk_norm": True, "num_experts": 4, "num_experts_per_tok": 2,
               "moe_intermediate_size": 16, "num_shared_experts": 1, "n_group": 2, "topk_group": 1,
               "routed_scaling_factor": 2.5, "first_k_dense_replace": 1, "mask_token_id": 39, "eos_token_id": 37,
               "pad_token_id": 37, "bos_token_id": 38}
DIFFUSIONGEMMA_TINY = {"canvas_length": 4, "text_config": {
    "model_type": "diffusion_gemma_text", "vocab_size": 40, "hidden_size": 32, "num_attention_heads": 4, "head_dim": 8,
    "num_key_value_heads": 2, "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"],
    "sliding_window": 4, "per_layer_config": {"1": {"head_dim": 16, "num_key_value_heads": 1}}, "intermediate_size": 48,
    "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 16, "final_logit_softcapping": 30.0,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True, "eos_token_id": 37, "pad_token_id": 37, "bos_token_id": 38,
    "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                           "rope_theta": 1000000.0}}}}
TINY_CONFIGS = {"llada": LLADA_TINY, "dream": DREAM_TINY, "sdar": SDAR_TINY, "llada2": LLADA2_TINY,
                "diffusiongemma": DIFFUSIONGEMMA_TINY}


def random_folder(folder: Path, layout: str, seed: int = 0, shards: int = 2,
                  special_ids: tuple[int, int, int] | None = None) -> Path:
    """A random tiny model of ``layout`` (``llada``, ``dream``, ``sdar``, ``llada2`` or ``diffusiongemma``) written in
    the released layout; ``special_ids`` (EOS = PAD, BOS, mask) places the special tokens ``<|eot|>``, ``<|start|>``
    and ``<|mdm_mask|>`` (default: the config's, the last three of the 40 ids; DiffusionGemma has no mask token)."""
    if layout == "diffusiongemma":
        return _random_gemma_folder(folder, seed, shards, special_ids)
    config = dict(TINY_CONFIGS[layout])
    if special_ids is not None:
        eos, bos, mask = special_ids
        config.update(eos_token_id=eos, pad_token_id=eos, bos_token_id=bos, mask_token_id=mask)
    cfg = ModelConfig(backbone="llama", **LAYOUTS[layout].model(config), dropout=0.0)
    torch.manual_seed(seed)
    model = Transformer(cfg, config["vocab_size"], causal=False, mask_id=config["mask_token_id"])
    with torch.no_grad():  # away from the 0.02 init, so that outputs differ between positions
        for p in model.parameters():
            p.normal_(0, 0.3)
    lay = LAYOUTS[layout]
    state = lay.unconvert(model.state_dict(), cfg, config["mask_token_id"]) if lay.unconvert else \
        {lay.to_theirs(k): v for k, v in model.state_dict().items()}
    return write_folder(folder, layout, config, state, shards=shards,
                        specials={config["eos_token_id"]: "<|eot|>", config["bos_token_id"]: "<|start|>",
                                  config["mask_token_id"]: "<|mdm_mask|>"})


def _random_gemma_folder(folder: Path, seed: int, shards: int, special_ids: tuple[int, int, int] | None) -> Path:
    text = dict(DIFFUSIONGEMMA_TINY["text_config"])
    if special_ids is not None:
        text.update(eos_token_id=special_ids[0], pad_token_id=special_ids[0], bos_token_id=special_ids[1])
    config = {**DIFFUSIONGEMMA_TINY, "text_config": text}
    lay = LAYOUTS["diffusiongemma"]
    cfg = ModelConfig(backbone="diffusiongemma", **lay.model(text), block_size=config["canvas_length"], dropout=0.0)
    torch.manual_seed(seed)
    model = DiffusionGemma(cfg, text["vocab_size"])
    with torch.no_grad():  # away from the 0.02 init, so that outputs differ between positions
        for p in model.parameters():
            p.normal_(0, 0.3)
    state = {lay.to_theirs(k): v for k, v in model.state_dict().items()}
    return write_folder(folder, "diffusiongemma", config, state, shards=shards,
                        specials={text["eos_token_id"]: "<|eot|>", text["bos_token_id"]: "<|start|>"})


def hf_causal_folder(folder: Path, kind: str, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A tiny random ``transformers`` Qwen2 (embedding padded to 48 rows, spare rows for a mask), Llama or
    GPT-2 (tied, exactly 40 rows) causal LM saved with ``save_pretrained``, with a tokenizer of 40 ids that
    has no mask token; returns the folder and the ``transformers`` model."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                  bos_token_id=37, eos_token_id=37)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=48, rope_theta=1e6, **common))
    elif kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_positions=64, n_embd=32,
                                                                     n_layer=2, n_head=4, bos_token_id=37,
                                                                     eos_token_id=37))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=40, rope_theta=5e5, **common))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer_files(folder, 40, {37: "<|endoftext|>", 38: "<|im_start|>", 39: "<|im_end|>"})
    return folder, model


def forward_with_hidden_states(model, ids: torch.Tensor, layers: int, norm_index: int | None = None,
                               **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logits of a Llama-backbone ``model`` (called with ``kwargs``) and its hidden states named as the
    reference's ``output_hidden_states``: ``hidden_states.0`` the embeddings (block 0's input),
    ``hidden_states.i`` block ``i - 1``'s output, and the final norm's at ``norm_index``: ``layers`` in the
    2025 set (README sections 4 and 8.1: it replaces the last block's output), ``layers + 1`` in the 2026 set
    (every block's output is kept)."""
    norm_index = layers if norm_index is None else norm_index
    blocks = model.model.layers
    assert len(blocks) == layers, f"the model has {len(blocks)} blocks, the config says {layers}"
    hidden, hooks = {}, []
    hooks.append(blocks[0].register_forward_pre_hook(lambda m, args: hidden.__setitem__("hidden_states.0", args[0])))
    for i in range(min(layers, norm_index - 1)):
        hooks.append(blocks[i].register_forward_hook(
            lambda m, args, out, i=i: hidden.__setitem__(f"hidden_states.{i + 1}", out)))
    hooks.append(model.model.norm.register_forward_hook(
        lambda m, args, out: hidden.__setitem__(f"hidden_states.{norm_index}", out)))
    try:
        with torch.no_grad():
            logits = model(ids, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, hidden
