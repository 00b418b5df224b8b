"""Tokenized splits on disk: one memory-mapped token file per split, keyed by source and tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from .corpora import Corpus
from .readers import BLOCK_CHARS, DataError, Document
from .tokenization import OutOfVocabularyError, Tokenizer

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """The token cache folder: ``$UNMASK_CACHE``, else ``~/.cache/unmask``."""
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
