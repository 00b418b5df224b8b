"""Teacher trajectories as data: recorded through the decoding engine, each row what the teacher's sampler gives it
alone, each state along the trajectory the teacher's own canvas at that step; resumable after a kill, keyed by
everything that changes a row."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unmask.config import SampleConfig
from unmask.data.tokenization import CharTokenizer
from unmask.objectives.mdlm import MaskedDiffusion
from unmask.objectives.schedules import LogLinear
from unmask.samplers.base import SamplingError, row_seeds
from unmask.samplers.registry import make_sampler
from unmask.train.trajectories import Trajectories, TrajectoryError, record_trajectories

from toys import random_dit

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = CharTokenizer("0123456789+-=,")
LENGTH = 16
PROMPTS = ["12+3=", "7-2=", "45+45=", "3=", "100-1=", "9+9+9="]


def teacher(**settings):
    model = random_dit(length=LENGTH, vocab=TOK.vocab_size, seed=2)
    sample = SampleConfig(sampler="confidence", steps=5, temperature=0.7, **settings)
    return model, make_sampler(sample, MaskedDiffusion(LogLinear(), TOK.mask_id), TOK, LENGTH), sample


def record(tmp_path, batch_size=4, **settings):
    model, sampler, sample = teacher(**settings)
    return record_trajectories(model, sampler, TOK, sample, PROMPTS, LENGTH, "teacher-digest", tmp_path,
                               seed=3, batch_size=batch_size)


def test_each_row_is_the_teachers_decoding_and_each_state_its_canvas_at_that_step(tmp_path):
    got = record(tmp_path)
    model, sampler, _ = teacher()
    seeds = row_seeds(3, len(PROMPTS))
    assert len(got) == len(PROMPTS) and got.tokens.shape == (len(PROMPTS), LENGTH)
    for i, prompt in enumerate(PROMPTS):
        canvas = torch.full((1, LENGTH), TOK.mask_id)
        canvas[0, 0] = TOK.bos_id
        canvas[0, 1:1 + len(prompt)] = torch.as_tensor(TOK.encode(prompt))
        frames = []
        alone = sampler.sample(model, canvas, seeds[i:i + 1], lambda x: frames.append(x.clone()))
        assert np.array_equal(got.tokens[i], alone.tokens[0].numpy())  # batch-invariant: alone = in the batch
        assert got.row_nfe[i] == alone.row_nfe[0] and got.prompt_lengths[i] == 1 + len(prompt)
        steps = torch.from_numpy(np.array(got.reveal_step[i])).long()
        assert (steps[:1 + len(prompt)] == -1).all() and (steps[1 + len(prompt):] >= 0).all()
        final = torch.from_numpy(np.array(got.tokens[i])).long()
        assert len(frames) == 5
        for s, frame in enumerate(frames):  # x_s: the final tokens revealed by step s, masks elsewhere
            state = torch.where(steps <= s, final, torch.full_like(final, TOK.mask_id))
            state[:1 + len(prompt)] = final[:1 + len(prompt)]
            assert torch.equal(frame[0], state)
    assert len(np.unique(got.reveal_step[got.reveal_step >= 0])) == 5  # five steps, each revealing some


def test_rows_without_bos_are_unconditional_canvases_of_masks_alone(tmp_path):
    """A teacher whose rows do not begin with BOS decodes empty prompts from a canvas of masks only: every
    position is generated, each row is its decoding alone, and the recording is another folder than with BOS."""
    model, sampler, sample = teacher()
    got = record_trajectories(model, sampler, TOK, sample, ["", "", "7-"], LENGTH, "teacher-digest", tmp_path,
                              seed=3, batch_size=2, bos=False)
    seeds = row_seeds(3, 3)
    for i, prompt in enumerate(["", "", "7-"]):
        canvas = torch.full((1, LENGTH), TOK.mask_id)
        canvas[0, :len(prompt)] = torch.as_tensor(TOK.encode(prompt), dtype=torch.long)
        alone = sampler.sample(model, canvas, seeds[i:i + 1])
        assert np.array_equal(got.tokens[i], alone.tokens[0].numpy())
        assert got.prompt_lengths[i] == len(prompt)
        assert (got.reveal_step[i, :len(prompt)] == -1).all() and (got.reveal_step[i, len(prompt):] >= 0).all()
    assert not np.array_equal(got.tokens[0], got.tokens[1])  # each row its own seed
    with_bos = record_trajectories(model, sampler, TOK, sample, ["", "", "7-"], LENGTH, "teacher-digest", tmp_path,
                                   seed=3)
    assert with_bos.directory != got.directory and (with_bos.prompt_lengths == [1, 1, 3]).all()
    record_trajectories(model, sampler, TOK, sample, ["1" * (LENGTH - 1)], LENGTH, "t", tmp_path, bos=False)

def test_a_killed_recording_continues_to_the_same_arrays_and_settings_key_the_folder(tmp_path):
    model, sampler, sample = teacher()

    def killed(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record_trajectories(model, sampler, TOK, sample, PROMPTS, LENGTH, "teacher-digest", tmp_path / "a", seed=3,
                            batch_size=4, on_batch=killed)
    (folder,) = (tmp_path / "a").iterdir()
    assert json.loads((folder / "progress.json").read_text()) == {"done": 4}
    with pytest.raises(TrajectoryError, match="4 of 6"):
        Trajectories.open(folder)
    resumed = record(tmp_path / "a")
    whole = record(tmp_path / "b", batch_size=6)
    assert resumed.directory.name == whole.directory.name  # the batch size does not key the folder
    for name in ("tokens", "reveal_step", "row_nfe", "prompt_lengths"):
        assert np.array_equal(getattr(resumed, name), getattr(whole, name)), name
    assert record(tmp_path / "a", score="margin").directory != resumed.directory
    assert len(list((tmp_path / "a").iterdir())) == 2


def test_bad_recordings_are_refused(tmp_path):
    model, sampler, sample = teacher()
    with pytest.raises(TrajectoryError, match="no prompts"):
        record_trajectories(model, sampler, TOK, sample, [], LENGTH, "t", tmp_path)
    with pytest.raises(SamplingError, match="leaves nothing"):
        record_trajectories(model, sampler, TOK, sample, ["1" * (LENGTH - 1)], LENGTH, "t", tmp_path)
    folder = record(tmp_path).directory
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(TrajectoryError, match="not a trajectory recording"):
        Trajectories.open(folder)
