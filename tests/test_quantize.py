"""int8 inference (``--quantize int8``, weight-only, and ``int8-dynamic``): each scheme's arithmetic, the reference models' logits
within a stated tolerance of the reference's fp32 logits, memory and batch invariance (the commands:
``test_cli.py::test_quantize_on_the_command_line``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from unmask.models.quantize import DynamicInt8Linear, QuantizeError, quantize_weights, weight_bytes
from unmask.pipeline import from_pretrained

from released_folders import assert_matches, random_folder, reference_folder, vectors

pytestmark = pytest.mark.usefixtures("one_thread")

# the logits' RMS error at most this many times the error of the weights rounded to bf16 (measured on LLaDA's and
# Dream's tiny reference models: int8 0.68x and 1.6x, int8-dynamic 1.2x and 2.1x)
BF16_FACTOR = {"int8": 2.0, "int8-dynamic": 3.0}


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


def test_a_dynamic_int8_layer_multiplies_integers_and_rescales_per_row_and_column():
    """``int8-dynamic``: ``q_w`` int8 within half a step of ``W / s_w`` (``s_w = max|W_o| / 127`` per output
    row), each input row quantized the same way, ``y = (q_x q_w^T) s_x s_w + b`` (the integer product exact),
    for 3-D inputs, odd widths and empty batches."""
    torch.manual_seed(0)
    layer = nn.Linear(66, 37)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    quantize_weights(layer := nn.Sequential(layer), "int8-dynamic")
    q_layer = layer[0]
    assert isinstance(q_layer, DynamicInt8Linear) and not list(q_layer.parameters())
    q, s_w = q_layer.weight_int8.T, q_layer.weight_scale
    torch.testing.assert_close(s_w, w.abs().amax(1) / 127, rtol=1e-6, atol=0)
    assert q.dtype == torch.int8 and float((w / s_w[:, None] - q.float()).abs().max()) <= 0.5 + 1e-4
    x = torch.randn(2, 5, 66)
    with torch.no_grad():
        out = layer(x)
    rows = x.reshape(-1, 66).double()
    s_x = rows.abs().amax(1, keepdim=True) / 127
    q_x = torch.round(rows / s_x.float().double()).clamp(-127, 127)
    expected = (q_x @ q.double().T) * s_x * s_w.double() + b.double()
    torch.testing.assert_close(out.reshape(-1, 37).double(), expected, rtol=1e-5, atol=1e-6)
    assert float((out - (x @ w.T + b)).abs().max()) > 1e-4  # the rounding shows
    assert layer(torch.zeros(0, 66)).shape == (0, 37)
    assert weight_bytes(layer) <= 66 * 37 + 37 * 4 * 2
    with pytest.raises(QuantizeError, match="runs on CPU"):
        quantize_weights(nn.Linear(4, 4).to("meta"), "int8-dynamic")


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic"])
@pytest.mark.parametrize("name", ["llada_forward", "dream_forward"])
def test_quantized_reference_models_stay_close_to_the_reference_logits(tmp_path, name, scheme):
    """The released LLaDA/Dream reference models (their layouts, tied or not) quantized: the logits' RMS error
    against fp32 (which reproduces the reference's logits) is within :data:`BF16_FACTOR` times the error of the
    same weights rounded to bf16; every linear layer whose weight is not tied to an embedding is int8."""
    t, _ = vectors(name)
    ref = reference_folder(tmp_path, name)
    fp32, int8, bf16 = (from_pretrained(ref.folder, quantize=q) for q in ("none", scheme, "none"))
    ids = t["input_ids"]
    with torch.no_grad():
        for p in bf16.model.parameters():
            p.copy_(p.bfloat16().float())
        exact = fp32.model(ids)
        assert_matches(exact, t, name, "logits_shifted" if "logits_shifted" in t else "logits")  # Dream's shift
        rms = [float((m.model(ids) - exact).pow(2).mean().sqrt()) for m in (int8, bf16)]
    assert 0 < rms[0] < BF16_FACTOR[scheme] * rms[1], rms
    embeddings = {id(m.weight) for m in int8.model.modules() if isinstance(m, nn.Embedding)}
    linears = [m for m in int8.model.modules() if isinstance(m, nn.Linear)]
    if scheme == "int8":
        assert linears and all(m.weight.dtype == torch.float32 if id(m.weight) in embeddings else
                               type(m.weight).__name__ == "Int8Tensor" for m in linears)
    else:
        assert all(id(m.weight) in embeddings for m in linears)
        assert any(isinstance(m, DynamicInt8Linear) for m in int8.model.modules())
    assert weight_bytes(int8.model) < weight_bytes(fp32.model)


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic"])
def test_quantized_sampling_is_batch_invariant(tmp_path, scheme):
    """A row's tokens do not depend on the rows decoded beside it, quantized as with fp32."""
    lm = from_pretrained(random_folder(tmp_path / "llada", "llada"), quantize=scheme)
    knobs = dict(num_samples=4, seed=3, steps=8, length=16)
    batched = lm.generate(["w1 w2 w3", "w4"], batch_size=8, **knobs)
    alone = lm.generate(["w1 w2 w3", "w4"], batch_size=1, **knobs)
    assert batched.ids == alone.ids
