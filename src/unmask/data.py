"""Corpora, tokenized on-disk caches, MDLM row layouts and a deterministic, resumable batch order.

Pipeline: a :class:`Corpus` yields the documents of a split as streams of text pieces; the split
is tokenized once into a memory-mapped token file (:func:`tokenize_split`, cached by a fingerprint
of the source and the tokenizer); a layout cuts it into fixed-length rows:

* ``wrap`` (MDLM for OWT/text8): documents joined (with EOS after each when ``insert_eos``), cut
  into chunks of ``L-2`` tokens framed as ``[BOS] chunk [EOS]`` (or chunks of ``L`` when
  ``frame`` is off); the final partial chunk is dropped.
* ``pad`` (MDLM for LM1B): one document per row, ``[BOS] doc [EOS] [PAD]...``, truncated to ``L``.
  With ``data.prompt_field`` (supervised fine-tuning) a document is a (prompt, response) pair and
  the prompt's positions are of kind PROMPT: never counted, never noised, so the loss is on the
  response given the clean prompt; ``data.pad_with_eos`` fills the rest of the row with counted EOS
  tokens (SMDM), so the model learns where a response ends.

Rows carry a per-position kind (token/BOS/EOS/PAD) so which positions count in the loss is explicit
and does not depend on special ids (GPT-2's PAD is its EOS). Rows are read from the memory map on
demand, so a corpus larger than RAM trains in constant memory. :class:`BatchOrder` maps a step to
row ids through a per-epoch permutation seeded by ``(seed, epoch)``: a resumed run reads exactly
the batches it would have read.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import re
import json
import lzma
import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .config import DataConfig
from .tokenization import OutOfVocabularyError, Tokenizer, build_tokenizer

SPLITS = ("train", "valid", "test")
DATASETS = ("tinyshakespeare", "text8", "text8-prefix", "wikitext2", "wikitext103", "text", "hf")
TOKEN, BOS, EOS, PAD, PROMPT = 0, 1, 2, 3, 4
CACHE_VERSION = 1
BLOCK_CHARS = 1 << 20
TEXT8_LENGTH = 100_000_000
TEXT8_SPLITS = {"train": (0, 90_000_000), "valid": (90_000_000, 95_000_000),
                "test": (95_000_000, 100_000_000)}
TEXT8_PREFIX_SPLITS = {"train": (0, 10_000_000), "valid": (10_000_000, 11_250_000),
                       "test": (11_250_000, 12_500_000)}
SHAKESPEARE_CHARS = 1_115_394
SHAKESPEARE_SPLITS = {"train": (0, 1_003_854), "valid": (1_003_854, 1_059_624),
                      "test": (1_059_624, SHAKESPEARE_CHARS)}


class DataError(ValueError):
    """Unknown dataset, missing file, unreadable or too short corpus."""


def _file_id(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


class TextFile:
    """A text stream whose decoding errors name its file (``DataError``), not a bare codec error."""

    def __init__(self, stream: io.TextIOBase, path: Path, close=None):
        self.stream, self.path, self._close = stream, path, close

    def _decoded(self, call, *args):
        try:
            return call(*args)
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} cannot be "
                            f"decoded); convert it, e.g. with iconv -f latin1 -t utf-8") from None

    def read(self, size: int = -1) -> str:
        return self._decoded(self.stream.read, size)

    def readline(self) -> str:
        return self._decoded(self.stream.readline)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def close(self) -> None:
        self.stream.close()
        if self._close is not None:
            self._close()

    def __enter__(self) -> "TextFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_text(path: str | Path) -> TextFile:
    """Open a UTF-8 text file, decompressing ``.xz`` and ``.gz`` and reading the single member of a ``.zip``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix == ".xz":
        return TextFile(lzma.open(path, "rt", encoding="utf-8", newline=""), path)
    if path.suffix == ".gz":
        return TextFile(gzip.open(path, "rt", encoding="utf-8", newline=""), path)
    if path.suffix == ".zip":
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile as exc:
            raise DataError(f"{path} is not a readable zip archive ({exc})") from None
        members = [m for m in archive.namelist() if not m.endswith("/")]
        if len(members) != 1:
            archive.close()
            raise DataError(f"{path} must hold exactly one file, found {len(members)}")
        return TextFile(io.TextIOWrapper(archive.open(members[0]), encoding="utf-8", newline=""), path, archive.close)
    return TextFile(open(path, encoding="utf-8", newline=""), path)


def _read_range(path: Path, start: int, end: int) -> Iterator[str]:
    """Characters ``[start, end)`` of a text file, streamed in blocks."""
    with open_text(path) as f:
        skipped = 0
        while skipped < start:
            block = f.read(min(BLOCK_CHARS, start - skipped))
            if not block:
                break
            skipped += len(block)
        remaining = end - start
        while remaining > 0:
            block = f.read(min(BLOCK_CHARS, remaining))
            if not block:
                break
            remaining -= len(block)
            yield block
        if remaining > 0:
            raise DataError(f"{path} has {end - remaining} characters, but the split needs {end}")


def _read_pieces(path: Path) -> Iterator[str]:
    """A whole file in blocks that end at line boundaries (so BPE never sees a cut word)."""
    with open_text(path) as f:
        while True:
            block = f.read(BLOCK_CHARS)
            if not block:
                return
            if not block.endswith("\n"):
                block += f.readline()
            yield block


class Corpus:
    """A source of documents per split; each document is an iterable of text pieces."""

    name = "corpus"

    def documents(self, split: str) -> Iterator[Iterable[str]]:
        raise NotImplementedError

    def fingerprint(self, split: str) -> str:
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
        start, end = self.ranges[split]
        yield _read_range(self.path, start, end)

    def fingerprint(self, split: str) -> str:
        return f"{self.name}|{self.source_id}|{self.ranges[split]}"


FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".ffn", ".fas", ".frn")
FASTQ_SUFFIXES = (".fq", ".fastq")
TABLE_SUFFIXES = (".csv", ".tsv")


def file_format(path: Path) -> str:
    """``jsonl``, ``fasta``, ``fastq``, ``csv``, ``tsv`` or ``text``, from the suffix before any
    ``.xz``/``.gz`` compression suffix."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in (".xz", ".gz"):
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last == ".jsonl":
        return "jsonl"
    if last in FASTA_SUFFIXES:
        return "fasta"
    if last in FASTQ_SUFFIXES:
        return "fastq"
    if last in TABLE_SUFFIXES:
        return last[1:]
    return "text"


def _is_jsonl(path: Path) -> bool:
    return file_format(path) == "jsonl"


def read_fasta(path: Path) -> Iterator[tuple[str, str]]:
    """(header, sequence) of every record of a FASTA file: a ``>`` line, then sequence lines (any
    wrapping) up to the next ``>``. Blank lines and ``;`` comment lines are skipped; sequence before
    the first header is an error. Records without sequence are skipped."""
    header, parts = None, []
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith(";"):
                continue
            if line.startswith(">"):
                if header is not None and parts:
                    yield header, "".join(parts)
                header, parts = line[1:].strip(), []
            elif header is None:
                raise DataError(f"{path}:{lineno}: sequence before the first '>' header: not a FASTA file")
            else:
                parts.append("".join(line.split()))
    if header is not None and parts:
        yield header, "".join(parts)


def read_fastq(path: Path) -> Iterator[tuple[str, str]]:
    """(identifier, sequence) of every record of a FASTQ file: ``@id``, sequence, ``+``, qualities of
    the same length (one line each); anything else is an error naming the line."""
    with open_text(path) as f:
        lines = (line.rstrip("\r\n") for line in f)
        lineno = 0
        for head in lines:
            lineno += 1
            if not head.strip():
                continue
            record = [head]
            for _ in range(3):
                record.append(next(lines, None))
            if record[-1] is None or not head.startswith("@") or not record[2].startswith("+"):
                raise DataError(f"{path}:{lineno}: not a FASTQ record (@id, sequence, +, qualities)")
            if len(record[3]) != len(record[1]):
                raise DataError(f"{path}:{lineno}: {len(record[1])} bases but {len(record[3])} quality values")
            lineno += 3
            yield head[1:].strip(), record[1].strip()


def read_jsonl(path: Path, fields: tuple[str, ...]) -> Iterator[tuple]:
    """The ``fields`` of every record of a JSON-lines file (blank lines skipped)."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                yield tuple(record[name] for name in fields)
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                names = " and ".join(f"'{name}'" for name in fields)
                raise DataError(f"{path}:{lineno}: not a JSON object with {names} field{'s' * (len(fields) > 1)} "
                                f"({exc.__class__.__name__})") from None


def read_table(path: Path, column: str, delimiter: str = ",") -> Iterator[str]:
    """The ``column`` of every row of a CSV/TSV file with a header row."""
    for (value,) in read_columns(path, (column,), delimiter):
        yield value


def read_columns(path: Path, columns: tuple[str, ...], delimiter: str = ",") -> Iterator[tuple[str, ...]]:
    """The ``columns`` of every row of a CSV/TSV file with a header row."""
    with open_text(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for column in columns:
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise DataError(f"{path}: no column '{column}' (columns: {', '.join(reader.fieldnames or [])}); "
                                f"set data.text_field / data.prompt_field")
        for lineno, row in enumerate(reader, 2):
            values = tuple(row[column] for column in columns)
            if any(v is None for v in values):
                raise DataError(f"{path}:{lineno}: the row lacks a value for {', '.join(columns)}")
            yield values


class Document:
    """The pieces of one document of a file, and where it starts there (for error messages): a text
    document at ``line`` of ``path``, or ``record`` of a structured file (JSONL, CSV, FASTA...)."""

    def __init__(self, pieces: Iterable[str], path: Path, line: int = 1, record: int | None = None,
                 start: int = 0):
        self.pieces, self.path, self.line, self.record, self.start = pieces, path, line, record, start

    def __iter__(self) -> Iterator[str]:
        return iter(self.pieces)

    def locate(self, offset: int) -> str:
        """``path:line:column`` of character ``offset`` of the document (a whole-file document is
        read again: this is for errors only)."""
        if self.record is not None:
            return f"{self.path}, record {self.record}, character {offset + 1}"
        pieces = self.pieces
        if not isinstance(pieces, list):  # streamed from the file: read it again from its start
            pieces, offset = _read_pieces(self.path), offset + self.start
        line, column, seen = self.line, offset + 1, 0
        for piece in pieces:
            part = piece[:max(0, offset - seen)]
            line += part.count("\n")
            if "\n" in part:
                column = offset - seen - part.rfind("\n")
            seen += len(piece)
            if seen >= offset:
                break
        return f"{self.path}:{line}:{column}"


def _documents_of_file(path: Path, mode: str, text_field: str,
                       prompt_field: str | None = None) -> Iterator[Document]:
    fmt = file_format(path)
    if prompt_field:  # supervised pairs: the document is [prompt, response]
        if fmt == "jsonl":
            pairs = read_jsonl(path, (prompt_field, text_field))
        elif fmt in ("csv", "tsv"):
            pairs = read_columns(path, (prompt_field, text_field), "," if fmt == "csv" else "\t")
        else:
            raise DataError(f"{path}: prompt/response pairs (data.prompt_field) need .jsonl, .csv or .tsv files")
        for i, (prompt, response) in enumerate(pairs, 1):
            yield Document([str(prompt), str(response)], path, record=i)
        return
    if fmt in ("fasta", "fastq"):  # one document per record
        for i, (_, sequence) in enumerate((read_fasta if fmt == "fasta" else read_fastq)(path), 1):
            yield Document([sequence], path, record=i)
        return
    if fmt in ("csv", "tsv"):
        for i, value in enumerate(read_table(path, text_field, "," if fmt == "csv" else "\t"), 1):
            yield Document([value], path, record=i)
        return
    if _is_jsonl(path):
        for i, (text,) in enumerate(read_jsonl(path, (text_field,)), 1):
            yield Document([text], path, record=i)
        return
    if mode == "file":
        yield Document(_read_pieces(path), path)
        return
    with open_text(path) as f:
        if mode == "line":
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield Document([line.rstrip("\n")], path, lineno)
            return
        paragraph: list[str] = []
        start = 1
        for lineno, line in enumerate(f, 1):
            if line.strip():
                if not paragraph:
                    start = lineno
                paragraph.append(line)
            elif paragraph:
                yield Document(["".join(paragraph).rstrip("\n")], path, start)
                paragraph = []
        if paragraph:
            yield Document(["".join(paragraph).rstrip("\n")], path, start)


def _list_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"folder {path} holds no files")
        return files
    raise DataError(f"data path not found: {path}")


class FilesCorpus(Corpus):
    """Plain text files and folders (``.xz``/``.zip`` allowed, ``.jsonl`` with a text field).

    Splits come from ``valid_path``/``test_path`` when given. Otherwise the documents of ``path`` are
    split contiguously by fraction (the last ``test_fraction`` is test); a single document (one file
    with ``documents: file``) is split by characters instead.
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
        fractions = (cfg.valid_fraction, cfg.test_fraction)
        if not self.explicit and (min(fractions) < 0 or sum(fractions) >= 1):
            raise DataError(f"data.valid_fraction + data.test_fraction must lie in [0, 1), got {fractions}")
        self._bounds: tuple[int, int, int] | None = None

    def _all_documents(self, files: list[Path]) -> Iterator[Iterable[str]]:
        for f in files:
            yield from _documents_of_file(f, self.cfg.documents, self.cfg.text_field, self.cfg.prompt_field)

    def _split_bounds(self) -> tuple[str, int, int, int]:
        files = self.files["train"]
        single = (len(files) == 1 and self.cfg.documents == "file" and file_format(files[0]) == "text"
                  and not self.cfg.prompt_field)
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
            yield Document(_read_range(self.files["train"][0], start, end), self.files["train"][0], start=start)
            return
        for i, doc in enumerate(self._all_documents(self.files["train"])):
            if i >= end:
                return
            if i >= start:
                yield doc

    def fingerprint(self, split: str) -> str:
        files = self.files.get(split if self.explicit else "train", [])
        c = self.cfg
        return json.dumps([split, [_file_id(f) for f in files], c.documents, c.text_field,
                           self.explicit, c.valid_fraction, c.test_fraction]
                          + ([c.prompt_field] if c.prompt_field else []))


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
        field = self.cfg.text_field
        for record in self._load(split):
            if field not in record:
                raise DataError(f"dataset {self.cfg.path} has no field '{field}' (has {list(record)})")
            yield [record[field]]

    def fingerprint(self, split: str) -> str:
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
        with open_text(self._file(split)) as f:
            for line in f:
                yield [wikitext_detokenize(line) if line.strip() else ""]

    def fingerprint(self, split: str) -> str:
        return f"{self.name}|{_file_id(self._file(split))}|lines-detokenized"


def shipped_corpus_path() -> Path:
    return Path(__file__).parent / "assets" / "tinyshakespeare.txt.xz"


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
    import difflib

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


# ----------------------------------------------------------------------------- tokenized cache

def default_cache_dir() -> Path:
    return Path(os.environ.get("UNMASK_CACHE", Path.home() / ".cache" / "unmask"))


class TokenStream:
    """A tokenized split on disk: ``tokens`` (memory-mapped) and the start of every document."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.meta = json.loads((directory / "meta.json").read_text())
        n = self.meta["n_tokens"]
        self.tokens = (np.memmap(directory / "tokens.bin", dtype=self.meta["dtype"], mode="r", shape=(n,))
                       if n else np.zeros(0, dtype=self.meta["dtype"]))
        self.doc_starts = np.fromfile(directory / "doc_starts.bin", dtype=np.int64)
        prompts = directory / "prompt_lengths.bin"
        self.prompt_lengths = np.fromfile(prompts, dtype=np.int64) if prompts.exists() else None

    def __len__(self) -> int:
        return self.meta["n_tokens"]


def tokenize_split(corpus: Corpus, split: str, tokenizer: Tokenizer, insert_eos: bool,
                   cache_dir: Path | None = None, progress: bool = False, prompted: bool = False) -> TokenStream:
    """Tokenize one split into ``cache_dir`` (once; later calls reuse it). Written atomically.
    ``prompted``: the first piece of every document is its prompt, whose token count is kept."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = json.dumps([CACHE_VERSION, corpus.fingerprint(split), tokenizer.fingerprint(), insert_eos]
                     + (["prompted"] if prompted else []))
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    final = cache_dir / f"{corpus.name}-{split}-{digest}"
    if (final / "meta.json").exists():
        return TokenStream(final)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    n_tokens, n_chars, starts, prompt_lengths = 0, 0, [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"tokenizing {corpus.name}/{split}", unit=" chars", unit_scale=True, leave=False)
    try:
        with open(tmp / "tokens.bin", "wb") as out:
            pieces: list[str] = []
            offsets: list[int] = []
            doc_ids: list[tuple[int, Iterable[str]]] = []
            firsts: list[bool] = []
            lasts: list[bool] = []

            def flush():
                nonlocal n_tokens, n_chars
                if hasattr(tokenizer, "encode_batch"):
                    encoded = tokenizer.encode_batch(pieces)
                else:
                    encoded = []
                    for piece, offset, (index, doc) in zip(pieces, offsets, doc_ids):
                        try:
                            encoded.append(tokenizer.encode(piece, offset=offset))
                        except OutOfVocabularyError as exc:
                            where = (doc.locate(exc.position) if isinstance(doc, Document) else
                                     f"{corpus.name} {split} split, document {index}, character {exc.position}")
                            raise DataError(f"{where}: {exc.reason}") from None
                for ids, piece, first, last in zip(encoded, pieces, firsts, lasts):
                    if first:
                        starts.append(n_tokens)
                        if prompted:
                            prompt_lengths.append(len(ids))
                    if last and insert_eos:
                        ids = np.append(ids, tokenizer.eos_id)
                    ids.astype(dtype).tofile(out)
                    n_tokens += len(ids)
                    n_chars += len(piece)
                    if bar is not None:
                        bar.update(len(piece))
                for buffer in (pieces, offsets, doc_ids, firsts, lasts):
                    buffer.clear()

            buffered = 0
            for doc_index, doc in enumerate(corpus.documents(split)):
                offset, first = 0, True
                remaining = iter(doc)
                piece = next(remaining, None)
                while piece is not None:
                    following = next(remaining, None)
                    pieces.append(piece)
                    offsets.append(offset)
                    doc_ids.append((doc_index, doc))
                    firsts.append(first)
                    lasts.append(following is None)
                    first = False
                    offset += len(piece)
                    buffered += len(piece)
                    piece = following
                    if buffered >= BLOCK_CHARS or len(pieces) >= 4096:
                        flush()
                        buffered = 0
            flush()
        if n_tokens == 0:
            raise DataError(f"{corpus.name} {split} split is empty")
        np.asarray(starts, dtype=np.int64).tofile(tmp / "doc_starts.bin")
        if prompted:
            np.asarray(prompt_lengths, dtype=np.int64).tofile(tmp / "prompt_lengths.bin")
        meta = {"corpus": corpus.name, "split": split, "n_tokens": n_tokens, "n_docs": len(starts),
                "n_chars": n_chars, "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
                "insert_eos": insert_eos, "key": key}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return TokenStream(final)


# ----------------------------------------------------------------------------- layouts

class Rows:
    """Fixed-length rows of a tokenized split. ``get(indices)`` -> (ids, kinds), both (n, L)."""

    length: int

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class WrapRows(Rows):
    """MDLM ``wrap=True``: the document stream cut into chunks, framed ``[BOS] chunk [EOS]``."""

    def __init__(self, stream: TokenStream, length: int, frame: bool, tokenizer: Tokenizer):
        self.stream, self.length, self.frame = stream, length, frame
        self.bos, self.eos = tokenizer.bos_id, tokenizer.eos_id
        self.chunk = length - 2 if frame else length
        self.n = len(stream) // self.chunk
        if self.n == 0:
            raise DataError(f"{stream.meta['corpus']} {stream.meta['split']} split has {len(stream)} "
                            f"tokens, fewer than one row of {length}")

    def __len__(self) -> int:
        return self.n

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        ids = np.empty((len(indices), self.length), dtype=np.int64)
        body = slice(1, -1) if self.frame else slice(None)
        for row, i in enumerate(indices):
            ids[row, body] = self.stream.tokens[i * self.chunk:(i + 1) * self.chunk]
        kinds = np.where(ids == self.eos, EOS, TOKEN).astype(np.int8)
        if self.frame:
            ids[:, 0], ids[:, -1] = self.bos, self.eos
            kinds[:, 0], kinds[:, -1] = BOS, EOS
        return ids, kinds


class PadRows(Rows):
    """MDLM ``wrap=False``: one document per row, ``[BOS] doc [EOS] [PAD]...``, truncated to fit.

    Empty documents are skipped; ``truncated`` counts the documents cut short.
    """

    def __init__(self, stream: TokenStream, length: int, tokenizer: Tokenizer, pad_with_eos: bool = False):
        self.stream, self.length, self.pad_with_eos = stream, length, pad_with_eos
        self.bos, self.eos, self.pad = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        starts = stream.doc_starts
        ends = np.append(starts[1:], len(stream))
        keep = ends > starts
        self.starts, self.ends = starts[keep], ends[keep]
        self.prompts = None if stream.prompt_lengths is None else stream.prompt_lengths[keep]
        self.truncated = int(((self.ends - self.starts) > length - 2).sum())
        # rows whose prompt fills the row: nothing of their response is left to learn or score
        self.prompt_overflow = 0 if self.prompts is None else int((self.prompts >= length - 2).sum())
        if len(self.starts) == 0:
            raise DataError(f"{stream.meta['corpus']} {stream.meta['split']} split has no documents")

    def __len__(self) -> int:
        return len(self.starts)

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        ids = np.full((len(indices), self.length), self.pad, dtype=np.int64)
        kinds = np.full((len(indices), self.length), PAD, dtype=np.int8)
        for row, i in enumerate(indices):
            doc = self.stream.tokens[self.starts[i]:min(self.ends[i], self.starts[i] + self.length - 2)]
            n = len(doc)
            ids[row, 0], kinds[row, 0] = self.bos, BOS
            ids[row, 1:n + 1], kinds[row, 1:n + 1] = doc, TOKEN
            if self.prompts is not None:
                kinds[row, 1:1 + min(int(self.prompts[i]), n)] = PROMPT
            ids[row, n + 1], kinds[row, n + 1] = self.eos, EOS
            if self.pad_with_eos:
                ids[row, n + 2:], kinds[row, n + 2:] = self.eos, EOS
        return ids, kinds


def random_lengths(ids: np.ndarray, kinds: np.ndarray, selected: np.ndarray, u: np.ndarray,
                   pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """SMDM's variable-length training: each ``selected`` row keeps its first ``1 + floor(u L)``
    positions (a length uniform on 1..L) and the rest becomes PAD (not counted, never noised), so a
    model trained on fixed-length rows also sees ends. The pads stay visible to the network: rows
    keep their fixed shape (SMDM feeds genuinely shorter sequences)."""
    ids, kinds = ids.copy(), kinds.copy()
    lengths = 1 + np.floor(u * ids.shape[1]).astype(np.int64)
    cut = selected[:, None] & (np.arange(ids.shape[1])[None, :] >= lengths[:, None])
    ids[cut], kinds[cut] = pad_id, PAD
    return ids, kinds


def counted_positions(kinds: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Which positions count in losses and metrics (and are noised): tokens always; BOS, EOS and
    PAD as configured; prompt positions never. Positions that do not count are kept clean, so a bound is a bound on the
    counted tokens given the others."""
    counted = kinds == TOKEN
    for kind, flag in ((BOS, cfg.count_bos), (EOS, cfg.count_eos), (PAD, cfg.count_pad)):
        if flag:
            counted |= kinds == kind
    return counted


class BatchOrder:
    """Deterministic order of rows: step ``s`` reads positions ``[s*B, (s+1)*B)`` of the endless
    sequence of per-epoch permutations (each seeded by ``(seed, epoch)``). Depends only on the step,
    so resuming at step ``s`` continues exactly."""

    def __init__(self, n_rows: int, batch_size: int, seed: int, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.shuffle = n_rows, batch_size, seed, shuffle
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                          else np.arange(self.n))
        return self._perm

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.n

    def batch(self, step: int) -> np.ndarray:
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(positions // self.n):
            sel = positions // self.n == epoch
            out[sel] = self._permutation(int(epoch))[positions[sel] % self.n]
        return out


# ----------------------------------------------------------------------------- assembly

class Data:
    """The tokenizer and the row sets of a :class:`DataConfig`, split by split, built lazily."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer | None = None, progress: bool = False):
        self.cfg = cfg
        self.corpus = make_corpus(cfg)
        self.progress = progress
        if tokenizer is None:
            try:
                tokenizer = build_tokenizer(cfg.tokenizer, cfg.tokenizer_path, cfg.alphabet, cfg.oov,
                                            cfg.oov_replacement, corpus_symbols=self.corpus.symbols)
            except (OSError, ValueError) as exc:
                raise DataError(str(exc)) from None
        self.tokenizer = tokenizer
        self._rows: dict[str, Rows] = {}

    def stream(self, split: str) -> TokenStream:
        if split not in SPLITS:
            raise DataError(f"unknown split '{split}'; known: {', '.join(SPLITS)}")
        insert_eos = self.cfg.insert_eos and self.cfg.layout == "wrap"
        cache = Path(self.cfg.cache_dir) if self.cfg.cache_dir else None
        return tokenize_split(self.corpus, split, self.tokenizer, insert_eos, cache, self.progress,
                              prompted=bool(self.cfg.prompt_field))

    def rows(self, split: str) -> Rows:
        if split not in self._rows:
            stream = self.stream(split)
            if self.cfg.layout == "wrap":
                self._rows[split] = WrapRows(stream, self.cfg.length, self.cfg.frame, self.tokenizer)
            else:
                rows = PadRows(stream, self.cfg.length, self.tokenizer, self.cfg.pad_with_eos)
                if rows.prompt_overflow:
                    print(f"warning: {rows.prompt_overflow} {split} prompts fill the whole row of "
                          f"{self.cfg.length} tokens (no response left); raise data.length", file=sys.stderr)
                self._rows[split] = rows
        return self._rows[split]
