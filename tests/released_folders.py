"""Tiny open-weight folders in the released layouts (LLaDA, Dream), written by the tests themselves:
``config.json`` as the released models have it, sharded safetensors with an index file, a
``tokenizers`` tokenizer and a ``tokenizer_config.json`` with a chat template. Also the reference
vectors of ``../shared/reference/vectors`` (skipped with a reason when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from unmask.checkpoints.open_weights import INDEX, LAYOUTS
from unmask.config import ModelConfig
from unmask.models.llama import Transformer

VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "vectors"

CHAT_TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")


def vectors(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the ``oracle`` metadata of a reference vector file (skips when absent)."""
    path = VECTORS / f"{name}.safetensors"
    if not path.is_file():
        pytest.skip(f"reference vectors not found at {path} (../shared is absent)")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["oracle"])
    return load_file(str(path)), meta


def tokenizer_files(folder: Path, vocab: int, specials: dict[int, str]) -> None:
    """A word-level tokenizer of ``vocab`` ids: ``w0 .. w{n}`` then the special tokens at their ids."""
    words = {f"w{i}": i for i in range(vocab) if i not in specials}
    tk = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for i in sorted(specials):
        assert i == tk.get_vocab_size(with_added_tokens=True), "specials must follow the words"
        tk.add_special_tokens([AddedToken(specials[i], special=True)])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))


def write_folder(folder: Path, layout: str, config: dict, state: dict[str, torch.Tensor], shards: int = 2,
                 specials: dict[int, str] | None = None) -> Path:
    """A released-layout folder with ``state`` (their parameter names) cut into ``shards`` files."""
    folder.mkdir(parents=True, exist_ok=True)
    model_type = {"llada": "llada", "dream": "Dream", "qwen2": "qwen2", "llama": "llama"}[layout]
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
    vocab = config["vocab_size"]  # the tokenizer's ids (LLaDA has more embedding rows than that)
    tokenizer_files(folder, vocab, specials or {vocab - 3: "<|eot|>", vocab - 2: "<|start|>",
                                                vocab - 1: "<|mdm_mask|>"})
    return folder


def reference_folder(tmp_path: Path, name: str) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """The model of a reference vector file (``llada_forward`` or ``dream_forward``) as a released folder."""
    t, meta = vectors(name)
    layout = "llada" if name.startswith("llada") else "dream"
    config = meta["config"]
    specials = {61: "<pad>", 62: "<|eot|>", 63: "<|mdm_mask|>"} if layout == "llada" else \
        {61: "<|start|>", 62: "<|endoftext|>", 63: "<|mask|>"}
    state = {k.removeprefix("state."): v for k, v in t.items() if k.startswith("state.")}
    return write_folder(tmp_path / layout, layout, config, state, shards=2, specials=specials), t, meta


LLADA_TINY = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "mlp_hidden_size": 64,
              "vocab_size": 40, "embedding_size": 48, "max_sequence_length": 64, "rope_theta": 500000.0,
              "rms_norm_eps": 1e-5, "block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu",
              "rope": True, "weight_tying": False, "include_qkv_bias": False, "mask_token_id": 39,
              "eos_token_id": 37, "pad_token_id": 37, "bos_token_id": 38}
DREAM_TINY = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
              "intermediate_size": 64, "vocab_size": 40, "max_position_embeddings": 64, "rope_theta": 1000000.0,
              "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "mask_token_id": 39,
              "eos_token_id": 37, "pad_token_id": 37, "bos_token_id": 38, "rope_scaling": None}


def random_folder(folder: Path, layout: str, seed: int = 0, shards: int = 2) -> Path:
    """A random tiny model of ``layout`` (``llada`` or ``dream``) written in the released layout."""
    config = LLADA_TINY if layout == "llada" else DREAM_TINY
    cfg = ModelConfig(backbone="llama", **LAYOUTS[layout].model(config), dropout=0.0)
    torch.manual_seed(seed)
    model = Transformer(cfg, config["vocab_size"], causal=False, mask_id=config["mask_token_id"])
    with torch.no_grad():  # away from the 0.02 init, so that outputs differ between positions
        for p in model.parameters():
            p.normal_(0, 0.3)
    state = {LAYOUTS[layout].to_theirs(k): v for k, v in model.state_dict().items()}
    return write_folder(folder, layout, config, state, shards=shards,
                        specials={37: "<|eot|>", 38: "<|start|>", 39: "<|mdm_mask|>"})


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
