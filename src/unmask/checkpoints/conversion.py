"""Autoregressive to diffusion (A2D): a Hugging Face causal LM made into a masked diffusion model.

The converted model is the same network with bidirectional attention and a mask token, ready for
continued pretraining (``unmask train ... train.init_from=OUT``), the route Dream-7B took from
Qwen2.5-7B and DiffuLLaMA from Llama:

* **Mask token.** The tokenizer's mask token when it has one, else ``<|mask|>`` appended as a new id.
  Its embedding row is a spare row of the embedding when the matrix has more rows than the tokenizer has
  ids (Qwen2 pads to a multiple of 128; Dream puts its mask there), else a row appended to the embedding
  and the output layer. The row is initialised to the mean of the token embeddings (a neutral input
  that the first steps of training adapt); its output-layer row to zeros (the mask is never a target:
  every loss and sampler excludes its logit).
* **Logit shift** (``shift=True``, Dream's choice, the default): position ``i`` is scored by the output at
  ``i - 1``, so the converted model starts from its next-token predictions: with causal attention its
  logits at ``i`` are exactly the AR model's at ``i - 1`` (tested). Without the shift each position
  predicts itself, which the AR model never learned.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import config_from_dict, to_dict
from ..models.registry import BACKBONES
from .checkpoint import CheckpointError, check_dtype
from .open_weights import OpenWeights
from .pretrained import Pretrained


def to_diffusion(source: OpenWeights, shift: bool = True) -> Pretrained:
    """The masked-diffusion model made from the causal LM ``source`` (its weights in memory, float32)."""
    if not source.layout.causal:
        raise CheckpointError(f"{source.path} is already a {source.config.family} model ({source.layout.name} layout); "
                              f"conversion takes a causal LM (GPT-2, Llama or Qwen2 layout)")
    tokenizer, mask = source.tokenizer, source.tokenizer.mask_id
    tied = source.config.model.tie_embeddings
    weights = source.weights()
    for key, value in weights.items():
        check_dtype(key, value, torch.float32, str(source.path))
    weights = {k: v.float() for k, v in weights.items() if not (tied and k == "lm_head.weight")}
    name = BACKBONES[source.config.model.backbone].network.INPUT_EMBEDDING
    embed = weights[name]
    if mask >= len(embed):  # no spare row: grow the embedding and the output layer by one
        weights[name] = embed = torch.cat([embed, embed.new_zeros(1, embed.shape[1])])
        if "lm_head.weight" in weights:
            head = weights["lm_head.weight"]
            weights["lm_head.weight"] = torch.cat([head, head.new_zeros(1, head.shape[1])])
    if tokenizer.appended_mask:  # a new token: a neutral embedding, a zero output row (tied: the embedding)
        embed[mask] = embed[:tokenizer.vocab_size - 1].mean(dim=0)
        if "lm_head.weight" in weights:
            weights["lm_head.weight"][mask] = 0.0
    if tied:
        weights["lm_head.weight"] = embed
    model = dataclasses.replace(source.config.model, vocab=len(embed), logit_shift=shift)
    tree = to_dict(source.config)
    tree.update(family="mdlm", model=dataclasses.asdict(model))
    tree["sample"] = {"sampler": "dream" if shift else "confidence", "score": "entropy" if shift else "confidence"}
    return Pretrained(source.path, config_from_dict(tree), tokenizer, 0, weights, source_format="a2d")
