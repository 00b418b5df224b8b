"""Model folders in the Hugging Face convention, and one loader for every kind of model source.

``save_pretrained`` writes::

    config.json              {"model_type": "unmask", "family", "vocab_size", "step", "run_config": {...}}
    model.safetensors        weights (EMA by default) with MDLM's DiT key names
    unmask_tokenizer.json    the tokenizer (+ tokenizer.json for BPE tokenizers)
    README.md                model card: training data, steps, measured metrics

``from_pretrained`` / :func:`open_source` read any of

* a run folder or checkpoint folder of ``unmask train``;
* a folder written by ``save_pretrained``;
* MDLM's released layouts (:mod:`unmask.checkpoints.released`): the ``kuleshov-group/mdlm-owt`` folder, or a
  Lightning ``.ckpt`` file (restricted unpickling);
* a Hugging Face hub id (``org/name``), downloaded with ``huggingface_hub`` when a hub is reachable.

Released MDLM folders ship no tokenizer: GPT-2's is taken from the folder when present (a
``tokenizer.json``, ``vocab.json`` + ``merges.txt`` or ``encoder.json`` + ``vocab.bpe``), else
from ``tokenizer_path``, else from the hub; the mask token is appended as id 50257.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ConfigError, RunConfig, config_from_dict, to_dict
from ..data.tokenization import HFTokenizer, Tokenizer, load_tokenizer
from ..families import build_model, family_of
from ..files import member, read_json, sha256_file
from ..hub import hub_reachable
from ..models.adapters import add_adapters, merged_weights, trainable_names
from ..models.common import count_parameters
from ..models.registry import BACKBONES
from . import released
from .checkpoint import (
    CHECKSUMS,
    Checkpoint,
    CheckpointError,
    WeightSource,
    check_dtype,
    check_finite,
    load_tensors,
    load_weights,
    record_checksums,
    unique_tensors,
    verified,
)
from .open_weights import LAYOUTS, WRITABLE, OpenWeights, read_open_weights, read_smdm, save_released
from .runfolder import FILE, replaceable

MODEL_TYPE = "unmask"


EXPORT_LAYOUT = {name: FILE for name in ("config.json", "model.safetensors", "README.md", CHECKSUMS,
                                         "unmask_tokenizer.json", "tokenizer.json")}


class Pretrained(WeightSource):
    """A model source read from disk: ``config``, ``tokenizer``, ``step``, ``path``, ``weights()``.

    The same interface as :class:`~unmask.checkpoints.checkpoint.Checkpoint`, so
    :func:`unmask.checkpoints.checkpoint.load_model`
    and the CLI take either.
    """

    def __init__(self, path: Path, config: RunConfig, tokenizer: Tokenizer, step: int,
                 weights: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None = None,
                 source_format: str = MODEL_TYPE, card: dict | None = None):
        self.path, self.config, self.tokenizer, self.step = path, config, tokenizer, step
        self._weights, self._ema, self.format, self.card = weights, ema, source_format, card or {}

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        """The EMA weights when ``ema`` and the source has them, else the raw ones."""
        return self._ema if ema and self._ema is not None else self._weights

    def ema_state(self) -> dict[str, torch.Tensor] | None:
        """The EMA weights (None: the source has none)."""
        return self._ema

    @property
    def has_ema(self) -> bool:
        """Whether the source holds EMA weights."""
        return self._ema is not None


def _gpt2_tokenizer(folder: Path | None, tokenizer_path: str | None, root: Path | None = None) -> Tokenizer:
    given = Path(tokenizer_path) if tokenizer_path else None
    for directory in [p for p in (given, folder) if p is not None]:
        inside = (lambda name: directory / name) if directory == given else \
            (lambda name: member(directory, name, root))
        if directory.is_file():
            return HFTokenizer.from_file(directory)
        if inside("tokenizer.json").is_file():
            return HFTokenizer.from_file(inside("tokenizer.json"))
        for vocab, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
            if inside(vocab).is_file() and inside(merges).is_file():
                return HFTokenizer.gpt2_from_files(directory, vocab, merges)
        if directory == given:
            raise CheckpointError(f"no GPT-2 tokenizer in {directory} (tokenizer.json, vocab.json + merges.txt "
                                  f"or encoder.json + vocab.bpe)")
    try:
        return HFTokenizer.from_hub("gpt2")
    except OSError:
        raise CheckpointError("the released MDLM model needs the GPT-2 tokenizer: none in its folder and the hub "
                              "is unreachable; give tokenizer_path (a folder with encoder.json + vocab.bpe, "
                              "vocab.json + merges.txt, or tokenizer.json)") from None


def _check_vocab(tokenizer: Tokenizer, vocab_size: int, source: Path, padded: int = 0) -> None:
    """The embedding has a row per id of the tokenizer (or ``padded`` rows, LLaDA-style, when set)."""
    if vocab_size not in (tokenizer.vocab_size, padded or tokenizer.vocab_size):
        raise CheckpointError(f"{source}: the model has a vocabulary of {vocab_size} but the tokenizer gives "
                              f"{tokenizer.vocab_size} ids (mask included)")


def _hub_download(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"'{name}' is not a local path, and huggingface_hub is not installed to fetch it "
                              f"from the hub") from None
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.md", "*.bpe"],
                                      local_files_only=not hub_reachable()))
    except Exception as exc:  # offline, unknown repo, gated: one line that says which
        raise CheckpointError(f"'{name}' is not a local path and could not be fetched from the Hugging Face hub "
                              f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def source_reference(path: str) -> str:
    """How a run records ``train.init_from``: an existing local path made absolute (so that reading the run
    from another directory finds the same folder, never a hub repository of that name); a hub id as given."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``weights`` (in name order): the identity of a
    base model that adapters were trained on."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def initialize_from(model: torch.nn.Module, source_path: str, cfg: RunConfig, tokenizer) -> str:
    """Continued pretraining: copy the weights of ``source_path`` (any source of :func:`open_source`;
    EMA weights when it has them) into a new run's ``model``, or into its ``backbone`` when the run's
    family starts from another one (a classifier from an MDLM). The family, architecture and tokenizer
    must match; a soft-mask model may start from a binary one (its soft-mask scalars keep their
    initialization, w_s ~ 0, so training starts from the binary model). Returns the
    :func:`weights_digest` of the source's weights."""
    spec = family_of(cfg)
    family = spec.starts_from or cfg.family
    model = model.backbone if spec.starts_from else model
    source = open_source(source_path)
    if source.config.family != family:
        raise ConfigError(f"train.init_from={source_path} is a {source.config.family} model; this run needs "
                          f"a {family} model")
    if source.tokenizer.vocabulary() != tokenizer.vocabulary():
        raise ConfigError(f"train.init_from={source_path} was trained with another tokenizer than data.tokenizer "
                          f"({source.tokenizer.describe()} vs {tokenizer.describe()})")
    weights = dict(source.weights(ema=True))
    digest = weights_digest(weights)
    for name, value in model.state_dict().items():
        if name.startswith("soft_mask.") and name not in weights:
            weights[name] = value
    if model.soft_mask is None:
        weights = {k: v for k, v in weights.items() if not k.startswith("soft_mask.")}
    load_weights(model, weights, f"train.init_from={source_path}")
    return digest


def check_base(recorded: str | None, digest: str, source_path: str, what: str) -> None:
    """Adapters are valid only on the weights they were trained on: refuse a base whose digest differs from
    the one ``what`` recorded (checkpoints written before digests were recorded are not checked)."""
    if recorded is not None and recorded != digest:
        raise CheckpointError(f"{what} was trained on other weights than train.init_from={source_path} holds now "
                              f"(SHA-256 {recorded[:12]}… then, {digest[:12]}… now): its adapters apply only to "
                              f"the base they were trained on")


class AdapterCheckpoint(WeightSource):
    """A checkpoint of an adapter run (``adapter.kind``): its files hold the adapters (and soft-mask
    scalars); the weights it gives are its base (``train.init_from``) with them merged in, so every
    reader of weights (sampling, evaluation, ``unmask export``) sees a plain model."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self.config, self.tokenizer, self.path = ckpt, ckpt.config, ckpt.tokenizer, ckpt.path
        self.step, self.state = ckpt.step, ckpt.state

    def with_adapters(self, ema: bool = True) -> torch.nn.Module:
        """The base network with this checkpoint's adapters injected and loaded (not merged)."""
        cfg = self.config
        model = build_model(cfg, self.tokenizer)
        digest = initialize_from(model, cfg.train.init_from, cfg, self.tokenizer)
        check_base(self.state.get("base_sha256"), digest, cfg.train.init_from, str(self.path))
        add_adapters(model, cfg.adapter, cfg.model.backbone)
        tensors = self.ckpt.tensors("ema" if ema and self.ckpt.has("ema") else "model")
        if sorted(tensors) != sorted(trainable_names(model)):
            raise CheckpointError(f"{self.path} does not hold the adapters of adapter.targets={cfg.adapter.targets}")
        state = model.state_dict()
        for key, value in tensors.items():
            check_dtype(key, value, state[key].dtype, str(self.path))
            if value.shape != state[key].shape:
                raise CheckpointError(f"{self.path}: adapter tensor {key!r} has shape {tuple(value.shape)}, but "
                                      f"adapter.rank={cfg.adapter.rank} of its config makes {tuple(state[key].shape)}")
        check_finite(tensors, str(self.path))
        model.load_state_dict(tensors, strict=False)
        return model

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        """The base weights with the adapters (EMA ones when ``ema`` and present) merged in."""
        return merged_weights(self.with_adapters(ema))

    def ema_state(self) -> dict[str, torch.Tensor] | None:
        """The merged weights of the EMA adapters (None: the run kept no EMA)."""
        return self.weights(ema=True) if self.has_ema else None

    @property
    def has_ema(self) -> bool:
        """Whether the checkpoint holds EMA adapters."""
        return self.ckpt.has("ema")


CKPT_OPTIONS = {"heads", "length", "time_conditioning"}  # what a Lightning .ckpt cannot say about itself


def open_source(path: str | Path, tokenizer_path: str | None = None,
                **ckpt_options) -> Checkpoint | Pretrained | OpenWeights:
    """The model source at ``path`` (see the module docstring); nothing is built yet.

    ``ckpt_options`` (``heads``, ``length``, ``time_conditioning``) complete what a Lightning
    ``.ckpt`` cannot say about itself. Files are read only from inside the given folder (or, for a
    hub snapshot, inside its repository's cache folder).
    """
    unknown = sorted(set(ckpt_options) - CKPT_OPTIONS)
    if unknown:  # (not silently ignored: from_pretrained passes its extra keywords here)
        raise TypeError(f"unknown model-source option {unknown[0]!r} (known: {', '.join(sorted(CKPT_OPTIONS))})")
    p, root = Path(path), None
    if not p.exists():
        if str(path).count("/") == 1 and not str(path).startswith((".", "/")):
            p = _hub_download(str(path))
            root = p.parent.parent  # models--org--name: snapshots link into its blobs/
        else:
            raise CheckpointError(f"model not found: {path}")
    if p.is_file() and p.suffix == ".safetensors":
        return read_smdm(p, tokenizer_path, ckpt_options.get("heads"))
    if p.is_file():
        cfg, weights, ema, step = released.read_mdlm_ckpt(p, **ckpt_options)
        tokenizer = _gpt2_tokenizer(p.parent, tokenizer_path, p.parent)
        _check_vocab(tokenizer, cfg_vocab(weights), p)
        return Pretrained(p, cfg, tokenizer, step, weights, ema, source_format="mdlm-ckpt")
    config = member(p, "config.json", root)
    if not config.is_file():
        ckpt = Checkpoint(p)
        return AdapterCheckpoint(ckpt) if ckpt.config.adapter.kind != "none" else ckpt
    meta = read_json(config)
    if meta.get("model_type") == "mdlm":
        cfg, weights = released.read_mdlm_hf(p, meta, root)
        tokenizer = _gpt2_tokenizer(p, tokenizer_path, root)
        _check_vocab(tokenizer, cfg_vocab(weights), p)
        return Pretrained(p, cfg, tokenizer, 0, weights, source_format="mdlm-hf")
    opened = read_open_weights(p, meta, root)
    if opened is not None:
        return opened
    if meta.get("model_type") != MODEL_TYPE:
        known = [MODEL_TYPE, "mdlm", *(t for layout in LAYOUTS.values() for t in layout.model_types)]
        raise CheckpointError(f"{config} has model_type {meta.get('model_type')!r}; this loader reads "
                              f"{', '.join(map(repr, known))} folders")
    return read_pretrained(p, meta, root)


def cfg_vocab(weights: dict[str, torch.Tensor]) -> int:
    """The vocabulary size of any backbone's weights (rows of its input embedding, whatever the wrapper)."""
    names = tuple(spec.network.INPUT_EMBEDDING for spec in BACKBONES.values())
    for key, value in weights.items():
        if key.endswith(names) and value.dim() == 2:
            return value.shape[0]
    raise CheckpointError("the weights hold no input embedding matrix of a known backbone: not a model of this project")


def read_pretrained(folder: Path, meta: dict, root: Path | None = None) -> Pretrained:
    """A ``save_pretrained`` folder whose ``config.json`` holds ``meta``; its files are checked
    against the folder's ``checksums.json`` when it has one."""
    sums = member(folder, CHECKSUMS, root)
    checksums = read_json(sums) if sums.is_file() else {}
    for name in checksums:
        verified(folder, name, checksums)
    if not isinstance(meta.get("run_config"), dict):
        raise CheckpointError(f"{folder / 'config.json'} has no run_config mapping")
    cfg = config_from_dict(meta["run_config"])
    tokenizer = load_tokenizer(folder)
    weights = load_tensors(member(folder, "model.safetensors", root))
    _check_vocab(tokenizer, cfg_vocab(weights), folder, cfg.model.vocab)
    step = meta.get("step", 0)
    return Pretrained(folder, cfg, tokenizer, step if isinstance(step, int) else 0, weights, card=meta.get("card"))


def _model_card(source, card: dict) -> str:
    cfg = source.config
    data = cfg.data
    family = family_of(cfg)
    tag, kind = family.card_tag, family.description
    lines = ["---", "library_name: unmask", "tags:", f"- {tag}",
             "- text-generation", "---", "",
             f"# {card.get('name') or Path(str(source.path)).name}", "",
             f"A {kind} model trained "
             f"with [unmask](https://pypi.org/project/unmask/).", "",
             "| | |", "|---|---|",
             f"| family | {cfg.family} |",
             f"| parameters | {card.get('parameters', 0):,} |",
             f"| architecture | {cfg.model.backbone}, hidden {cfg.model.hidden}, {cfg.model.blocks} blocks, "
             f"{cfg.model.heads} heads, length {cfg.model.length}, time conditioning "
             f"{'on' if cfg.model.time_conditioning else 'off'} |",
             f"| training data | {data.dataset}{f' ({data.path})' if data.path else ''}, {data.tokenizer} tokenizer, "
             f"{data.layout} rows of {data.length} |",
             f"| training steps | {source.step:,} |",
             f"| weights | {'EMA' if card.get('ema') else 'raw'} |",
             f"| exported | {card.get('exported', '')} |"]
    metrics = card.get("metrics") or {}
    if metrics:
        lines += ["", "## Measured", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += ["", "## Use", "", "```python", "from unmask.pipeline import from_pretrained",
              "lm = from_pretrained('PATH_OR_HUB_ID')", "print(lm.generate(num_samples=2).texts)", "```", ""]
    return "\n".join(lines)


def last_metrics(source) -> dict:
    """The last logged training loss and validation figures of the run a checkpoint belongs to."""
    path = Path(str(source.path))
    for candidate in (path.parent.parent / "metrics.jsonl", path / "metrics.jsonl"):
        if candidate.is_file():
            out: dict = {}
            for line in candidate.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "event" in record or record.get("step", 0) > source.step:
                    continue
                for key, value in record.items():
                    if key == "loss" or key.startswith("valid"):
                        out[f"train {key}" if key == "loss" else key] = value
                out["at step"] = record.get("step")
            return out
    return {}


def earlier_export(directory: Path) -> bool:
    """True when ``directory`` is absent, empty, or a folder written by :func:`save_pretrained` and left as
    it was: every file in it recorded in its ``checksums.json`` with the bytes it was written with (an
    edited model card is the user's now)."""
    if not replaceable(directory, EXPORT_LAYOUT):
        return False
    if not directory.exists() or not any(directory.iterdir()):
        return True
    try:
        sums = read_json(directory / CHECKSUMS)
        files = {p.name for p in directory.iterdir() if p.name != CHECKSUMS}
        return (read_json(directory / "config.json").get("model_type") == MODEL_TYPE and isinstance(sums, dict)
                and set(sums) == files and all(sha256_file(directory / name) == sums[name] for name in files))
    except (CheckpointError, FileNotFoundError, OSError):
        return False


def save_pretrained(source: Checkpoint | Pretrained, directory: str | Path, ema: bool = True,
                    metrics: dict | None = None, name: str | None = None,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``source`` (or ``weights`` with ``source``'s config and tokenizer) as a Hugging Face
    style folder. It is written next to ``directory`` and renamed into place, so an interrupted
    export leaves no half folder. An existing ``directory`` is replaced only when it is an earlier
    export (nothing in it but what this function writes); anything else is refused untouched."""
    directory = Path(directory)
    if not earlier_export(directory):
        raise CheckpointError(f"{directory} exists and is not an earlier export of unmask; nothing was written "
                              f"(choose a new folder)")
    used_ema = weights is None and ema and source.ema_state() is not None
    weights = weights if weights is not None else source.weights(ema=ema)
    model = build_model(source.config, source.tokenizer)
    load_weights(model, weights, str(source.path))  # refuse to export weights the config cannot load
    card = {"name": name or directory.name, "parameters": count_parameters(model), "ema": used_ema,
            "exported": datetime.date.today().isoformat(),
            "metrics": dict(last_metrics(source), **(metrics or {}))}
    meta = {"model_type": MODEL_TYPE, "architectures": [type(model).__name__], "family": source.config.family,
            "vocab_size": source.tokenizer.vocab_size, "step": source.step, "card": card,
            "run_config": to_dict(source.config)}
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    save_file(unique_tensors(weights), str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    source.tokenizer.save(tmp)
    (tmp / "config.json").write_text(json.dumps(meta, indent=1) + "\n")
    (tmp / "README.md").write_text(_model_card(source, card))
    record_checksums(tmp)
    if directory.exists():
        shutil.rmtree(directory)  # an earlier export (checked above)
    os.replace(tmp, directory)
    return directory


def export(source: Checkpoint | Pretrained, out: str | Path, to: str = MODEL_TYPE, ema: bool = True,
           metrics: dict | None = None) -> Path:
    """Write ``source`` as ``unmask`` (:func:`save_pretrained`, ``metrics`` go into the model card),
    ``mdlm-hf`` (the ``mdlm-owt`` folder layout, with the tokenizer) or ``mdlm-ckpt`` (a
    Lightning-layout ``.ckpt``)."""
    out = Path(out)
    if out.is_symlink():
        raise CheckpointError(f"{out} is a symbolic link; an export never writes through one (choose a new path)")
    if to == MODEL_TYPE:
        return save_pretrained(source, out, ema=ema, metrics=metrics)
    if to in WRITABLE:
        return save_released(source, out, to, weights=source.weights(ema=ema))
    if to not in family_of(source.config).exports:
        raise CheckpointError(f"a {source.config.family} model cannot be written as {to!r} (it exports as "
                              f"{', '.join(family_of(source.config).exports)})")
    if source.config.model.soft_mask_top_k:
        raise CheckpointError("MDLM's layouts have no place for the soft-mask module; export this model as 'unmask'")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise CheckpointError(f"{out} exists; exports to MDLM's layouts never replace files (choose a new path)")
    if to == "mdlm-hf":
        released.write_mdlm_hf(out, source.weights(ema=ema), source.config, source.tokenizer.vocab_size)
        if isinstance(source.tokenizer, HFTokenizer):
            source.tokenizer.tk.save(str(out / "tokenizer.json"))
        return out
    if to == "mdlm-ckpt":
        if out.is_dir():
            raise CheckpointError(f"{out} is a folder; --to mdlm-ckpt writes one .ckpt file (give a file name)")
        released.write_mdlm_ckpt(out, source.weights(ema=False), source.ema_state(), source.config, source.step)
        return out
    raise CheckpointError(f"unknown export format '{to}' (unmask, mdlm-hf, mdlm-ckpt)")
