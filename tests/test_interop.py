"""Released MDLM formats, the restricted .ckpt loader, save_pretrained / from_pretrained round trips,
continuation likelihoods (the lm-eval path) and zero-shot evaluation."""

from __future__ import annotations

import json
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from unmask.checkpoints.checkpoint import CheckpointError, load_model, save_checkpoint
from unmask.checkpoints.pretrained import open_source, save_pretrained
from unmask.checkpoints.released import (
    UnsafeCheckpointError,
    mdlm_parameter_names,
    read_lightning_ckpt,
    run_config_for,
    write_mdlm_ckpt,
    write_mdlm_hf,
)
from unmask.cli import main
from unmask.config import load_config
from unmask.data.corpora import wikitext_detokenize
from unmask.data.tokenization import HFTokenizer, build_tokenizer
from unmask.eval.likelihood import continuation_loglikelihoods
from unmask.families import build_model
from unmask.models.common import count_parameters
from unmask.objectives.ar import Autoregressive
from unmask.objectives.mdlm import MaskedDiffusion
from unmask.objectives.schedules import LogLinear
from unmask.pipeline import from_pretrained

from toys import GPT2_DIR, SHARED_DATA, TINY, EnumeratedModel, random_joint

needs_gpt2 = pytest.mark.skipif(not GPT2_DIR.is_dir(), reason=f"GPT-2 tokenizer files not found at {GPT2_DIR}")
WIKITEXT2 = SHARED_DATA / "wikitext2"
GPT2_VOCAB = 50258


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (MDLM zero-initializes adaLN and the output layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def released_model(time_conditioning=False, heads=2):
    cfg = run_config_for(hidden=32, n_blocks=2, heads=heads, cond_dim=16, length=64, vocab_size=GPT2_VOCAB,
                         time_conditioning=time_conditioning)
    tokenizer = HFTokenizer.gpt2_from_files(GPT2_DIR)
    return cfg, tokenizer, randomize(build_model(cfg, tokenizer))


def logits_of(model, ids, t=0.5):
    sigma = torch.full((ids.shape[0],), t)
    with torch.no_grad():
        return model(ids, sigma)


# --- released layouts -----------------------------------------------------------------------------

def test_released_small_config_has_mdlm_parameter_count():
    cfg = run_config_for(768, 12, 12, 128, 1024, GPT2_VOCAB, False)
    with torch.device("meta"):
        model = build_model(cfg, types.SimpleNamespace(vocab_size=GPT2_VOCAB, mask_id=50257, bos_id=50256))
    assert count_parameters(model) == 169_627_218
    assert [n for n, _ in model.named_parameters()] == mdlm_parameter_names(12)


@needs_gpt2
@pytest.mark.parametrize("time_conditioning", [False, True])
def test_mdlm_hf_folder_round_trip_gives_identical_logits(tmp_path, time_conditioning):
    cfg, tokenizer, model = released_model(time_conditioning)
    write_mdlm_hf(tmp_path / "mdlm-owt", model.state_dict(), cfg, GPT2_VOCAB)
    hf = json.loads((tmp_path / "mdlm-owt" / "config.json").read_text())
    assert hf["model_type"] == "mdlm" and hf["cond_dim"] == 16 and hf["time_conditioning"] is time_conditioning
    from safetensors.torch import load_file

    assert all(k.startswith("backbone.") for k in load_file(str(tmp_path / "mdlm-owt" / "model.safetensors")))
    source = open_source(tmp_path / "mdlm-owt", tokenizer_path=str(GPT2_DIR))
    assert source.format == "mdlm-hf" and source.tokenizer.mask_id == 50257
    assert source.config.diffusion.schedule_eps == 1e-3
    loaded, _ = load_model(source)
    ids = torch.randint(0, GPT2_VOCAB, (2, 16))
    ids[:, ::3] = 50257
    assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))


@needs_gpt2
def test_mdlm_hf_folder_without_tokenizer_and_no_hub_is_a_clear_error(tmp_path, monkeypatch):
    cfg, _, model = released_model()
    write_mdlm_hf(tmp_path / "m", model.state_dict(), cfg, GPT2_VOCAB)
    monkeypatch.setattr(HFTokenizer, "from_hub", classmethod(lambda cls, name: (_ for _ in ()).throw(OSError())))
    with pytest.raises(CheckpointError, match="GPT-2 tokenizer"):
        open_source(tmp_path / "m")


@needs_gpt2
def test_lightning_ckpt_round_trip_with_ema_list(tmp_path):
    cfg, tokenizer, model = released_model(heads=4)
    raw = model.state_dict()
    params = dict(model.named_parameters())
    ema = {k: v + 0.01 * torch.randn_like(v) if k in params else v for k, v in raw.items()}
    write_mdlm_ckpt(tmp_path / "last.ckpt", raw, ema, cfg, step=1234)
    obj = torch.load(tmp_path / "last.ckpt", weights_only=True)  # plain data only
    assert isinstance(obj["ema"]["shadow_params"], list)
    assert len(obj["ema"]["shadow_params"]) == len(list(model.parameters()))
    source = open_source(tmp_path / "last.ckpt", tokenizer_path=str(GPT2_DIR))
    assert source.step == 1234 and source.config.model.heads == 4  # read from hyper_parameters
    ids = torch.randint(0, GPT2_VOCAB, (2, 16))
    for use_ema, weights in ((False, raw), (True, ema)):
        reference = build_model(cfg, tokenizer)
        reference.load_state_dict(weights)
        loaded, _ = load_model(source, ema=use_ema)
        assert torch.equal(logits_of(loaded.eval(), ids), logits_of(reference.eval(), ids))


class Marker:
    """A pickled object whose loading would create a file: the attack a .ckpt can carry."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
def test_ckpt_with_code_is_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    if payload == "os.system":
        evil = Marker(marker)
    else:
        class Exec:
            def __reduce__(self):
                return (exec, (f"open({str(marker)!r}, 'w').close()",))
        evil = Exec()
    torch.save({"state_dict": {"backbone.x": torch.zeros(1)}, "hyper_parameters": {"config": evil}},
               tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=payload.split(".")[1] if payload == "os.system" else "exec"):
        read_lightning_ckpt(tmp_path / "evil.ckpt")
    assert not marker.exists()
    assert main(["eval", str(tmp_path / "evil.ckpt")]) == 2
    assert not marker.exists()


def test_ckpt_metadata_classes_are_read_inertly(tmp_path, monkeypatch):
    """OmegaConf-like config objects (a module that will not exist at load time) become inert data,
    and the model settings in them are still read."""
    fake = types.ModuleType("omegaconf.fake_dictconfig")

    class AnyNode:
        def __init__(self, value):
            self._val = value

    class DictConfig:
        def __init__(self, content):
            self._content = {k: (v if isinstance(v, DictConfig) else AnyNode(v)) for k, v in content.items()}
            self._parent = None

    for cls in (AnyNode, DictConfig):
        cls.__module__, cls.__qualname__ = fake.__name__, cls.__name__
        setattr(fake, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    if "omegaconf" not in sys.modules:
        monkeypatch.setitem(sys.modules, "omegaconf", types.ModuleType("omegaconf"))
    cfg = run_config_for(32, 1, 2, 16, 64, 11, False)
    model = randomize(build_model(cfg, types.SimpleNamespace(vocab_size=11, mask_id=10, bos_id=9)))
    hp = DictConfig({"model": DictConfig({"n_heads": 8, "length": 48, "dropout": 0.0}), "time_conditioning": True})
    torch.save({"state_dict": {"backbone." + k: v for k, v in model.state_dict().items()}, "global_step": 7,
                "hyper_parameters": {"config": hp}}, tmp_path / "m.ckpt")
    monkeypatch.delitem(sys.modules, fake.__name__)  # the loader must not need the classes
    from unmask.checkpoints.released import read_mdlm_ckpt

    read, weights, ema, step = read_mdlm_ckpt(tmp_path / "m.ckpt")
    assert (read.model.heads, read.model.length, read.model.time_conditioning, step) == (8, 48, True, 7)
    assert ema is None and torch.equal(weights["blocks.0.attn_qkv.weight"], model.state_dict()["blocks.0.attn_qkv.weight"])


def test_corrupt_and_non_zip_ckpt_are_clear_errors(tmp_path):
    (tmp_path / "a.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a torch zip"):
        read_lightning_ckpt(tmp_path / "a.ckpt")
    torch.save({"state_dict": {"backbone.x": torch.zeros(3)}}, tmp_path / "b.ckpt")
    data = (tmp_path / "b.ckpt").read_bytes()
    (tmp_path / "b.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        read_lightning_ckpt(tmp_path / "b.ckpt")
    torch.save({"weights": 1}, tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        read_lightning_ckpt(tmp_path / "c.ckpt")


# --- our Hugging Face style folder -------------------------------------------------------------------

def tiny_checkpoint(tmp_path, family="mdlm", corpus="tinyshakespeare", *extra):
    cfg = load_config(None, TINY + [f"family={family}", f"run_dir={tmp_path / family}", f"data.dataset={corpus}",
                                    "data.tokenizer=char", "data.alphabet=abcdefghijklmnopqrstuvwxyz .,\n", *extra])
    tokenizer = build_tokenizer("char", alphabet=cfg.data.alphabet)
    model = randomize(build_model(cfg, tokenizer), seed=3)
    ema = {k: v + 0.05 for k, v in model.state_dict().items()}
    return save_checkpoint(Path(cfg.run_dir) / "checkpoints", 5, model.state_dict(), cfg, tokenizer, ema_state=ema)


@pytest.mark.parametrize("family", ["mdlm", "ar"])
def test_from_pretrained_of_save_pretrained_gives_identical_logits_and_samples(tmp_path, family):
    ckpt = tiny_checkpoint(tmp_path, family)
    original = from_pretrained(ckpt)
    folder = save_pretrained(open_source(ckpt), tmp_path / "exported")
    assert {"config.json", "model.safetensors", "README.md", "unmask_tokenizer.json"} <= {p.name for p in folder.iterdir()}
    card = (folder / "README.md").read_text()
    assert "training steps | 5" in card and "tinyshakespeare" in card
    loaded = from_pretrained(folder)
    assert loaded.source.step == 5 and loaded.config == original.config
    ids = torch.randint(0, 30, (3, 24))
    assert torch.equal(logits_of(loaded.model, ids), logits_of(original.model, ids))
    a = original.generate(num_samples=3, seed=4, steps=8, length=24)
    b = loaded.generate(num_samples=3, seed=4, steps=8, length=24)
    assert a.ids == b.ids and a.texts == b.texts


def test_soft_mask_model_round_trips_and_stays_out_of_mdlm_layouts(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path, "mdlm", "tinyshakespeare", "model.soft_mask_top_k=3")
    original = from_pretrained(ckpt)
    with torch.no_grad():  # a large lambda even for this untrained, uncertain model
        original.model.soft_mask.a.fill_(3.0)
        original.model.soft_mask.c.fill_(10.0)
    loaded = from_pretrained(original.save_pretrained(tmp_path / "exported"))
    assert torch.equal(loaded.model.soft_mask.c, original.model.soft_mask.c)
    a = original.generate(num_samples=3, seed=4, steps=8, length=24)
    assert a.ids == loaded.generate(num_samples=3, seed=4, steps=8, length=24).ids
    assert a.ids != original.generate(num_samples=3, seed=4, steps=8, length=24, soft_mask=False).ids
    assert main(["export", str(ckpt), str(tmp_path / "m"), "--to", "mdlm-hf"]) == 2
    assert "soft-mask" in capsys.readouterr().err


def test_loaded_model_save_pretrained_keeps_current_weights(tmp_path):
    lm = from_pretrained(tiny_checkpoint(tmp_path))
    with torch.no_grad():
        lm.model.output_layer.linear.bias.add_(1.0)
    folder = lm.save_pretrained(tmp_path / "tuned")
    again = from_pretrained(folder)
    assert torch.equal(again.model.output_layer.linear.bias, lm.model.output_layer.linear.bias)


def test_bad_sources_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="not found"):
        open_source(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        open_source(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="model_type 'bert'.*'llada'"):
        open_source(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "llama"}')  # a known layout, incomplete
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        open_source(tmp_path / "bad")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="hub"):
        open_source("nobody-here/no-such-model")


def test_cli_export_then_sample_and_mdlm_layouts(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path)
    out = tmp_path / "pt"
    assert main(["export", str(ckpt), str(out)]) == 0
    assert main(["sample", str(out), "sample.num_samples=2", "sample.steps=4", "sample.length=16"]) == 0
    assert "--- 2 samples" in capsys.readouterr().out
    assert main(["export", str(ckpt), str(tmp_path / "m.ckpt"), "--to", "mdlm-ckpt"]) == 0
    raw = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert torch.equal(raw["state_dict"]["backbone.output_layer.linear.bias"],
                       from_pretrained(ckpt, ema=False).model.output_layer.linear.bias)
    ar = tiny_checkpoint(tmp_path, "ar")
    assert main(["export", str(ar), str(tmp_path / "ar.ckpt"), "--to", "mdlm-ckpt"]) == 2
    assert "a ar model cannot be written as 'mdlm-ckpt'" in capsys.readouterr().err


# --- continuation likelihoods (lm-eval's loglikelihood) ------------------------------------------------

def enumerated_problem(causal):
    states, weights = random_joint(length=4, vocab=3, seed=5)
    return states, weights, EnumeratedModel(states, weights, vocab=3, causal=causal)


def exact_conditional(states, weights, x, start):
    match_all = (states == x).all(1)
    match_ctx = (states[:, :start] == x[:start]).all(1)
    return math.log(float(weights[match_all].sum() / weights[match_ctx].sum()))


def test_ar_continuation_loglikelihood_is_exact():
    states, weights, model = enumerated_problem(causal=True)
    objective = Autoregressive(bos_id=0, mask_id=3)
    xs = [states[5].tolist(), states[40].tolist(), states[77].tolist()]
    starts = [1, 2, 3]
    out = continuation_loglikelihoods(model, objective, xs, starts)
    for x, s, (ll, err, _) in zip(xs, starts, out):
        assert ll == pytest.approx(exact_conditional(states, weights, torch.tensor(x), s), abs=1e-5)
        assert err == 0.0
    greedy = []
    for j in range(states.shape[1]):  # the argmax of each next-token conditional
        prefix = (states[:, :j] == torch.tensor(greedy, dtype=states.dtype)).all(1)
        marginal = torch.zeros(3, dtype=torch.float64).index_add_(0, states[prefix, j], weights[prefix])
        greedy.append(int(marginal.argmax()))
    other = greedy[:3] + [(greedy[3] + 1) % 3]
    assert [r[2] for r in continuation_loglikelihoods(model, objective, [greedy, other], [0, 0])] == [True, False]


@pytest.mark.parametrize("estimator", ["time", "count"])
def test_mdlm_continuation_bound_of_exact_denoiser_matches_true_conditional(estimator):
    """For the exact denoiser the conditional NELBO is tight: both MC estimators must agree with
    log p(continuation | context) within their reported standard error."""
    states, weights, model = enumerated_problem(causal=False)
    objective = MaskedDiffusion(LogLinear(), mask_id=3, t_min=0.0)
    x = states[weights.argsort()[len(weights) // 2]]
    for start in (0, 1, 2):
        (ll, err, _), = continuation_loglikelihoods(model, objective, [x.tolist()], [start], mc_samples=20000,
                                                    batch_rows=20000, seed=start, estimator=estimator)
        exact = exact_conditional(states, weights, x, start) if start else math.log(float(weights[(states == x).all(1)]))
        assert 0 < err < 0.08
        assert abs(ll - exact) < 4 * err, (ll, exact, err)


def test_guided_continuation_score_of_one_token_is_the_tilted_conditional():
    """One continuation token: the count estimator is exact, so the guided score must equal
    log of p(x | context)^{1+w} / p(x)^w normalized over the vocabulary (SMDM eq. 7), and w = 0 the
    plain score exactly."""
    states, weights, model = enumerated_problem(causal=False)
    objective = MaskedDiffusion(LogLinear(), mask_id=3, t_min=0.0)
    x = states[17]
    w = 0.8
    (guided, err, _), = continuation_loglikelihoods(model, objective, [x.tolist()], [3], mc_samples=4,
                                                      estimator="count", guidance=w)
    (plain, _, _), = continuation_loglikelihoods(model, objective, [x.tolist()], [3], mc_samples=4,
                                                   estimator="count")
    (zero, _, _), = continuation_loglikelihoods(model, objective, [x.tolist()], [3], mc_samples=4,
                                                  estimator="count", guidance=0.0)
    match = (states[:, :3] == x[:3]).all(1)
    conditional = torch.zeros(3, dtype=torch.float64).index_add_(0, states[match, 3], weights[match])
    conditional /= conditional.sum()
    unconditional = torch.zeros(3, dtype=torch.float64).index_add_(0, states[:, 3], weights)
    tilted = conditional ** (1 + w) / unconditional ** w
    expected = math.log(float(tilted[x[3]] / tilted.sum()))
    assert err == pytest.approx(0.0, abs=1e-9) and guided == pytest.approx(expected, abs=1e-4)
    assert plain == zero and plain == pytest.approx(math.log(float(conditional[x[3]])), abs=1e-4)
    with pytest.raises(ValueError, match="guidance"):
        continuation_loglikelihoods(model, Autoregressive(bos_id=0, mask_id=3), [x.tolist()], [3], guidance=1.0)


def test_count_estimator_has_lower_variance_and_choices_share_draws():
    states, weights, model = enumerated_problem(causal=False)
    objective = MaskedDiffusion(LogLinear(), mask_id=3)
    x = states[weights.argsort()[len(weights) // 2]].tolist()
    errors = {e: continuation_loglikelihoods(model, objective, [x], [1], mc_samples=256, estimator=e)[0][1]
              for e in ("time", "count")}
    assert errors["count"] < 0.7 * errors["time"], errors
    # the choices of one question (same context and length) draw the same times and masks
    from unmask.eval.likelihood import _context_key

    assert _context_key([1, 2, 0, 1], 2) == _context_key([1, 2, 2, 2], 2)
    assert _context_key([1, 2, 0, 1], 2) != _context_key([1, 0, 0, 1], 2)
    assert _context_key([1, 2, 0, 1], 2) != _context_key([1, 2, 0, 1, 1], 2)


def test_continuation_loglikelihoods_do_not_depend_on_batching():
    states, weights, model = enumerated_problem(causal=False)
    objective = MaskedDiffusion(LogLinear(), mask_id=3)
    xs = [states[i].tolist() for i in (3, 9, 27, 50)]
    together = continuation_loglikelihoods(model, objective, xs, [1, 2, 1, 3], mc_samples=8, batch_rows=64)
    alone = [continuation_loglikelihoods(model, objective, xs[:i + 1], [1, 2, 1, 3][:i + 1], mc_samples=8,
                                         batch_rows=8)[i] for i in range(4)]
    assert together == alone
    with pytest.raises(ValueError, match="non-empty"):
        continuation_loglikelihoods(model, objective, [xs[0]], [4])


# --- zero-shot ---------------------------------------------------------------------------------------

def test_wikitext_detokenizer():
    line = (' The game @-@ play , " Valkyria " ( 2011 ) is 1 @,@ 000 @.@ 5 km ; it \'s Raita \'s . \n')
    assert wikitext_detokenize(line) == ' The game-play, "Valkyria" (2011) is 1,000.5 km; it\'s Raita\'s.\n'
    assert wikitext_detokenize(" = = Gameplay = = \n") == " == Gameplay ==\n"


@needs_gpt2
@pytest.mark.skipif(not (WIKITEXT2 / "wiki.test.tokens").is_file(), reason=f"WikiText-2 not found at {WIKITEXT2}")
def test_zero_shot_wikitext2_reports_both_eos_conventions(tmp_path, capsys):
    cfg, tokenizer, model = released_model()
    write_mdlm_hf(tmp_path / "m", model.state_dict(), cfg, GPT2_VOCAB)
    argv = ["eval", str(tmp_path / "m"), "--tokenizer", str(GPT2_DIR), "--zero-shot", "wikitext2",
            f"data.path={WIKITEXT2}", "eval.max_sequences=4", "eval.mc_samples=1", "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    with_eos, without = result["with_eos"], result["without_eos"]
    assert with_eos["sequences"] == without["sequences"] == 4
    assert math.isfinite(with_eos["perplexity"]) and math.isfinite(without["perplexity"])
    err = capsys.readouterr().err
    assert "no EOS between documents" in err and "EOS between documents" in err
    # the token streams differ by one EOS per line of the file (4,358 lines in the test split)
    from unmask.data.dataset import Data

    streams = [Data(load_config(None, ["data.dataset=wikitext2", f"data.path={WIKITEXT2}", "data.tokenizer=gpt2",
                                       f"data.tokenizer_path={GPT2_DIR}", f"data.insert_eos={e}"]).data).stream("test")
               for e in (True, False)]
    assert len(streams[0]) - len(streams[1]) == 4358


@needs_gpt2
def test_ckpt_like_mdlms_with_real_omegaconf_tokenizer_and_optimizer_state(tmp_path):
    """What MDLM's Lightning checkpoints hold: an OmegaConf config and the pickled transformers
    tokenizer in hyper_parameters, optimizer and loop state with NumPy scalars, the EMA list."""
    omegaconf = pytest.importorskip("omegaconf")
    transformers = pytest.importorskip("transformers")
    import numpy as np

    cfg, _, model = released_model(time_conditioning=True, heads=4)
    config = omegaconf.OmegaConf.create({
        "backbone": "dit", "time_conditioning": True, "noise": {"type": "loglinear"},
        "model": {"name": "small", "type": "ddit", "hidden_size": 32, "cond_dim": 16, "length": 64, "n_blocks": 2,
                  "n_heads": 4, "scale_by_sigma": True, "dropout": 0.1}})
    tokenizer = transformers.GPT2TokenizerFast(vocab_file=str(GPT2_DIR / "encoder.json"),
                                               merges_file=str(GPT2_DIR / "vocab.bpe"))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    torch.save({"epoch": 3, "global_step": 777, "pytorch-lightning_version": "2.2.1",
                "state_dict": {"backbone." + k: v for k, v in model.state_dict().items()},
                "hyper_parameters": {"config": config, "tokenizer": tokenizer},
                "ema": {"decay": 0.9999, "num_updates": 777, "shadow_params": [p.detach() for p in model.parameters()]},
                "optimizer_states": [optimizer.state_dict()],
                "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": np.int64(3)}}}}}, tmp_path / "last.ckpt")
    source = open_source(tmp_path / "last.ckpt", tokenizer_path=str(GPT2_DIR))
    assert (source.config.model.heads, source.config.model.length, source.config.model.time_conditioning,
            source.step) == (4, 64, True, 777)
    loaded, _ = load_model(source)
    ids = torch.randint(0, GPT2_VOCAB, (2, 16))
    assert torch.equal(logits_of(loaded, ids), logits_of(model.eval(), ids))
