"""The contract of every registered family and backbone: a tiny model of each trains through the one
``train_step`` (finite losses that fall on a fixed batch, with the noise its objective asks for), and the
memory planner has its constants for every family and backbone. A family or backbone added to its
registry is checked here; a family whose config rules need keys of their own must say so in
``FAMILY_KEYS`` (a test fails until it does)."""

from __future__ import annotations

import pytest
import torch

from unmask.config import ConfigError, load_config
from unmask.data.tokenization import CharTokenizer
from unmask.families import FAMILIES, build_model, build_objective, fits
from unmask.models.registry import BACKBONES, transformer_blocks
from unmask.objectives.base import draw_noise
from unmask.train.memory import model_shape, plan_memory
from unmask.train.step import Batch, TrainState, train_step

from toys import TINY, TINY_CANVAS

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = CharTokenizer("abcdefghij ")
# the keys a family's own config rules ask for (FamilySpec.rules), beyond the tiny run's
FAMILY_KEYS = {
    "ilm": ["data.layout=pad"],
    "classifier": ["data.dataset=text", "data.path=train.tsv", "data.valid_path=valid.tsv",
                   "classifier.labels=[neg, pos]"],
    "bd3lm": [],
}
BACKBONE_KEYS = {"diffusiongemma": TINY_CANVAS}  # the keys a backbone needs beyond the tiny run's


def family_config(family: str, *extra: str):
    spec = FAMILIES[family]
    blocks = ["model.block_size=4"] if spec.blocks else []
    return load_config(None, [*TINY, f"family={family}", *blocks, *FAMILY_KEYS.get(family, []), *extra])


def test_every_family_with_rules_is_known_here():
    assert {name for name, spec in FAMILIES.items() if spec.rules is not None} <= set(FAMILY_KEYS)


# a backbone's variants beyond its defaults: the llama backbone with LLaDA2's mixture of experts and partial rotary
VARIANTS = {**{name: [] for name in BACKBONES},
            "llama-moe": ["model.backbone=llama", "model.moe_experts=4", "model.moe_top_k=2", "model.moe_width=16",
                          "model.moe_shared=1", "model.moe_groups=2", "model.moe_top_groups=1",
                          "model.moe_dense_layers=1", "model.rotary_dim=8", "model.qk_norm=true"]}


def pairs(backbones) -> list:
    """(family, backbone) for every backbone that serves the family."""
    return [(f, b) for f in FAMILIES for b in backbones if fits(f, VARIANTS.get(b) and "llama" or b)]


def test_a_family_refuses_a_backbone_that_does_not_serve_it():
    for family in FAMILIES:
        for backbone in BACKBONES:
            if not fits(family, backbone):
                with pytest.raises(ConfigError, match=f"family {family} does not run on model.backbone={backbone}"):
                    family_config(family, *BACKBONE_KEYS.get(backbone, []), f"model.backbone={backbone}")
    assert not fits("mdlm", "diffusiongemma") and fits("udlm", "diffusiongemma") and not fits("udlm", "llama")


@pytest.mark.parametrize("family, backbone", pairs(VARIANTS))
def test_every_family_trains_through_the_one_step(family, backbone):
    variant = VARIANTS[backbone] or [*BACKBONE_KEYS.get(backbone, []), f"model.backbone={backbone}"]
    cfg = family_config(family, *variant, "model.intermediate=64")
    torch.manual_seed(0)
    model = build_model(cfg, TOKENIZER).train()
    objective = build_objective(cfg, TOKENIZER)
    rows, length = 4, cfg.data.length
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 10, (rows, length), generator=g)
    if FAMILIES[family].decoding == "insertion":  # a document per row: BOS, text, EOS, padding
        x0[:, 0], x0[:, 12], x0[:, 13:] = TOKENIZER.bos_id, TOKENIZER.eos_id, TOKENIZER.pad_id
    counted = x0 != TOKENIZER.pad_id
    noise = draw_noise(rows, length, torch.Generator().manual_seed(2), blocks=objective.time_blocks(length),
                       extra=objective.extra_noise)
    labels = torch.tensor([0, 1, 0, 1]) if FAMILIES[family].labels else None
    tokens = float(rows if objective.per_sequence else counted.sum())
    state = TrainState(model, objective, torch.optim.AdamW(model.parameters(), lr=3e-3), grad_clip=1.0, micro=2)
    losses = [train_step(state, Batch(x0, counted, noise, tokens, labels)) for _ in range(8)]
    assert all(bool(m.finite) for m in losses)
    assert float(losses[-1].loss_sum) < float(losses[0].loss_sum)  # the same batch: the loss falls


@pytest.mark.parametrize("family, backbone", pairs(BACKBONES))
def test_the_memory_plan_knows_every_family_and_backbone(family, backbone):
    kinds = ["model.layer_types=[sliding_attention,full_attention,sliding_attention]"] if backbone == "diffusiongemma" \
        else []
    cfg = family_config(family, *BACKBONE_KEYS.get(backbone, []), f"model.backbone={backbone}", "model.intermediate=64",
                        "model.blocks=3", *kinds)
    shape = model_shape(cfg, TOKENIZER)  # counted from networks of one and two blocks: exactly a full build's
    with torch.device("meta"):
        full = FAMILIES[family].network(cfg, TOKENIZER)
    blocks = transformer_blocks(full)
    assert (shape.parameters, shape.trainable, shape.blocks, shape.block_parameters, shape.largest_trainable) == (
        sum(p.numel() for p in full.parameters()), sum(p.numel() for p in full.parameters()), len(blocks),
        max(sum(p.numel() for p in b.parameters()) for b in blocks), max(p.numel() for p in full.parameters()))
    plan = plan_memory(cfg, shape, TOKENIZER.vocab_size, device="cpu")
    assert plan.activations > 0 and plan.total > plan.weights > 0
