"""Supervised fine-tuning data: prompt/response pairs whose prompt stays clean and out of the loss,
EOS padding, random-length rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unmask.checkpoints.pretrained import open_source
from unmask.config import ConfigError, load_config
from unmask.data.chat import chat_pair
from unmask.data.dataset import Data
from unmask.data.layouts import (
    BOS,
    EOS,
    PAD,
    PROMPT,
    TOKEN,
    counted_positions,
    random_lengths,
)
from unmask.data.readers import DataError
from unmask.objectives.base import draw_noise
from unmask.objectives.mdlm import MaskedDiffusion
from unmask.objectives.schedules import LogLinear
from unmask.train.loop import train

from released_folders import random_folder
from toys import TINY


def pairs_file(tmp_path, rows=40):
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"prompt": f"q{i % 7}?", "text": "ab" * (1 + i % 3)}) + "\n")
    return path


def sft_overrides(tmp_path, path, *extra):
    return [*TINY, "data.dataset=text", f"data.path={path}", "data.prompt_field=prompt", "data.layout=pad",
            "data.tokenizer=char", "data.alphabet=abq0123456789?", "data.length=12", "data.valid_fraction=0.1",
            "data.test_fraction=0.1", f"run_dir={tmp_path / 'run'}", *extra]


def test_pairs_become_rows_with_clean_prompt_positions(tmp_path):
    cfg = load_config(None, sft_overrides(tmp_path, pairs_file(tmp_path)))
    data = Data(cfg.data)
    ids, kinds = data.rows("train").get(np.arange(3))
    tok = data.tokenizer
    # row 0: "q0?" then "ab"
    assert kinds[0].tolist() == [BOS, PROMPT, PROMPT, PROMPT, TOKEN, TOKEN, EOS] + [PAD] * 5
    assert tok.decode(ids[0][kinds[0] == PROMPT]) == "q0?" and tok.decode(ids[0][kinds[0] == TOKEN]) == "ab"
    counted = counted_positions(kinds, cfg.data)
    assert not counted[kinds == PROMPT].any() and counted[kinds == TOKEN].all() and counted[kinds == EOS].all()
    padded = Data(load_config(None, sft_overrides(tmp_path, pairs_file(tmp_path), "data.pad_with_eos=true")).data)
    ids2, kinds2 = padded.rows("train").get(np.arange(1))
    assert kinds2[0].tolist() == [BOS, PROMPT, PROMPT, PROMPT, TOKEN, TOKEN] + [EOS] * 6
    assert (ids2[0][6:] == tok.eos_id).all()


def test_the_sft_loss_never_noises_or_scores_prompt_positions(tmp_path):
    cfg = load_config(None, sft_overrides(tmp_path, pairs_file(tmp_path)))
    data = Data(cfg.data)
    ids, kinds = data.rows("train").get(np.arange(8))
    x0 = torch.from_numpy(ids)
    counted = torch.from_numpy(counted_positions(kinds, cfg.data))
    prompt = torch.from_numpy(kinds == PROMPT)
    diffusion = MaskedDiffusion(LogLinear(0.0), data.tokenizer.mask_id)
    for seed in range(20):
        noise = draw_noise(8, 12, torch.Generator().manual_seed(seed))
        t, _ = diffusion.times_and_weights(noise.time_u, exact=False)
        xt = diffusion.mask(x0, t, noise.mask_u, counted)
        assert torch.equal(xt[prompt], x0[prompt])

    class Probe(torch.nn.Module):
        """Logits that depend on the position; ``garbage`` changes them only at prompt positions."""

        def __init__(self, garbage: bool):
            super().__init__()
            self.garbage = garbage

        def forward(self, ids, sigma=None, positions=None):
            g = torch.Generator().manual_seed(0)
            logits = torch.randn(*ids.shape, data.tokenizer.vocab_size, generator=g)
            if self.garbage:
                logits[prompt] = 100 * torch.randn(int(prompt.sum()), data.tokenizer.vocab_size, generator=g)
            flat = logits.reshape(-1, logits.shape[-1])
            return flat[positions] if positions.dtype != torch.bool else logits[positions]

    noise = draw_noise(8, 12, torch.Generator().manual_seed(3))
    a = diffusion.loss(Probe(False), x0, counted, noise)
    b = diffusion.loss(Probe(True), x0, counted, noise)
    assert torch.equal(a, b) and (a > 0).any()


def test_pairs_from_csv_and_the_errors(tmp_path):
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("prompt,text\n" + "q1?,ab\nq2?,abab\n" * 10)
    data = Data(load_config(None, sft_overrides(tmp_path, csv_path)).data)
    _, kinds = data.rows("train").get(np.arange(1))
    assert (kinds[0] == PROMPT).sum() == 3
    txt = tmp_path / "pairs.txt"
    txt.write_text("ab\n")
    with pytest.raises(DataError, match="prompt/response pairs"):
        Data(load_config(None, sft_overrides(tmp_path, txt)).data).rows("train")
    with pytest.raises(ConfigError, match="layout=pad"):
        load_config(None, sft_overrides(tmp_path, csv_path, "data.layout=wrap"))


def test_random_lengths_cut_selected_rows_to_uniform_lengths():
    ids = np.arange(2000 * 10).reshape(2000, 10)
    kinds = np.zeros_like(ids, dtype=np.int8)
    selected = np.arange(2000) % 2 == 0
    u = np.random.default_rng(0).random(2000)
    out_ids, out_kinds = random_lengths(ids, kinds, selected, u, pad_id=-1)
    assert np.array_equal(out_ids[~selected], ids[~selected]) and (out_kinds[~selected] == TOKEN).all()
    lengths = (out_kinds[selected] == TOKEN).sum(1)
    assert lengths.min() == 1 and lengths.max() == 10
    assert np.bincount(lengths, minlength=11)[1:].min() > 60  # every length 1..10 occurs (100 expected)
    assert ((out_ids == -1) == (out_kinds == PAD)).all()


def test_sft_training_runs_with_random_lengths(tmp_path):
    cfg = load_config(None, sft_overrides(tmp_path, pairs_file(tmp_path), "train.steps=3",
                                          "train.random_length_prob=0.5"))
    train(cfg)
    with pytest.raises(ConfigError, match="random_length_prob"):
        load_config(None, sft_overrides(tmp_path, pairs_file(tmp_path), "train.random_length_prob=2"))


def test_chat_sft_renders_conversations_with_the_models_template_and_counts_eos_padding(tmp_path):
    folder = random_folder(tmp_path / "llada", "llada")
    chats = tmp_path / "chats.jsonl"
    conversations = [[{"role": "user", "content": f"w{1 + i % 5} w{2 + i % 3}"},
                      {"role": "assistant", "content": f"w{10 + i % 4} w{20 + i % 6}"}] for i in range(12)]
    chats.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    overrides = ["family=mdlm", "data.dataset=text", f"data.path={chats}", f"data.valid_path={chats}",
                 "data.messages_field=messages", "data.layout=pad", "data.pad_with_eos=true", "data.length=24",
                 "model.length=24", f"train.init_from={folder}", "train.steps=2", "train.batch_size=4",
                 "train.progress=false", "train.threads=1", f"run_dir={tmp_path}/run", f"data.cache_dir={tmp_path}/c"]
    cfg = load_config(None, overrides)
    tokenizer = open_source(folder).tokenizer
    rows = Data(cfg.data, tokenizer).rows("train")
    ids, kinds = rows.get(np.arange(len(conversations)))
    prompt, response = chat_pair(tokenizer.chat_template, conversations[0], "<|start|>", "<|eot|>")
    assert prompt == "user\nw1 w2<|eot|><|start|>assistant\n" and response == "w10 w20<|eot|>"
    # [BOS] prompt (never counted) response, then EOS to the end of the row, counted (LLaDA's convention)
    p, r = len(tokenizer.encode(prompt)), len(tokenizer.encode(response))
    assert ids[0, 0] == tokenizer.bos_id and (kinds[0, 1:1 + p] == PROMPT).all()
    assert ids[0, 1 + p:1 + p + r].tolist() == tokenizer.encode(response).tolist()
    assert (ids[0, 1 + p + r:] == tokenizer.eos_id).all() and (kinds[0, 1 + p + r:] == EOS).all()
    counted = counted_positions(kinds, cfg.data)
    assert counted[0, 1 + p:].all() and not counted[0, 1:1 + p].any()
    assert train(cfg).name == "step_00000002"
    # a conversation that does not end with the assistant's turn is a one-line error naming it
    chats.write_text(json.dumps({"messages": conversations[0][:1]}) + "\n")
    with pytest.raises(DataError, match="conversation 1"):
        Data(load_config(None, [*overrides, f"data.cache_dir={tmp_path}/c2"]).data, tokenizer).rows("train")
