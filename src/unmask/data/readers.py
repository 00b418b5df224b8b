"""Reading text files: UTF-8 streams (optionally compressed), FASTA/FASTQ/CSV/TSV/JSONL records, and
documents that know where they start."""

from __future__ import annotations

import csv
import gzip
import io
import json
import lzma
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .chat import ChatTemplateError

BLOCK_CHARS = 1 << 20


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
        """Up to ``size`` characters (all with -1), as :meth:`io.TextIOBase.read`."""
        return self._decoded(self.stream.read, size)

    def readline(self) -> str:
        """The next line (empty at the end)."""
        return self._decoded(self.stream.readline)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def close(self) -> None:
        """Close the stream and what it reads from."""
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


def _documents_of_file(path: Path, mode: str, text_field: str, prompt_field: str | None = None,
                       chat: tuple[str, Callable] | None = None) -> Iterator[Document]:
    """The documents of one file; ``chat``: (field, pair) reads conversations from that JSONL field and
    makes each a [prompt, response] document with ``pair(messages)``."""
    fmt = file_format(path)
    if chat is not None:
        field, pair = chat
        if fmt != "jsonl":
            raise DataError(f"{path}: conversations (data.messages_field) need a .jsonl file")
        for i, (messages,) in enumerate(read_jsonl(path, (field,)), 1):
            try:
                yield Document(list(pair(messages)), path, record=i)
            except ChatTemplateError as exc:
                raise DataError(f"{path}: conversation {i}: {exc}") from None
        return
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
