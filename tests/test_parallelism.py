"""Measures of parallel decoding: tokens per forward (answer tokens over a row's network calls) and d3LLM's
accuracy under parallelism (AUP) on curves whose value follows by hand."""

from __future__ import annotations

import math

import pytest
import torch

from unmask.config import SampleConfig
from unmask.data.tokenization import CharTokenizer
from unmask.eval.aup import aup, aup_points, aup_weight
from unmask.objectives.mdlm import MaskedDiffusion
from unmask.objectives.schedules import LogLinear
from unmask.pipeline import answer_tokens, generate_rows

from toys import random_dit


def test_a_single_point_is_its_rectangle_and_equal_accuracy_its_area():
    assert aup([2.5], [40.0], y_max=40.0) == 100.0
    # at the best accuracy every weight is 1: the area under the flat curve, 1 x 50 + (3 - 1) x 50
    assert aup([1.0, 3.0], [50.0, 50.0], y_max=50.0) == 150.0


def test_the_weight_halves_a_point_at_ln2_over_alpha_below_the_best():
    y_max = 60.0
    y = y_max * (1 - math.log(2) / 3)  # W(y) = exp(-3 (1 - y / y_max)) = 1/2
    assert aup_weight(y, y_max) == pytest.approx(0.5, abs=1e-15)
    assert aup_weight(70.0, y_max) == 1.0  # capped at 1 above the best
    # the first point's rectangle is not weighted: 1 x y, then the trapezoid (4 - 1) (y x 1/2 + 60 x 1) / 2
    assert aup([1.0, 4.0], [y, 60.0], y_max) == pytest.approx(y + 1.5 * (y / 2 + 60), rel=1e-15)


def test_points_more_than_five_below_the_least_parallel_leave_the_curve_in_rho_order():
    rho, y = [8.0, 2.0, 1.0, 4.0], [76.0, 70.0, 80.0, 78.0]  # unsorted; 70 < 80 - 5 is dropped
    assert aup_points(rho, y) == [(1.0, 80.0), (4.0, 78.0), (8.0, 76.0)]
    without = aup([1.0, 4.0, 8.0], [80.0, 78.0, 76.0], 82.0)
    assert aup(rho, y, 82.0) == without
    assert aup([1.0, 2.0], [80.0, 75.0], 80.0) > aup([1.0], [80.0], 80.0)  # exactly 5 below stays


@pytest.mark.parametrize("rho,y,y_max", [([], [], 50.0), ([1.0], [50.0, 60.0], 60.0), ([0.0], [50.0], 50.0),
                                          ([1.0], [0.5 * 200], 101.0), ([1.0], [120.0], 100.0)])
def test_bad_curves_are_refused(rho, y, y_max):
    with pytest.raises(ValueError):
        aup(rho, y, y_max)


def test_tokens_per_forward_counts_each_answer_up_to_its_first_special_token():
    tok = CharTokenizer("abcd")
    a, b, c = (tok.encode(ch)[0] for ch in "abc")
    row = torch.tensor([tok.bos_id, a, b, c, a, tok.eos_id, b, tok.pad_id])
    free = torch.tensor([False, False, False, True, True, True, True, True])
    assert answer_tokens(row, free, tok.special_token_ids()) == 2  # c a, then EOS: what follows is not the answer
    assert answer_tokens(row, free & (row != tok.eos_id), tok.special_token_ids()) == 3  # c a b, then PAD

    model = random_dit(length=12, vocab=tok.vocab_size)
    model.mask_id = tok.mask_id
    objective = MaskedDiffusion(LogLinear(), tok.mask_id)
    gen = generate_rows(model, objective, tok, SampleConfig(sampler="confidence", steps=4, num_samples=3, seed=1),
                        12, 12, prompts=["ab"], bos=True)
    assert gen.row_nfe == [4, 4, 4]
    for ids, tokens, tpf in zip(gen.ids, gen.row_answer_tokens, gen.tokens_per_forward):
        answer = ids[3:]
        ends = [i for i, t in enumerate(answer) if t in tok.special_token_ids()]
        assert tokens == (ends[0] if ends else len(answer)) and tpf == tokens / 4
    assert gen.summary()["tokens_per_forward"] == pytest.approx(sum(gen.row_answer_tokens) / 12)
