"""A loaded model ready to use: prompts and templates to canvases, and generation."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints.checkpoint import Checkpoint, load_model
from .checkpoints.pretrained import Pretrained, open_source, save_pretrained
from .config import (
    ConfigError,
    RunConfig,
    SampleConfig,
    config_from_dict,
    merge_trees,
    parse_overrides,
    to_dict,
)
from .data.tokenization import Tokenizer
from .samplers.ar import AutoregressiveSampler
from .samplers.base import SamplingError, row_seeds
from .samplers.insertion import InsertionSampler
from .samplers.registry import make_sampler

MASK_MARK = re.compile(r"\[MASK(?:\*([^\[\]]*))?\]")  # [MASK], or [MASK*anything]: the count is checked


def _mask_count(mark: re.Match) -> int:
    """The number of masked positions a ``[MASK]`` / ``[MASK*n]`` marker stands for."""
    count = mark.group(1)
    if count is None:
        return 1
    shown = mark.group(0) if len(mark.group(0)) <= 40 else mark.group(0)[:36] + "...]"
    digits = count.strip().lstrip("0")
    if not (digits.isascii() and digits.isdigit()):
        raise SamplingError(f"{shown}: a [MASK*n] marker needs a whole number n >= 1")
    if len(digits) > 18:
        raise SamplingError(f"{shown}: n is too large")
    return int(digits)


def encode_template(tokenizer: Tokenizer, template: str, max_length: int | None = None) -> list[int]:
    """Token ids of ``template`` where ``[MASK]`` is one masked position and ``[MASK*n]`` is n.

    With ``max_length``, a template that would take more tokens is refused before its masks are built.
    """
    ids: list[int] = []
    pos = 0

    def check(extra: int) -> None:
        if max_length is not None and len(ids) + extra > max_length:
            raise SamplingError(f"the template takes more than the maximum of {max_length} tokens")

    for m in MASK_MARK.finditer(template):
        ids += encode_fixed(tokenizer, template[pos:m.start()])
        count = _mask_count(m)
        check(count)
        ids += [tokenizer.mask_id] * count
        pos = m.end()
    ids += encode_fixed(tokenizer, template[pos:])
    check(0)
    return ids


def encode_fixed(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of fixed text, which must not contain the mask token itself."""
    ids = tokenizer.encode(text).tolist() if text else []
    if tokenizer.mask_id in ids:
        raise SamplingError("fixed text contains the mask token itself; mark masked positions with [MASK]")
    return ids


def make_canvas(tokenizer: Tokenizer, rows: list[list[int]], length: int, bos: bool = False) -> torch.Tensor:
    """A canvas of ``length`` per row: optional BOS, the row's tokens (mask ids where to generate),
    then masks up to ``length``. Rows may have different prompt lengths."""
    if not rows:
        raise SamplingError("nothing to sample: the batch is empty")
    canvas = torch.full((len(rows), length), tokenizer.mask_id, dtype=torch.long)
    for r, ids in enumerate(rows):
        prefix = ([tokenizer.bos_id] if bos else []) + list(ids)
        if len(prefix) > length:
            raise SamplingError(f"a prompt of {len(prefix)} tokens does not fit a canvas of {length}")
        if len(prefix) == length and tokenizer.mask_id not in prefix:
            raise SamplingError(f"a prompt of {len(prefix)} tokens leaves nothing to generate in a canvas "
                                f"of {length}")
        canvas[r, :len(prefix)] = torch.tensor(prefix, dtype=torch.long)
    return canvas


@dataclass
class Generation:
    """Samples of one request: per-row texts and ids, and the totals behind the throughput."""

    texts: list[str]
    ids: list[list[int]]
    row_nfe: list[int]
    nfe: int
    seconds: float
    generated: int

    def summary(self) -> dict:
        return {"samples": len(self.texts), "generated_tokens": self.generated, "seconds": self.seconds,
                "generated_tokens_per_second": self.generated / self.seconds if self.seconds else None,
                "nfe": self.nfe, "mean_row_nfe": sum(self.row_nfe) / max(len(self.row_nfe), 1)}


def generate(model, objective, tokenizer: Tokenizer, cfg: SampleConfig, length: int, model_length: int,
             prompts: list[str] | None = None, template: str | None = None, bos: bool = False,
             device: torch.device | str = "cpu", autocast=None) -> Generation:
    """``cfg.num_samples`` samples per prompt (or per template, or unconditional), canvases of
    ``length``, row ``i`` seeded by ``(cfg.seed, i)``. A template's canvas is the template itself (and
    BOS): only its masks are generated; an insertion model may grow it up to ``length``.

    ``autocast`` is an optional context-manager factory for the network's precision.
    """
    sampler = make_sampler(cfg, objective, tokenizer, model_length)
    if prompts and template:
        raise SamplingError("give prompts or a template, not both")
    if template is not None:
        if isinstance(sampler, AutoregressiveSampler):
            raise SamplingError("a template ([MASK] infilling) needs a masked diffusion or insertion model; "
                                "an autoregressive model only continues a prompt")
        requests = [encode_template(tokenizer, template)]
        if isinstance(sampler, InsertionSampler):
            length = max(length, len(requests[0]) + int(bos))
        else:
            length = len(requests[0]) + int(bos)
    else:
        requests = [encode_fixed(tokenizer, p) for p in prompts] if prompts else [[]]
    if length > model_length and not cfg.window:
        raise SamplingError(f"a canvas of {length} tokens (sample.length) exceeds the model's maximum length "
                            f"{model_length}; set sample.window (semi-autoregressive) for longer outputs")
    rows = [ids for ids in requests for _ in range(cfg.num_samples)]
    seeds = row_seeds(cfg.seed, len(rows))
    out = Generation([], [], [], 0, 0.0, 0)
    for start in range(0, len(rows), cfg.batch_size):
        canvas = make_canvas(tokenizer, rows[start:start + cfg.batch_size], length, bos).to(device)
        if template is not None and isinstance(sampler, InsertionSampler):  # infill only the template's gaps
            canvas[:, len(requests[0]) + int(bos):] = tokenizer.pad_id
        with (autocast() if autocast else _no_autocast()):
            result = sampler.sample(model, canvas, seeds[start:start + len(canvas)].to(device))
        for row, n in zip(result.tokens.cpu(), result.row_nfe.tolist()):
            out.texts.append(tokenizer.decode(row))
            out.ids.append(row.tolist())
            out.row_nfe.append(n)
        out.nfe += result.nfe
        out.seconds += result.seconds
        out.generated += result.generated
    return out


def _no_autocast():
    return contextlib.nullcontext()


@dataclasses.dataclass
class LoadedModel:
    """A ready model: the network (eval mode), its objective, tokenizer and config."""

    model: torch.nn.Module
    objective: object
    tokenizer: Tokenizer
    config: RunConfig
    source: Checkpoint | Pretrained

    def generate(self, prompts: list[str] | None = None, template: str | None = None, **sample):
        """Samples with ``SampleConfig`` fields as keywords (``num_samples``, ``sampler``, ``seed``, ...)."""
        cfg = dataclasses.replace(self.config.sample, **sample)
        device = next(self.model.parameters()).device
        return generate(self.model, self.objective, self.tokenizer, cfg, cfg.length or self.config.data.length,
                        self.config.model.length, prompts, template,
                        bos=self.config.data.layout == "pad" or self.config.data.frame, device=device)

    def save_pretrained(self, directory: str | Path, **kw) -> Path:
        """The current weights of ``model`` (fine-tuned or not) with this config and tokenizer."""
        return save_pretrained(self.source, directory, weights=self.model.state_dict(), **kw)


def from_pretrained(path: str | Path, ema: bool = True, device: str | torch.device = "cpu",
                    tokenizer_path: str | None = None, **ckpt_options) -> LoadedModel:
    """Load any model source (run folder, ``save_pretrained`` folder, released MDLM, hub id)."""
    source = open_source(path, tokenizer_path, **ckpt_options)
    model, objective = load_model(source, ema=ema, device=device)
    return LoadedModel(model, objective, source.tokenizer, source.config, source)


Source = Checkpoint | Pretrained


def checkpoint_config(ckpt: Source, overrides: list[str]) -> RunConfig:
    """The checkpoint's config with ``eval.*``/``sample.*``/``data.*`` overrides applied."""
    tree = parse_overrides(overrides)
    for section in tree:
        if section not in ("eval", "sample", "data"):
            raise ConfigError(f"only eval.*, sample.* and data.* can be overridden for a checkpoint, "
                              f"not '{section}'")
    return config_from_dict(merge_trees(to_dict(ckpt.config), tree))
