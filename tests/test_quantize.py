"""Weight-only int8 inference (``--quantize int8``): the scheme's arithmetic, the reference models' logits
within a stated tolerance of the reference's fp32 logits, memory and batch invariance (the commands:
``test_cli.py::test_quantize_on_the_command_line``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from unmask.models.quantize import quantize_weights, weight_bytes
from unmask.pipeline import from_pretrained

from released_folders import assert_matches, random_folder, reference_folder, vectors

pytestmark = pytest.mark.usefixtures("one_thread")

BF16_FACTOR = 2.0  # int8 logits' RMS error at most this many times the error of the weights rounded to bf16


def test_a_linear_layer_computes_with_its_weights_rounded_per_output_row():
    """``W ~ s q`` with ``s_o = max_i |W_oi| / 127.5`` and ``q`` int8 within half a step of ``W / s`` (ties may
    go either way); the layer's output is ``x (s q)^T + b``, and its weights take a quarter of their bytes."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    quantize_weights(layer, "int8")
    q, scale = layer.weight.qdata, layer.weight.scale
    assert q.dtype == torch.int8 and scale.shape == (48, 1)
    torch.testing.assert_close(scale, w.abs().amax(1, keepdim=True) / 127.5, rtol=1e-6, atol=0)
    assert float((w / scale - q.float()).abs().max()) <= 0.5 + 1e-4
    x = torch.randn(5, 64)
    with torch.no_grad():
        out = layer(x)
        torch.testing.assert_close(out, x @ (q.float() * scale).T + b, rtol=1e-5, atol=1e-5)
        assert float((out - (x @ w.T + b)).abs().max()) > 1e-4  # the rounding shows: it is not fp32 any more
    assert weight_bytes(layer) <= 64 * 48 + 48 * (4 + 1) + 48 * 4  # int8 data, per-row scale and zero point, bias


@pytest.mark.parametrize("name", ["llada_forward", "dream_forward"])
def test_quantized_reference_models_stay_close_to_the_reference_logits(tmp_path, name):
    """The released LLaDA/Dream reference models (their layouts, tied or not) with int8 weights: the logits'
    RMS error against fp32 (which reproduces the reference's logits) is within :data:`BF16_FACTOR` times the
    error of the same weights rounded to bf16 (measured: 0.68x on LLaDA's, 1.6x on Dream's tiny models);
    every linear weight that is not tied to an embedding is int8."""
    t, _ = vectors(name)
    ref = reference_folder(tmp_path, name)
    fp32, int8, bf16 = (from_pretrained(ref.folder, quantize=q) for q in ("none", "int8", "none"))
    ids = t["input_ids"]
    with torch.no_grad():
        for p in bf16.model.parameters():
            p.copy_(p.bfloat16().float())
        exact = fp32.model(ids)
        assert_matches(exact, t, name, "logits_shifted" if "logits_shifted" in t else "logits")  # Dream's shift
        rms = [float((m.model(ids) - exact).pow(2).mean().sqrt()) for m in (int8, bf16)]
    assert 0 < rms[0] < BF16_FACTOR * rms[1], rms
    embeddings = {id(m.weight) for m in int8.model.modules() if isinstance(m, nn.Embedding)}
    linears = [m for m in int8.model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.weight.dtype == torch.float32 if id(m.weight) in embeddings else
                           type(m.weight).__name__ == "Int8Tensor" for m in linears)
    assert weight_bytes(int8.model) < weight_bytes(fp32.model)


def test_quantized_sampling_is_batch_invariant(tmp_path):
    """A row's tokens do not depend on the rows decoded beside it, with int8 weights as with fp32."""
    lm = from_pretrained(random_folder(tmp_path / "llada", "llada"), quantize="int8")
    knobs = dict(num_samples=4, seed=3, steps=8, length=16)
    batched = lm.generate(["w1 w2 w3", "w4"], batch_size=8, **knobs)
    alone = lm.generate(["w1 w2 w3", "w4"], batch_size=1, **knobs)
    assert batched.ids == alone.ids
