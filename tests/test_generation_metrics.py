"""Generation-quality metrics: entropy closed forms, evaluator NLL against the exact AR NLL, the
Hugging Face evaluator path, and `unmask eval eval.metric=generation` end to end."""

import json
import math

import numpy as np
import pytest
import torch

from unmask.checkpoints.checkpoint import Checkpoint, load_model, save_checkpoint
from unmask.cli import main
from unmask.config import load_config
from unmask.data.tokenization import CharTokenizer
from unmask.eval import generation as gm
from unmask.families import build_model

from toys import TINY


def test_unigram_entropy_closed_forms():
    assert gm.unigram_entropy([3, 3, 3]) == 0.0
    assert gm.unigram_entropy([1, 2, 3, 4]) == pytest.approx(math.log(4))
    assert gm.unigram_entropy([1, 1, 2, 2, 2, 2]) == pytest.approx(-(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3))
    assert gm.unigram_entropy([]) == 0.0


def ar_checkpoint(tmp_path, window=16):
    tok = CharTokenizer("abcd ")
    cfg = load_config(None, [*TINY, "family=ar", f"model.length={window}", f"data.length={window}",
                             f"run_dir={tmp_path / 'ar'}"])
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    path = save_checkpoint(tmp_path / "ar" / "checkpoints", 1, model.state_dict(), cfg, tok)
    return path, tok


def test_checkpoint_evaluator_nll_is_the_models_exact_nll_across_windows(tmp_path):
    path, tok = ar_checkpoint(tmp_path, window=16)
    evaluator = gm.load_evaluator(path)
    texts = ["abcd abcd", "dcba " * 8]  # the second needs three windows of 15 tokens
    totals, counts = evaluator.nll(texts)
    assert counts.tolist() == [9, 40]
    model, _ = load_model(Checkpoint(path))
    for text, total in zip(texts, totals):
        ids = tok.encode(text).tolist()
        expected = 0.0
        for start in range(0, len(ids), 15):
            piece = torch.tensor([[tok.bos_id] + ids[start:start + 15]])
            with torch.no_grad():
                logits = model(piece[:, :-1]).float()
            logits[..., tok.mask_id] = float("-inf")
            expected += float(torch.nn.functional.cross_entropy(logits[0], piece[0, 1:], reduction="sum"))
        assert total == pytest.approx(expected, rel=1e-5)
    assert evaluator.features(texts).shape == (2, 32)


def test_evaluator_must_be_autoregressive(tmp_path):
    tok = CharTokenizer("ab")
    cfg = load_config(None, [*TINY, f"run_dir={tmp_path / 'm'}"])
    path = save_checkpoint(tmp_path / "m" / "checkpoints", 1, build_model(cfg, tok).state_dict(), cfg, tok)
    with pytest.raises(ValueError, match="AR model is needed"):
        gm.load_evaluator(path)
    with pytest.raises(FileNotFoundError):
        gm.load_evaluator(tmp_path / "missing")


def test_huggingface_causal_lm_evaluator(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"a": 0, "b": 1, "c": 2, "d": 3, " ": 4, "<|endoftext|>": 5}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    config = transformers.GPT2Config(vocab_size=6, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    evaluator = gm.load_evaluator(folder)
    assert isinstance(evaluator, gm.HuggingFaceEvaluator)
    totals, counts = evaluator.nll(["abcd", "ab cd ab cd"])  # the second spans two windows of 7
    assert counts.tolist() == [4, 11]
    with torch.no_grad():
        ids = torch.tensor([[5, 0, 1, 2, 3]])
        logits = model(ids).logits[0, :-1]
        expected = float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
    assert totals[0] == pytest.approx(expected, rel=1e-5)


def test_generation_metrics_report_entropy_and_reference(tmp_path, monkeypatch):
    path, tok = ar_checkpoint(tmp_path)
    evaluator = gm.load_evaluator(path)
    samples = ["aaaa aaaa", "abab abab"]
    refs = ["abcd dcba", "dcba abcd"]
    monkeypatch.setattr(gm, "mauve_score", lambda p, q: None)
    out = gm.generation_metrics(samples, [tok.encode(s).tolist() for s in samples], refs,
                                [tok.encode(r).tolist() for r in refs], evaluator)
    totals, counts = evaluator.nll(samples)
    assert out["gen_ppl"] == pytest.approx(math.exp(totals.sum() / counts.sum()))
    assert out["entropy"] < out["reference_entropy"]
    assert out["mauve"] is None and "mauve-text" in out["mauve_note"]


def test_eval_generation_end_to_end(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 400)
    common = [*TINY, "data.dataset=text", f"data.path={corpus}", "train.steps=3"]
    assert main(["train", *common, f"run_dir={tmp_path / 'mdlm'}"]) == 0
    assert main(["train", *common, "family=ar", f"run_dir={tmp_path / 'ar'}"]) == 0
    capsys.readouterr()
    code = main(["eval", str(tmp_path / "mdlm"), "eval.metric=generation", f"eval.evaluator={tmp_path / 'ar'}",
                 "sample.num_samples=3", "sample.steps=4", "eval.mauve=false"])
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["samples"] == 3 and result["gen_ppl"] > 1 and result["reference_gen_ppl"] > 1
    assert 0 <= result["entropy"] and result["reference_entropy"] > 0
    assert "gen-ppl" in captured.err
    assert main(["eval", str(tmp_path / "mdlm"), "eval.metric=generation"]) == 2
    assert "eval.evaluator" in capsys.readouterr().err
    assert np.isfinite(result["generated_tokens_per_second"])


def test_mauve_separates_matching_from_shifted_feature_clouds():
    pytest.importorskip("mauve", reason="mauve-text is not installed (pip install -e '.[mauve]')")
    rng = np.random.default_rng(0)
    p = rng.normal(size=(200, 8))
    same = gm.mauve_score(p, rng.normal(size=(200, 8)))
    shifted = gm.mauve_score(p, rng.normal(size=(200, 8)) + 3.0)
    assert same > 0.9 and shifted < 0.2, (same, shifted)
