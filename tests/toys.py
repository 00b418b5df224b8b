"""Toy models and data with known answers, shared by the math tests."""

from pathlib import Path

import numpy as np
import torch

from unmask.config import ModelConfig
from unmask.data import TOKEN, Rows
from unmask.model import DiT

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GPT2_DIR = SHARED_DATA / "gpt2-tokenizer"
TEXT8_PREFIX = SHARED_DATA / "text8" / "text8_first12500000chars.xz"

# a model and run small enough for unit tests
TINY = ["model.preset=nano", "model.hidden=32", "model.blocks=2", "model.heads=2", "model.cond_dim=16",
        "model.length=32", "data.length=32", "train.batch_size=4", "train.progress=false", "train.threads=1",
        "train.log_every=1", "train.warmup_steps=0"]

V_TOKENS, LENGTH = 5, 8
MASK = V_TOKENS  # ids 0..4 are tokens, 5 is the mask


class FactorizedModel(torch.nn.Module):
    """The optimal denoiser of a factorized distribution: p(x0_l | x_t) = p_l, whatever x_t is."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        logits = torch.cat([probs.log(), torch.zeros(probs.shape[0], 1)], dim=1)  # mask column ignored
        self.register_buffer("logits", logits)

    def forward(self, ids, sigma=None, positions=None):
        out = self.logits.expand(ids.shape[0], -1, -1)
        if positions is None:
            return out
        return out[positions] if positions.dtype == torch.bool else out.reshape(-1, out.shape[-1])[positions]


class ArrayRows(Rows):
    def __init__(self, ids: np.ndarray):
        self.ids, self.length = ids, ids.shape[1]

    def __len__(self):
        return len(self.ids)

    def get(self, indices):
        ids = self.ids[np.asarray(indices)]
        return ids, np.full(ids.shape, TOKEN, dtype=np.int8)


def factorized_problem(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(2 * torch.randn(LENGTH, V_TOKENS, generator=g), dim=-1)
    x = torch.multinomial(probs.repeat(n, 1), 1, generator=g).view(n, LENGTH)
    true_nll = float(-probs.log().gather(1, x.T).T.sum()) / (n * LENGTH)
    return probs, x.numpy(), true_nll


def tiny_dit(vocab=V_TOKENS + 1, causal=False, seed=0):
    torch.manual_seed(seed)
    model = DiT(ModelConfig(hidden=32, blocks=2, heads=2, cond_dim=16, dropout=0.0, length=64), vocab, causal=causal)
    with torch.no_grad():  # leave the zero init so outputs depend on inputs
        model.output_layer.linear.weight.normal_(0, 0.5)
        for block in model.blocks:
            block.adaLN_modulation.bias.normal_(0, 0.3)
    return model.eval()
