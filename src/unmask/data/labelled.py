"""Labelled rows for sequence classification (CSV/TSV/JSONL with a text and a label column)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import RunConfig
from .readers import DataError, file_format, read_jsonl, read_table
from .tokenization import OutOfVocabularyError, Tokenizer


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


class LabelledSplit:
    """One split in memory: ``ids`` (N, L), ``keep`` (N, L), ``labels`` (N,) class indices."""

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

    def __len__(self) -> int:
        return len(self.labels)
