"""Labelled rows for sequence classification (CSV/TSV/JSONL with a text and a label column): the data
of a ``family: classifier`` run, with the interface of :class:`~unmask.data.dataset.Data`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig
from .layouts import PAD, TOKEN, Rows
from .readers import DataError, file_format, read_jsonl, read_table
from .tokenization import OutOfVocabularyError, Tokenizer, build_tokenizer


def read_labelled(path: str | Path, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
    """(texts, labels as strings) of a CSV/TSV/JSONL file."""
    path = Path(path)
    fmt = file_format(path)
    if fmt in ("csv", "tsv"):
        delimiter = "," if fmt == "csv" else "\t"
        texts = list(read_table(path, text_field, delimiter))
        labels = list(read_table(path, label_field, delimiter))
        return texts, labels
    if fmt == "jsonl":
        rows = list(read_jsonl(path, (text_field, label_field)))
        return [text for text, _ in rows], [str(label) for _, label in rows]
    raise DataError(f"{path}: labelled data must be .csv, .tsv or .jsonl (optionally .xz/.gz), not '{path.name}'")


def label_names(labels: list[str]) -> list[str]:
    """Class names in index order: integers in numeric order when every label is one, else sorted."""
    unique = set(labels)
    if all(label.lstrip("-").isdigit() for label in unique):
        return [str(v) for v in sorted(int(label) for label in unique)]
    return sorted(unique)


def encode_rows(texts: list[str], tokenizer: Tokenizer, length: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[BOS] text [EOS] [PAD]...`` rows (N, length) and their non-padding positions (N, length)."""
    ids = torch.full((len(texts), length), tokenizer.pad_id, dtype=torch.long)
    keep = torch.zeros(len(texts), length, dtype=torch.bool)
    for i, text in enumerate(texts):
        try:
            tokens = tokenizer.encode(text)[:length - 2].tolist()
        except OutOfVocabularyError as exc:
            raise DataError(f"{where}, row {i + 1}: {exc}") from None
        row = [tokenizer.bos_id, *tokens, tokenizer.eos_id]
        ids[i, :len(row)] = torch.tensor(row)
        keep[i, :len(row)] = True
    return ids, keep


class LabelledSplit(Rows):
    """One split in memory: ``ids`` (N, L), ``keep`` (N, L) its non-padding positions, ``labels`` (N,)
    class indices. As :class:`~unmask.data.layouts.Rows`, ``get`` gives the ids of ``[BOS] text [EOS]
    [PAD]...`` rows and their kinds: every non-padding position, BOS and EOS included, is a token of
    the sequence the classifier reads (``data.count_*`` do not apply), padding is padding."""

    def __init__(self, path: str, cfg: RunConfig, tokenizer: Tokenizer, names: list[str]):
        texts, labels = read_labelled(path, cfg.data.text_field, cfg.data.label_field)
        if not texts:
            raise DataError(f"{path} holds no rows")
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise DataError(f"{path}: labels {unknown[:5]} are not among the classes {names}")
        self.ids, self.keep = encode_rows(texts, tokenizer, cfg.data.length, str(path))
        self.labels = torch.tensor([index[label] for label in labels])
        self.length = cfg.data.length
        self.kinds = np.where(self.keep.numpy(), TOKEN, PAD).astype(np.int8)

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids and kinds, both (n, L), of the rows at ``indices``."""
        return self.ids.numpy()[indices], self.kinds[indices]


class LabelledData:
    """The tokenizer and the labelled splits of a classifier run (``data.path`` train,
    ``data.valid_path``, ``data.test_path``). The classes are ``classifier.labels`` or, when unset,
    those of the training file, written into ``cfg`` so that the run's config names them."""

    def __init__(self, cfg: RunConfig, tokenizer: Tokenizer | None = None):
        d = cfg.data
        texts, labels = read_labelled(d.path, d.text_field, d.label_field)
        names = cfg.classifier.labels or label_names(labels)
        if len(names) < 2:
            raise DataError(f"{d.path}: a classifier needs at least two classes, found {names}")
        cfg.classifier.labels = names
        if tokenizer is None:
            try:
                tokenizer = build_tokenizer(d.tokenizer, d.tokenizer_path, d.alphabet, d.oov, d.oov_replacement,
                                            corpus_symbols=lambda: set("".join(texts)))
            except (OSError, ValueError) as exc:
                raise DataError(str(exc)) from None
        self.cfg, self.tokenizer, self.names = cfg, tokenizer, names
        self.paths = {"train": d.path, "valid": d.valid_path, "test": d.test_path}
        self._rows: dict[str, LabelledSplit] = {}

    def has(self, split: str) -> bool:
        """Whether the run has a file for ``split``."""
        return bool(self.paths.get(split))

    def rows(self, split: str) -> LabelledSplit:
        """The rows of ``split`` (read and tokenized once); an error when it has no file."""
        if not self.has(split):
            raise DataError(f"this classifier has no {split} file: set data.{split}_path")
        if split not in self._rows:
            self._rows[split] = LabelledSplit(self.paths[split], self.cfg, self.tokenizer, self.names)
        return self._rows[split]
