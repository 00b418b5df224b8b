"""A loaded model ready to use: prompts and templates to canvases, and generation.

``from_pretrained(source)`` gives a :class:`LoadedModel` (network, objective, tokenizer, config) from any
model source; :func:`generate` samples from it (or from a source path) with ``sample.*`` settings as
keywords. :func:`generate_rows` is the engine underneath, for callers that hold the parts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import statistics
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
from .data.chat import ChatTemplateError, render_chat
from .data.layouts import starts_with_bos
from .data.tokenization import Tokenizer
from .families import family_of
from .objectives.base import Objective
from .runtime import memory_bytes
from .samplers.base import SamplingError, row_seeds
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


def request_ids(tokenizer: Tokenizer, text: str, template: bool, new_tokens: int | None = None,
                max_length: int | None = None) -> list[int]:
    """The ids of one request, mask ids where tokens are to be generated: a template's (its ``[MASK]`` /
    ``[MASK*n]`` markers masked) or a prompt's followed by ``new_tokens`` masks (None: the canvas's
    length decides). Longer than ``max_length`` is refused before anything of that size is built."""
    if template:
        return encode_template(tokenizer, text, max_length)
    ids = encode_fixed(tokenizer, text)
    if max_length is not None and len(ids) + (new_tokens or 0) > max_length:
        raise SamplingError(f"prompt and completion take {len(ids) + (new_tokens or 0)} tokens, more than the "
                            f"maximum of {max_length}")
    return ids + [tokenizer.mask_id] * (new_tokens or 0)


def make_canvas(tokenizer: Tokenizer, rows: list[list[int]], length: int, bos: bool = False,
                close: bool = False) -> torch.Tensor:
    """Canvases (B, ``length``), one per row of ids (mask ids where to generate): optional BOS, the
    row, then masks up to ``length``; with ``close``, EOS after the row and padding to ``length``
    instead (a row as the pad layout trains it). Rows may have different lengths."""
    if not rows:
        raise SamplingError("nothing to sample: the batch is empty")
    canvas = torch.full((len(rows), length), tokenizer.pad_id if close else tokenizer.mask_id, dtype=torch.long)
    for r, ids in enumerate(rows):
        prefix = ([tokenizer.bos_id] if bos else []) + list(ids) + ([tokenizer.eos_id] if close else [])
        if len(prefix) > length:
            raise SamplingError(f"a {'row' if close else 'prompt'} of {len(prefix)} tokens does not fit a canvas of "
                                f"{length}")
        if len(prefix) == length and tokenizer.mask_id not in prefix and not close:
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
    row_answer_tokens: list[int] = dataclasses.field(default_factory=list)  # see :func:`answer_tokens`

    @property
    def tokens_per_forward(self) -> list[float]:
        """Each row's answer tokens over the network calls it took part in (d3LLM's TPF, the parallelism of
        :mod:`unmask.eval.aup`)."""
        return [t / max(n, 1) for t, n in zip(self.row_answer_tokens, self.row_nfe)]

    def summary(self) -> dict:
        """The totals as a dict: samples, generated tokens, seconds, tokens per second, network calls
        (total and mean per row), answer tokens and tokens per forward (mean and quartiles over rows)."""
        rows = max(len(self.row_nfe), 1)
        return {"samples": len(self.texts), "generated_tokens": self.generated, "seconds": self.seconds,
                "generated_tokens_per_second": self.generated / self.seconds if self.seconds else None,
                "nfe": self.nfe, "mean_row_nfe": sum(self.row_nfe) / rows,
                "answer_tokens": sum(self.row_answer_tokens), "tokens_per_forward": sum(self.tokens_per_forward) / rows,
                "tokens_per_forward_quartiles": quartiles(self.tokens_per_forward)}


def quartiles(values: list[float]) -> list[float]:
    """The 25th, 50th and 75th percentiles of ``values`` (fewer than two: the values themselves)."""
    return statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else list(values)


def first_special(ids: list[int], special: set[int]) -> int | None:
    """The index of the first of ``ids`` in ``special`` (None: none is)."""
    return next((i for i, t in enumerate(ids) if t in special), None)


def answer_tokens(row: torch.Tensor, free: torch.Tensor, special: set[int]) -> int:
    """Tokens of a sampled row's answer: its generated positions ``free`` (L,) bool up to the first special token
    among them (EOS, PAD: what fills a fixed canvas after the answer is not counted, as d3LLM counts)."""
    generated = row[free].tolist()
    end = first_special(generated, special)
    return len(generated) if end is None else end


def chat_prompt(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text of a conversation under the model's chat template (which places BOS itself)."""
    template = tokenizer.chat_template
    if template is None:
        raise SamplingError("this model has no chat template (tokenizer_config.json's chat_template)")
    try:
        return render_chat(template, messages, bos_token=tokenizer.piece(tokenizer.bos_id),
                           eos_token=tokenizer.piece(tokenizer.eos_id))
    except ChatTemplateError as exc:
        raise SamplingError(str(exc)) from None


def chat_answer(tokenizer: Tokenizer, generated: list[int]) -> tuple[str, bool]:
    """The answer in ``generated`` ids: up to the first special token (end of turn, padding), and whether
    the model ended its turn there."""
    end = first_special(generated, tokenizer.special_token_ids())
    return tokenizer.decode(generated[:end]), end is not None


HELD_BYTES_PER_TOKEN = 64  # a generated token kept as a Python int among the ids, plus its share of the text


def generate_rows(model, objective: Objective, tokenizer: Tokenizer, cfg: SampleConfig, length: int,
                  model_length: int, prompts: list[str] | None = None, template: str | None = None,
                  bos: bool = False, device: torch.device | str = "cpu", autocast=None,
                  chat: bool = False) -> Generation:
    """``cfg.num_samples`` samples per prompt (or per template, or unconditional), canvases of
    ``length``, row ``i`` seeded by ``(cfg.seed, i)``. A template's canvas is the template itself (and
    BOS): only its masks are generated; an insertion model may grow it up to ``length``. With ``chat``
    each prompt is a user's message in the model's chat template, and the texts are the answers.

    ``autocast`` is an optional context-manager factory for the network's precision.
    """
    if chat:
        if not prompts or template is not None:
            raise SamplingError("chat takes one or more prompts (the user's messages), and no template")
        prompts = [chat_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        bos = False
    sampler = make_sampler(cfg, objective, tokenizer, model_length)
    if cfg.compile:
        model = compiled_for_decoding(model)
    family = family_of(objective.family)
    grows = family.decoding == "insertion"  # an insertion model lengthens its canvas
    if prompts and template:
        raise SamplingError("give prompts or a template, not both")
    if template is not None:
        if not family.infills:
            raise SamplingError(f"a template ([MASK] infilling) needs a model that infills; a {family.name} model "
                                f"only continues a prompt")
        requests = [request_ids(tokenizer, template, template=True)]
        length = max(length, len(requests[0]) + int(bos)) if grows else len(requests[0]) + int(bos)
    else:
        requests = [request_ids(tokenizer, p, template=False) for p in prompts] if prompts else [[]]
    if getattr(cfg, "guidance", 0.0) and not any(requests):
        raise SamplingError(f"sample.guidance={cfg.guidance:g} guides towards a prompt (SMDM eq. 7), and these "
                            f"samples have none: it would only double the network calls (give --prompt or "
                            f"--template, or leave sample.guidance at 0)")
    if length > model_length and not cfg.window:
        raise SamplingError(f"a canvas of {length} tokens (sample.length) exceeds the model's maximum length "
                            f"{model_length}; set sample.window (semi-autoregressive) for longer outputs")
    held = len(requests) * cfg.num_samples * length * HELD_BYTES_PER_TOKEN
    if held > memory_bytes() // 2:
        raise SamplingError(f"{len(requests) * cfg.num_samples:,} samples of {length} tokens would hold about "
                            f"{held / 2**30:,.0f} GiB of results; this machine has {memory_bytes() / 2**30:,.0f} GiB "
                            f"(sample fewer at a time, with another sample.seed each)")
    rows = [ids for ids in requests for _ in range(cfg.num_samples)]
    seeds = row_seeds(cfg.seed, len(rows))
    out = Generation([], [], [], 0, 0.0, 0)
    for start in range(0, len(rows), cfg.batch_size):
        canvas = make_canvas(tokenizer, rows[start:start + cfg.batch_size], length, bos).to(device)
        if template is not None and grows:  # infill only the template's gaps
            canvas[:, len(requests[0]) + int(bos):] = tokenizer.pad_id
        with (autocast() if autocast else contextlib.nullcontext()):
            result = sampler.sample(model, canvas, seeds[start:start + len(canvas)].to(device))
        special = tokenizer.special_token_ids()
        free_rows = (canvas == tokenizer.mask_id).cpu()
        for r, (row, n, free) in enumerate(zip(result.tokens.cpu(), result.row_nfe.tolist(), free_rows)):
            out.texts.append(chat_answer(tokenizer, row[free].tolist())[0] if chat else tokenizer.decode(row))
            out.ids.append(row.tolist())
            out.row_nfe.append(n)
            out.row_answer_tokens.append(answer_tokens(row, free, special) if result.row_tokens is None
                                         else int(result.row_tokens[r]))
        out.nfe += result.nfe
        out.seconds += result.seconds
        out.generated += result.generated
    return out


def compiled_for_decoding(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(model, dynamic=True)``: one graph for the canvas lengths and batch sizes a sampler
    feeds. On the CPU 1.16-1.28x per decoding path after 19-45 s of compilation (docs/results/compile.md, "Compiled
    decoding and training"); fused kernels round differently, so near-ties may resolve otherwise than in
    eager decoding (first-hitting, ancestral and AR gave the eager tokens there, LLaDA with the dual cache
    did not)."""
    return torch.compile(model, dynamic=True)


@dataclasses.dataclass
class LoadedModel:
    """A ready model: the network (eval mode), its objective, tokenizer and config."""

    model: torch.nn.Module
    objective: Objective | None
    tokenizer: Tokenizer
    config: RunConfig
    source: Checkpoint | Pretrained

    def generate(self, prompts: list[str] | None = None, template: str | None = None, chat: bool = False,
                 **sample):
        """Samples with ``SampleConfig`` fields as keywords (``num_samples``, ``sampler``, ``seed``, ...);
        ``chat``: the prompts are user messages in the model's chat template, the texts its answers."""
        cfg = dataclasses.replace(self.config.sample, **sample)
        device = next(self.model.parameters()).device
        return generate_rows(self.model, self.objective, self.tokenizer, cfg, cfg.length or self.config.data.length,
                             self.config.model.length, prompts, template, bos=starts_with_bos(self.config.data),
                             device=device, chat=chat)

    def save_pretrained(self, directory: str | Path, **kw) -> Path:
        """The current weights of ``model`` (fine-tuned or not) with this config and tokenizer."""
        return save_pretrained(self.source, directory, weights=self.model.state_dict(), **kw)


def from_pretrained(path: str | Path, ema: bool = True, device: str | torch.device = "cpu",
                    tokenizer_path: str | None = None, quantize: str = "none", **ckpt_options) -> LoadedModel:
    """Load any model source (run folder, ``save_pretrained`` folder, released MDLM, hub id); ``quantize``:
    ``int8`` weights for inference (:mod:`unmask.models.quantize`)."""
    source = open_source(path, tokenizer_path, **ckpt_options)
    model, objective = load_model(source, ema=ema, device=device, quantize=quantize)
    return LoadedModel(model, objective, source.tokenizer, source.config, source)


Source = Checkpoint | Pretrained


def generate(model: LoadedModel | str | Path, prompts: list[str] | None = None, template: str | None = None,
             **sample) -> Generation:
    """Samples from ``model`` (a :class:`LoadedModel`, or any model source to load), continuing each of
    ``prompts`` or filling the ``[MASK]`` gaps of ``template`` (or unconditional), with
    :class:`~unmask.config.SampleConfig` fields as keywords (``num_samples``, ``sampler``, ``steps``,
    ``seed``, ...)."""
    loaded = model if isinstance(model, LoadedModel) else from_pretrained(model)
    return loaded.generate(prompts, template, **sample)


def checkpoint_config(ckpt: Source, overrides: list[str]) -> RunConfig:
    """The checkpoint's config with ``eval.*``/``sample.*``/``data.*`` overrides applied."""
    tree = parse_overrides(overrides)
    for section in tree:
        if section not in ("eval", "sample", "data"):
            raise ConfigError(f"only eval.*, sample.* and data.* can be overridden for a checkpoint, "
                              f"not '{section}'")
    return config_from_dict(merge_trees(to_dict(ckpt.config), tree))
