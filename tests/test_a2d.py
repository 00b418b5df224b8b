"""Autoregressive to diffusion: Hugging Face causal LMs (GPT-2, Llama, Qwen2) load as unmask AR models
with the same logits, convert into masked diffusion models, and `unmask train` continues them."""

from __future__ import annotations

import pytest
import torch

from unmask.checkpoints.conversion import to_diffusion
from unmask.checkpoints.pretrained import open_source, save_pretrained
from unmask.cli import main
from unmask.pipeline import from_pretrained

from released_folders import hf_causal_folder


@pytest.mark.parametrize("kind", ["qwen2", "llama", "gpt2"])
def test_a_causal_lm_loads_with_the_transformers_logits(tmp_path, kind):
    folder, hf = hf_causal_folder(tmp_path / kind, kind)
    lm = from_pretrained(folder)
    assert lm.config.family == "ar" and lm.tokenizer.mask_id == 40  # appended: the tokenizer had none
    ids = torch.randint(0, 37, (2, 13))
    with torch.no_grad():
        ours, theirs = lm.model(ids), hf(ids).logits
    assert (ours[..., :theirs.shape[-1]] - theirs).abs().max() < 1e-4
    out = lm.generate(["w1 w2"], length=12, num_samples=2)  # the AR sampler with its KV cache (GQA)
    assert all(text.startswith("w1 w2") for text in out.texts)


@pytest.mark.parametrize("kind", ["qwen2", "llama", "gpt2"])
def test_conversion_keeps_the_next_token_predictions_under_causal_attention(tmp_path, kind):
    """Documented: the converted model with Dream's shift, run with causal attention, gives at position i
    exactly the AR model's logits at i - 1 (position 0: its own); with bidirectional attention (what it
    is trained with) it differs."""
    folder, hf = hf_causal_folder(tmp_path / kind, kind)
    converted = to_diffusion(open_source(folder))
    model = converted.build().eval()
    assert converted.config.family == "mdlm" and model.cfg.logit_shift and not model.causal
    mask = converted.tokenizer.mask_id
    embed = model.get_parameter(type(model).INPUT_EMBEDDING)
    assert embed.shape[0] == (48 if kind == "qwen2" else 41)  # a spare row, or one more
    ids = torch.randint(0, 37, (2, 13))
    with torch.no_grad():
        theirs = hf(ids).logits
        bidirectional = model(ids)
        model.causal = True
        causal = model(ids)
    v = 40  # the tokenizer's ids (the mask's output row is new: zero)
    assert (causal[:, 1:, :v] - theirs[:, :-1, :v]).abs().max() < 1e-4
    assert (causal[:, 0, :v] - theirs[:, 0, :v]).abs().max() < 1e-4
    assert (bidirectional[:, 1:, :v] - theirs[:, :-1, :v]).abs().max() > 1e-2
    assert torch.allclose(embed[mask], embed[:40].mean(0), atol=1e-6)


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_convert_then_train_continues_the_model(tmp_path, kind):
    folder, _ = hf_causal_folder(tmp_path / kind, kind)
    corpus = tmp_path / "words.txt"
    corpus.write_text("\n".join(" ".join(f"w{(i * 5 + j) % 30 + 1}" for j in range(30)) for i in range(60)))
    assert main(["convert", str(folder), str(tmp_path / "a2d")]) == 0
    assert main(["train", f"run_dir={tmp_path / 'run'}", f"train.init_from={tmp_path / 'a2d'}", "data.dataset=text",
                 f"data.path={corpus}", "data.length=24", "model.length=64", "train.steps=3", "train.batch_size=4",
                 "train.warmup_steps=0", "train.progress=false", "train.threads=1"]) == 0
    trained = from_pretrained(tmp_path / "run")
    assert trained.config.model.backbone == ("gpt2" if kind == "gpt2" else "llama")
    assert trained.config.model.logit_shift and trained.config.family == "mdlm"
    start = from_pretrained(tmp_path / "a2d")
    moved = [(a - b).abs().max() for a, b in zip(trained.source.weights(ema=False).values(),
                                                 start.source.weights().values())]
    assert max(moved) > 0  # trained, from the converted weights


def test_a_conflicting_architecture_is_refused(tmp_path, capsys):
    folder, _ = hf_causal_folder(tmp_path / "qwen2", "qwen2")
    save_pretrained(to_diffusion(open_source(folder)), tmp_path / "a2d")
    assert main(["train", f"run_dir={tmp_path / 'run'}", f"train.init_from={tmp_path / 'a2d'}", "model.blocks=5",
                 "train.steps=1"]) == 2
    assert "model.blocks=5 (it has 2)" in capsys.readouterr().err
