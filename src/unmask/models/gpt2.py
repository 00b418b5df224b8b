"""GPT-2's transformer (``model.backbone=gpt2``): the source architecture of GPT-2 A2D conversions.

Learned absolute positions added to the token embedding, pre-norm blocks of LayerNorm (with bias),
attention with biased fused q/k/v and output projections, and a GELU (tanh) MLP with biases; a final
LayerNorm and an output layer tied to the embedding. Per block::

    x = x + c_proj(attention(c_attn(ln_1(x))))
    x = x + mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))

Parameter names are Hugging Face's ``GPT2LMHeadModel`` names (``transformer.wte``, ``transformer.wpe``,
``transformer.h.{i}.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj}``, ``transformer.ln_f``,
``lm_head``), with the weights of ``nn.Linear`` (``(out, in)``; ``transformers`` stores its ``Conv1D``
weights transposed, and the loader transposes them). ``causal`` switches the attention pattern as for
the other backbones; ``model.logit_shift`` scores position ``i`` by the output at ``i - 1``.

Shapes: ids (B, L) -> logits (B, L, V), or (N, V) at ``positions``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .common import (
    KVCache,
    Layout,
    attend,
    attention_mask,
    layer_attention,
    normal_init,
    select_positions,
    shift_by_one,
)
from .softmask import SoftFeedback, input_embeddings, soft_mask_for


class Attention(nn.Module):
    """GPT-2's multi-head attention: fused biased q/k/v projection ``c_attn``, output projection ``c_proj``."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.c_proj = nn.Linear(hidden, hidden)

    def forward(self, x, causal: bool, mask: torch.Tensor | None, cache: KVCache | None, layer: int,
                read: int | None = None):
        """Outputs (B, L, H), or (B, read, H) of the first ``read`` tokens (every token's keys and values)."""
        b, length, hidden = x.shape
        q, k, v = self.c_attn(x).view(b, length, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        if read is not None:
            q, length = q[:, :, :read], read
        out = attend(q, k, v, causal, mask, cache, layer)
        return self.c_proj(out.transpose(1, 2).reshape(b, length, hidden))


class MLP(nn.Module):
    """GPT-2's MLP: ``c_proj(gelu(c_fc(x)))`` (GELU, tanh approximation)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.c_fc = nn.Linear(hidden, intermediate)
        self.c_proj = nn.Linear(intermediate, hidden)

    def forward(self, x):
        """(B, L, H) -> (B, L, H)."""
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """A pre-norm GPT-2 block: attention and MLP, each after its LayerNorm and added to the residual."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = Attention(cfg.hidden, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.hidden, cfg.intermediate or 4 * cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, causal, mask=None, cache=None, layer=0, read=None):
        """Hidden states (B, L, H) -> (B, L, H), or (B, read, H) of the first ``read`` tokens; ``mask``, ``cache``
        and ``layer`` as for :meth:`Attention.forward`."""
        attn = self.attn(self.ln_1(x), causal, mask, cache, layer, read)
        x = (x if read is None else x[:, :read]) + self.dropout(attn)
        return x + self.dropout(self.mlp(self.ln_2(x)))


class Body(nn.Module):
    """``transformer.*``: token and position embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, cfg.hidden)
        self.wpe = nn.Embedding(cfg.length, cfg.hidden)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.blocks))
        self.ln_f = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)


class GPT2(nn.Module):
    """GPT-2 with the interface of :class:`~unmask.models.dit.DiT` (``sigma`` ignored: no time conditioning);
    the output layer is always tied to the embedding, as GPT-2's."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, causal: bool = False, mask_id: int | None = None):
        super().__init__()
        if cfg.hidden % cfg.heads:
            raise ValueError(f"model.hidden={cfg.hidden} must split into model.heads={cfg.heads} heads")
        if causal and cfg.logit_shift:
            raise ValueError("model.logit_shift is for bidirectional models (a causal model predicts the next token)")
        self.cfg, self.causal, self.mask_id = cfg, causal, mask_id
        self.vocab_size = max(vocab_size, cfg.vocab)
        self.transformer = Body(cfg, self.vocab_size)
        self.lm_head = nn.Linear(cfg.hidden, self.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.soft_mask = soft_mask_for(cfg.soft_mask_top_k, causal, mask_id, self.vocab_size)
        self.apply(normal_init)

    @property
    def time_conditioning(self) -> bool:
        """False: GPT-2 ignores ``sigma``."""
        return False

    def forward(self, ids: torch.Tensor | None = None, sigma: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, feedback: SoftFeedback | None = None,
                keep: torch.Tensor | None = None, layout: Layout | None = None) -> torch.Tensor:
        """Logits (B, L, V), or (N, V) at ``positions``; ``cache``, ``keep``, ``feedback`` and ``layout`` as for
        the other backbones."""
        if cache is not None and cache.bidirectional == self.causal:
            raise ValueError(f"a {type(cache).__name__} is for {'bidirectional' if cache.bidirectional else 'causal'}"
                             f" models")
        x = input_embeddings(self.transformer.wte.weight, self.soft_mask, self.mask_id, ids, inputs_embeds, feedback)
        if layout is not None and (self.causal or cache is not None):
            raise ValueError("a layout is for bidirectional models without a cache")
        start = cache.length if cache is not None else 0
        length = x.shape[1]
        end = start + length if layout is None else layout.span
        if end > self.cfg.length:
            raise ValueError(f"sequence length {end} exceeds the model's maximum {self.cfg.length}")
        wpe = self.transformer.wpe.weight
        x = x + (wpe[start:end] if layout is None else wpe[layout.positions])
        mask = attention_mask(keep, layout)
        for i, block in enumerate(self.transformer.h):
            block_mask, read = layer_attention(mask, layout, i, len(self.transformer.h))
            x = block(x, self.causal, block_mask, cache, i, read)
        if cache is not None:
            cache.advance(length)
        h = self.transformer.ln_f(x)
        if self.cfg.logit_shift:
            h = shift_by_one(h)
        return self.lm_head(select_positions(h, positions))

    INPUT_EMBEDDING = "transformer.wte.weight"  # the state-dict name of the input embedding
    BLOCK_CACHES = True  # takes a BlockCache (Fast-dLLM's prefix and dual caches) when bidirectional

    @property
    def packs(self) -> bool:
        """Whether canvases of any lengths may share one row of a forward (a
        :func:`~unmask.models.common.packed_layout`): a
        bidirectional model whose logits are not shifted (a shift would cross from one canvas into the next)."""
        return not self.causal and not self.cfg.logit_shift

    def materialize(self, device: torch.device | str) -> None:
        """After the weights were assigned to a model made on the meta device: tie the output layer again."""
        self.lm_head.weight = self.transformer.wte.weight

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The token and position embeddings (the output layer is tied to the first)."""
        return [self.transformer.wte.weight, self.transformer.wpe.weight]

    def new_cache(self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  capacity: int | None = None, kind: type = KVCache):
        """An empty cache of ``kind`` (:class:`KVCache` or :class:`BlockDiffusionCache`) for this model."""
        cfg = self.cfg
        return kind(cfg.blocks, batch, cfg.heads, cfg.hidden // cfg.heads, capacity or cfg.length, device, dtype)
