"""Toy models and data with known answers, shared by the math tests."""

from pathlib import Path

import numpy as np
import torch

from unmask.config import ModelConfig
from unmask.data.layouts import TOKEN, Rows
from unmask.models.dit import DiT

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GPT2_DIR = SHARED_DATA / "gpt2-tokenizer"
TEXT8_PREFIX = SHARED_DATA / "text8" / "text8_first12500000chars.xz"

# a model and run small enough for unit tests
TINY = ["model.preset=nano", "model.hidden=32", "model.blocks=2", "model.heads=2", "model.cond_dim=16",
        "model.length=32", "data.length=32", "train.batch_size=4", "train.progress=false", "train.threads=1",
        "train.log_every=1", "train.warmup_steps=0"]

# a tiny DiffusionGemma-style encoder-decoder (family udlm): a sliding and a full layer, four experts, canvases of 4
TINY_CANVAS = ["model.backbone=diffusiongemma", "model.block_size=4", "model.intermediate=64",
               "model.layer_types=[sliding_attention,full_attention]", "model.sliding_window=4", "model.moe_experts=4",
               "model.moe_top_k=2", "model.moe_width=16", "model.softcap=30"]

CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 26: 54.05}  # 99.9 % quantiles by degrees of freedom


def chi_square(counts, probs) -> float:
    """Pearson's statistic of observed ``counts`` against ``probs`` (a zero-probability draw fails)."""
    counts, probs = np.asarray(counts, dtype=float), np.asarray(probs, dtype=float)
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a zero-probability outcome was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


V_TOKENS, LENGTH = 5, 8
MASK = V_TOKENS  # ids 0..4 are tokens, 5 is the mask


class FactorizedModel(torch.nn.Module):
    """The optimal denoiser of a factorized distribution: p(x0_l | x_t) = p_l, whatever x_t is."""

    soft_mask = None  # a denoiser network without a soft-mask input module (as a binary DiT)
    time_conditioning = False

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


def random_dit(length: int = 32, vocab: int = 21, seed: int = 0, causal: bool = False,
               time_conditioning: bool = False) -> DiT:
    """A DiT (without time conditioning unless asked), every parameter drawn from N(0, 0.3^2); its mask id is
    ``vocab - 1``."""
    torch.manual_seed(seed)
    model = DiT(ModelConfig(hidden=32, heads=4, blocks=2, cond_dim=16, length=length, dropout=0.0,
                            time_conditioning=time_conditioning), vocab, causal, vocab - 1).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


class CountingModel(torch.nn.Module):
    """A network that counts its forward passes (every other attribute is the inner network's)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.forwards = inner, 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, *args, **kwargs):
        self.forwards += 1
        return self.inner(*args, **kwargs)


class EnumeratedModel(torch.nn.Module):
    """The exact denoiser of a distribution over short sequences given as ``states`` (S, L) with
    probabilities ``weights`` (S,): p(x_l = v | unmasked tokens of x_t), by enumeration. ``causal``
    gives next-token conditionals instead (for AR samplers: inputs are [BOS, x_0 .. x_{L-2}])."""

    soft_mask = None  # a denoiser network without a soft-mask input module (as a binary DiT)

    def __init__(self, states: torch.Tensor, weights: torch.Tensor, vocab: int, causal: bool = False):
        super().__init__()
        self.register_buffer("states", states)
        self.register_buffer("weights", weights.double() / weights.sum())
        self.vocab, self.mask, self.causal = vocab, vocab, causal
        self.time_conditioning = False

    def conditionals(self, ids: torch.Tensor) -> torch.Tensor:
        if self.causal:  # position j sees inputs 0..j = BOS, x_0 .. x_{j-1}
            known = torch.zeros_like(ids, dtype=torch.bool)
            seen = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
            rows = []
            for j in range(ids.shape[1]):
                visible = torch.zeros_like(known)
                visible[:, :j] = True
                rows.append(self._marginals(seen, visible)[:, j])
            return torch.stack(rows, dim=1)
        return self._marginals(ids, ids != self.mask)

    def _marginals(self, ids, visible):
        """(R, n, V) conditionals of the first n = ids.shape[1] positions given the visible ones."""
        n = ids.shape[1]
        agree = (self.states[None, :, :n] == ids[:, None, :]) | ~visible[:, None, :]  # (R, S, n)
        w = agree.all(dim=2).double() * self.weights  # (R, S)
        onehot = torch.nn.functional.one_hot(self.states[:, :n], self.vocab).double()  # (S, n, V)
        marg = torch.einsum("rs,slv->rlv", w, onehot)
        return marg / marg.sum(dim=2, keepdim=True)

    def forward(self, ids, sigma=None, positions=None, cache=None):
        probs = self.conditionals(ids)
        logits = torch.cat([probs.clamp_min(1e-300).log(), torch.zeros(*probs.shape[:2], 1, dtype=probs.dtype)], 2)
        logits = logits.float()
        if positions is None:
            return logits
        return logits[positions] if positions.dtype == torch.bool else logits.reshape(-1, logits.shape[-1])[positions]


def all_states(length: int, vocab: int) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(vocab)] * length, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def random_joint(length=3, vocab=3, seed=0):
    """A non-factorized joint distribution over vocab^length sequences."""
    g = torch.Generator().manual_seed(seed)
    states = all_states(length, vocab)
    weights = torch.rand(len(states), generator=g, dtype=torch.float64) ** 3 + 0.01
    return states, weights / weights.sum()


def markov_chain(length: int, vocab: int = 3, seed: int = 1):
    """A stationary Markov chain: (states, probabilities, initial distribution, transition matrix)."""
    g = torch.Generator().manual_seed(seed)
    transition = torch.softmax(2 * torch.randn(vocab, vocab, generator=g, dtype=torch.float64), dim=1)
    evals, evecs = torch.linalg.eig(transition.T)
    pi = evecs[:, evals.real.argmax()].real
    pi = pi / pi.sum()
    states = all_states(length, vocab)
    p = pi[states[:, 0]]
    for j in range(1, length):
        p = p * transition[states[:, j - 1], states[:, j]]
    return states, p, pi, transition
