"""Tests for unmask.data: corpora and splits, the tokenized cache, row layouts, counted positions
and the resumable batch order."""

from __future__ import annotations

import json
import lzma
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from unmask.config import DataConfig
from unmask.data import corpora, readers
from unmask.data.cache import tokenize_split
from unmask.data.corpora import (
    SHAKESPEARE_CHARS,
    SHAKESPEARE_SPLITS,
    shipped_corpus_path,
)
from unmask.data.dataset import Data
from unmask.data.layouts import (
    BOS,
    EOS,
    PAD,
    TOKEN,
    BatchOrder,
    PadRows,
    WrapRows,
    counted_positions,
)
from unmask.data.readers import DataError
from unmask.data.tokenization import CharTokenizer

from toys import GPT2_DIR, TEXT8_PREFIX


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test tokenizes into its own cache folder (never the home cache)."""
    directory = tmp_path / "unmask-cache"
    monkeypatch.setenv("UNMASK_CACHE", str(directory))
    return directory


def text_cfg(path, **kw) -> DataConfig:
    """A 'text' dataset with no valid/test fraction unless asked (all documents are train)."""
    kw.setdefault("valid_fraction", 0.0)
    kw.setdefault("test_fraction", 0.0)
    return DataConfig(dataset="text", path=str(path), **kw)


def all_rows(rows):
    return rows.get(np.arange(len(rows)))


def cache_entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ----------------------------------------------------------------------------- wrap layout

def test_wrap_framed_rows_are_bos_chunk_eos(tmp_path):
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(103))
    (tmp_path / "c.txt").write_text(text)
    L = 10
    d = Data(text_cfg(tmp_path / "c.txt", tokenizer="char", alphabet="abcdefghijklmnopqrstuvwxyz",
                      length=L, insert_eos=False))
    tok = d.tokenizer
    stream = tok.encode(text)
    rows = d.rows("train")
    assert isinstance(rows, WrapRows)
    assert len(rows) == len(text) // (L - 2) == 12  # the partial chunk (7 tokens) is dropped
    ids, kinds = all_rows(rows)
    assert ids.shape == kinds.shape == (12, L)
    for i in range(len(rows)):
        expected = [tok.bos_id] + stream[i * (L - 2):(i + 1) * (L - 2)].tolist() + [tok.eos_id]
        assert ids[i].tolist() == expected
    assert (kinds[:, 0] == BOS).all() and (kinds[:, -1] == EOS).all()
    assert (kinds[:, 1:-1] == TOKEN).all()
    # rows can be read in any order and repeated
    ids2, _ = rows.get(np.array([5, 0, 5]))
    assert ids2.tolist() == [ids[5].tolist(), ids[0].tolist(), ids[5].tolist()]


def test_wrap_unframed_rows_are_plain_chunks(tmp_path):
    text = "abcab" * 9  # 45 chars
    (tmp_path / "c.txt").write_text(text)
    L = 8
    d = Data(text_cfg(tmp_path / "c.txt", tokenizer="char", alphabet="abc", length=L, frame=False,
                      insert_eos=False))
    stream = d.tokenizer.encode(text)
    rows = d.rows("train")
    assert len(rows) == 45 // L == 5
    ids, kinds = all_rows(rows)
    assert ids.tolist() == stream[:5 * L].reshape(5, L).tolist()
    assert (kinds == TOKEN).all()
    assert not np.isin(ids, list(d.tokenizer.special_ids)).any()


def test_wrap_inserts_eos_between_documents(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    docs = ["aaaa", "bb", "ccccc"]
    for i, doc in enumerate(docs):
        (folder / f"{i}.txt").write_text(doc)
    L = 5
    d = Data(text_cfg(folder, tokenizer="char", alphabet="abc", length=L, frame=False))
    tok = d.tokenizer
    stream = d.stream("train")
    expected = []
    for doc in docs:
        expected += tok.encode(doc).tolist() + [tok.eos_id]
    assert np.asarray(stream.tokens).tolist() == expected  # aaaa E bb E ccccc E
    assert stream.meta["n_docs"] == 3 and stream.doc_starts.tolist() == [0, 5, 8]
    rows = d.rows("train")
    assert len(rows) == len(expected) // L == 2
    ids, kinds = all_rows(rows)
    assert ids.reshape(-1).tolist() == expected[:2 * L]
    # an EOS inside the body is marked as EOS, everything else as a token
    assert kinds.reshape(-1).tolist() == [EOS if t == tok.eos_id else TOKEN for t in expected[:2 * L]]

    framed = Data(text_cfg(folder, tokenizer="char", alphabet="abc", length=L + 2))
    ids, kinds = framed.rows("train").get([0])
    assert ids[0].tolist() == [tok.bos_id, 0, 0, 0, 0, tok.eos_id, tok.eos_id]
    assert kinds[0].tolist() == [BOS, TOKEN, TOKEN, TOKEN, TOKEN, EOS, EOS]


def test_wrap_without_insert_eos_joins_documents(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, doc in enumerate(["aaaa", "bb", "ccccc"]):
        (folder / f"{i}.txt").write_text(doc)
    d = Data(text_cfg(folder, tokenizer="char", alphabet="abc", length=4, frame=False, insert_eos=False))
    stream = d.stream("train")
    assert d.tokenizer.decode(np.asarray(stream.tokens)) == "aaaabbccccc"
    assert d.tokenizer.eos_id not in np.asarray(stream.tokens)
    assert stream.doc_starts.tolist() == [0, 4, 6]
    ids, kinds = all_rows(d.rows("train"))
    assert len(ids) == 11 // 4
    assert (kinds == TOKEN).all()


def test_wrap_too_short_split_raises(tmp_path):
    (tmp_path / "c.txt").write_text("abc")
    d = Data(text_cfg(tmp_path / "c.txt", tokenizer="char", alphabet="abc", length=8))
    with pytest.raises(DataError, match="fewer than one row of 8"):
        d.rows("train")


# ----------------------------------------------------------------------------- pad layout

def _jsonl(path: Path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def test_pad_rows_layout_truncation_and_empty_docs(tmp_path):
    docs = ["ab", "", "abcabcabcab", "c", ""]
    path = _jsonl(tmp_path / "docs.jsonl", docs)
    L = 6
    d = Data(text_cfg(path, tokenizer="char", alphabet="abc", layout="pad", length=L))
    tok = d.tokenizer
    # the pad layout never inserts EOS into the stream
    assert d.stream("train").meta["insert_eos"] is False
    rows = d.rows("train")
    assert isinstance(rows, PadRows)
    assert len(rows) == 3  # the two empty documents are skipped
    assert rows.truncated == 1
    ids, kinds = all_rows(rows)
    B, E, P = tok.bos_id, tok.eos_id, tok.pad_id
    assert ids.tolist() == [
        [B, 0, 1, E, P, P],
        [B, 0, 1, 2, 0, E],  # "abcabcabcab" cut to L-2 = 4 tokens
        [B, 2, E, P, P, P],
    ]
    assert kinds.tolist() == [
        [BOS, TOKEN, TOKEN, EOS, PAD, PAD],
        [BOS, TOKEN, TOKEN, TOKEN, TOKEN, EOS],
        [BOS, TOKEN, EOS, PAD, PAD, PAD],
    ]
    ids_b, _ = rows.get([2, 0])
    assert ids_b.tolist() == [ids[2].tolist(), ids[0].tolist()]


def test_pad_rows_doc_of_exactly_length_minus_two_is_not_truncated(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ["abca", "abcab"])
    d = Data(text_cfg(path, tokenizer="char", alphabet="abc", layout="pad", length=6))
    rows = d.rows("train")
    assert rows.truncated == 1
    ids, kinds = all_rows(rows)
    assert (kinds == PAD).sum() == 0
    assert ids[0].tolist() == [3, 0, 1, 2, 0, 4]


def test_pad_rows_with_gpt2_ids_use_kinds_not_ids(tmp_path):
    """With BOS = EOS = PAD (GPT-2 style), kinds still say which position is which."""
    from tokenizers import Tokenizer as TK
    from tokenizers import models, pre_tokenizers

    from unmask.data.tokenization import HFTokenizer

    tk = TK(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "<|endoftext|>": 3}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = HFTokenizer(tk)
    assert tok.bos_id == tok.eos_id == tok.pad_id == 3
    path = _jsonl(tmp_path / "d.jsonl", ["a b", "b"])
    d = Data(text_cfg(path, layout="pad", length=5), tokenizer=tok)
    ids, kinds = all_rows(d.rows("train"))
    assert ids.tolist() == [[3, 1, 2, 3, 3], [3, 2, 3, 3, 3]]
    assert kinds.tolist() == [[BOS, TOKEN, TOKEN, EOS, PAD], [BOS, TOKEN, EOS, PAD, PAD]]


# ----------------------------------------------------------------------------- counted positions

def test_counted_positions_flags():
    kinds = np.array([[BOS, TOKEN, TOKEN, EOS, PAD, PAD]], dtype=np.int8)

    def counted(**flags):
        return counted_positions(kinds, DataConfig(**flags))[0].tolist()

    assert counted() == [True, True, True, True, False, False]  # defaults: BOS, EOS yes; PAD no
    assert counted(count_bos=False, count_eos=False, count_pad=False) == [False, True, True, False, False, False]
    assert counted(count_bos=True, count_eos=False, count_pad=False) == [True, True, True, False, False, False]
    assert counted(count_bos=False, count_eos=True, count_pad=False) == [False, True, True, True, False, False]
    assert counted(count_bos=False, count_eos=False, count_pad=True) == [False, True, True, False, True, True]
    assert counted(count_bos=True, count_eos=True, count_pad=True) == [True] * 6
    assert counted_positions(kinds, DataConfig()).dtype == bool


# ----------------------------------------------------------------------------- token cache

def test_tokenize_split_caches_and_reuses(tmp_path, cache):
    path = tmp_path / "c.txt"
    path.write_text("abcab" * 20)
    cfg = text_cfg(path, tokenizer="char", alphabet="abc", length=6)
    first = Data(cfg)
    ids1, kinds1 = all_rows(first.rows("train"))
    entries = cache_entries(cache)
    assert len(entries) == 1 and entries[0].startswith("text-train-")  # no .tmp- leftovers

    second = Data(cfg)

    def no_encode(*args, **kwargs):
        raise AssertionError("split tokenized again although it is cached")

    second.tokenizer.encode = no_encode
    ids2, kinds2 = all_rows(second.rows("train"))
    assert ids2.tolist() == ids1.tolist() and kinds2.tolist() == kinds1.tolist()
    assert cache_entries(cache) == entries

    stream = second.stream("train")
    assert isinstance(stream.tokens, np.memmap)
    assert stream.tokens.dtype == np.uint16
    assert stream.meta["n_tokens"] == len(stream) == 101  # 100 chars + EOS
    assert stream.meta["n_chars"] == 100 and stream.meta["n_docs"] == 1
    assert (cache / entries[0] / "tokens.bin").stat().st_size == 101 * 2


def test_cache_dir_from_config_and_key_changes(tmp_path, cache):
    path = tmp_path / "c.txt"
    path.write_text("abcab" * 20)
    own = tmp_path / "own-cache"
    base = dict(tokenizer="char", alphabet="abc", length=6, cache_dir=str(own))
    Data(text_cfg(path, **base)).rows("train")
    assert not cache.exists()  # data.cache_dir wins over UNMASK_CACHE
    assert len(cache_entries(own)) == 1
    Data(text_cfg(path, **{**base, "insert_eos": False})).rows("train")
    assert len(cache_entries(own)) == 2  # insert_eos is part of the key
    Data(text_cfg(path, **{**base, "alphabet": "cba"})).rows("train")
    assert len(cache_entries(own)) == 3  # so is the tokenizer
    Data(text_cfg(path, **{**base, "length": 12})).rows("train")
    assert len(cache_entries(own)) == 3  # the row length is not: same tokens


def test_changed_corpus_gets_a_new_cache(tmp_path, cache):
    path = tmp_path / "c.txt"
    path.write_text("aaaa" * 10)
    cfg = text_cfg(path, tokenizer="char", alphabet="ab", length=4, frame=False, insert_eos=False)
    ids, _ = all_rows(Data(cfg).rows("train"))
    assert (ids == 0).all()
    path.write_text("bbbb" * 10)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    ids, _ = all_rows(Data(cfg).rows("train"))
    assert (ids == 1).all()
    assert len(cache_entries(cache)) == 2


def test_large_vocab_uses_uint32(tmp_path, cache):
    n = 65_540  # EOS = n + 1 does not fit in uint16
    alphabet = "".join(chr(0x10000 + i) for i in range(n))
    tok = CharTokenizer(alphabet)
    text = alphabet[-3:] + alphabet[:2]
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    d = Data(text_cfg(tmp_path / "c.txt", length=4), tokenizer=tok)
    stream = d.stream("train")
    assert stream.tokens.dtype == np.uint32
    assert np.asarray(stream.tokens).tolist() == [n - 3, n - 2, n - 1, 0, 1, n + 1]


def test_tokenize_split_directly(tmp_path):
    """The module-level function with an explicit cache_dir, and a char-range corpus."""
    path = tmp_path / "t.txt"
    path.write_text("0123456789")
    corpus = corpora.CharRangeCorpus("digits", path, {"train": (0, 6), "valid": (6, 8), "test": (8, 10)})
    tok = CharTokenizer("0123456789")
    out = tmp_path / "c"
    s = tokenize_split(corpus, "valid", tok, insert_eos=False, cache_dir=out)
    assert np.asarray(s.tokens).tolist() == [6, 7]
    assert s.directory.parent == out and s.directory.name.startswith("digits-valid-")
    again = tokenize_split(corpus, "valid", tok, insert_eos=False, cache_dir=out)
    assert again.directory == s.directory


def test_unknown_split_raises(tmp_path):
    (tmp_path / "c.txt").write_text("abc" * 10)
    with pytest.raises(DataError, match="unknown split 'validation'"):
        Data(text_cfg(tmp_path / "c.txt", tokenizer="byte")).rows("validation")


# ----------------------------------------------------------------------------- batch order

def test_batch_order_deterministic_and_seeded():
    a = [BatchOrder(50, 8, seed=3).batch(s).tolist() for s in range(10)]
    b = [BatchOrder(50, 8, seed=3).batch(s).tolist() for s in range(10)]
    c = [BatchOrder(50, 8, seed=4).batch(s).tolist() for s in range(10)]
    assert a == b
    assert a != c


def test_batch_order_epoch_is_permutation():
    n, bs = 48, 6
    order = BatchOrder(n, bs, seed=0)
    epoch0 = np.concatenate([order.batch(s) for s in range(n // bs)])
    epoch1 = np.concatenate([order.batch(s) for s in range(n // bs, 2 * n // bs)])
    assert sorted(epoch0.tolist()) == list(range(n))
    assert sorted(epoch1.tolist()) == list(range(n))
    assert epoch0.tolist() != list(range(n))  # shuffled
    assert epoch0.tolist() != epoch1.tolist()  # a fresh permutation each epoch
    assert order.batch(0).dtype == np.int64
    assert order.epoch_of(n // bs) == 1.0


def test_batch_order_resumable_in_any_query_order():
    n, bs, steps = 23, 5, 20  # batches straddle epoch boundaries
    reference = BatchOrder(n, bs, seed=11)
    expected = {s: reference.batch(s).tolist() for s in range(steps)}
    shuffled = np.random.default_rng(0).permutation(steps)
    other = BatchOrder(n, bs, seed=11)
    for s in shuffled:
        assert other.batch(int(s)).tolist() == expected[int(s)]
    # a fresh instance that starts mid-run (a resumed run) reads the same batches
    assert BatchOrder(n, bs, seed=11).batch(13).tolist() == expected[13]
    # the positions of the endless sequence are the per-epoch permutations laid end to end
    flat = sum((expected[s] for s in range(steps)), [])
    for e in range(steps * bs // n):
        assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))


def test_batch_order_crossing_epoch_boundary():
    n, bs = 10, 4
    order = BatchOrder(n, bs, seed=5)
    perm0 = np.random.default_rng([5, 0]).permutation(n)
    perm1 = np.random.default_rng([5, 1]).permutation(n)
    assert order.batch(2).tolist() == [perm0[8], perm0[9], perm1[0], perm1[1]]
    assert order.batch(0).tolist() == perm0[:4].tolist()
    assert order.batch(3).tolist() == perm1[2:6].tolist()


def test_batch_order_batch_larger_than_rows():
    order = BatchOrder(3, 7, seed=0, shuffle=False)
    assert order.batch(0).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert order.batch(1).tolist() == [1, 2, 0, 1, 2, 0, 1]


def test_batch_order_without_shuffle_is_sequential():
    order = BatchOrder(10, 4, seed=123, shuffle=False)
    assert [order.batch(s).tolist() for s in range(4)] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5]]


# ----------------------------------------------------------------------------- tinyshakespeare (shipped)

def test_tinyshakespeare_split_ranges():
    d = Data(DataConfig(dataset="tinyshakespeare", tokenizer="char", insert_eos=False))
    assert len(d.tokenizer.alphabet) == 65
    with lzma.open(shipped_corpus_path(), "rt", encoding="utf-8", newline="") as f:
        full = f.read()
    assert len(full) == SHAKESPEARE_CHARS == 1_115_394
    expected = {"train": 1_003_854, "valid": 1_059_624 - 1_003_854, "test": 1_115_394 - 1_059_624}
    for split, n in expected.items():
        s = d.stream(split)
        assert s.meta["n_chars"] == n
        assert s.meta["n_tokens"] == n  # one token per character
        start = SHAKESPEARE_SPLITS[split][0]
        assert d.tokenizer.decode(np.asarray(s.tokens[:200])) == full[start:start + 200]
        assert d.tokenizer.decode(np.asarray(s.tokens[-50:])) == full[start + n - 50:start + n]


def test_tinyshakespeare_insert_eos_adds_one_token_per_split():
    d = Data(DataConfig(dataset="tinyshakespeare", tokenizer="char", length=128))
    s = d.stream("valid")
    assert s.meta["n_tokens"] == 1_059_624 - 1_003_854 + 1
    assert int(s.tokens[-1]) == d.tokenizer.eos_id
    assert len(d.rows("valid")) == s.meta["n_tokens"] // 126


# ----------------------------------------------------------------------------- text datasets

def test_text_single_file_split_by_characters(tmp_path):
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abc \n"), size=1000))
    path = tmp_path / "c.txt"
    path.write_text(text)
    d = Data(text_cfg(path, tokenizer="char", alphabet="abc \n", valid_fraction=0.1, test_fraction=0.2,
                      insert_eos=False))
    parts = {}
    for split in ("train", "valid", "test"):
        s = d.stream(split)
        parts[split] = d.tokenizer.decode(np.asarray(s.tokens))
        assert s.meta["n_chars"] == len(parts[split])
    assert {k: len(v) for k, v in parts.items()} == {"train": 700, "valid": 100, "test": 200}
    assert parts["train"] + parts["valid"] + parts["test"] == text


def test_text_empty_split_and_bad_fractions(tmp_path):
    (tmp_path / "c.txt").write_text("abc" * 10)
    d = Data(text_cfg(tmp_path / "c.txt", tokenizer="byte", valid_fraction=0.0, test_fraction=0.5))
    assert d.stream("test").meta["n_chars"] == 15
    with pytest.raises(DataError, match="empty valid split"):
        d.stream("valid")
    with pytest.raises(DataError, match="valid_fraction"):
        Data(text_cfg(tmp_path / "c.txt", tokenizer="byte", valid_fraction=0.5, test_fraction=0.5))


def test_text_folder_split_by_documents(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    names = [f"f{i:02d}.txt" for i in range(8)] + ["sub/g.txt", "sub/h.txt"]
    for i, name in enumerate(names):
        (folder / name).write_text(f"doc{i}")
    (folder / ".hidden.txt").write_text("SECRET")
    (folder / ".git").mkdir()
    (folder / ".git" / "x").write_text("SECRET")
    d = Data(text_cfg(folder, tokenizer="byte", layout="pad", length=16,
                      valid_fraction=0.2, test_fraction=0.1))
    got = {}
    for split in ("train", "valid", "test"):
        ids, kinds = all_rows(d.rows(split))
        got[split] = [d.tokenizer.decode(row[k == TOKEN]) for row, k in zip(ids, kinds)]
    assert got == {"train": [f"doc{i}" for i in range(7)], "valid": ["doc7", "doc8"], "test": ["doc9"]}


def test_text_explicit_valid_and_test_paths(tmp_path):
    for name, body in [("train.txt", "aaaa bbbb"), ("valid.txt", "cc"), ("test.txt", "dd dd")]:
        (tmp_path / name).write_text(body)
    cfg = DataConfig(dataset="text", path=str(tmp_path / "train.txt"), valid_path=str(tmp_path / "valid.txt"),
                     test_path=str(tmp_path / "test.txt"), tokenizer="char", insert_eos=False, length=3,
                     frame=False)
    d = Data(cfg)
    assert d.tokenizer.alphabet == " abcd"  # built from every split
    assert {s: d.tokenizer.decode(np.asarray(d.stream(s).tokens)) for s in ("train", "valid", "test")} == \
        {"train": "aaaa bbbb", "valid": "cc", "test": "dd dd"}

    only_valid = Data(DataConfig(dataset="text", path=str(tmp_path / "train.txt"),
                                 valid_path=str(tmp_path / "valid.txt"), tokenizer="byte"))
    assert only_valid.stream("valid").meta["n_chars"] == 2
    with pytest.raises(DataError, match="no test split"):
        only_valid.stream("test")


def test_text_documents_line(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("first line\n\n   \nsecond\nthird one\n")
    d = Data(text_cfg(path, tokenizer="byte", layout="pad", length=16, documents="line"))
    ids, kinds = all_rows(d.rows("train"))
    assert [d.tokenizer.decode(r) for r in ids] == ["first line", "second", "third one"]
    assert d.stream("train").meta["n_docs"] == 3


def test_text_documents_blank_line(tmp_path):
    path = tmp_path / "paras.txt"
    path.write_text("para one\nstill one\n\n\n\npara two\n\npara three\nend")
    d = Data(text_cfg(path, tokenizer="byte", layout="pad", length=32, documents="blank_line"))
    ids, _ = all_rows(d.rows("train"))
    assert [d.tokenizer.decode(r) for r in ids] == ["para one\nstill one", "para two", "para three\nend"]


def test_text_documents_line_split_by_fraction(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line{i}\n" for i in range(10)))
    d = Data(text_cfg(path, tokenizer="byte", layout="pad", length=16, documents="line",
                      valid_fraction=0.3, test_fraction=0.2))
    dec = {s: [d.tokenizer.decode(r) for r in all_rows(d.rows(s))[0]] for s in ("train", "valid", "test")}
    assert dec == {"train": [f"line{i}" for i in range(5)], "valid": ["line5", "line6", "line7"],
                   "test": ["line8", "line9"]}


def test_a_shuffled_split_partitions_the_documents_by_a_fixed_permutation(tmp_path):
    """``data.split_order=shuffled``: every document lands in exactly one split, in file order, the
    sizes are the contiguous split's, the assignment does not depend on the run (the seed is fixed),
    and an ordered file's held-out documents are no longer its last ones."""
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line{i}\n" for i in range(40)))

    def splits(cache):
        d = Data(text_cfg(path, tokenizer="byte", layout="pad", length=16, documents="line", valid_fraction=0.25,
                          test_fraction=0.25, split_order="shuffled", cache_dir=str(tmp_path / cache)))
        return {s: [d.tokenizer.decode(r) for r in all_rows(d.rows(s))[0]] for s in ("train", "valid", "test")}

    dec = splits("a")
    assert [len(dec[s]) for s in ("train", "valid", "test")] == [20, 10, 10]
    assert sorted(sum(dec.values(), []), key=lambda x: int(x[4:])) == [f"line{i}" for i in range(40)]
    assert all(v == sorted(v, key=lambda x: int(x[4:])) for v in dec.values())
    assert dec["test"] != [f"line{i}" for i in range(30, 40)] and splits("b") == dec
    contiguous = Data(text_cfg(path, tokenizer="byte", layout="pad", length=16, documents="line", valid_fraction=0.25,
                               test_fraction=0.25, cache_dir=str(tmp_path / "a")))  # the same cache: its own entry
    assert [contiguous.tokenizer.decode(r) for r in all_rows(contiguous.rows("test"))[0]] == \
        [f"line{i}" for i in range(30, 40)]
    single = tmp_path / "one.txt"
    single.write_text("abc" * 50)
    with pytest.raises(DataError, match="split_order=shuffled needs documents"):
        Data(text_cfg(single, tokenizer="byte", test_fraction=0.2, split_order="shuffled")).rows("test")


def test_text_jsonl_with_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "first doc", "id": 1}) + "\n\n" +
                    json.dumps({"body": "second\ndoc", "id": 2}) + "\n")
    d = Data(text_cfg(path, tokenizer="byte", layout="pad", length=16, text_field="body"))
    ids, _ = all_rows(d.rows("train"))
    assert [d.tokenizer.decode(r) for r in ids] == ["first doc", "second\ndoc"]
    with pytest.raises(DataError, match=r"d\.jsonl:1: .*'text' field"):
        Data(text_cfg(path, tokenizer="byte", layout="pad")).rows("train")


def test_text_jsonl_bad_line_names_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2:"):
        Data(text_cfg(path, tokenizer="byte")).rows("train")


def test_text_jsonl_xz_is_split_by_documents(tmp_path):
    path = tmp_path / "d.jsonl.xz"
    with lzma.open(path, "wt", encoding="utf-8") as f:
        for i in range(10):
            f.write(json.dumps({"text": f"record {i}"}) + "\n")
    d = Data(text_cfg(path, tokenizer="byte", layout="pad", length=16, test_fraction=0.2))
    train = [d.tokenizer.decode(r) for r in all_rows(d.rows("train"))[0]]
    test = [d.tokenizer.decode(r) for r in all_rows(d.rows("test"))[0]]
    assert train == [f"record {i}" for i in range(8)]
    assert test == ["record 8", "record 9"]


def test_text_xz_and_zip_files(tmp_path):
    text = "hello compressed world\n" * 3
    with lzma.open(tmp_path / "a.txt.xz", "wt", encoding="utf-8") as f:
        f.write(text)
    with zipfile.ZipFile(tmp_path / "b.zip", "w") as z:
        z.writestr("inner.txt", text)
    for name in ("a.txt.xz", "b.zip"):
        d = Data(text_cfg(tmp_path / name, tokenizer="byte", insert_eos=False))
        assert d.tokenizer.decode(np.asarray(d.stream("train").tokens)) == text
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as z:
        z.writestr("x.txt", "a")
        z.writestr("y.txt", "b")
    with pytest.raises(DataError, match="exactly one file, found 2"):
        Data(text_cfg(tmp_path / "two.zip", tokenizer="byte")).rows("train")


def test_text_newlines_are_kept_verbatim(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"a\r\nb\rc\n")
    d = Data(text_cfg(path, tokenizer="byte", insert_eos=False))
    assert np.asarray(d.stream("train").tokens).tolist() == list(b"a\r\nb\rc\n")


def test_text_oov_error_names_symbol_position_and_document(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("abc\nab#c\n")
    with pytest.raises(DataError) as info:
        Data(text_cfg(path, tokenizer="char", alphabet="abc\n")).rows("train")
    msg = str(info.value)
    assert msg.startswith(f"{path}:2:3: symbol '#'"), msg  # file:line:column

    with pytest.raises(DataError) as info:
        Data(text_cfg(path, tokenizer="char", alphabet="abc", documents="line")).rows("train")
    assert str(info.value).startswith(f"{path}:2:3: symbol '#'")
    with pytest.raises(DataError) as info:  # the valid split of one file starts part-way into it
        Data(text_cfg(path, tokenizer="char", alphabet="abc\n", valid_fraction=0.5, test_fraction=0.0)).rows("valid")
    assert str(info.value).startswith(f"{path}:2:3: symbol '#'")
    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text("abc\n\nab\nc#\n")
    with pytest.raises(DataError) as info:
        Data(text_cfg(paragraphs, tokenizer="char", alphabet="abc\n", documents="blank_line")).rows("train")
    assert str(info.value).startswith(f"{paragraphs}:4:2: symbol '#'")
    records = tmp_path / "r.jsonl"
    records.write_text('{"text": "abc"}\n{"text": "a#"}\n')
    with pytest.raises(DataError) as info:
        Data(text_cfg(records, tokenizer="char", alphabet="abc")).rows("train")
    assert str(info.value).startswith(f"{records}, record 2, character 2: symbol '#'")


def test_oov_position_counts_across_pieces(tmp_path, monkeypatch):
    """A document read in several pieces reports the position within the whole document."""
    monkeypatch.setattr(readers, "BLOCK_CHARS", 4)
    path = tmp_path / "c.txt"
    path.write_text("ab\nab\nabc\naa\nb!a\n")  # '!' at character 14
    with pytest.raises(DataError) as info:
        Data(text_cfg(path, tokenizer="char", alphabet="abc\n")).rows("train")
    assert str(info.value).startswith(f"{path}:5:2: symbol '!'")  # character 14


def test_oov_replace_and_drop_in_corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("ab#c")
    rep = Data(text_cfg(path, tokenizer="char", alphabet="abc ", oov="replace", insert_eos=False))
    assert rep.tokenizer.decode(np.asarray(rep.stream("train").tokens)) == "ab c"
    drop = Data(text_cfg(path, tokenizer="char", alphabet="abc", oov="drop", insert_eos=False))
    assert drop.tokenizer.decode(np.asarray(drop.stream("train").tokens)) == "abc"


def test_char_alphabet_built_from_corpus(tmp_path):
    (tmp_path / "c.txt").write_text("zebra\nZ")
    d = Data(text_cfg(tmp_path / "c.txt", tokenizer="char"))
    assert d.tokenizer.alphabet == "\nZaberz"


def test_gpt2_tokenizer_through_data(tmp_path):
    if not (GPT2_DIR / "encoder.json").is_file():
        pytest.skip(f"GPT-2 tokenizer files not found in {GPT2_DIR} (shared data absent)")
    from unmask.data.tokenization import HFTokenizer

    tok = HFTokenizer.gpt2_from_files(GPT2_DIR)
    path = _jsonl(tmp_path / "d.jsonl", ["Hello world", "Hello world, again and again."])
    d = Data(text_cfg(path, length=8), tokenizer=tok)
    stream = d.stream("train")
    assert stream.tokens.dtype == np.uint16
    expected = [15496, 995, 50256] + tok.encode("Hello world, again and again.").tolist() + [50256]
    assert np.asarray(stream.tokens).tolist() == expected
    ids, kinds = d.rows("train").get([0])
    assert ids[0].tolist() == [50256, 15496, 995, 50256] + expected[3:6] + [50256]
    assert kinds[0].tolist() == [BOS, TOKEN, TOKEN, EOS, TOKEN, TOKEN, TOKEN, EOS]


# ----------------------------------------------------------------------------- text8

def test_text8_prefix_test_split_matches_file():
    if not TEXT8_PREFIX.is_file():
        pytest.skip(f"text8 prefix not found at {TEXT8_PREFIX} (shared data absent)")
    d = Data(DataConfig(dataset="text8-prefix", path=str(TEXT8_PREFIX), tokenizer="text8", length=256))
    s = d.stream("test")
    assert s.meta["n_chars"] == 1_250_000
    assert s.meta["n_tokens"] == 1_250_001  # plus the EOS closing the split
    with lzma.open(TEXT8_PREFIX, "rt", encoding="utf-8") as f:
        f.read(11_250_000)
        head = f.read(1000)
    assert d.tokenizer.decode(np.asarray(s.tokens[:1000])) == head
    assert len(d.rows("test")) == 1_250_001 // 254


def test_text8_wrong_size_zip_raises(tmp_path):
    path = tmp_path / "text8.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("text8", " anarchism originated as a term" * 10)
    with pytest.raises(DataError, match="text8-prefix") as info:
        Data(DataConfig(dataset="text8", path=str(path), tokenizer="text8"))
    assert "310 characters" in str(info.value)


def test_text8_needs_path():
    for name in ("text8", "text8-prefix"):
        with pytest.raises(DataError, match="needs data.path"):
            Data(DataConfig(dataset=name, tokenizer="text8"))


# ----------------------------------------------------------------------------- errors

def test_unknown_dataset_lists_known_names():
    with pytest.raises(DataError) as info:
        Data(DataConfig(dataset="tinyshakspeare"))
    msg = str(info.value)
    assert "unknown dataset 'tinyshakspeare'" in msg and "did you mean 'tinyshakespeare'" in msg
    for name in ("tinyshakespeare", "text8", "text8-prefix", "text", "hf"):
        assert name in msg


@pytest.mark.parametrize("dataset", ["text", "text8", "text8-prefix", "tinyshakespeare"])
def test_missing_file_raises_data_error_naming_path(tmp_path, dataset):
    missing = tmp_path / "nowhere" / "corpus.txt"
    with pytest.raises(DataError, match="not found") as info:
        Data(DataConfig(dataset=dataset, path=str(missing), tokenizer="text8")).rows("train")
    assert str(missing) in str(info.value)


def test_empty_folder_and_missing_path_option(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        Data(text_cfg(tmp_path / "empty", tokenizer="byte"))
    with pytest.raises(DataError, match="needs data.path"):
        Data(DataConfig(dataset="text", tokenizer="byte"))
    with pytest.raises(DataError, match="needs data.path"):
        Data(DataConfig(dataset="hf", tokenizer="byte"))


def test_empty_split_raises(tmp_path):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(DataError, match="empty") as info:
        Data(text_cfg(tmp_path / "e.txt", tokenizer="byte")).rows("train")
    assert "train_fraction" not in str(info.value)  # a key that does not exist
    assert str(tmp_path / "e.txt") in str(info.value) and "data.valid_fraction" in str(info.value)


@pytest.mark.parametrize("name", ["latin.txt", "latin.txt.xz", "latin.jsonl"])
def test_a_file_that_is_not_utf8_is_named(tmp_path, name):
    import lzma

    text = '{"text": "caf\xe9"}\n' if name.endswith(".jsonl") else "caf\xe9 au lait\n" * 10
    data = text.encode("latin-1")
    (tmp_path / name).write_bytes(lzma.compress(data) if name.endswith(".xz") else data)
    with pytest.raises(DataError) as info:
        Data(text_cfg(tmp_path / name, tokenizer="byte")).rows("train")
    assert str(info.value).startswith(f"{tmp_path / name} is not UTF-8 text (byte 0xe9"), str(info.value)


def test_tokenizer_problems_become_data_errors(tmp_path):
    (tmp_path / "c.txt").write_text("abc")
    with pytest.raises(DataError, match="encoder.json"):
        Data(text_cfg(tmp_path / "c.txt", tokenizer="gpt2", tokenizer_path=str(tmp_path)))
    with pytest.raises(DataError, match="oov_replacement"):
        Data(text_cfg(tmp_path / "c.txt", tokenizer="char", alphabet="abc", oov="replace",
                      oov_replacement="?"))


# ----------------------------------------------------------------------------- Hugging Face datasets

@pytest.fixture
def hf_datasets(tmp_path, monkeypatch):
    """``datasets`` kept offline and caching under tmp_path."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    datasets = pytest.importorskip("datasets")
    # the variables above are read when datasets is imported, which may already have happened
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache", raising=False)
    return datasets


def _decoded_rows(d, split):
    ids, kinds = all_rows(d.rows(split))
    return [d.tokenizer.decode(row[k == TOKEN]) for row, k in zip(ids, kinds)]


def test_hf_saved_to_disk(tmp_path, hf_datasets):
    ds = hf_datasets
    splits = {"train": ["alpha", "beta gamma", "h\u00e9llo \u4e16\u754c"], "validation": ["v one", "v two"],
              "test": ["t"]}
    ds.DatasetDict({k: ds.Dataset.from_dict({"text": v, "n": list(range(len(v)))})
                    for k, v in splits.items()}).save_to_disk(str(tmp_path / "saved"))
    d = Data(DataConfig(dataset="hf", path=str(tmp_path / "saved"), tokenizer="byte", layout="pad", length=32))
    assert _decoded_rows(d, "train") == splits["train"]
    assert _decoded_rows(d, "valid") == splits["validation"]
    assert _decoded_rows(d, "test") == splits["test"]

    wrap = Data(DataConfig(dataset="hf", path=str(tmp_path / "saved"), tokenizer="byte", length=4,
                           frame=False))
    stream = np.asarray(wrap.stream("valid").tokens).tolist()
    assert stream == list(b"v one") + [257] + list(b"v two") + [257]

    bad_split = Data(DataConfig(dataset="hf", path=str(tmp_path / "saved"), tokenizer="byte",
                                hf_split_names=["train", "validation", "heldout"]))
    with pytest.raises(DataError, match="no split 'heldout'"):
        bad_split.rows("test")


def test_hf_missing_text_field(tmp_path, hf_datasets):
    ds = hf_datasets
    ds.DatasetDict(train=ds.Dataset.from_dict({"content": ["a", "b"]})).save_to_disk(str(tmp_path / "saved"))
    d = Data(DataConfig(dataset="hf", path=str(tmp_path / "saved"), tokenizer="byte"))
    with pytest.raises(DataError, match="no field 'text'") as info:
        d.rows("train")
    assert "content" in str(info.value)
    ok = Data(DataConfig(dataset="hf", path=str(tmp_path / "saved"), tokenizer="byte", text_field="content",
                         layout="pad", length=8))
    assert _decoded_rows(ok, "train") == ["a", "b"]


def test_hf_local_jsonl_folder(tmp_path, hf_datasets):
    folder = tmp_path / "jsonl"
    folder.mkdir()
    splits = {"train": ["one two", "three"], "validation": ["four"], "test": ["five", "six", "seven"]}
    for name, texts in splits.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                                                      for i, t in enumerate(texts)))
    d = Data(DataConfig(dataset="hf", path=str(folder), tokenizer="byte", layout="pad", length=16))
    assert _decoded_rows(d, "train") == splits["train"]
    assert _decoded_rows(d, "valid") == splits["validation"]
    assert _decoded_rows(d, "test") == splits["test"]
    with pytest.raises(DataError, match="no field 'body'"):
        Data(DataConfig(dataset="hf", path=str(folder), tokenizer="byte", text_field="body")).rows("train")
