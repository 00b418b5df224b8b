"""The DiT backbone of MDLM (``models/dit.py``), with switches instead of copies.

One module serves every family:

* ``causal=False``: bidirectional attention, the masked-diffusion denoiser;
  ``causal=True``: the autoregressive baseline of the same size.
* ``time_conditioning``: when off (MDLM's default) the adaLN conditioning sees ``sigma = 0``.
* input as token ids or as input embeddings (``inputs_embeds``);
* ``soft_mask_top_k > 0``: the model owns a :class:`~unmask.models.softmask.SoftMask` (``soft_mask.{a,b,c}``)
  and ``forward(ids, feedback=...)`` blends the embeddings of masked positions with the previous
  pass's top-k predictions. Without it the state dict has MDLM's keys exactly.

Module and parameter names follow MDLM's layout (``vocab_embed.embedding``, ``sigma_map.mlp.{0,2}``,
``rotary_emb.inv_freq``, ``blocks.{i}.{norm1,attn_qkv,attn_out,norm2,mlp.0,mlp.2,adaLN_modulation}``,
``output_layer.{norm_final,linear,adaLN_modulation}``) so released checkpoints load without renaming.

Shapes: ids (B, L) -> logits (B, L, V) over the whole vocabulary, mask included (the
parameterization, not the backbone, removes it).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from ..config import ModelConfig
from .common import (
    KVCache,
    Layout,
    Rotary,
    apply_rotary,
    attend,
    attention_mask,
    layer_attention,
    rotary_table,
    select_positions,
)
from .softmask import SoftFeedback, input_embeddings, soft_mask_for


class LayerNorm(nn.Module):
    """Non-affine layer norm in fp32 times a learnable ``weight`` (no bias), as in MDLM, followed by
    adaLN modulation ``y * (1 + scale) + shift``.

    ``shift``, ``scale``: (C, 1, H) with C = 1 (the same for every row, as without time conditioning) or
    B. With C = 1 the weight, scale and shift fold into layer norm's own affine parameters (one fused
    kernel: ``w * (1 + scale)`` and ``shift``); per-row modulation multiplies and adds after it."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x, shift: torch.Tensor, scale: torch.Tensor):
        """Layer norm of ``x`` (B, L, H) in float32, modulated: ``norm(x) * (1 + scale) + shift``; (B, L, H) float32."""
        with torch.autocast(x.device.type, enabled=False):
            if shift.shape[0] == 1:
                return F.layer_norm(x.float(), [self.dim], self.weight * (1 + scale.reshape(-1).float()),
                                    shift.reshape(-1).float())
            y = F.layer_norm(x.float(), [self.dim], self.weight)
            return torch.addcmul(shift.float(), y, 1 + scale.float())


def gated_linear(linear: nn.Linear, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``gate * linear(x)`` with gate (C, 1, H_out). While a gradient is taken with C = 1 the gate scales
    the weight's rows (and the bias) instead of the (N, H_out) output, so the backward pass reduces
    H_out x H_in products for the gate's gradient instead of N x H_out. Without gradient the output is
    scaled: one pass, and the same arithmetic for a row whatever the batch (samplers are batch-invariant).
    A layer that is not a plain ``nn.Linear`` (one with adapters) is called as it is."""
    if gate.shape[0] != 1 or not torch.is_grad_enabled() or type(linear) is not nn.Linear:
        return gate * linear(x)
    g = gate.reshape(-1)
    bias = None if linear.bias is None else linear.bias * g
    return F.linear(x, linear.weight * g[:, None], bias)


def biased_linear(x: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """``x W^T + b`` for (N, H) rows as one matrix product ``[x, 1] [W, b]^T``, when a gradient is taken of
    a plain ``nn.Linear`` with a bias: ``addmm`` would first copy the bias into every row of the (N, V)
    result and its backward sum the (N, V) gradient for the bias; here the bias gradient is the product's
    last column (the output layer's bias cost a training step 4 % at a 50,257-word vocabulary). Otherwise
    (no gradient, adapters, quantized or sharded weights) the layer is called as it is."""
    if (linear.bias is None or not torch.is_grad_enabled() or type(linear) is not nn.Linear
            or type(linear.weight) is not nn.Parameter or x.dim() != 2):
        return linear(x)
    ones = x.new_ones(x.shape[0], 1)
    return F.linear(torch.cat([x, ones], dim=1), torch.cat([linear.weight, linear.bias[:, None]], dim=1))


class TimestepEmbedder(nn.Module):
    """``sigma_map``: 256-dim sinusoidal embedding of sigma, then Linear -> SiLU -> Linear."""

    def __init__(self, cond_dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma):
        """The conditioning vectors (B, cond_dim) of noise levels ``sigma`` (B,)."""
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
        args = sigma.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class EmbeddingLayer(nn.Module):
    """``vocab_embed.embedding``: a raw (V, H) parameter with Kaiming-uniform init."""

    def __init__(self, hidden: int, vocab_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, hidden))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, ids):
        """Embeddings (B, L, H) of token ids (B, L)."""
        return self.embedding[ids]


class DDiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation (shift/scale/gate for attn and MLP)."""

    def __init__(self, hidden: int, heads: int, cond_dim: int, dropout: float, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = LayerNorm(hidden)
        self.attn_qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.attn_out = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_ratio * hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * hidden, hidden))
        self.dropout = nn.Dropout(dropout)
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * hidden)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x, rotary, cond, causal: bool, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None, modulation: torch.Tensor | None = None, read: int | None = None):
        """``cond`` (C, cond_dim): the conditioning this block's ``adaLN_modulation`` turns into its rows
        (C, 6H), unless they come precomputed as ``modulation`` (computed here, the block's weights are
        used inside its own forward: what FSDP, which gathers them per block, needs). ``read``: outputs
        (B, read, H) of the first ``read`` tokens only (all tokens' keys and values)."""
        b, length, hidden = x.shape
        if modulation is None:
            modulation = self.adaLN_modulation(cond)
        (shift_msa, scale_msa, gate_msa,
         shift_mlp, scale_mlp, gate_mlp) = modulation[:, None].chunk(6, dim=2)
        qkv = self.attn_qkv(self.norm1(x, shift_msa, scale_msa)).view(b, length, 3, self.heads, hidden // self.heads)
        qk, v = qkv.split([2, 1], dim=2)  # split, not indexing: its backward is one concatenation, no zero fill
        cos, sin = rotary  # (L, d): q and k rotated together, into contiguous (2, B, heads, L, d) for SDPA
        q, k = apply_rotary(qk.permute(2, 0, 3, 1, 4), cos, sin).unbind(0)  # each (B, heads, L, d)
        v = v.squeeze(2).transpose(1, 2)
        if read is not None:
            x, q, length = x[:, :read], q[:, :, :read], read
        attn = attend(q, k, v, causal, mask, cache, layer).transpose(1, 2).reshape(b, length, hidden)
        x = x + self.dropout(gated_linear(self.attn_out, attn, gate_msa))
        h = self.mlp[1](self.mlp[0](self.norm2(x, shift_mlp, scale_mlp)))
        return x + self.dropout(gated_linear(self.mlp[2], h, gate_mlp))


class DDiTFinalLayer(nn.Module):
    """adaLN-modulated norm, then a zero-initialised Linear(H -> V) with bias."""

    def __init__(self, hidden: int, vocab_size: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden)
        self.linear = nn.Linear(hidden, vocab_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x, modulation, positions=None):
        """x (B, L, H), modulation (C, 2H) from ``adaLN_modulation`` (C = 1 or B) -> logits."""
        shift, scale = modulation[:, None].chunk(2, dim=2)
        return biased_linear(select_positions(self.norm_final(x, shift, scale), positions), self.linear)


class DiT(nn.Module):
    """MDLM's DiT. ``forward(ids, sigma)`` -> logits (B, L, V).

    ``positions`` restricts the output layer to selected positions and returns (N, V) logits: a
    bool mask (B, L), or flat indices into the B*L positions (see :func:`bucketed_positions`). The
    masked-diffusion loss only needs masked positions, and the output layer is the largest matmul for
    big vocabularies.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, causal: bool = False, mask_id: int | None = None):
        super().__init__()
        self.cfg, self.vocab_size, self.causal, self.mask_id = cfg, vocab_size, causal, mask_id
        self.vocab_embed = EmbeddingLayer(cfg.hidden, vocab_size)
        self.soft_mask = soft_mask_for(cfg.soft_mask_top_k, causal, mask_id, vocab_size)
        self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.rotary_emb = Rotary(cfg.hidden // cfg.heads, cfg.rope_base, cfg.length)
        self.blocks = nn.ModuleList(DDiTBlock(cfg.hidden, cfg.heads, cfg.cond_dim, cfg.dropout)
                                    for _ in range(cfg.blocks))
        self.output_layer = DDiTFinalLayer(cfg.hidden, vocab_size, cfg.cond_dim)
        self._constant_modulations: tuple[tuple, tuple] | None = None

    @property
    def time_conditioning(self) -> bool:
        """Whether the network reads the noise level ``sigma`` (``model.time_conditioning``)."""
        return self.cfg.time_conditioning

    def forward(self, ids: torch.Tensor | None = None, sigma: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, feedback: SoftFeedback | None = None,
                keep: torch.Tensor | None = None, layout: Layout | None = None):
        """``cache``: the new tokens continue the cached ones (a causal model's :class:`KVCache`, or a
        bidirectional model's Fast-dLLM :class:`~unmask.models.common.BlockCache` or block diffusion's
        :class:`~unmask.models.common.BlockDiffusionCache`); the logits of the new positions are returned.
        ``feedback`` (soft-mask models, with ``ids``): the previous pass, see :mod:`unmask.models.softmask`.
        ``keep`` (B, L) bool (bidirectional models): attend only to these positions (variable-length rows,
        padding invisible). ``layout``: the tokens' positions and attention pattern (block diffusion's
        two-stream input, :func:`~unmask.models.common.two_stream_layout`)."""
        x, final = self.features(ids, sigma, inputs_embeds, cache, feedback, keep, layout)
        return self.output_layer(x, final, positions)

    def features(self, ids: torch.Tensor | None = None, sigma: torch.Tensor | None = None,
                 inputs_embeds: torch.Tensor | None = None, cache: KVCache | None = None,
                 feedback: SoftFeedback | None = None, keep: torch.Tensor | None = None,
                 layout: Layout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block's hidden states (B, L, H) and the output layer's modulation (C, 2H) (see
        :meth:`modulations`)."""
        if (keep is not None or layout is not None) and (self.causal or cache is not None):
            raise ValueError("a key padding mask (keep) or a layout is for bidirectional models without a cache")
        if cache is not None and cache.bidirectional == self.causal:
            raise ValueError(f"a {type(cache).__name__} is for {'bidirectional' if cache.bidirectional else 'causal'}"
                             f" models")
        x = input_embeddings(self.vocab_embed.embedding, self.soft_mask, self.mask_id, ids, inputs_embeds, feedback)
        b, length = x.shape[:2]
        start = cache.length if cache is not None else 0
        end = start + length if layout is None else layout.span
        if end > self.cfg.length:
            raise ValueError(f"sequence length {end} exceeds the model's maximum {self.cfg.length}")
        cond, rows, final = self.modulations(sigma, x.device)
        rotary = rotary_table(self.rotary_emb, start, length, layout, x.device)
        mask = attention_mask(keep, layout)
        for i, block in enumerate(self.blocks):
            block_mask, read = layer_attention(mask, layout, i, len(self.blocks))
            x = block(x, rotary, cond, self.causal, cache, i, block_mask, None if rows is None else rows[i], read)
        if cache is not None:
            cache.advance(length)
        return x, final

    def modulations(self, sigma: torch.Tensor | None,
                    device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor] | None, torch.Tensor]:
        """The conditioning ``c = silu(sigma_map(sigma))`` (C, cond_dim), the blocks' adaLN rows (C, 6H)
        when cached (else None: each block makes its own from ``c``) and the output layer's (C, 2H):
        C = B with time conditioning, else C = 1 (``sigma = 0`` for every row, broadcast). The constant
        rows are kept between calls while no gradient is taken and the weights that make them are
        unchanged (same storage, same version, same autocast), so a sampler's hundreds of calls compute
        them once; not for weights sharded by FSDP, which exist whole only inside each block's forward."""
        constant = sigma is None or not self.cfg.time_conditioning
        key = None
        sharded = any(isinstance(p, DTensor) for b in self.blocks for p in b.adaLN_modulation.parameters())
        if constant and not torch.is_grad_enabled() and not sharded:
            autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
            makers = [self.sigma_map, *(b.adaLN_modulation for b in self.blocks), self.output_layer.adaLN_modulation]
            key = (device, autocast, tuple((p.data_ptr(), p._version) for m in makers
                                           for p in [*m.parameters(), *m.buffers()]))
            if self._constant_modulations is not None and self._constant_modulations[0] == key:
                return self._constant_modulations[1]
        c = F.silu(self.sigma_map(torch.zeros(1, device=device) if constant else sigma))
        final = self.output_layer.adaLN_modulation(c)
        if key is None:
            return c, None, final
        result = (c, [block.adaLN_modulation(c) for block in self.blocks], final)
        self._constant_modulations = (key, result)
        return result

    INPUT_EMBEDDING = "vocab_embed.embedding"  # the state-dict name of the input embedding
    BLOCK_CACHES = True  # takes a BlockCache (Fast-dLLM's prefix and dual caches) when bidirectional
    KEY_PADDING = True  # takes a key padding mask (keep) when bidirectional: ragged canvases share a forward

    @property
    def packs(self) -> bool:
        """Whether canvases of any lengths may share one row of a forward (a
        :func:`~unmask.models.common.packed_layout`): without
        time conditioning, where every row sees the same conditioning."""
        return not self.cfg.time_conditioning and not self.causal

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The input embedding and the output layer (what "non-embedding parameters" leave out)."""
        return [self.vocab_embed.embedding, *self.output_layer.linear.parameters()]

    def new_cache(self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  capacity: int | None = None, kind: type = KVCache):
        """An empty cache of ``kind`` (:class:`KVCache` or :class:`BlockDiffusionCache`) for this model."""
        cfg = self.cfg
        return kind(cfg.blocks, batch, cfg.heads, cfg.hidden // cfg.heads, capacity or cfg.length, device, dtype)
