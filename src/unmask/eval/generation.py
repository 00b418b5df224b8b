"""Quality of generated text: generative perplexity under an evaluator AR model, always next to
per-sample unigram entropy (and the same statistics of held-out data), and MAUVE when installed.

Generative perplexity (MDLM ``compute_generative_perplexity``): samples are decoded to text,
re-tokenized by the evaluator, scored with next-token cross-entropy in windows of the evaluator's
length, and ``exp(total NLL / total tokens)`` is pooled over all samples. A low value alone is not
quality: a sampler that collapses diversity (low entropy) scores well, which is why entropy is
always reported with it (Zheng et al. 2024).

Evaluators: a causal checkpoint of this project (``family: ar``; a run folder or checkpoint) or a
Hugging Face causal LM folder (``transformers``, e.g. GPT-2 Large when it is on disk).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..checkpoints.checkpoint import load_model
from ..checkpoints.pretrained import open_source
from ..families import family_of
from ..files import CheckpointError, member, read_json


def unigram_entropy(ids) -> float:
    """Entropy (nats) of the token frequencies of one sample: ``-sum_k (c_k/n) log(c_k/n)``."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size == 0:
        return 0.0
    _, counts = np.unique(ids, return_counts=True)
    p = counts / ids.size
    return float(-(p * np.log(p)).sum())


def kmer_spectrum(texts: list[str], k: int) -> dict[str, float]:
    """Frequencies of the overlapping k-mers of ``texts`` (each text counted on its own, no k-mer
    across two texts), normalized to sum to 1."""
    counts: dict[str, int] = {}
    for text in texts:
        for i in range(len(text) - k + 1):
            kmer = text[i:i + k]
            counts[kmer] = counts.get(kmer, 0) + 1
    total = sum(counts.values())
    return {kmer: c / total for kmer, c in counts.items()} if total else {}


def kmer_spectrum_distance(samples: list[str], references: list[str], k: int) -> float:
    """Total variation distance ``(1/2) sum_w |p(w) - q(w)|`` between the k-mer spectra of samples
    and references: 0 for identical spectra, 1 for disjoint ones."""
    p, q = kmer_spectrum(samples, k), kmer_spectrum(references, k)
    return 0.5 * sum(abs(p.get(w, 0.0) - q.get(w, 0.0)) for w in set(p) | set(q))


class Evaluator:
    """An autoregressive model that scores text."""

    name: str

    def nll(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per text: summed next-token NLL (nats) and the number of scored tokens."""
        raise NotImplementedError

    def features(self, texts: list[str]) -> np.ndarray:
        """One embedding per text (the last position's final hidden state), for MAUVE."""
        raise NotImplementedError


class CheckpointEvaluator(Evaluator):
    """A ``family: ar`` checkpoint of this project."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", batch_size: int = 16):
        ckpt = open_source(path)
        if family_of(ckpt.config).decoding != "ar":
            raise CheckpointError(f"evaluator {ckpt.path} is a {ckpt.config.family} model; an AR model is needed")
        self.model, _ = load_model(ckpt, ema=True, device=device)
        self.tokenizer, self.device, self.batch_size = ckpt.tokenizer, torch.device(device), batch_size
        self.window = ckpt.config.model.length
        self.name = str(ckpt.path)

    def _windows(self, texts: list[str]) -> list[tuple[int, list[int]]]:
        """(text index, [BOS] + up to window-1 tokens) pieces covering every token of every text."""
        pieces = []
        for i, text in enumerate(texts):
            ids = self.tokenizer.encode(text).tolist()
            step = self.window - 1
            for start in range(0, max(len(ids), 1), step):
                pieces.append((i, [self.tokenizer.bos_id] + ids[start:start + step]))
        return pieces

    @torch.no_grad()
    def nll(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per text: summed next-token NLL (nats) and the number of scored tokens, over windows of the model's length
        each starting with BOS."""
        totals, counts = np.zeros(len(texts)), np.zeros(len(texts), dtype=np.int64)
        pieces = self._windows(texts)
        for lo in range(0, len(pieces), self.batch_size):
            batch = pieces[lo:lo + self.batch_size]
            width = max(len(p) for _, p in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_id, dtype=torch.long)
            valid = torch.zeros(len(batch), width, dtype=torch.bool)
            for r, (_, p) in enumerate(batch):
                ids[r, :len(p)] = torch.tensor(p)
                valid[r, 1:len(p)] = True
            logits = self.model(ids[:, :-1].to(self.device)).float()
            logits[..., self.tokenizer.mask_id] = float("-inf")
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:].to(self.device),
                                                    reduction="none").cpu()
            for r, (i, _) in enumerate(batch):
                totals[i] += float(nll[r][valid[r, 1:]].sum())
                counts[i] += int(valid[r].sum())
        return totals, counts

    @torch.no_grad()
    def features(self, texts: list[str]) -> np.ndarray:
        """One embedding per text (N, hidden): the final hidden state at the last position, for MAUVE."""
        hidden: list[torch.Tensor] = []
        handle = self.model.output_layer.register_forward_hook(lambda m, args, out: hidden.append(args[0]))
        try:
            for text in texts:
                ids = [self.tokenizer.bos_id] + self.tokenizer.encode(text).tolist()[: self.window - 1]
                self.model(torch.tensor([ids], device=self.device))
        finally:
            handle.remove()
        return np.stack([h[0, -1].float().cpu().numpy() for h in hidden])


class HuggingFaceEvaluator(Evaluator):
    """A causal LM folder loaded with ``transformers`` (``AutoModelForCausalLM``): safetensors
    weights only (a pickled ``.bin`` could run code), no code from the folder (``trust_remote_code``
    stays off)."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", batch_size: int = 8):
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise CheckpointError("a Hugging Face evaluator needs the 'transformers' package") from None
        path = Path(path)
        if not any(member(path, p.name).suffix == ".safetensors" for p in path.iterdir()):
            raise CheckpointError(f"evaluator {path} has no safetensors weights; pickled weights (.bin, .pt) are "
                                  f"never loaded: convert them to safetensors")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
            self.model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True,
                                                              trust_remote_code=False).to(device).eval()
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"evaluator {path} could not be loaded: {first}") from None
        self.device, self.batch_size = torch.device(device), batch_size
        self.window = int(getattr(self.model.config, "n_positions", None)
                          or getattr(self.model.config, "max_position_embeddings", 1024))
        self.name = str(path)

    @torch.no_grad()
    def nll(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per text: summed next-token NLL (nats) and the number of scored tokens, over windows of the model's
        context each starting with EOS."""
        eos = self.tokenizer.eos_token_id
        totals, counts = np.zeros(len(texts)), np.zeros(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = self.tokenizer(text)["input_ids"]
            step = self.window - 1
            for start in range(0, max(len(ids), 1), step):
                piece = torch.tensor([[eos] + ids[start:start + step]], device=self.device)
                if piece.shape[1] < 2:
                    continue
                logits = self.model(piece).logits[0, :-1].float()
                totals[i] += float(torch.nn.functional.cross_entropy(logits, piece[0, 1:], reduction="sum"))
                counts[i] += piece.shape[1] - 1
        return totals, counts

    @torch.no_grad()
    def features(self, texts: list[str]) -> np.ndarray:
        """One embedding per text (N, hidden): the last hidden state at the last position, for MAUVE."""
        out = []
        for text in texts:
            ids = self.tokenizer(text, return_tensors="pt", truncation=True, max_length=self.window)["input_ids"]
            hidden = self.model(ids.to(self.device), output_hidden_states=True).hidden_states[-1]
            out.append(hidden[0, -1].float().cpu().numpy())
        return np.stack(out)


def load_evaluator(path: str | Path, device: torch.device | str = "cpu") -> Evaluator:
    """An AR model of this project (run, checkpoint or ``save_pretrained`` folder) or a Hugging Face
    causal LM folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"evaluator not found: {path}")
    config = member(path, "config.json") if path.is_dir() else path / "config.json"
    if config.is_file() and read_json(config).get("model_type") not in ("unmask", "mdlm"):
        return HuggingFaceEvaluator(path, device)
    return CheckpointEvaluator(path, device)


def mauve_score(p_features: np.ndarray, q_features: np.ndarray) -> float | None:
    """MAUVE (Pillutla et al. 2021) between reference and sample features, or None when the
    ``mauve-text`` package is not installed."""
    try:
        import mauve
    except ImportError:
        return None
    result = mauve.compute_mauve(p_features=p_features, q_features=q_features, verbose=False,
                                 num_buckets=max(2, min(len(p_features), len(q_features)) // 10))
    return float(result.mauve)


def generation_metrics(samples: list[str], sample_ids: list[list[int]], references: list[str],
                       reference_ids: list[list[int]], evaluator: Evaluator, mauve: bool = True,
                       kmer_sizes: tuple[int, ...] = ()) -> dict:
    """Gen-PPL of samples and of held-out references under ``evaluator``, per-sample unigram
    entropy of both (mean and standard deviation), MAUVE when available, and the k-mer spectrum
    distance of samples to references for each of ``kmer_sizes`` (DNA)."""
    def ppl(texts):
        totals, counts = evaluator.nll(texts)
        return math.exp(totals.sum() / max(counts.sum(), 1)), int(counts.sum())

    gen_ppl, scored = ppl(samples)
    ref_ppl, _ = ppl(references)
    ent = np.array([unigram_entropy(ids) for ids in sample_ids])
    ref_ent = np.array([unigram_entropy(ids) for ids in reference_ids])
    out = {"evaluator": evaluator.name, "samples": len(samples), "scored_tokens": scored,
           "gen_ppl": gen_ppl, "reference_gen_ppl": ref_ppl,
           "entropy": float(ent.mean()), "entropy_std": float(ent.std()),
           "reference_entropy": float(ref_ent.mean()), "reference_entropy_std": float(ref_ent.std()),
           "mauve": None}
    for k in kmer_sizes:
        out[f"kmer{k}_distance"] = kmer_spectrum_distance(samples, references, k)
    if mauve:
        out["mauve"] = mauve_score(evaluator.features(references), evaluator.features(samples))
        if out["mauve"] is None:
            out["mauve_note"] = "install mauve-text for MAUVE"
    return out
