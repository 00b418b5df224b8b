"""DiffusionGemma against ``transformers`` itself (its reference implementation, version >= 5.25) on random tiny
configs that differ from the vector set's in every setting (layer pattern, head shapes, window, experts, rotary,
soft cap, canvas length, special ids mid-vocabulary, batch of three): a folder written by ``save_pretrained``
(vision tower included) loads in unmask with the same logits, with and without self-conditioning;
``generate`` with recorded draws gives the same tokens, NFE and tokens per forward through unmask's
``entropy_bound`` sampler; and a model exported by unmask loads in ``transformers`` with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from unmask import from_pretrained
from unmask.checkpoints.pretrained import export, open_source
from unmask.config import SampleConfig
from unmask.samplers.registry import make_sampler

from released_folders import tokenizer_files

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.diffusion_gemma", reason="transformers >= 5.25 has DiffusionGemma")

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = dict(vocab_size=80, hidden_size=48, num_attention_heads=4, head_dim=12, num_key_value_heads=2,
            num_hidden_layers=4, layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
            sliding_window=5, global_head_dim=24, num_global_key_value_heads=1, intermediate_size=40, num_experts=6,
            top_k_experts=3, moe_intermediate_size=20, final_logit_softcapping=20.0, rms_norm_eps=1e-6, pad_token_id=30,
            eos_token_id=41, bos_token_id=52, max_position_embeddings=128,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 5000.0},
                             "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                                "rope_theta": 50000.0}})
VISION = {"model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8}
CANVAS = 6


def reference_folder(folder: Path, seed: int = 0, text: dict = TEXT):
    """A random DiffusionGemma of text config ``text`` saved by ``transformers`` (weights away from their
    initialisation, layer scalars included) with a tokenizer of its text ids; returns the folder and the
    ``transformers`` model."""
    cfg = transformers.DiffusionGemmaConfig(text_config=dict(text), vision_config=VISION, canvas_length=CANVAS)
    torch.manual_seed(seed)
    model = transformers.DiffusionGemmaForBlockDiffusion(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" not in name:
                p.normal_(0, 0.3)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    tokenizer_files(folder, TEXT["vocab_size"], {TEXT["pad_token_id"]: "<pad>", TEXT["eos_token_id"]: "<eos>",
                                                 TEXT["bos_token_id"]: "<bos>"})
    return folder, model


def unmask_logits(model, ids, canvas, self_conditioning=None):
    with torch.no_grad():
        cache = model.new_encoder_cache(len(ids), ids.device)
        model.encode(ids, cache)
        return model.decode(canvas, cache, self_conditioning)


# the text config's variants: image tokens attending both ways (text alone is causal as without), and transformers'
# defaults for the layer pattern (5 sliding : 1 full, the last full), the full layers' heads (512 wide), the rotary
# of each kind and the soft cap (class defaults: not in config.json)
VARIANTS = {"as given": TEXT, "bidirectional vision": {**TEXT, "use_bidirectional_attention": "vision"},
            "defaults": {**{k: v for k, v in TEXT.items()
                            if k not in ("layer_types", "global_head_dim", "num_global_key_value_heads",
                                         "final_logit_softcapping", "rope_parameters")},
                         "num_hidden_layers": 7}}


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_folder_written_by_transformers_gives_its_logits(tmp_path, variant):
    folder, reference = reference_folder(tmp_path / "dg", text=VARIANTS[variant])
    if variant == "defaults":  # a config.json that leaves them out: unmask fills in what transformers would
        config = json.loads((folder / "config.json").read_text())
        for key in ("layer_types", "per_layer_config", "rope_parameters", "final_logit_softcapping"):
            config["text_config"].pop(key, None)
        (folder / "config.json").write_text(json.dumps(config))
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert any(".vision_tower." in k for k in f.keys())  # the vision tower is there, and ignored
    lm = from_pretrained(folder)
    assert lm.config.family == "udlm" and lm.config.model.block_size == CANVAS
    assert (lm.tokenizer.eos_id, lm.tokenizer.pad_id, lm.tokenizer.bos_id) == (41, 30, 52)
    g = torch.Generator().manual_seed(1)
    ids, canvas = torch.randint(0, 80, (3, 9), generator=g), torch.randint(0, 80, (3, CANVAS), generator=g)
    conditioning = 3 * torch.randn(3, CANVAS, 80, generator=g)
    for sc in (None, conditioning):
        with torch.no_grad():
            expected = reference(input_ids=ids, decoder_input_ids=canvas, self_conditioning_logits=sc).logits
        assert float((unmask_logits(lm.model, ids, canvas, sc) - expected).abs().max()) < 1e-4


class Recorder:
    """``torch.multinomial`` as the race ``argmax p / q`` with recorded Exp(1) draws ``q``, and ``torch.randint``
    recorded, while ``transformers`` generates."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.exponentials, self.integers = [], []
        self.originals = torch.multinomial, torch.randint

    def multinomial(self, probs, num_samples=1, **kwargs):
        q = torch.empty(probs.shape, dtype=torch.float32).exponential_(generator=self.g)
        self.exponentials.append(q)
        return (probs / q).argmax(-1, keepdim=True)

    def randint(self, *args, low=0, high=None, size=None, device=None, **kwargs):
        drawn = self.originals[1](low, high, size, generator=self.g)
        self.integers.append(drawn)
        return drawn

    def __enter__(self):
        torch.multinomial, torch.randint = self.multinomial, self.randint
        return self

    def __exit__(self, *exc):
        torch.multinomial, torch.randint = self.originals


@pytest.mark.parametrize("adaptive", [True, False])
def test_generate_gives_transformers_tokens_with_its_draws(tmp_path, adaptive):
    folder, reference = reference_folder(tmp_path / "dg", seed=3)
    lm = from_pretrained(folder)
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 80, (3, 5), generator=g)
    prompt[prompt == TEXT["eos_token_id"]] = 0
    settings = dict(max_denoising_steps=5, entropy_bound=0.6, t_min=0.3, t_max=0.9,
                    stability_threshold=1 if adaptive else None, confidence_threshold=0.5 if adaptive else None)
    generation = transformers.DiffusionGemmaGenerationConfig(
        max_new_tokens=2 * CANVAS, eos_token_id=TEXT["eos_token_id"], pad_token_id=TEXT["pad_token_id"],
        max_denoising_steps=settings["max_denoising_steps"], t_min=settings["t_min"], t_max=settings["t_max"],
        stability_threshold=settings["stability_threshold"], confidence_threshold=settings["confidence_threshold"])
    sampler_config = transformers.EntropyBoundSamplerConfig(entropy_bound=settings["entropy_bound"])
    calls = []
    hook = reference.model.decoder.register_forward_pre_hook(lambda *a: calls.append(1))
    with Recorder(5) as recorder, torch.no_grad():
        out = reference.generate(prompt, generation_config=generation, sampler_config=sampler_config,
                                 return_dict_in_generate=True)
    hook.remove()
    cfg = SampleConfig(sampler="entropy_bound", steps=settings["max_denoising_steps"],
                       entropy_bound=settings["entropy_bound"], temperature_max=settings["t_max"],
                       temperature_min=settings["t_min"], stable_steps=settings["stability_threshold"] or 0,
                       stop_entropy=settings["confidence_threshold"] or 0.0)
    sampler = make_sampler(cfg, lm.objective, lm.tokenizer, lm.config.model.length)
    integers, exponentials = list(recorder.integers), list(recorder.exponentials)

    class Streams:
        def __init__(self, seeds):
            pass

        def integers(self, rows, counter, index, high):
            return integers.pop(0)[rows, index]

        def categorical(self, weights, rows, counter, index, precision="float64"):
            q = exponentials.pop(0).view(len(prompt), CANVAS, weights.shape[-1])
            return (weights / q[rows, index]).argmax(-1)

    sampler.streams = Streams
    canvas = torch.cat([prompt, torch.full((3, 2 * CANVAS), lm.tokenizer.mask_id)], dim=1)
    result = sampler.sample(lm.model, canvas, torch.zeros(3, dtype=torch.long))
    assert torch.equal(result.tokens, out.sequences)
    assert result.nfe == len(calls) and not integers and not exponentials
    assert torch.equal(result.tokens_per_forward, out.tokens_per_forward.float())


def test_an_exported_model_loads_in_transformers_with_the_same_logits(tmp_path):
    folder, _ = reference_folder(tmp_path / "dg", seed=6)
    written = export(open_source(folder), tmp_path / "out", to="diffusiongemma")
    config = json.loads((written / "config.json").read_text())
    assert config["model_type"] == "diffusion_gemma" and config["canvas_length"] == CANVAS
    assert {k: config["text_config"][k] for k in ("layer_types", "sliding_window", "eos_token_id")} == \
        {k: TEXT[k] for k in ("layer_types", "sliding_window", "eos_token_id")}
    reference = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(written, dtype=torch.float32).eval()
    ours = from_pretrained(written).model
    assert from_pretrained(written).tokenizer.vocab_size == from_pretrained(folder).tokenizer.vocab_size
    g = torch.Generator().manual_seed(7)
    ids, canvas = torch.randint(0, 80, (2, 7), generator=g), torch.randint(0, 80, (2, CANVAS), generator=g)
    with torch.no_grad():
        expected = reference(input_ids=ids, decoder_input_ids=canvas).logits
    assert float((unmask_logits(ours, ids, canvas) - expected).abs().max()) < 1e-4
