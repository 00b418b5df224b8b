"""Corpora: the documents of each split, from shipped, downloaded or local sources."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..config import DataConfig
from .readers import (
    DataError,
    Document,
    _documents_of_file,
    _file_id,
    _list_files,
    _read_pieces,
    _read_range,
    file_format,
    open_text,
)

SPLITS = ("train", "valid", "test")
SPLIT_SEED = 0  # data.split_order=shuffled: the permutation that assigns documents to splits


DATASETS = ("tinyshakespeare", "text8", "text8-prefix", "wikitext2", "wikitext103", "text", "hf")


TEXT8_LENGTH = 100_000_000


TEXT8_SPLITS = {"train": (0, 90_000_000), "valid": (90_000_000, 95_000_000),
                "test": (95_000_000, 100_000_000)}


TEXT8_PREFIX_SPLITS = {"train": (0, 10_000_000), "valid": (10_000_000, 11_250_000),
                       "test": (11_250_000, 12_500_000)}


SHAKESPEARE_CHARS = 1_115_394


SHAKESPEARE_SPLITS = {"train": (0, 1_003_854), "valid": (1_003_854, 1_059_624),
                      "test": (1_059_624, SHAKESPEARE_CHARS)}


class Corpus:
    """A source of documents per split; each document is an iterable of text pieces."""

    name = "corpus"

    def documents(self, split: str) -> Iterator[Iterable[str]]:
        """The documents of ``split``, in order, each an iterable of text pieces."""
        raise NotImplementedError

    def fingerprint(self, split: str) -> str:
        """A string that changes whenever ``split``'s documents may (the token cache's key)."""
        raise NotImplementedError

    def symbols(self) -> set[str]:
        """Every symbol in every split (a character tokenizer's closed alphabet)."""
        seen: set[str] = set()
        for split in SPLITS:
            try:
                for doc in self.documents(split):
                    for piece in doc:
                        seen.update(piece)
            except DataError:
                if split == "train":
                    raise
        return seen


class CharRangeCorpus(Corpus):
    """One long text whose splits are character ranges (text8, tiny-shakespeare, one text file)."""

    def __init__(self, name: str, path: Path, ranges: dict[str, tuple[int, int]], source_id: str = ""):
        self.name, self.path, self.ranges = name, Path(path), ranges
        self.source_id = source_id or _file_id(self.path)

    def documents(self, split: str) -> Iterator[Iterable[str]]:
        """The one document of ``split``: its character range of the text."""
        start, end = self.ranges[split]
        yield _read_range(self.path, start, end)

    def fingerprint(self, split: str) -> str:
        """The corpus name, the file's identity and ``split``'s character range."""
        return f"{self.name}|{self.source_id}|{self.ranges[split]}"


class FilesCorpus(Corpus):
    """Plain text files and folders (``.xz``/``.zip`` allowed, ``.jsonl`` with a text field).

    Splits come from ``valid_path``/``test_path`` when given. Otherwise the documents of ``path`` are
    split by fraction: contiguously (``split_order: contiguous``, the last ``test_fraction`` is test),
    or ``shuffled``: a fixed permutation (seed ``SPLIT_SEED``) of the document indices assigns them,
    each split keeping the file order; held-out documents then come from the same distribution as
    the training ones when the file is ordered (by play, by date). A single document (one file with
    ``documents: file``) is split by characters instead, contiguously.
    """

    name = "text"

    def __init__(self, cfg: DataConfig):
        if cfg.path is None:
            raise DataError("dataset 'text' needs data.path (a file or a folder)")
        self.cfg = cfg
        self.files = {"train": _list_files(Path(cfg.path))}
        if cfg.valid_path:
            self.files["valid"] = _list_files(Path(cfg.valid_path))
        if cfg.test_path:
            self.files["test"] = _list_files(Path(cfg.test_path))
        self.explicit = bool(cfg.valid_path or cfg.test_path)
        self.chat: tuple[Callable, str] | None = None  # (messages -> (prompt, response), template digest)
        fractions = (cfg.valid_fraction, cfg.test_fraction)
        if not self.explicit and (min(fractions) < 0 or sum(fractions) >= 1):
            raise DataError(f"data.valid_fraction + data.test_fraction must lie in [0, 1), got {fractions}")
        self._bounds: tuple[int, int, int] | None = None

    def use_chat_template(self, pair: Callable, template: str) -> None:
        """Read ``data.messages_field`` conversations as (prompt, response) documents through ``pair``."""
        self.chat = (pair, hashlib.sha256(template.encode()).hexdigest()[:16])

    def _all_documents(self, files: list[Path]) -> Iterator[Iterable[str]]:
        chat = None
        if self.cfg.messages_field:
            if self.chat is None:
                raise DataError("conversations (data.messages_field) are rendered with the model's chat template; "
                                "this tokenizer has none (fine-tune a model that has one: train.init_from)")
            chat = (self.cfg.messages_field, self.chat[0])
        for f in files:
            yield from _documents_of_file(f, self.cfg.documents, self.cfg.text_field, self.cfg.prompt_field, chat)

    def _split_bounds(self) -> tuple[str, int, int, int]:
        files = self.files["train"]
        single = (len(files) == 1 and self.cfg.documents == "file" and file_format(files[0]) == "text"
                  and not self.cfg.prompt_field and not self.cfg.messages_field)
        if self._bounds is None:
            if single:
                total = sum(len(p) for p in _read_pieces(files[0]))
            else:
                total = sum(1 for _ in self._all_documents(files))
            n_test = int(total * self.cfg.test_fraction)
            n_valid = int(total * self.cfg.valid_fraction)
            self._bounds = (total - n_valid - n_test, total - n_test, total)
        return ("chars" if single else "documents", *self._bounds)

    def documents(self, split: str) -> Iterator[Iterable[str]]:
        """The documents of ``split``: its own files, or its share of ``path``'s documents (class docstring)."""
        if self.explicit:
            if split not in self.files:
                raise DataError(f"dataset 'text' has no {split} split: give data.{split}_path")
            yield from self._all_documents(self.files[split])
            return
        unit, a, b, total = self._split_bounds()
        start, end = {"train": (0, a), "valid": (a, b), "test": (b, total)}[split]
        if end <= start:
            fractions = "data.valid_fraction and data.test_fraction leave it nothing" if split == "train" else \
                f"raise data.{split}_fraction"
            raise DataError(f"dataset 'text' has an empty {split} split: {self.files['train'][0]} is too short or "
                            f"empty ({fractions})")
        if unit == "chars":
            if self.cfg.split_order == "shuffled":
                raise DataError("data.split_order=shuffled needs documents to shuffle (data.documents=line or "
                                "blank_line, or several files); one file is split by characters")
            yield Document(_read_range(self.files["train"][0], start, end), self.files["train"][0], start=start)
            return
        if self.cfg.split_order == "shuffled":
            chosen = np.zeros(total, dtype=bool)
            chosen[np.random.default_rng(SPLIT_SEED).permutation(total)[start:end]] = True
            yield from (doc for i, doc in enumerate(self._all_documents(self.files["train"])) if chosen[i])
            return
        for i, doc in enumerate(self._all_documents(self.files["train"])):
            if i >= end:
                return
            if i >= start:
                yield doc

    def fingerprint(self, split: str) -> str:
        """The files' identities and every setting that decides ``split``'s documents, as JSON."""
        files = self.files.get(split if self.explicit else "train", [])
        c = self.cfg
        return json.dumps([split, [_file_id(f) for f in files], c.documents, c.text_field,
                           self.explicit, c.valid_fraction, c.test_fraction]
                          + ([c.split_order] if c.split_order != "contiguous" and not self.explicit else [])
                          + ([c.prompt_field] if c.prompt_field else [])
                          + ([c.messages_field, self.chat and self.chat[1]] if c.messages_field else []))


class HFCorpus(Corpus):
    """A Hugging Face ``datasets`` dataset by hub name, local loading script/folder, or a folder saved
    with ``save_to_disk``. Documents are the ``text_field`` of each record."""

    name = "hf"

    def __init__(self, cfg: DataConfig):
        if cfg.path is None:
            raise DataError("dataset 'hf' needs data.path (a dataset name or a local folder)")
        if len(cfg.hf_split_names) != 3:
            raise DataError("data.hf_split_names must name the train, valid and test splits")
        self.cfg = cfg
        self.split_names = dict(zip(SPLITS, cfg.hf_split_names))

    def _load(self, split: str):
        try:
            import datasets
        except ImportError:
            raise DataError("dataset 'hf' needs the 'datasets' package (pip install datasets)") from None
        name, hf_split = self.cfg.path, self.split_names[split]
        saved = Path(name)
        try:
            if saved.is_dir() and ((saved / "dataset_dict.json").exists() or (saved / "state.json").exists()):
                ds = datasets.load_from_disk(str(saved))
                if isinstance(ds, datasets.DatasetDict):
                    if hf_split not in ds:
                        raise DataError(f"dataset {name} has no split '{hf_split}' (has {list(ds)})")
                    return ds[hf_split]
                if split != "train":
                    raise DataError(f"{name} holds a single dataset, used as the train split; save a "
                                    f"DatasetDict with {self.cfg.hf_split_names} to give {split} data")
                return ds
            return datasets.load_dataset(name, self.cfg.hf_config, split=hf_split,
                                         streaming=self.cfg.hf_streaming)
        except DataError:
            raise
        except ValueError as exc:
            raise DataError(f"dataset {name}: {exc}".splitlines()[0]) from None
        except (FileNotFoundError, ConnectionError, OSError) as exc:
            raise DataError(f"could not load dataset '{name}' ({exc.__class__.__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None

    def documents(self, split: str) -> Iterator[Iterable[str]]:
        """The ``text_field`` of each record of ``split``, one document each."""
        field = self.cfg.text_field
        for record in self._load(split):
            if field not in record:
                raise DataError(f"dataset {self.cfg.path} has no field '{field}' (has {list(record)})")
            yield [record[field]]

    def fingerprint(self, split: str) -> str:
        """The dataset, config, split name, ``datasets`` fingerprint and text field, as JSON."""
        ds = self._load(split)
        ident = getattr(ds, "_fingerprint", None) or "streaming"
        return json.dumps([self.cfg.path, self.cfg.hf_config, self.split_names[split], ident,
                           self.cfg.text_field])


WIKITEXT_RULES = [  # MDLM's `wt_detokenizer` (after Megatron-LM): undo WikiText's tokenization
    ("s '", "s'"), (re.compile(r"/' [0-9]/"), r"/'[0-9]/"),
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"), (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"), (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"), (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s"),
]


def wikitext_detokenize(text: str) -> str:
    """WikiText's ``" @-@ "``, ``" , "``, ``"( x )"`` ... back to running text, rule by rule as
    MDLM's ``wt_detokenizer`` does before tokenizing for zero-shot perplexity."""
    for pattern, replacement in WIKITEXT_RULES:
        text = pattern.sub(replacement, text) if isinstance(pattern, re.Pattern) else text.replace(pattern, replacement)
    return text


class WikiTextCorpus(Corpus):
    """WikiText-2/103 from a folder of the official files (``wiki.{train,valid,test}.tokens`` or the
    raw ``.raw`` variant): one document per line, blank lines included, each detokenized, as the
    Hugging Face ``wikitext-*-v1`` rows that MDLM evaluates zero-shot. Missing splits are an error
    when asked for (the test data here ships only valid and test)."""

    def __init__(self, name: str, cfg: DataConfig):
        if cfg.path is None:
            raise DataError(f"dataset '{name}' needs data.path: a folder with wiki.valid.tokens and "
                            f"wiki.test.tokens (or the .raw files)")
        self.name, self.folder = name, Path(cfg.path)
        if not self.folder.is_dir():
            raise DataError(f"data path not found: {self.folder}")

    def _file(self, split: str) -> Path:
        stem = {"train": "train", "valid": "valid", "test": "test"}[split]
        for suffix in ("tokens", "raw"):
            path = self.folder / f"wiki.{stem}.{suffix}"
            if path.is_file():
                return path
        raise DataError(f"{self.name}: no {split} split in {self.folder} (wiki.{stem}.tokens or .raw)")

    def documents(self, split: str) -> Iterator[Iterable[str]]:
        """One detokenized document per line of ``split``'s file (blank lines as empty documents)."""
        with open_text(self._file(split)) as f:
            for line in f:
                yield [wikitext_detokenize(line) if line.strip() else ""]

    def fingerprint(self, split: str) -> str:
        """The corpus name and the identity of ``split``'s file."""
        return f"{self.name}|{_file_id(self._file(split))}|lines-detokenized"


def shipped_corpus_path() -> Path:
    """The tiny-shakespeare text shipped with the package (xz-compressed)."""
    return Path(__file__).resolve().parents[1] / "assets" / "tinyshakespeare.txt.xz"


def make_corpus(cfg: DataConfig) -> Corpus:
    """The corpus a :class:`DataConfig` names."""
    if cfg.dataset == "tinyshakespeare":
        path = Path(cfg.path) if cfg.path else shipped_corpus_path()
        return CharRangeCorpus("tinyshakespeare", path, SHAKESPEARE_SPLITS)
    if cfg.dataset == "text8":
        if cfg.path is None:
            raise DataError("dataset 'text8' needs data.path: the official text8.zip or the raw text8 "
                            "file (100,000,000 characters)")
        path = Path(cfg.path)
        size = _text8_size(path)
        if size is not None and size != TEXT8_LENGTH:
            raise DataError(f"{path} holds {size:,} characters, not text8's {TEXT8_LENGTH:,}; "
                            f"for the 12.5M-character prefix use dataset=text8-prefix")
        return CharRangeCorpus("text8", path, TEXT8_SPLITS)
    if cfg.dataset == "text8-prefix":
        if cfg.path is None:
            raise DataError("dataset 'text8-prefix' needs data.path: a file whose first 12,500,000 "
                            "characters are text8's (e.g. text8_first12500000chars.xz)")
        return CharRangeCorpus("text8-prefix", Path(cfg.path), TEXT8_PREFIX_SPLITS)
    if cfg.dataset in ("wikitext2", "wikitext103"):
        return WikiTextCorpus(cfg.dataset, cfg)
    if cfg.dataset == "text":
        return FilesCorpus(cfg)
    if cfg.dataset == "hf":
        return HFCorpus(cfg)

    close = difflib.get_close_matches(cfg.dataset, DATASETS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise DataError(f"unknown dataset '{cfg.dataset}'{hint}; known: {', '.join(DATASETS)}")


def _text8_size(path: Path) -> int | None:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            infos = [i for i in archive.infolist() if not i.is_dir()]
            return infos[0].file_size if len(infos) == 1 else None
    if path.suffix in ("", ".txt"):
        return path.stat().st_size
    return None
