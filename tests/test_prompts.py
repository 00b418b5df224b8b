"""Prompts and templates: ``[MASK*n]`` markers are checked (a count that is not a whole number >= 1 is
an error about the marker), a template longer than its budget is refused before its masks are built,
and a template's canvas is the template itself, for masked diffusion models only."""

import time

import pytest

from unmask.config import SampleConfig
from unmask.data.tokenization import CharTokenizer
from unmask.objectives.ar import Autoregressive
from unmask.objectives.mdlm import MaskedDiffusion
from unmask.objectives.schedules import LogLinear
from unmask.pipeline import encode_template, generate_rows
from unmask.samplers.base import SamplingError

from toys import tiny_dit

TOK = CharTokenizer("abcdefgh *-[]0123456789")


@pytest.mark.parametrize("marker", ["[MASK*-3]", "[MASK*0]", "[MASK*]", "[MASK*x]", "[MASK*1.5]", "[MASK*٣]"])
def test_a_bad_mask_count_is_an_error_about_the_marker(marker):
    with pytest.raises(SamplingError, match=r"\[MASK\*n\] marker needs a whole number n >= 1"):
        encode_template(TOK, f"ab {marker} cd")


def test_mask_counts_and_plain_brackets():
    m = TOK.mask_id
    assert encode_template(TOK, "a[MASK]b[MASK*3]") == [0, m, 1, m, m, m]
    assert encode_template(TOK, "a[MASK*002]") == [0, m, m]
    assert encode_template(TOK, "[a]") == TOK.encode("[a]").tolist()  # brackets that are no marker are text


@pytest.mark.parametrize("template", ["a [MASK*100000000] b", "[MASK*99999999999999999999999999]",
                                      "a [MASK*20] b [MASK*20]", "abcdefgh" * 5 + "[MASK]"])
def test_a_template_over_its_budget_is_refused_before_its_masks_are_built(template):
    start = time.perf_counter()
    with pytest.raises(SamplingError, match="maximum of 32|too large"):
        encode_template(TOK, template, max_length=32)
    assert time.perf_counter() - start < 0.5
    assert encode_template(TOK, "a[MASK*30]b", max_length=32).count(TOK.mask_id) == 30


def test_a_template_canvas_is_the_template_and_nothing_more():
    model = tiny_dit(vocab=TOK.vocab_size, seed=3)
    diffusion = MaskedDiffusion(LogLinear(0.0), TOK.mask_id)
    for bos in (False, True):
        gen = generate_rows(model, diffusion, TOK, SampleConfig(sampler="ancestral", steps=4, num_samples=2), 40, 64,
                       template="ab[MASK*3]cd", bos=bos)
        assert all(len(ids) == 7 + int(bos) for ids in gen.ids)
        assert all(text.startswith("ab") and text.endswith("cd") and len(text) == 7 for text in gen.texts)
        assert gen.generated == 2 * 3


def test_an_autoregressive_model_refuses_a_template():
    model = tiny_dit(vocab=TOK.vocab_size, causal=True)
    objective = Autoregressive(TOK.bos_id, TOK.mask_id)
    with pytest.raises(SamplingError, match="template .* needs a model that infills; a ar model"):
        generate_rows(model, objective, TOK, SampleConfig(sampler="ar"), 16, 64, template="ab[MASK*3]cd")
