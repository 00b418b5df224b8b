"""Tokenizers: character-level (any closed alphabet; text8's 27 symbols; DNA), byte-level, and any
Hugging Face ``tokenizers`` model (GPT-2 BPE from ``encoder.json`` + ``vocab.bpe``, or a
``tokenizer.json``).

Every tokenizer has explicit ``bos_id``, ``eos_id``, ``pad_id`` and ``mask_id``; a mask token is
appended when the underlying vocabulary has none (GPT-2: mask 50257, vocabulary 50258, BOS = EOS =
PAD = 50256, as in MDLM). ``encode`` never adds special tokens; layouts add them.

Character and byte tokenizers are a lookup table (NumPy) rather than a ``tokenizers`` model: the
mapping is trivial, and the closed-alphabet policy (error naming the symbol and position, or a
documented replacement) needs exact control over out-of-alphabet text.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as TK

from ..files import UnsafeFileError, member, read_json
from ..hub import hub_reachable

TEXT8_ALPHABET = "abcdefghijklmnopqrstuvwxyz "


OOV_POLICIES = ("error", "replace", "drop")


META_FILE = "unmask_tokenizer.json"


class OutOfVocabularyError(ValueError):
    """Text contains a symbol outside a closed alphabet."""

    def __init__(self, symbol: str, position: int, where: str = ""):
        self.symbol, self.position = symbol, position
        self.reason = (f"symbol {symbol!r} (U+{ord(symbol):04X}) is outside the tokenizer's alphabet; set "
                       f"data.oov=replace (with data.oov_replacement) or data.oov=drop to map or remove such symbols")
        where = f" {where}" if where else ""
        super().__init__(f"symbol {symbol!r} (U+{ord(symbol):04X}) at character {position}{where} is outside the "
                         f"tokenizer's alphabet; set data.oov=replace (with data.oov_replacement) or data.oov=drop "
                         f"to map or remove such symbols")


class TokenizerFileError(ValueError):
    """A saved tokenizer that cannot be read (malformed, incomplete, unknown kind)."""


class Tokenizer:
    """Common interface. ``vocab_size`` counts every id the model sees, the mask included."""

    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    mask_id: int

    def encode(self, text: str, offset: int = 0) -> np.ndarray:
        """Token ids of ``text`` (no special tokens). ``offset`` only shifts positions in errors."""
        raise NotImplementedError

    def decode(self, ids, skip_special: bool = True) -> str:
        """The text of ``ids`` (any shape); with ``skip_special`` the special tokens are left out, else shown by
        name."""
        raise NotImplementedError

    chat_template: str | None = None  # a model's Jinja chat template (Hugging Face tokenizers that have one)

    @property
    def special_ids(self) -> set[int]:
        """The ids of the four roles: BOS, EOS, PAD and mask."""
        return {self.bos_id, self.eos_id, self.pad_id, self.mask_id}

    def special_token_ids(self) -> set[int]:
        """Every id of a special token (an answer ends at the first one it generates)."""
        return self.special_ids

    def token_str(self, i: int) -> str:
        """A printable form of one id, used when showing partially masked canvases."""
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary of {self.vocab_size}")
        names = {self.mask_id: "[MASK]", self.bos_id: "[BOS]", self.eos_id: "[EOS]", self.pad_id: "[PAD]"}
        return names.get(i) or self.decode([i], skip_special=False)

    def describe(self) -> dict:
        """Everything that defines the tokenizer, as JSON-able data (what :meth:`save` writes)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A short hash of :meth:`describe` (part of the token cache's key)."""
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]

    def vocabulary(self) -> dict:
        """What fixes the ids (the description without the out-of-alphabet policy): equal
        vocabularies mean a model trained with one reads text tokenized by the other."""
        return {k: v for k, v in self.describe().items() if k not in ("oov", "oov_replacement")}

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer into ``directory`` (read back by :func:`load_tokenizer`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META_FILE).write_text(json.dumps(self.describe(), indent=1))


class CharTokenizer(Tokenizer):
    """One id per symbol of a closed alphabet, then BOS, EOS, PAD, MASK."""

    kind = "char"

    def __init__(self, alphabet: str, oov: str = "error", oov_replacement: str = " "):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet has repeated symbols")
        if not alphabet:
            raise ValueError("alphabet is empty")
        if oov not in OOV_POLICIES:
            raise ValueError(f"oov policy {oov!r} is not one of {OOV_POLICIES}")
        if oov == "replace" and (len(oov_replacement) != 1 or oov_replacement not in alphabet):
            raise ValueError(f"oov_replacement {oov_replacement!r} must be one symbol of the alphabet")
        self.alphabet, self.oov, self.oov_replacement = alphabet, oov, oov_replacement
        n = len(alphabet)
        self.bos_id, self.eos_id, self.pad_id, self.mask_id = n, n + 1, n + 2, n + 3
        self.vocab_size = n + 4
        codes = np.array([ord(c) for c in alphabet], dtype=np.int64)
        self._order = np.argsort(codes)
        self._sorted_codes = codes[self._order]
        self._symbols = np.array(list(alphabet), dtype=object)

    @classmethod
    def from_corpus_symbols(cls, symbols: set[str], **kw) -> "CharTokenizer":
        """The tokenizer whose alphabet is ``symbols``, in code point order."""
        return cls("".join(sorted(symbols)), **kw)

    def encode(self, text: str, offset: int = 0) -> np.ndarray:
        """Token ids (n,) of ``text``; out-of-alphabet symbols raise, are replaced or dropped as ``oov`` says."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        pos = np.searchsorted(self._sorted_codes, codes).clip(max=len(self._sorted_codes) - 1)
        known = self._sorted_codes[pos] == codes
        ids = self._order[pos]
        if not known.all():
            bad = np.flatnonzero(~known)
            if self.oov == "error":
                raise OutOfVocabularyError(text[bad[0]], offset + int(bad[0]))
            if self.oov == "replace":
                ids[bad] = self.alphabet.index(self.oov_replacement)
            else:
                ids = ids[known]
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        """The symbols of ``ids``; special tokens left out with ``skip_special``, else shown by name."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = len(self.alphabet)
        if skip_special:
            return "".join(self._symbols[ids[ids < n]])
        return "".join(self.alphabet[i] if i < n else self.token_str(int(i)) for i in ids)

    def describe(self) -> dict:
        """Kind, alphabet and out-of-alphabet policy."""
        return {"kind": self.kind, "alphabet": self.alphabet, "oov": self.oov,
                "oov_replacement": self.oov_replacement}


DNA_ALPHABET = "ACGTN"


IUPAC_AMBIGUITY = "RYSWKMBDHVU"


class DNATokenizer(CharTokenizer):
    """Nucleotides A, C, G, T and N (unknown base), then BOS, EOS, PAD, MASK.

    Lower case (soft-masked repeats in genome files) reads as upper case; decoding gives upper case.
    Any other symbol, the IUPAC ambiguity codes R Y S W K M B D H V and RNA's U included, is an error
    naming it and its position, unless ``oov="replace"`` (each becomes ``N``, the documented mapping:
    an ambiguity code is a base we do not know) or ``oov="drop"``.
    """

    kind = "dna"

    def __init__(self, oov: str = "error", oov_replacement: str = "N"):
        super().__init__(DNA_ALPHABET, oov, oov_replacement)

    def encode(self, text: str, offset: int = 0) -> np.ndarray:
        """Token ids (n,) of ``text`` read as upper case."""
        return super().encode(text.upper(), offset)

    def describe(self) -> dict:
        """Kind and out-of-alphabet policy (the alphabet is fixed)."""
        return {"kind": self.kind, "oov": self.oov, "oov_replacement": self.oov_replacement}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then BOS, EOS, PAD, MASK. Any text round-trips."""

    kind = "byte"

    def __init__(self):
        self.bos_id, self.eos_id, self.pad_id, self.mask_id = 256, 257, 258, 259
        self.vocab_size = 260

    def encode(self, text: str, offset: int = 0) -> np.ndarray:
        """The UTF-8 bytes (n,) of ``text``."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids, skip_special: bool = True) -> str:
        """The text of ``ids`` (invalid UTF-8 replaced); special tokens left out with ``skip_special``, else shown by
        name."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not skip_special:  # decode runs of bytes together so multi-byte characters survive
            out, run = [], []
            for i in ids.tolist() + [None]:
                if i is not None and i < 256:
                    run.append(i)
                    continue
                out.append(bytes(run).decode("utf-8", errors="replace"))
                run = []
                if i is not None:
                    out.append(self.token_str(i))
            return "".join(out)
        return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        """The kind alone (the vocabulary is fixed)."""
        return {"kind": self.kind}


MASK_CANDIDATES = ("<mask>", "[MASK]", "<|mask|>")


BOS_CANDIDATES = ("<s>", "[CLS]", "<|begin_of_text|>", "<bos>", "<|endoftext|>")


EOS_CANDIDATES = ("</s>", "[SEP]", "<|end_of_text|>", "<eos>", "<|endoftext|>")


PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` with explicit special ids.

    BOS/EOS/PAD/mask are looked up among common names (``<s>``, ``[CLS]``, ``<|endoftext|>``, ...).
    A missing mask token is appended as ``<|mask|>`` (id = previous vocabulary size); a missing PAD
    reuses EOS (as MDLM does for GPT-2, keeping its vocabulary of 50258).
    """

    kind = "hf"

    def __init__(self, tokenizer, source: str = "", ids: dict[str, int] | None = None,
                 chat_template: str | None = None):
        """``ids`` (keys ``bos``, ``eos``, ``pad``, ``mask``) fixes special ids a model's config states
        (LLaDA's mask 126336, Dream's 151666) instead of looking them up by name; ``chat_template``
        is the model's Jinja chat template (``tokenizer_config.json``)."""
        self.tk, self.source, self.chat_template = tokenizer, source, chat_template
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        given = {k: v for k, v in (ids or {}).items() if v is not None}
        for name, value in given.items():
            if name not in ("bos", "eos", "pad", "mask") or not isinstance(value, int) or not 0 <= value < size:
                raise ValueError(f"tokenizer {source!r}: {name} id {value!r} is not an id of its {size} tokens")

        def find(candidates):
            return next((vocab[c] for c in candidates if c in vocab), None)

        bos, eos = given.get("bos", find(BOS_CANDIDATES)), given.get("eos", find(EOS_CANDIDATES))
        if bos is None and eos is None:
            raise ValueError(f"tokenizer {source!r} has neither a BOS nor an EOS token among "
                             f"{BOS_CANDIDATES + EOS_CANDIDATES}")
        self.bos_id = bos if bos is not None else eos
        self.eos_id = eos if eos is not None else bos
        pad = given.get("pad", find(PAD_CANDIDATES))
        self.pad_id = pad if pad is not None else self.eos_id
        mask = given.get("mask", find(MASK_CANDIDATES))
        self.appended_mask = mask is None  # the mask token is new: no model has an embedding for it yet
        if mask is None:

            tokenizer.add_special_tokens([AddedToken("<|mask|>", special=True)])
            mask = tokenizer.token_to_id("<|mask|>")
        self.mask_id = mask
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._special = sorted(self.special_ids)

    @classmethod
    def gpt2_from_files(cls, directory: str | Path, vocab: str = "encoder.json",
                        merges: str = "vocab.bpe") -> "HFTokenizer":
        """GPT-2 byte-level BPE from ``encoder.json`` + ``vocab.bpe`` (the original release files; the
        Hugging Face names are ``vocab.json`` + ``merges.txt``)."""
        directory = Path(directory)
        for name in (vocab, merges):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"GPT-2 tokenizer file not found: {directory / name}")
        tk = TK(models.BPE.from_file(str(directory / vocab), str(directory / merges)))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
        return cls(tk, source=f"gpt2:{directory}")

    @classmethod
    def from_file(cls, path: str | Path, source: str | None = None, ids: dict[str, int] | None = None,
                  chat_template: str | None = None) -> "HFTokenizer":
        """The tokenizer of a ``tokenizer.json`` file (or the one in folder ``path``); ``ids`` and ``chat_template``
        as in the constructor."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        read_json(path)  # size limit, UTF-8 and JSON errors that name the file
        try:
            tk = TK.from_file(str(path))
        except Exception as exc:  # the Rust parser's own error type: one line naming the file
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TokenizerFileError(f"unreadable tokenizer file {path}: {first}") from None
        try:
            return cls(tk, source=source or str(path), ids=ids, chat_template=chat_template)
        except ValueError as exc:
            raise TokenizerFileError(f"unusable tokenizer file {path}: {exc}") from None

    @classmethod
    def from_hub(cls, name: str) -> "HFTokenizer":
        """``tokenizer.json`` of the hub repository ``name``: downloaded when the hub is reachable,
        else from the local Hugging Face cache."""
        from huggingface_hub import hf_hub_download

        online = hub_reachable()
        try:
            path = hf_hub_download(name, "tokenizer.json", local_files_only=not online)
        except Exception as exc:  # network, missing repo, not cached: one line that says which
            why = str(exc).splitlines()[0] if online and str(exc) else "the hub is unreachable and it is not cached"
            raise OSError(f"could not load tokenizer '{name}' from the Hugging Face hub ({why}); give "
                          f"data.tokenizer_path to a local tokenizer instead") from None
        tok = cls.from_file(path)
        tok.source = f"hub:{name}"
        return tok

    def encode(self, text: str, offset: int = 0) -> np.ndarray:
        """Token ids (n,) of ``text``, without special tokens."""
        return np.asarray(self.tk.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def piece(self, i: int) -> str:
        """The token's own text (special tokens as written in templates, e.g. ``<|eot_id|>``)."""
        return self.tk.id_to_token(i)

    def special_token_ids(self) -> set[int]:
        """Every id of a special token: the four roles and the tokenizer's added special tokens (end of
        turn, headers, ...)."""
        added = {i for i, token in self.tk.get_added_tokens_decoder().items() if token.special}
        return added | self.special_ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each of ``texts`` (batched encoding), without special tokens."""
        return [np.asarray(e.ids, dtype=np.int64)
                for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special: bool = True) -> str:
        """The text of ``ids``; with ``skip_special`` the special tokens are left out."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if skip_special:
            return self.tk.decode([i for i in ids if i not in self.special_ids], skip_special_tokens=True)
        return self.tk.decode(ids, skip_special_tokens=False)

    def describe(self) -> dict:
        """Source, vocabulary size, special ids, a hash of the tokenizer's JSON and its chat template."""
        out = {"kind": self.kind, "source": self.source, "vocab_size": self.vocab_size,
               "bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id, "mask": self.mask_id,
               "sha": hashlib.sha256(self.tk.to_str().encode()).hexdigest()[:16]}
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        return out

    def save(self, directory: str | Path) -> None:
        """Write the description and ``tokenizer.json`` into ``directory``."""
        super().save(directory)
        self.tk.save(str(Path(directory) / "tokenizer.json"))


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Inverse of :meth:`Tokenizer.save`; a missing, malformed or incomplete file is a
    :class:`TokenizerFileError` naming it."""
    directory = Path(directory)
    meta_path = member(directory, META_FILE)
    if not meta_path.is_file():
        raise FileNotFoundError(f"no tokenizer in {directory} ({META_FILE} missing)")
    try:
        meta = read_json(meta_path)
        kind = meta["kind"]
        if kind == "char":
            return CharTokenizer(meta["alphabet"], meta["oov"], meta["oov_replacement"])
        if kind == "dna":
            return DNATokenizer(meta["oov"], meta["oov_replacement"])
        if kind == "byte":
            return ByteTokenizer()
        if kind == "hf":
            template = meta.get("chat_template")
            return HFTokenizer.from_file(member(directory, "tokenizer.json"), source=str(meta["source"]),
                                         ids={k: meta[k] for k in ("bos", "eos", "pad", "mask")},
                                         chat_template=template if isinstance(template, str) else None)
    except (KeyError, TypeError, ValueError, AttributeError, UnsafeFileError) as exc:
        what = f"lacks the key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise TokenizerFileError(f"unreadable tokenizer {meta_path}: {what}") from None
    raise TokenizerFileError(f"unknown tokenizer kind {kind!r} in {meta_path}")


def with_oov_policy(tokenizer: Tokenizer, oov: str, replacement: str = " ") -> Tokenizer:
    """``tokenizer`` with another out-of-alphabet policy (character and DNA tokenizers; others as they
    are). The ids do not change, so a model trained with one policy reads text under another."""
    if isinstance(tokenizer, DNATokenizer):
        return tokenizer if oov == tokenizer.oov else DNATokenizer(oov, "N" if replacement == " " else replacement)
    if isinstance(tokenizer, CharTokenizer) and oov != tokenizer.oov:
        return CharTokenizer(tokenizer.alphabet, oov, replacement)
    return tokenizer


TOKENIZER_KINDS = ("char", "text8", "dna", "byte", "gpt2", "hf")


def build_tokenizer(kind: str, path: str | None = None, alphabet: str | None = None,
                    oov: str = "error", oov_replacement: str = " ",
                    corpus_symbols=None) -> Tokenizer:
    """Make the tokenizer a config names.

    ``char`` uses ``alphabet`` or, when none is given, the symbols of the corpus (``corpus_symbols``
    is a zero-argument callable returning them, so it is only scanned when needed). ``gpt2`` reads
    ``encoder.json`` + ``vocab.bpe`` (or a ``tokenizer.json``) from ``path``, or the hub when no path
    is given. ``hf`` reads a ``tokenizer.json`` file or folder, or a hub id.
    """
    if kind == "text8":
        return CharTokenizer(alphabet or TEXT8_ALPHABET, oov, oov_replacement)
    if kind == "dna":
        if alphabet is not None:
            raise ValueError("data.alphabet does not apply to the dna tokenizer (A, C, G, T, N)")
        return DNATokenizer(oov, "N" if oov_replacement == " " else oov_replacement.upper())
    if kind == "char":
        if alphabet is None:
            if corpus_symbols is None:
                raise ValueError("a char tokenizer needs data.alphabet or a corpus to build it from")
            alphabet = "".join(sorted(corpus_symbols()))
        return CharTokenizer(alphabet, oov, oov_replacement)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":
        if path is None:
            return HFTokenizer.from_hub("gpt2")
        p = Path(path)
        if (p / "encoder.json").exists() or not ((p / "tokenizer.json").exists() or p.is_file()):
            return HFTokenizer.gpt2_from_files(p)
        return HFTokenizer.from_file(p)
    if kind == "hf":
        if path is None:
            raise ValueError("data.tokenizer=hf needs data.tokenizer_path (a tokenizer.json or hub id)")
        p = Path(path)
        return HFTokenizer.from_file(p) if p.exists() else HFTokenizer.from_hub(path)
    raise ValueError(f"unknown tokenizer '{kind}'; known: {', '.join(TOKENIZER_KINDS)}")
