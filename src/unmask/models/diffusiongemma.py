"""DiffusionGemma's encoder-decoder (``model.backbone=diffusiongemma``; transformers 5.25
``DiffusionGemmaForBlockDiffusion``): one stack of layers run twice, as a causal **encoder** over the clean
tokens (the prompt, then every finished canvas; it fills an :class:`EncoderCache`) and as a **decoder** over a
canvas of ``model.block_size`` noisy tokens, which attends to the cache and to the whole canvas without a mask.

Each layer is ``model.layer_types[i]``: ``sliding_attention`` (heads of ``model.head_dim``, ``model.kv_heads``,
rotary base ``model.rope_base``; the encoder sees the last ``model.sliding_window`` positions, the decoder the
last ``sliding_window - 1`` encoded ones) or ``full_attention`` (heads of ``model.global_head_dim``,
``model.global_kv_heads``, no value projection: the raw key projection is the value; "proportional" rotary of
base ``model.global_rope_base`` on the first ``model.global_rotary_fraction`` of the pairs, with frequencies
``base^(-2i/d)`` over the full head width). A layer, with Gemma's RMSNorm ``N`` (statistics and weight in
float32; "N0": without weight)::

    a = N(x);  q = rot(N(q_proj a)),  k = rot(N(k_proj a)),  v = N0(v_proj a)      (scale 1, softmax float32)
    x = x + N(o_proj attention(q, k, v));  r = x
    f1 = N(mlp(N(r)));  f2 = N(sum_e w_e expert_e(N(r)))   router: softmax(proj(N0(r) * scale / sqrt(D)))
    x = (r + N(f1 + f2)) * layer_scalar                      (the encoder has scalars of its own)

with GELU-tanh MLPs, top-``model.moe_top_k`` of ``model.moe_experts`` experts (weights renormalised, times
``per_expert_scale``). Embeddings are ``E[ids] * sqrt(D)``; the decoder's input is ``N0(e + sc(s))`` with the
self-conditioning signal ``s = softmax(previous logits) @ E * sqrt(D)`` through a GELU-tanh MLP (``sc(0)`` is
skipped: ``N0(e)``). Logits ``c tanh(N(x) E^T / c)``, ``c`` = ``model.softcap``, tied to the embedding.

There is no mask token: a canvas is noised by uniform draws (the ``udlm`` family). Parameter names are the
released decoder's (``model.decoder.*`` without the prefix); ``layers.{i}.encoder_layer_scalar`` is the
encoder's ``layer_scalar``. Shapes: canvases (B, C) -> logits (B, C, V) float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .common import normal_init

SLIDING, FULL = "sliding_attention", "full_attention"


def layer_kinds(cfg: ModelConfig) -> list[str]:
    """Each layer's attention kind (``model.layer_types``; empty: every layer full)."""
    return list(cfg.layer_types) or [FULL] * cfg.blocks


class Norm(nn.Module):
    """Gemma's RMSNorm ``x (mean(x^2) + eps)^-1/2 * w``, statistics and weight in float32, cast back last
    (``weight=False``: no weight)."""

    def __init__(self, dim: int, eps: float, weight: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


def rotary(positions: torch.Tensor, head_dim: int, base: float, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, 1, L, head_dim) float32 of ``positions`` (B, L): ``inv_freq[i] = base^(-2i/head_dim)`` for the
    first ``pairs`` pairs, 0 after (proportional rotary), rotate-half layout."""
    i = torch.arange(head_dim // 2, dtype=torch.float32, device=positions.device)
    inv = torch.where(i < pairs, base ** (-2 * i / head_dim), torch.zeros((), device=positions.device))
    angles = positions.float()[..., None] * inv
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on x (B, H, L, d): ``x cos + [-x2, x1] sin``."""
    half = x.shape[-1] // 2
    return x * cos.to(x.dtype) + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin.to(x.dtype)


class Attention(nn.Module):
    """One layer's attention (module docstring): q/k norms before rotary, values normed without weight,
    scale 1, grouped-query heads."""

    def __init__(self, cfg: ModelConfig, sliding: bool):
        super().__init__()
        self.sliding, self.heads = sliding, cfg.heads
        self.head_dim = cfg.head_size if sliding else cfg.global_head_dim or cfg.head_size
        self.kv_heads = (cfg.kv_heads or cfg.heads) if sliding else cfg.global_kv_heads or cfg.kv_heads or cfg.heads
        d = self.head_dim
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, self.kv_heads * d, bias=False) if sliding else None
        self.o_proj = nn.Linear(cfg.heads * d, cfg.hidden, bias=False)
        self.q_norm, self.k_norm = Norm(d, cfg.norm_eps), Norm(d, cfg.norm_eps)
        self.v_norm = Norm(d, cfg.norm_eps, weight=False)
        if sliding:
            self.base, self.pairs = cfg.rope_base, d // 2
        else:
            self.base, self.pairs = cfg.global_rope_base or cfg.rope_base, int(cfg.global_rotary_fraction * d // 2)

    def project(self, a: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries (B, H, L, d), keys and values (B, K, L, d) of the normed input ``a`` (B, L, D) at
        ``positions`` (B, L)."""
        b, length, _ = a.shape
        d = self.head_dim
        cos, sin = rotary(positions, d, self.base, self.pairs)
        q = rotate(self.q_norm(self.q_proj(a).view(b, length, self.heads, d)).transpose(1, 2), cos, sin)
        raw = self.k_proj(a).view(b, length, self.kv_heads, d)
        k = rotate(self.k_norm(raw).transpose(1, 2), cos, sin)
        v = raw if self.v_proj is None else self.v_proj(a).view(b, length, self.kv_heads, d)
        return q, k, self.v_norm(v).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``o_proj`` of softmax(q k^T) v, scale 1; ``mask`` bool broadcast to (B, H, Lq, Lk)."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=self.kv_heads != self.heads)
        b, _, length, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))


class Router(nn.Module):
    """``softmax(proj(N0(r) * scale / sqrt(D)))`` in float32, its top-k renormalised and times the chosen
    experts' ``per_expert_scale``: (index, weight), each (N, k)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.hidden, cfg.moe_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.moe_experts))
        self.norm = Norm(cfg.hidden, cfg.norm_eps, weight=False)
        self.top_k, self.hidden = cfg.moe_top_k, cfg.hidden

    def forward(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (N, D) -> expert ``index`` (N, k), ``weight`` (N, k) float32."""
        u = self.norm(r) * self.scale * self.hidden ** -0.5
        p = self.proj(u).float().softmax(-1)
        weight, index = p.topk(self.top_k, dim=-1)
        weight = weight / weight.sum(-1, keepdim=True) * self.per_expert_scale.float()[index]
        return index, weight


class Experts(nn.Module):
    """Stacked GELU-tanh experts, ``gate_up_proj`` (E, 2I, D) (gate rows first) and ``down_proj`` (E, D, I);
    the (token, expert) pairs grouped by expert, one product per expert, the weighted outputs summed in float32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(cfg.moe_experts, 2 * cfg.moe_width, cfg.hidden))
        self.down_proj = nn.Parameter(torch.empty(cfg.moe_experts, cfg.hidden, cfg.moe_width))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def __len__(self) -> int:
        """The number of experts."""
        return len(self.gate_up_proj)

    def forward(self, y: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """y (N, D), index/weight (N, k) -> (N, D) float32."""
        out = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
        k = index.shape[1]
        expert = index.flatten()
        order = expert.argsort(stable=True)
        token = torch.arange(len(y), device=y.device).repeat_interleave(k)[order]
        w = weight.flatten()[order]
        start = 0
        for e, count in enumerate(torch.bincount(expert, minlength=len(self.gate_up_proj)).tolist()):
            if count:
                rows = token[start:start + count]
                g, u = (y[rows] @ self.gate_up_proj[e].t()).chunk(2, dim=-1)
                y_e = (gelu_tanh(g) * u) @ self.down_proj[e].t()
                out.index_add_(0, rows, y_e.float() * w[start:start + count, None])
                start += count
        return out


class MLP(nn.Module):
    """``down(gelu_tanh(gate x) * up x)``."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D)."""
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "pre_feedforward_layernorm_2",
         "post_feedforward_layernorm", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2")


class Layer(nn.Module):
    """One layer (module docstring), shared by the encoder and the decoder (each with its ``layer_scalar``)."""

    def __init__(self, cfg: ModelConfig, sliding: bool):
        super().__init__()
        self.self_attn = Attention(cfg, sliding)
        self.mlp = MLP(cfg.hidden, cfg.intermediate)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        for name in NORMS:
            setattr(self, name, Norm(cfg.hidden, cfg.norm_eps))
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))
        self.routing: tuple[torch.Tensor, torch.Tensor] | None = None  # the last call's (index, weight)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, before: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor, encoder: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, L, D) at ``positions`` (B, L); the queries attend to ``before`` (cached keys, values) and then
        to the chunk's own, as ``mask`` (B, 1, L, Lk) says. Returns the new stream and the chunk's (k, v)."""
        q, k, v = self.self_attn.project(self.input_layernorm(x), positions)
        keys, values = (k, v) if before is None else (torch.cat([before[0], k], 2), torch.cat([before[1], v], 2))
        r = x + self.post_attention_layernorm(self.self_attn.attend(q, keys, values, mask))
        f1 = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(r)))
        flat = r.reshape(-1, r.shape[-1])
        index, weight = self.router(flat)
        self.routing = (index, weight)
        y = self.pre_feedforward_layernorm_2(r).reshape(-1, r.shape[-1])
        f2 = self.post_feedforward_layernorm_2(self.experts(y, index, weight).to(r.dtype).view_as(r))
        scalar = self.encoder_layer_scalar if encoder else self.layer_scalar
        return (r + self.post_feedforward_layernorm(f1 + f2)) * scalar.to(r.dtype), (k, v)


class SelfConditioning(nn.Module):
    """``down(gelu_tanh(gate n) * up n)``, ``n = N(s)``: the previous step's prediction as decoder input."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm = Norm(cfg.hidden, cfg.norm_eps)
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """(B, C, D) -> (B, C, D)."""
        n = self.pre_norm(s)
        return self.down_proj(gelu_tanh(self.gate_proj(n)) * self.up_proj(n))


class EncoderCache:
    """The encoded tokens of a batch, per layer: keys and values (B, K, n, d), and per row each position's
    rotary ``positions`` (B, n) and whether it is a token (``valid``, False for the padding of shorter prompts).
    ``length`` (B,): each row's encoded tokens, the position of its next canvas."""

    def __init__(self, blocks: int, batch: int, device: torch.device | str):
        self.keys: list[torch.Tensor | None] = [None] * blocks
        self.values: list[torch.Tensor | None] = [None] * blocks
        self.positions = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.length = torch.zeros(batch, dtype=torch.long, device=device)

    def before(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This layer's cached keys and values (None: nothing encoded yet)."""
        return None if self.keys[layer] is None else (self.keys[layer], self.values[layer])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add a chunk's keys and values (B, K, n, d) to ``layer``."""
        before = self.before(layer)
        self.keys[layer], self.values[layer] = (k, v) if before is None else \
            (torch.cat([before[0], k], 2), torch.cat([before[1], v], 2))


class DiffusionGemma(nn.Module):
    """The encoder-decoder (module docstring): :meth:`encode` clean tokens into an :class:`EncoderCache`,
    :meth:`decode` a canvas against it; ``forward`` scores every canvas of a training row given the clean
    tokens before it."""

    INPUT_EMBEDDING = "embed_tokens.weight"

    def __init__(self, cfg: ModelConfig, vocab_size: int, causal: bool = False, mask_id: int | None = None):
        super().__init__()
        kinds = layer_kinds(cfg)
        if causal:
            raise ValueError("model.backbone=diffusiongemma is an encoder-decoder for canvases (family udlm), not a "
                             "causal model")
        if len(kinds) != cfg.blocks or cfg.block_size < 1:  # (the config's rules say the rest)
            raise ValueError(f"model.layer_types must name {cfg.blocks} layers and model.block_size (the canvas) "
                             f"be >= 1")
        self.cfg, self.mask_id = cfg, mask_id
        self.vocab_size = max(vocab_size, cfg.vocab)
        self.embed_tokens = nn.Embedding(self.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(Layer(cfg, kind == SLIDING) for kind in kinds)
        self.norm = Norm(cfg.hidden, cfg.norm_eps)
        self.self_conditioning = SelfConditioning(cfg)
        self.input_norm = Norm(cfg.hidden, cfg.norm_eps, weight=False)
        self.apply(normal_init)

    time_conditioning = False
    soft_mask = None  # soft-masking blends mask embeddings: a model without a mask token has none

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``E[ids] * sqrt(D)`` (the scale rounded to the weight's dtype first, as the reference)."""
        weight = self.embed_tokens.weight
        scale = torch.tensor(math.sqrt(self.cfg.hidden), dtype=weight.dtype, device=weight.device)
        return self.embed_tokens(ids) * scale

    def encode(self, ids: torch.Tensor, cache: EncoderCache, valid: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Encode ``ids`` (B, n) after each row's encoded tokens (``valid`` (B, n): which are tokens; the rest is
        right padding, never attended to); appends to ``cache`` and advances its ``length`` by the valid count.
        Returns the hidden states (embeddings, each layer's output, the final norm)."""
        b, n = ids.shape
        valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
        positions = cache.length[:, None] + torch.arange(n, device=ids.device)
        key_pos = torch.cat([cache.positions, positions], 1)[:, None, None, :]
        key_ok = torch.cat([cache.valid, valid], 1)[:, None, None, :]
        q_pos = positions[:, None, :, None]
        own = torch.zeros(b, 1, n, key_pos.shape[-1], dtype=torch.bool, device=ids.device)
        own[..., -n:] = torch.eye(n, dtype=torch.bool, device=ids.device)
        causal = (key_ok & (key_pos <= q_pos)) | own  # a padding query sees itself: no empty softmax
        sliding = (causal & (key_pos > q_pos - self.cfg.sliding_window)) | own
        x = self.embed(ids)
        hidden = [x]
        for i, layer in enumerate(self.layers):
            mask = sliding if layer.self_attn.sliding else causal
            x, (k, v) = layer(x, positions, cache.before(i), mask, encoder=True)
            cache.append(i, k, v)
            hidden.append(x)
        hidden.append(self.norm(x))
        cache.positions = torch.cat([cache.positions, positions], 1)
        cache.valid = torch.cat([cache.valid, valid], 1)
        cache.length = cache.length + valid.sum(1)
        return hidden

    def new_encoder_cache(self, batch: int, device: torch.device | str) -> EncoderCache:
        """An empty :class:`EncoderCache` for ``batch`` rows."""
        return EncoderCache(len(self.layers), batch, device)

    def decode(self, canvas: torch.Tensor, cache: EncoderCache, self_conditioning: torch.Tensor | None = None,
               rows: torch.Tensor | None = None, hidden: list | None = None) -> torch.Tensor:
        """Logits (R, C, V) float32 of ``canvas`` (R, C) of the cache's batch rows ``rows`` (R,) (None: all) at
        each row's next positions, against ``cache``; ``self_conditioning``: the previous step's logits
        (R, C, V) (None: none). ``hidden``: a list that receives the decoder's input, each layer's output and
        the final norm."""
        pick = slice(None) if rows is None else rows
        start = cache.length[pick][:, None]
        size = canvas.shape[1]
        positions = start + torch.arange(size, device=canvas.device)
        key_pos, key_ok = cache.positions[pick][:, None, None, :], cache.valid[pick][:, None, None, :]
        own = torch.ones(len(canvas), 1, size, size, dtype=torch.bool, device=canvas.device)
        near = key_ok & (key_pos >= start[:, None, :, None] - (self.cfg.sliding_window - 1))
        full = torch.cat([key_ok.expand(-1, -1, size, -1), own], -1)
        sliding = torch.cat([near.expand(-1, -1, size, -1), own], -1)

        def before(i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
            kept = cache.before(i)
            return None if kept is None else (kept[0][pick], kept[1][pick])

        return self._decode(canvas, positions, before, full, sliding, self_conditioning, hidden)

    def _decode(self, canvas, positions, before, full, sliding, self_conditioning, hidden, conditioned=None):
        e = self.embed(canvas)
        if self_conditioning is not None:
            weight = self.embed_tokens.weight
            s = self_conditioning.float().softmax(-1) @ weight.float() * math.sqrt(self.cfg.hidden)
            if conditioned is not None:  # the other rows' signal is 0, which adds exactly nothing
                s = s * conditioned[:, None, None]
            e = e + self.self_conditioning(s.to(e.dtype))
        x = self.input_norm(e)
        if hidden is not None:
            hidden.append(x)
        for i, layer in enumerate(self.layers):
            x, _ = layer(x, positions, before(i), sliding if layer.self_attn.sliding else full, encoder=False)
            if hidden is not None:
                hidden.append(x)
        h = self.norm(x)
        if hidden is not None:
            hidden.append(h)
        z = (h @ self.embed_tokens.weight.t()).float()
        cap = self.cfg.softcap
        return cap * torch.tanh(z / cap) if cap else z

    def forward(self, ids: torch.Tensor, sigma: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                clean: torch.Tensor | None = None, self_conditioning: torch.Tensor | None = None,
                conditioned: torch.Tensor | None = None, cache: EncoderCache | None = None,
                rows: torch.Tensor | None = None, encode: bool = False, valid: torch.Tensor | None = None):
        """Every call of the network (so that hooks and counters see each pass):

        * ``cache`` and ``encode``: :meth:`encode` ``ids`` into the cache (``valid``: which are tokens); returns
          the hidden states;
        * ``cache``: :meth:`decode` the canvas ``ids`` of the cache's rows ``rows`` (with ``self_conditioning``);
        * else training: logits (B, L, V) float32 of the noisy row ``ids`` (B, L), each canvas of
          ``model.block_size`` given the clean tokens of ``clean`` (B, L) before it (their encoding; sliding
          layers: the last ``sliding_window - 1``), as :meth:`decode` sees it in generation; (N, V) at
          ``positions`` (flat indices). ``self_conditioning`` (B, L, V): the previous pass's logits, for the rows
          ``conditioned`` (B,) bool says (None: all). ``sigma`` is ignored."""
        if cache is not None:
            return self.encode(ids, cache, valid) if encode else self.decode(ids, cache, self_conditioning, rows)
        if clean is None or clean.shape != ids.shape:
            raise ValueError("the diffusiongemma backbone scores a noisy row given its clean tokens (clean=, same "
                             "shape)")
        b, length = ids.shape
        if length > self.cfg.length:
            raise ValueError(f"sequence length {length} exceeds the model's maximum {self.cfg.length}")
        cache = self.new_encoder_cache(b, ids.device)
        self.encode(clean, cache)
        pos = torch.arange(length, device=ids.device)
        start = pos - pos % self.cfg.block_size  # each query's canvas start
        seen = pos[None, :] < start[:, None]
        own = start[:, None] == start[None, :]
        edge = start[:, None] - (self.cfg.sliding_window - 1)
        full = torch.cat([seen, own], 1)
        sliding = torch.cat([seen & (pos[None, :] >= edge), own], 1)
        logits = self._decode(ids, pos.expand(b, -1), lambda i: cache.before(i), full, sliding, self_conditioning,
                              None, conditioned)
        return logits if positions is None else logits.reshape(-1, logits.shape[-1])[positions]

    def materialize(self, device: torch.device | str) -> None:
        """After a build on the meta device: nothing to recompute (rotary tables are made per call)."""

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The embedding (also the output layer)."""
        return [self.embed_tokens.weight]
