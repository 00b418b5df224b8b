"""The data of a run: corpus, tokenizer, token caches and row layout of each split."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from ..config import DataConfig
from .cache import TokenStream, tokenize_split
from .chat import chat_pair
from .corpora import SPLITS, FilesCorpus, make_corpus
from .layouts import PadRows, Rows, WrapRows
from .readers import DataError
from .tokenization import Tokenizer, build_tokenizer


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
        if cfg.messages_field:
            if not isinstance(self.corpus, FilesCorpus):
                raise DataError("conversations (data.messages_field) are read from JSONL files: data.dataset=text")
            if tokenizer.chat_template is not None:
                pair = functools.partial(chat_pair, tokenizer.chat_template,
                                         bos_token=tokenizer.piece(tokenizer.bos_id),
                                         eos_token=tokenizer.piece(tokenizer.eos_id))
                self.corpus.use_chat_template(pair, tokenizer.chat_template)
        self._rows: dict[str, Rows] = {}

    def stream(self, split: str) -> TokenStream:
        """The tokenized ``split`` (tokenized into the cache on first use)."""
        if split not in SPLITS:
            raise DataError(f"unknown split '{split}'; known: {', '.join(SPLITS)}")
        insert_eos = self.cfg.insert_eos and self.cfg.layout == "wrap"
        cache = Path(self.cfg.cache_dir) if self.cfg.cache_dir else None
        return tokenize_split(self.corpus, split, self.tokenizer, insert_eos, cache, self.progress,
                              prompted=bool(self.cfg.prompt_field or self.cfg.messages_field))

    def rows(self, split: str) -> Rows:
        """The rows of ``split`` in the configured layout (``wrap`` or ``pad``), built once."""
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
