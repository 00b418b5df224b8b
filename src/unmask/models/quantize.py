"""Weight-only quantization for inference, through torchao (``pip install 'unmask[quantize]'``).

``int8``: every ``nn.Linear`` weight (W of shape (out, in)) becomes int8 with one fp32 scale per output row,
``W ~ s * q`` with ``s_o = max_i |W_oi| / 127.5`` and ``q = round(W / s)`` in int8 (symmetric, per
row; torchao's ``Int8WeightOnlyConfig``); activations
stay in the network's precision, and each product is ``(x @ q^T) * s``. Embedding tables, norms and biases
keep their precision. The weights take about a quarter of their fp32 bytes (plus 4 bytes per row).

torchao was chosen over ``torch.ao.quantization`` (deprecated in favour of torchao) and over
hand-written int8 kernels: it dispatches to torch's own int8 matmul on the CPU and is maintained by the
PyTorch team. int4 is refused on this build: torchao 0.18 packs int4 weights only for CUDA (the ``mslk``
kernels) and for ARM CPUs (KleidiAI); on an x86 CPU it would store each int4 value in an int8 byte, the
memory of int8 at a lower precision.

``int8-dynamic``: the same int8 weights (symmetric per output row, ``s_o = max_i |W_oi| / 127``), and each
input row quantized to int8 when the layer runs (``s_x = max_i |x_i| / 127``); the product
``q_x q_w^T`` is exact in int32 (torch's ``_int_mm``, VNNI/AMX kernels on x86), then rescaled:
``y = (q_x q_w^T) s_x s_o + b``. A row's output depends on that row alone (batch-invariant). This
scheme is CPU-only and hand-written (a small module, :class:`DynamicInt8Linear`): torchao's
``Int8DynamicActivationInt8WeightConfig`` computes the same arithmetic but its CPU path is written for
inductor, and in eager decoding it ran 3x slower than fp32 on this project's Xeon, while ``_int_mm`` ran
the products 2-3x faster than fp32 (``benchmarks/quantize.py``); ``torch.ao.quantization.quantize_dynamic``
is deprecated. On CUDA use ``int8`` (torchao's kernels).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..config import QUANTIZE_SCHEMES, ConfigError


class QuantizeError(ConfigError):
    """A quantization that cannot be applied here (its reason in one line)."""


def quantize_weights(model: nn.Module, scheme: str) -> nn.Module:
    """``model`` with its ``nn.Linear`` layers quantized in place by ``scheme`` (``none``, ``int8`` or
    ``int8-dynamic``); layers whose weight is tied to an embedding keep it."""
    if scheme == "none":
        return model
    if scheme == "int4":
        raise QuantizeError("quantize=int4: torchao packs int4 weights only for CUDA and ARM CPUs; on this machine "
                            "it would keep one int4 value per byte (int8's memory): use int8")
    if scheme not in QUANTIZE_SCHEMES:
        raise QuantizeError(f"quantize={scheme!r}: choose one of {', '.join(QUANTIZE_SCHEMES)}")
    if any(p.requires_grad and p.grad is not None for p in model.parameters()):
        raise QuantizeError("quantize: int8 quantization is for inference; this model carries gradients")
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if scheme == "int8-dynamic":
        devices = {p.device.type for p in model.parameters()}
        if devices != {"cpu"}:
            raise QuantizeError(f"quantize=int8-dynamic runs on CPU (torch's int8 matmul); this model is on "
                                f"{', '.join(sorted(devices))}: use int8")
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if type(child) is nn.Linear and id(child.weight) not in tied:
                    setattr(parent, name, DynamicInt8Linear(child))
        return model
    # torchao's import logs that its CUDA-only extensions do not load on a CPU, and torch that one of its
    # enums is registered the old way: nothing a user can act on
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:
            logger.setLevel(logging.CRITICAL)
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise QuantizeError(f"quantize={scheme} needs torchao: pip install 'unmask[quantize]' ({exc})") from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    quantize_(model, Int8WeightOnlyConfig(),
              filter_fn=lambda module, _: type(module) is nn.Linear and id(module.weight) not in tied)
    return model


class DynamicInt8Linear(nn.Module):
    """An ``nn.Linear`` (out, in) with int8 weights, computing in int8 with its input quantized per row at run
    time (the module docstring's ``int8-dynamic``). Inference only: it holds buffers, no parameters."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).t()
                             .contiguous())  # (in, out): the layout ``_int_mm`` reads
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., in) -> (..., out) in ``x``'s dtype: each row quantized to int8 by its absolute maximum,
        multiplied in int8 and rescaled."""
        rows = x.reshape(-1, self.in_features).float()
        if not len(rows):
            return x.new_zeros(*x.shape[:-1], self.out_features)
        row_scale = rows.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
        q = torch.round(rows / row_scale).clamp_(-127, 127).to(torch.int8)
        y = torch._int_mm(q, self.weight_int8).float().mul_(row_scale).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        """The layer's sizes and kind, for ``repr``."""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights and inputs"


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers hold (shared ones once; a quantized weight by its int8 data,
    scales and zero points)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
        if hasattr(data, "__tensor_flatten__") and type(data) is not torch.Tensor:
            names, _ = data.__tensor_flatten__()
            total += sum(getattr(data, name).nbytes for name in names)
        else:
            total += data.nbytes
    return total
