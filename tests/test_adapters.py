"""LoRA and DoRA through peft: only the adapters (and soft-mask scalars) train, the base stays bit for bit,
checkpoints hold the adapters alone, readers get the merged model with the same logits, resuming is
exact, and two FSDP processes make the update of one."""

from __future__ import annotations

import pytest
import torch

from unmask.checkpoints.checkpoint import Checkpoint, CheckpointError
from unmask.checkpoints.pretrained import AdapterCheckpoint, open_source
from unmask.cli import main
from unmask.config import ConfigError, load_config
from unmask.data.tokenization import CharTokenizer
from unmask.families import build_model, build_objective
from unmask.models.adapters import add_adapters, merged_weights, trainable_names
from unmask.objectives.base import draw_noise
from unmask.pipeline import from_pretrained
from unmask.train.loop import train

from runs import EXACT, config, max_diff, records, step_records, torchrun, weights
from toys import TINY

pytestmark = pytest.mark.slow


@pytest.fixture
def base(tmp_path, corpus):
    run = tmp_path / "base"
    train(config(corpus, run, *EXACT, "train.steps=3", "train.lr=0.003", "train.ema=0"))
    return run


def adapter_run(corpus, run, base, kind, *extra):
    return config(corpus, run, *EXACT, f"train.init_from={base}", f"adapter.kind={kind}", "adapter.rank=4",
                  "adapter.targets=[attention,mlp]", "train.lr=0.01", "train.ema=0.9", *extra)


def logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (3, 32), generator=g)
    sigma = torch.rand(3, generator=g)
    with torch.no_grad():
        return model.eval()(ids, sigma)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapters_train_alone_and_merge_into_the_same_model(tmp_path, corpus, base, kind):
    soft = ["model.soft_mask_top_k=2", "diffusion.soft_mask_prob=0.5"] if kind == "dora" else []
    run = tmp_path / kind
    train(adapter_run(corpus, run, base, kind, "train.steps=4", *soft))
    start = records(run)[0]
    assert 0 < start["trainable_parameters"] < start["parameters"] / 5

    ckpt = Checkpoint(run)
    saved = ckpt.tensors("model")
    assert saved and all("lora_" in k or k.startswith("soft_mask.") for k in saved)
    assert any("lora_magnitude_vector" in k for k in saved) == (kind == "dora")
    assert any(k.startswith("soft_mask.") for k in saved) == bool(soft)

    source = open_source(run)
    assert isinstance(source, AdapterCheckpoint)
    adapted = source.with_adapters(ema=False)
    base_weights = Checkpoint(base).weights(ema=False)
    for name, value in adapted.state_dict().items():  # the frozen base, bit for bit
        plain = name.replace(".base_layer.", ".")
        if "lora_" not in name and not name.startswith("soft_mask."):
            assert torch.equal(value, base_weights[plain]), name
    assert max(float(v.abs().max()) for k, v in saved.items() if "lora_B" in k) > 0  # the adapters moved

    merged = from_pretrained(run, ema=False).model
    assert not any("lora_" in k for k in merged.state_dict())
    assert torch.allclose(logits(merged), logits(adapted), atol=1e-5)
    assert not torch.allclose(logits(merged), logits(Checkpoint(base).build(ema=False)), atol=1e-3)
    # the EMA of the adapters is what readers get by default
    assert not torch.allclose(logits(from_pretrained(run).model), logits(merged), atol=1e-6)


def test_an_adapter_run_resumes_exactly(tmp_path, corpus, base):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(adapter_run(corpus, whole, base, "lora", "train.steps=6"))
    train(adapter_run(corpus, split, base, "lora", "train.steps=3", "train.save_every=3"))
    train(adapter_run(corpus, split, base, "lora", "train.steps=6"))
    a, b = step_records(whole), step_records(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert a[s]["loss"] == b[s]["loss"], s
    for kind in ("model", "ema", "optimizer"):
        assert max_diff(weights(whole, kind), weights(split, kind)) == 0, kind


def test_adapters_on_two_fsdp_processes_make_the_update_of_one(tmp_path, corpus, base):
    extra = [f"train.init_from={base}", "adapter.kind=lora", "adapter.rank=4", "adapter.targets=[attention,mlp]",
             *EXACT, "train.lr=0.01", "train.ema=0.9", "train.steps=3", "train.batch_size=8"]
    fsdp, single = tmp_path / "fsdp", tmp_path / "single"
    torchrun(fsdp, *extra, "train.parallel=fsdp", corpus=corpus)
    train(config(corpus, single, *extra))
    a, b = step_records(fsdp), step_records(single)
    for s in a:
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-5), s
    assert Checkpoint(fsdp).shards == 2
    for kind in ("model", "ema", "optimizer"):
        assert max_diff(weights(fsdp, kind), weights(single, kind)) < 1e-5, kind
    assert torch.allclose(logits(from_pretrained(fsdp).model), logits(from_pretrained(single).model), atol=1e-5)


def test_adapter_settings_are_checked(tmp_path, corpus, base):
    with pytest.raises(ConfigError, match="train.init_from"):
        load_config(None, ["adapter.kind=lora"])
    with pytest.raises(ConfigError, match="names no linear layer"):
        train(adapter_run(corpus, tmp_path / "none", base, "lora", "train.steps=1", "adapter.targets=[nothing]"))


@pytest.mark.parametrize("backbone", ["dit", "llama", "gpt2"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_every_backbone_takes_adapters_on_attention_and_mlp_and_merges_them_exactly(backbone, kind):
    cfg = load_config(None, [*TINY, f"model.backbone={backbone}", "train.init_from=unused", f"adapter.kind={kind}",
                             "adapter.rank=2", "adapter.targets=[attention,mlp]"])
    tokenizer = CharTokenizer("abcdefghij")
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    with torch.no_grad():  # no zero-initialised output layer (the DiT's) to hide what the adapters do
        for p in model.parameters():
            p.normal_(0, 0.1)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    add_adapters(model, cfg.adapter, backbone)
    adapted = {name.rsplit(".lora_", 1)[0] for name in trainable_names(model)}
    per_block = {"dit": 4, "llama": 7, "gpt2": 4}[backbone]  # q k v o (fused in DiT and GPT-2) and the MLP's
    assert len(adapted) == 2 * per_block and all(name.split(".")[-1] != "0" or ".mlp." in name for name in adapted)
    assert not any("sigma_map" in name for name in adapted)
    with torch.no_grad():  # adapters that do something (peft starts B at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    before = logits(model)
    # while training, every adapter takes part in the loss
    x0 = torch.randint(0, 10, (2, 32))
    build_objective(cfg, tokenizer).loss(model.train(), x0, torch.ones_like(x0, dtype=torch.bool),
                                         draw_noise(2, 32, torch.Generator().manual_seed(0))).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    merged = build_model(cfg, tokenizer)
    merged.load_state_dict(merged_weights(model))
    assert torch.allclose(logits(merged), before, atol=1e-5)
    assert not torch.allclose(before, logits(load_plain(cfg, tokenizer, plain)), atol=1e-3)


def load_plain(cfg, tokenizer, state):
    model = build_model(cfg, tokenizer)
    model.load_state_dict(state)
    return model


def test_an_adapter_run_pins_its_base_by_path_and_by_content(tmp_path, corpus, base, monkeypatch):
    """A relative train.init_from is stored resolved (read from anywhere, never looked up on the hub), and the
    base's weights digest recorded: a base trained further since is refused by readers and by a resume."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "lora"
    train(adapter_run(corpus, run, base.name, "lora", "train.steps=2", "train.save_every=2"))
    recorded = load_config(run / "config.yaml").train.init_from
    assert recorded == str(base.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = logits(from_pretrained(run, ema=False).model)
    train(config(corpus, base, *EXACT, "train.steps=5", "train.lr=0.003", "train.ema=0"))  # the base moves on
    with pytest.raises(CheckpointError, match="trained on other weights than train.init_from=.*base"):
        from_pretrained(run)
    assert main(["eval", str(run)]) == 2
    with pytest.raises(CheckpointError, match="trained on other weights"):
        train(adapter_run(corpus, run, base, "lora", "train.steps=4", "train.save_every=2"))
    assert before.isfinite().all()


def test_an_edited_adapter_rank_is_named_not_a_traceback(tmp_path, corpus, base, capsys):
    """adapter.rank edited in a checkpoint whose checksums.json is gone was a size-mismatch RuntimeError."""
    run = tmp_path / "lora"
    train(adapter_run(corpus, run, base, "lora", "train.steps=1"))
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "checksums.json").unlink()
        (ckpt / "config.yaml").write_text((ckpt / "config.yaml").read_text().replace("rank: 4", "rank: 8"))
    capsys.readouterr()
    assert main(["sample", str(run), "sample.num_samples=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "but adapter.rank=8 of its config makes" in err, err
