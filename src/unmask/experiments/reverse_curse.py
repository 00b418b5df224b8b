"""The reverse curse (Berglund et al. 2023; SMDM, Nie et al. 2024, section 5): models trained on
"NAME is DESCRIPTION." answer "who is NAME?" but not "who is DESCRIPTION?".

:func:`make_facts` writes fictitious facts (invented names and descriptions, seeded). A model is
trained on the forward statements only, then asked:

* **forward**: ``NAME is [MASK...].`` -> the description (the AR model: the prompt ``NAME is`` and the
  description generated after it);
* **reverse, same sentence**: ``[MASK...] is DESCRIPTION.`` -> the name. A masked diffusion model can
  infill it directly; an AR model cannot condition on what follows, so it is scored by ranking (below);
* **reverse, reversed sentence**: ``DESCRIPTION is [MASK...].`` -> the name, for both families (an order
  neither saw in training);
* **reverse ranking**: every name as a candidate in ``NAME is DESCRIPTION.``, the candidate with the
  highest likelihood wins (AR: exact; MDM: the NELBO bound with common random numbers), which is Bayes'
  rule inverting the forward model.

Generation is greedy (temperature 0, the answer's length given), exact match; the MDM decodes one
position per step by confidence, optionally with unsupervised classifier-free guidance.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch

from ..config import SampleConfig
from ..families import family_of
from ..objectives.base import Noise
from ..pipeline import make_canvas
from ..runtime import generator_for
from ..samplers.base import row_seeds
from ..samplers.registry import make_sampler

ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "r", "s", "st", "t", "th",
          "v", "w", "z"]


VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]


CODAS = ["", "", "n", "r", "l", "s", "th", "m", "x"]


ROLES = ["composer", "director", "architect", "author", "inventor", "painter", "founder", "sculptor", "designer",
         "translator"]


NOUNS = ["river", "lantern", "garden", "mirror", "harbor", "tower", "forest", "engine", "voyage", "winter", "orchard",
         "compass", "citadel", "meadow", "signal", "thunder"]


ADJECTIVES = ["silent", "crimson", "hidden", "golden", "distant", "broken", "endless", "quiet", "northern", "velvet",
              "hollow", "burning"]


@dataclasses.dataclass(frozen=True)
class Fact:
    """A fictitious fact: an invented ``name`` and the ``description`` it is."""

    name: str
    description: str

    @property
    def statement(self) -> str:
        """The forward sentence ``NAME is DESCRIPTION.`` (what the model is trained on)."""
        return f"{self.name} is {self.description}."


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))


def make_facts(n: int, seed: int = 0) -> list[Fact]:
    """``n`` facts with distinct invented names ("kavo relmin") and distinct descriptions ("the
    composer of the silent harbor"), all lower case."""
    rng = random.Random(seed)
    names, descriptions, facts = set(), set(), []
    while len(facts) < n:
        name = f"{_word(rng, rng.randint(1, 2))} {_word(rng, 2)}"
        description = f"the {rng.choice(ROLES)} of the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
        if name in names or description in descriptions:
            continue
        names.add(name)
        descriptions.add(description)
        facts.append(Fact(name, description))
    return facts


def write_facts(facts: list[Fact], path: str | Path) -> Path:
    """The forward statements, one per line (``data.documents=line``), and ``facts.json`` beside them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f.statement + "\n" for f in facts))
    (path.parent / "facts.json").write_text(json.dumps([dataclasses.asdict(f) for f in facts], indent=1))
    return path


def _layout(loaded, rows: list[list[int]]) -> torch.Tensor:
    """Rows as the model was trained on them: ``[BOS] ids [EOS] [PAD]...`` of ``data.length``."""
    canvas = make_canvas(loaded.tokenizer, rows, loaded.config.data.length, bos=True, close=True)
    return canvas.to(next(loaded.model.parameters()).device)


def _greedy(loaded, rows: list[list[int]], guidance: float) -> list[list[int]]:
    """Fill the mask ids of each row (laid out as in training) greedily: the MDM one position per step
    by confidence, the AR model left to right."""
    tok, ar = loaded.tokenizer, family_of(loaded.config).decoding == "ar"
    outputs = []
    for row in rows:  # rows differ in their number of masks, hence in steps: one at a time
        masks = row.count(tok.mask_id)
        cfg = SampleConfig(sampler="ar" if ar else "confidence", steps=max(1, masks), temperature=0.0,
                           guidance=0.0 if ar else guidance)
        sampler = make_sampler(cfg, loaded.objective, tok, loaded.config.model.length)
        canvas = _layout(loaded, [row])
        outputs.append(sampler.sample(loaded.model, canvas, row_seeds(0, 1)).tokens[0, 1:1 + len(row)].tolist())
    return outputs


def _accuracy(loaded, facts: list[Fact], template, answer, guidance: float) -> float:
    """Exact-match accuracy of greedy answers: ``template(fact)`` gives (prefix, suffix) around the
    masked answer ``answer(fact)``."""
    tok = loaded.tokenizer
    rows, spans = [], []
    for f in facts:
        prefix, suffix = template(f)
        a, p = tok.encode(answer(f)).tolist(), tok.encode(prefix).tolist()
        rows.append(p + [tok.mask_id] * len(a) + tok.encode(suffix).tolist())
        spans.append((len(p), len(p) + len(a), a))
    outputs = _greedy(loaded, rows, guidance)
    return sum(out[s:e] == a for out, (s, e, a) in zip(outputs, spans)) / len(facts)


@torch.no_grad()
def sentence_nll(loaded, statements: list[str], mc_samples: int = 16, seed: int = 17) -> torch.Tensor:
    """``-log p(statement)`` (nats, (N,)) of each statement laid out as in training, its tokens and EOS
    counted: exact for the AR model; for the MDM the NELBO bound from ``mc_samples`` any-order draws
    that are the same for every statement (common random numbers)."""
    tok = loaded.tokenizer
    device = next(loaded.model.parameters()).device
    x0 = _layout(loaded, [tok.encode(s).tolist() for s in statements])
    counted = (x0 != tok.pad_id) & (x0 != tok.bos_id)
    if loaded.objective.bound == "exact":
        return loaded.objective.loss(loaded.model, x0, counted).double().cpu()
    gen = generator_for(seed, 0x2E7)
    offset = torch.rand(1, generator=gen, dtype=torch.float64)
    time_u = (torch.arange(mc_samples, dtype=torch.float64) + offset) / mc_samples
    mask_u = torch.rand(mc_samples, x0.shape[1], generator=gen)
    n = len(statements)
    noise = Noise(time_u.repeat(n), mask_u.repeat(n, 1)).to(device)
    nats = loaded.objective.loss_by_count(loaded.model, x0.repeat_interleave(mc_samples, 0),
                                          counted.repeat_interleave(mc_samples, 0), noise)
    return nats.double().cpu().reshape(n, mc_samples).mean(1)


def ranking_accuracy(loaded, facts: list[Fact], mc_samples: int = 16) -> float:
    """Reverse by ranking: for each description, every name as a candidate in ``NAME is DESCRIPTION.``;
    accuracy of the most likely candidate."""
    correct = 0
    for f in facts:
        scores = sentence_nll(loaded, [Fact(c.name, f.description).statement for c in facts], mc_samples)
        correct += facts[int(scores.argmin())].name == f.name
    return correct / len(facts)


def evaluate_reverse_curse(loaded, facts: list[Fact], guidance: float = 0.0, mc_samples: int = 16) -> dict:
    """Forward and reverse accuracies of one model (see the module docstring)."""
    out = {"forward": _accuracy(loaded, facts, lambda f: (f"{f.name} is ", "."), lambda f: f.description, guidance),
           "reverse_reversed_sentence": _accuracy(loaded, facts, lambda f: (f"{f.description} is ", "."),
                                                  lambda f: f.name, guidance)}
    if family_of(loaded.config).infills:
        out["reverse_same_sentence"] = _accuracy(loaded, facts, lambda f: ("", f" is {f.description}."),
                                                 lambda f: f.name, guidance)
    if not guidance:
        out["reverse_ranking"] = ranking_accuracy(loaded, facts, mc_samples)
    return out
