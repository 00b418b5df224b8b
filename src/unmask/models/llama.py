"""A Llama/Qwen2/Qwen3-style transformer: the backbone of LLaDA, Dream, SMDM and SDAR (``model.backbone=llama``).

Pre-norm blocks of RMSNorm (statistics in float32), grouped-query attention with rotary positions
(rotate-half, base ``model.rope_base``) and a SwiGLU MLP; no time conditioning. Per block::

    x = x + o_proj(attention(rotary(q_proj(n)), rotary(k_proj(n)), v_proj(n)))    n = RMSNorm(x)
    x = x + down_proj(silu(gate_proj(m)) * up_proj(m))                            m = RMSNorm(x)

then ``logits = lm_head(RMSNorm(x))``. Query head ``j`` uses key/value head ``floor(j / (heads /
kv_heads))``; heads are ``model.head_dim`` wide (default ``hidden / heads``), and ``model.qk_norm`` puts an
RMSNorm on each head's queries and keys before the rotary positions (Qwen3, SDAR: ``q_norm``, ``k_norm``).
``model.rotary_dim`` turns only each head's leading features (LLaDA2's partial rotary); ``model.moe_*``
replaces the MLP of the layers from ``model.moe_dense_layers`` on by a :class:`MoE` (LLaDA2, Ling 2.0).
``model.qkv_bias`` adds biases to q/k/v (Qwen2); ``model.tie_embeddings`` shares the
embedding with the output layer; ``causal`` switches the attention pattern (bidirectional for
masked diffusion). ``model.logit_shift`` (Dream, adapted from an autoregressive model): position
``i`` is scored by the output at ``i - 1`` (position 0 by its own), so every sampler and loss sees
logits aligned with the tokens they score, as for any other model.

Parameter names are those of Hugging Face's Llama/Qwen2 (``model.embed_tokens``,
``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``model.layers.{i}.mlp.{gate,up,down}_proj``,
``model.layers.{i}.{input,post_attention}_layernorm``, ``model.norm``, ``lm_head``): a Qwen2 or Dream
checkpoint loads as it is, LLaDA's through a renaming (:mod:`unmask.checkpoints.open_weights`).

Shapes: ids (B, L) -> logits (B, L, V), or (N, V) at ``positions`` (see :func:`select_positions`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .common import (
    KVCache,
    Layout,
    Rotary,
    apply_rotary,
    attend,
    attention_mask,
    layer_attention,
    normal_init,
    rotary_table,
    select_positions,
    shift_by_one,
)
from .softmask import SoftFeedback, input_embeddings, soft_mask_for


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)`` over the last dimension, the statistics in float32 and the result
    cast back to the input's dtype before the weight (as Llama, Qwen2 and LLaDA)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., H), in the input's dtype."""
        with torch.autocast(x.device.type, enabled=False):
            y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention with rotary positions: ``heads`` query heads of ``head_dim`` share ``kv_heads``
    key/value heads; ``q_proj``/``k_proj``/``v_proj`` biased when ``bias`` (Qwen2); with ``qk_norm`` each
    head's queries and keys pass an RMSNorm over ``head_dim`` (``q_norm``, ``k_norm``) before the rotary
    positions (Qwen3, SDAR)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, bias: bool, qk_norm: bool = False,
                 eps: float = 1e-6, rotary_dim: int = 0):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.rotary_dim = rotary_dim or head_dim  # the leading features the rotary positions turn
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None

    def forward(self, x, rotary, causal: bool, mask: torch.Tensor | None, cache: KVCache | None, layer: int,
                read: int | None = None):
        """Outputs (B, L, H), or (B, read, H) of the first ``read`` tokens (every token's keys and values)."""
        b, length, _ = x.shape
        cos, sin = rotary
        reads = length if read is None else read
        q = self.q_proj(x[:, :reads]).view(b, reads, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rotate(q, cos[:reads], sin[:reads]), self._rotate(k, cos, sin)
        out = attend(q, k, v, causal, mask, cache, layer)
        return self.o_proj(out.transpose(1, 2).reshape(b, reads, -1))


    def _rotate(self, x, cos, sin):
        """Rotary positions on the first ``rotary_dim`` features of each head (rotate-half within them, LLaDA2's
        partial rotary); the others pass unchanged."""
        r = self.rotary_dim
        if r == x.shape[-1]:
            return apply_rotary(x, cos, sin)
        return torch.cat([apply_rotary(x[..., :r], cos, sin), x[..., r:]], dim=-1)


class MLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        """(B, L, H) -> (B, L, H)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Routing(NamedTuple):
    """A router's decision for N tokens: its ``logits`` (N, E) float32, the ``index`` (N, k) of each token's
    experts and their ``weight`` (N, k) float32."""

    logits: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor


class Router(nn.Module):
    """LLaDA2's (Ling 2.0's) router: scores ``s = sigmoid(h W^T)`` in float32; the selection adds the learned
    ``expert_bias`` (a buffer, for selection only), keeps the ``top_groups`` best of ``groups`` groups of
    consecutive experts (a group scores the sum of its two best biased scores) and takes the ``top_k`` best
    biased scores among them; the weights are the chosen experts' unbiased ``s``, normalised to sum 1 (when
    ``top_k > 1``) and multiplied by ``scale`` (DeepSeek-V3's auxiliary-loss-free routing, Liu et al. 2024)."""

    def __init__(self, hidden: int, experts: int, top_k: int, groups: int, top_groups: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden))
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("expert_bias", torch.zeros(experts))
        self.top_k, self.groups, self.top_groups, self.scale = top_k, groups, top_groups, scale

    def forward(self, h: torch.Tensor) -> Routing:
        """Tokens (N, H) -> their :class:`Routing`."""
        with torch.autocast(h.device.type, enabled=False):
            logits = h.float() @ self.weight.float().t()
        scores = logits.sigmoid()
        biased = scores + self.expert_bias.float()
        n, experts = biased.shape
        if self.top_groups < self.groups:
            per_group = biased.view(n, self.groups, experts // self.groups)
            group_score = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(-1)
            kept = torch.zeros_like(group_score, dtype=torch.bool).scatter_(
                1, group_score.topk(self.top_groups, dim=-1).indices, True)
            biased = biased.masked_fill(~kept.repeat_interleave(experts // self.groups, dim=1), float("-inf"))
        index = biased.topk(self.top_k, dim=-1).indices
        weight = scores.gather(1, index)
        if self.top_k > 1:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(logits, index, weight * self.scale)


class MoE(nn.Module):
    """A mixture of SwiGLU experts: each token passes the ``top_k`` routed experts its :class:`Router` picks,
    weighted, plus the shared experts (one MLP ``shared`` experts wide). The experts run batched: the
    (token, expert) pairs are grouped by expert, each expert evaluates its tokens in one call, and the
    weighted outputs are summed in float32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg.hidden, cfg.moe_experts, cfg.moe_top_k, cfg.moe_groups, cfg.moe_top_groups,
                           cfg.moe_scale)
        self.experts = nn.ModuleList(MLP(cfg.hidden, cfg.moe_width) for _ in range(cfg.moe_experts))
        self.shared_experts = MLP(cfg.hidden, cfg.moe_width * cfg.moe_shared) if cfg.moe_shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (B, L, H)."""
        flat = x.reshape(-1, x.shape[-1])
        routing = self.gate(flat)
        k = routing.index.shape[1]
        expert = routing.index.flatten()
        order = expert.argsort(stable=True)
        token = torch.arange(len(flat), device=x.device).repeat_interleave(k)[order]
        weight = routing.weight.flatten()[order]
        counts = torch.bincount(expert, minlength=len(self.experts)).tolist()
        out = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
        start = 0
        for e, count in enumerate(counts):
            if count:
                rows = token[start:start + count]
                out.index_add_(0, rows, self.experts[e](flat[rows]).float() * weight[start:start + count, None])
                start += count
        out = out.to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view_as(x)


class Block(nn.Module):
    """A pre-norm Llama block: attention and SwiGLU MLP (or a :class:`MoE`), each after its RMSNorm and added to
    the residual."""

    def __init__(self, cfg: ModelConfig, intermediate: int, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.self_attn = Attention(cfg.hidden, cfg.heads, cfg.kv_heads or cfg.heads, cfg.head_size, cfg.qkv_bias,
                                   cfg.qk_norm, cfg.norm_eps, cfg.rotary_dim)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.moe_experts and layer >= cfg.moe_dense_layers else MLP(cfg.hidden, intermediate)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rotary, causal, mask=None, cache=None, layer=0, read=None):
        """Hidden states (B, L, H) -> (B, L, H), or (B, read, H) of the first ``read`` tokens; ``rotary`` is the
        (cos, sin) table, the rest as for :meth:`Attention.forward`."""
        attn = self.self_attn(self.input_layernorm(x), rotary, causal, mask, cache, layer, read)
        x = (x if read is None else x[:, :read]) + self.dropout(attn)
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Body(nn.Module):
    """``model.*``: embedding, blocks, final norm."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, intermediate: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(Block(cfg, intermediate, i) for i in range(cfg.blocks))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)


class Transformer(nn.Module):
    """The Llama/Qwen2-style backbone; the same interface as :class:`~unmask.models.dit.DiT`
    (``forward(ids, sigma, positions=, cache=, keep=)``), ``sigma`` ignored (no time conditioning)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, causal: bool = False, mask_id: int | None = None):
        super().__init__()
        if (cfg.hidden % cfg.heads and not cfg.head_dim) or cfg.head_size % 2:
            raise ValueError(f"model.hidden={cfg.hidden} must split into model.heads={cfg.heads} heads of even size "
                             f"(or model.head_dim must be even)")
        kv_heads = cfg.kv_heads or cfg.heads
        if cfg.heads % kv_heads:
            raise ValueError(f"model.heads={cfg.heads} must be a multiple of model.kv_heads={kv_heads}")
        if causal and cfg.logit_shift:
            raise ValueError("model.logit_shift is for bidirectional models (a causal model predicts the next token)")
        self.cfg, self.causal, self.mask_id = cfg, causal, mask_id
        self.vocab_size = max(vocab_size, cfg.vocab)
        self.model = Body(cfg, self.vocab_size, cfg.intermediate or swiglu_width(cfg.hidden))
        self.soft_mask = soft_mask_for(cfg.soft_mask_top_k, causal, mask_id, self.vocab_size)
        self.lm_head = nn.Linear(cfg.hidden, self.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary_emb = Rotary(cfg.rotary_dim or cfg.head_size, cfg.rope_base, cfg.length, persistent=False)
        self.apply(normal_init)

    @property
    def time_conditioning(self) -> bool:
        """False: the backbone ignores ``sigma``."""
        return False

    def forward(self, ids: torch.Tensor | None = None, sigma: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, feedback: SoftFeedback | None = None,
                keep: torch.Tensor | None = None, layout: Layout | None = None) -> torch.Tensor:
        """Logits (B, L, V), or (N, V) at ``positions``. ``cache``: the new tokens continue the cached ones
        (as for the DiT). ``keep`` (B, L) bool: attend only to these positions (padding). ``layout``: the
        tokens' positions and attention pattern (block diffusion's two-stream input).
        ``feedback`` (soft-mask models): the previous pass, blended into the masked positions' inputs
        (with ``logit_shift`` the feedback comes from the shifted logits, as Dream's soft-masking)."""
        if cache is not None and cache.bidirectional == self.causal:
            raise ValueError(f"a {type(cache).__name__} is for {'bidirectional' if cache.bidirectional else 'causal'}"
                             f" models")
        x = input_embeddings(self.model.embed_tokens.weight, self.soft_mask, self.mask_id, ids, inputs_embeds,
                             feedback)
        if layout is not None and (self.causal or cache is not None):
            raise ValueError("a layout is for bidirectional models without a cache")
        start = cache.length if cache is not None else 0
        length = x.shape[1]
        end = start + length if layout is None else layout.span
        if end > self.cfg.length:
            raise ValueError(f"sequence length {end} exceeds the model's maximum {self.cfg.length}")
        rotary = rotary_table(self.rotary_emb, start, length, layout, x.device)
        mask = attention_mask(keep, layout)
        for i, layer in enumerate(self.model.layers):
            layer_mask, read = layer_attention(mask, layout, i, len(self.model.layers))
            x = layer(x, rotary, self.causal, layer_mask, cache, i, read)
        if cache is not None:
            cache.advance(length)
        h = self.model.norm(x)
        if self.cfg.logit_shift:  # the output at i - 1 scores position i; position 0 keeps its own
            h = shift_by_one(h)
        return self.lm_head(select_positions(h, positions))

    INPUT_EMBEDDING = "model.embed_tokens.weight"  # the state-dict name of the input embedding
    BLOCK_CACHES = True  # takes a BlockCache (Fast-dLLM's prefix and dual caches) when bidirectional

    @property
    def packs(self) -> bool:
        """Whether canvases of any lengths may share one row of a forward (a
        :func:`~unmask.models.common.packed_layout`): a
        bidirectional model whose logits are not shifted (a shift would cross from one canvas into the next)."""
        return not self.causal and not self.cfg.logit_shift
    KEY_PADDING = True  # takes a key padding mask (keep) when bidirectional: ragged canvases share a forward

    def materialize(self, device: torch.device | str) -> None:
        """After the weights were assigned to a model made on the meta device: tie the output layer again
        (when tied) and compute the rotary table's frequencies on ``device``."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary_emb.reset(device)

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The input embedding and the output layer (one parameter when tied)."""
        return [self.model.embed_tokens.weight, self.lm_head.weight]

    def new_cache(self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  capacity: int | None = None, kind: type = KVCache):
        """An empty cache of ``kind`` (:class:`KVCache` or :class:`BlockDiffusionCache`) for this model."""
        cfg = self.cfg
        return kind(cfg.blocks, batch, cfg.kv_heads or cfg.heads, cfg.head_size, capacity or cfg.length,
                       device, dtype)


def swiglu_width(hidden: int, multiple: int = 256) -> int:
    """Llama's SwiGLU width for ``model.intermediate = 0``: 8/3 of ``hidden`` (the parameters of a 4x GELU
    MLP), rounded up to a multiple of ``multiple``."""
    return multiple * -(-(8 * hidden // 3) // multiple)
