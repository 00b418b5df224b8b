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
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..config import QUANTIZE_SCHEMES, ConfigError


class QuantizeError(ConfigError):
    """A quantization that cannot be applied here (its reason in one line)."""


def quantize_weights(model: nn.Module, scheme: str) -> nn.Module:
    """``model`` with its ``nn.Linear`` weights quantized in place by ``scheme`` (``none`` or ``int8``)."""
    if scheme == "none":
        return model
    if scheme == "int4":
        raise QuantizeError("quantize=int4: torchao packs int4 weights only for CUDA and ARM CPUs; on this machine "
                            "it would keep one int4 value per byte (int8's memory): use int8")
    if scheme not in QUANTIZE_SCHEMES:
        raise QuantizeError(f"quantize={scheme!r}: choose one of {', '.join(QUANTIZE_SCHEMES)}")
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
    if any(p.requires_grad and p.grad is not None for p in model.parameters()):
        raise QuantizeError("quantize: weight-only quantization is for inference; this model carries gradients")
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    quantize_(model, Int8WeightOnlyConfig(),
              filter_fn=lambda module, _: type(module) is nn.Linear and id(module.weight) not in tied)
    return model


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
