"""The memory planner against the measured peak of live tensor bytes of real training steps (CPU)."""

from __future__ import annotations

import time

import pytest
import torch

from unmask.cli import main
from unmask.config import load_config
from unmask.data.tokenization import CharTokenizer
from unmask.families import build_model, build_objective
from unmask.models.adapters import add_adapters
from unmask.objectives.base import draw_noise
from unmask.runtime import LiveTensorBytes
from unmask.train.memory import model_shape, plan_memory, plan_table
from unmask.train.optim import EMA, parameter_groups
from unmask.train.parallel import checkpoint_activations, transformer_blocks

VOCAB = 1500  # characters; shapes unlike the ones the planner's constants were measured at


def measured_step(cfg, tokenizer) -> int:
    """Peak live bytes of a model, its AdamW state and EMA through a training step (the second one: the
    first has no AdamW state yet)."""
    b, length = cfg.train.batch_size, cfg.data.length
    x0 = torch.randint(0, VOCAB, (b, length))
    counted = torch.ones(b, length, dtype=torch.bool)
    noise = draw_noise(b, length, torch.Generator().manual_seed(0))
    with LiveTensorBytes() as live:
        model = build_model(cfg, tokenizer)
        if cfg.train.activation_checkpointing:
            for block in transformer_blocks(model):
                checkpoint_activations(block)
        objective = build_objective(cfg, tokenizer)
        optimizer = torch.optim.AdamW(parameter_groups(model, cfg))
        ema = EMA(model, 0.99)
        for _ in range(2):
            live.peak = live.current
            objective.loss(model, x0, counted, noise).sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(model)
    return live.peak


@pytest.mark.parametrize("family,backbone,extra", [
    ("mdlm", "dit", []), ("mdlm", "llama", []), ("ar", "gpt2", []), ("ar", "dit", []),
    ("mdlm", "dit", ["train.activation_checkpointing=true"]), ("mdlm", "llama", ["model.blocks=5", "data.length=96"]),
    # parameters dominate: the optimizer step is the peak
    ("mdlm", "dit", ["model.hidden=512", "train.batch_size=1", "data.length=16"]),
    ("ar", "llama", ["model.hidden=512", "train.batch_size=1", "data.length=16"]),
    # LLaDA2's mixture of experts (a dense first layer, 8 experts of which 2 per token and a shared one)
    ("mdlm", "llama", ["model.moe_experts=8", "model.moe_top_k=2", "model.moe_width=128", "model.moe_shared=1",
                       "model.moe_groups=4", "model.moe_top_groups=2", "model.moe_dense_layers=1"]),
    # DiffusionGemma's encoder-decoder on uniform-noise canvases (the constants were measured at 3 layers, 160)
    ("udlm", "diffusiongemma", ["model.blocks=4", "data.length=96",
                                "model.layer_types=[sliding_attention,full_attention,sliding_attention,full_attention]",
                                "model.block_size=16", "model.sliding_window=8", "model.moe_experts=6",
                                "model.moe_top_k=2", "model.moe_width=64", "model.intermediate=256"]),
])
def test_the_plan_is_within_15_percent_of_the_measured_peak(one_thread, family, backbone, extra):
    cfg = load_config(None, [f"family={family}", f"model.backbone={backbone}", "model.hidden=192", "model.heads=4",
                             "model.blocks=3", "model.length=160", "data.length=160", "model.dropout=0",
                             "train.batch_size=6", "train.ema=0.99", "train.precision=fp32", *extra])
    tokenizer = CharTokenizer("".join(chr(0x4E00 + i) for i in range(VOCAB)))
    plan = plan_memory(cfg, model_shape(cfg, tokenizer), tokenizer.vocab_size, device="cpu")
    measured = measured_step(cfg, tokenizer)
    assert plan.total == pytest.approx(measured, rel=0.15), plan_table({"plan": plan})


def test_sharding_divides_what_each_process_holds():
    cfg = load_config(None, ["model.preset=llada-8b", "data.length=2048", "train.batch_size=8", "train.ema=0",
                             "train.precision=bf16", "data.tokenizer=byte"])
    tokenizer = CharTokenizer("ab")
    model = model_shape(cfg, tokenizer)
    ddp = plan_memory(cfg, model, tokenizer.vocab_size, world=8)
    fsdp = plan_memory(load_config(None, ["model.preset=llada-8b", "data.length=2048", "train.batch_size=8",
                                          "train.ema=0", "train.precision=bf16", "train.parallel=fsdp"]),
                       model, tokenizer.vocab_size, world=8)
    assert 7.9e9 < ddp.parameters < 8.1e9
    assert ddp.optimizer == pytest.approx(8 * ddp.parameters) and fsdp.optimizer == pytest.approx(ddp.optimizer / 8)
    assert fsdp.activations == ddp.activations
    assert not ddp.fits(141) and fsdp.fits(141)


def test_plan_command_compares_settings_and_refuses_bad_worlds(capsys):
    assert main(["plan", "quickstart", "--world", "1", "2", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "2 cuda processes" in out and "fsdp + activation checkpointing" in out and "LoRA r=16" in out
    assert main(["plan", "quickstart", "--world", "0"]) == 2
    assert main(["plan", "quickstart", "train.batch_size=3", "--world", "2"]) == 2
    assert "not divisible" in capsys.readouterr().err


@pytest.mark.parametrize("backbone", ["dit", "llama"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_the_shape_of_an_adapter_run_is_what_a_full_build_counts(backbone, kind):
    cfg = load_config(None, [f"model.backbone={backbone}", "model.hidden=64", "model.heads=4", "model.blocks=5",
                             "model.length=64", "data.length=64", f"adapter.kind={kind}", "train.init_from=x"])
    tokenizer = CharTokenizer("abcdef")
    shape = model_shape(cfg, tokenizer)
    with torch.device("meta"):
        full = build_model(cfg, tokenizer)
        add_adapters(full, cfg.adapter, backbone)
    trained = [p for p in full.parameters() if p.requires_grad]
    assert shape.parameters == sum(p.numel() for p in full.parameters())
    assert shape.trainable == sum(p.numel() for p in trained) < shape.parameters
    assert shape.largest_trainable == max(p.numel() for p in trained)


def test_a_plan_of_absurd_depth_is_arithmetic_and_an_impossible_one_is_one_line(capsys):
    """`plan model.blocks=1000000000` built a billion meta modules (3 GB after six minutes); a hidden size
    of 10^9 was a storage overflow traceback."""
    start = time.perf_counter()
    assert main(["plan", "quickstart", "model.blocks=1000000000"]) == 0
    assert "none of 24/40/80/141 GB" in capsys.readouterr().out and time.perf_counter() - start < 30
    assert main(["plan", "quickstart", "model.hidden=1000000000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be built" in err, err


def test_a_mixture_of_experts_counts_its_dense_layers_and_the_parameters_a_token_uses():
    moe = ["model.backbone=llama", "model.hidden=64", "model.heads=4", "model.blocks=5", "model.intermediate=96",
           "model.moe_experts=8", "model.moe_top_k=2", "model.moe_width=16", "model.moe_shared=1", "model.moe_groups=4",
           "model.moe_top_groups=2", "model.moe_dense_layers=2"]
    cfg = load_config(None, moe)
    tokenizer = CharTokenizer("abcdefgh")
    model = build_model(cfg, tokenizer)
    shape = model_shape(cfg, tokenizer)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for layer in model.model.layers[2:] for p in layer.mlp.experts.parameters())
    assert shape.parameters == total and shape.active == total - routed * 6 // 8
