"""Tests for unmask.data.tokenization: char / byte / Hugging Face tokenizers, specials, OOV policy,
save/load and the build_tokenizer factory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unmask.data.tokenization import (
    META_FILE,
    TEXT8_ALPHABET,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    OutOfVocabularyError,
    build_tokenizer,
    load_tokenizer,
)

from toys import GPT2_DIR

# ----------------------------------------------------------------------------- character tokenizer

def test_char_round_trip_and_ids_follow_alphabet_order():
    tok = CharTokenizer("cab! ")
    ids = tok.encode("a cab!")
    # ids are positions in the alphabet as given (not sorted order)
    assert ids.tolist() == [1, 4, 0, 1, 2, 3]
    assert ids.dtype == np.int64
    assert tok.decode(ids) == "a cab!"
    assert tok.encode("").tolist() == []
    assert tok.decode([]) == ""


def test_char_special_ids_and_vocab_size():
    alphabet = "xyz\n"
    tok = CharTokenizer(alphabet)
    n = len(alphabet)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (n, n + 1, n + 2, n + 3)
    assert tok.vocab_size == n + 4
    assert tok.special_ids == {n, n + 1, n + 2, n + 3}
    # no symbol of the alphabet maps onto a special id
    assert set(tok.encode(alphabet).tolist()) == set(range(n))


def test_text8_tokenizer_has_27_symbols():
    tok = build_tokenizer("text8")
    assert isinstance(tok, CharTokenizer)
    assert tok.alphabet == TEXT8_ALPHABET == "abcdefghijklmnopqrstuvwxyz "
    assert len(tok.alphabet) == 27
    assert tok.vocab_size == 31
    assert tok.mask_id == 30
    assert tok.encode("az ").tolist() == [0, 25, 26]
    text = "the quick brown fox jumps over the lazy dog"
    assert tok.decode(tok.encode(text)) == text


def test_char_invalid_alphabets_and_policies():
    with pytest.raises(ValueError, match="repeated"):
        CharTokenizer("abca")
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer("")
    with pytest.raises(ValueError, match="oov policy"):
        CharTokenizer("abc", oov="ignore")
    with pytest.raises(ValueError, match="oov_replacement"):
        CharTokenizer("abc", oov="replace", oov_replacement="?")
    with pytest.raises(ValueError, match="oov_replacement"):
        CharTokenizer("abc", oov="replace", oov_replacement="ab")
    # the replacement is only checked when it is used
    CharTokenizer("abc", oov="error", oov_replacement="?")


def test_oov_error_names_symbol_and_position():
    tok = CharTokenizer("abc ")
    with pytest.raises(OutOfVocabularyError) as info:
        tok.encode("ab c#ab")
    err = info.value
    assert isinstance(err, ValueError)
    assert err.symbol == "#"
    assert err.position == 4
    msg = str(err)
    assert "'#'" in msg and "U+0023" in msg and "character 4" in msg
    assert "data.oov" in msg  # says how to get past it


def test_oov_error_reports_first_bad_symbol():
    tok = CharTokenizer("abc")
    with pytest.raises(OutOfVocabularyError) as info:
        tok.encode("abXcY")
    assert (info.value.symbol, info.value.position) == ("X", 2)


def test_oov_error_offset_shifts_position():
    tok = CharTokenizer("abc")
    with pytest.raises(OutOfVocabularyError) as info:
        tok.encode("abcZ", offset=1000)
    assert info.value.position == 1003
    assert "character 1003" in str(info.value)


def test_oov_position_counts_code_points_not_utf16_units():
    emoji = "\U0001F600"
    tok = CharTokenizer("ab" + emoji)
    assert tok.decode(tok.encode(f"a{emoji}b")) == f"a{emoji}b"
    with pytest.raises(OutOfVocabularyError) as info:
        tok.encode(f"{emoji}{emoji}ab!")
    assert (info.value.symbol, info.value.position) == ("!", 4)


def test_oov_replace_maps_to_replacement_id():
    tok = CharTokenizer("abc ", oov="replace", oov_replacement=" ")
    ids = tok.encode("a#b\u00e9c")
    assert ids.tolist() == [0, 3, 1, 3, 2]
    assert tok.decode(ids) == "a b c"
    tok2 = CharTokenizer("abc ", oov="replace", oov_replacement="c")
    assert tok2.encode("?a").tolist() == [2, 0]


def test_oov_drop_removes_symbols():
    tok = CharTokenizer("abc", oov="drop")
    ids = tok.encode("#a!!b\u4e16c?")
    assert ids.tolist() == [0, 1, 2]
    assert tok.encode("###").tolist() == []


def test_char_decode_specials():
    tok = CharTokenizer("ab")
    ids = [tok.bos_id, 0, tok.mask_id, 1, tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special=False) == "[BOS]a[MASK]b[EOS][PAD]"
    assert tok.decode(np.array([[0, tok.mask_id], [1, 0]])) == "aba"  # any shape is flattened
    assert tok.token_str(tok.mask_id) == "[MASK]"
    assert tok.token_str(1) == "b"


def test_char_fingerprint_depends_on_alphabet_and_policy():
    a = CharTokenizer("abc")
    assert a.fingerprint() == CharTokenizer("abc").fingerprint()
    assert a.fingerprint() != CharTokenizer("abd").fingerprint()
    assert a.fingerprint() != CharTokenizer("acb").fingerprint()
    assert a.fingerprint() != CharTokenizer("abc", oov="drop").fingerprint()


def test_char_save_and_load(tmp_path):
    tok = CharTokenizer("xyz \n", oov="replace", oov_replacement="z")
    tok.save(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / META_FILE).read_text())["kind"] == "char"
    back = load_tokenizer(tmp_path / "tok")
    assert isinstance(back, CharTokenizer)
    assert back.alphabet == tok.alphabet and back.oov == "replace" and back.oov_replacement == "z"
    assert back.encode("x?y\n").tolist() == tok.encode("x?y\n").tolist() == [0, 2, 1, 4]
    assert back.fingerprint() == tok.fingerprint()


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=META_FILE):
        load_tokenizer(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"kind": "wordpiece"}))
    with pytest.raises(ValueError, match="wordpiece"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- byte tokenizer

def test_byte_round_trip_non_ascii():
    tok = ByteTokenizer()
    text = "h\u00e9llo \u2014 \u4e16\u754c \U0001F600\n\ttab"
    ids = tok.encode(text)
    assert ids.tolist() == list(text.encode("utf-8"))
    assert ids.max() < 256
    assert tok.decode(ids) == text
    assert tok.vocab_size == 260
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (256, 257, 258, 259)


def test_byte_decode_specials():
    tok = ByteTokenizer()
    ids = [tok.bos_id] + tok.encode("h\u00e9").tolist() + [tok.mask_id, tok.eos_id]
    assert tok.decode(ids) == "h\u00e9"
    # multi-byte characters survive between special names
    assert tok.decode(ids, skip_special=False) == "[BOS]h\u00e9[MASK][EOS]"
    assert tok.decode(tok.encode("\u4e16\u754c"), skip_special=False) == "\u4e16\u754c"
    assert tok.token_str(tok.pad_id) == "[PAD]"
    assert tok.token_str(ord("A")) == "A"


def test_byte_save_and_load(tmp_path):
    ByteTokenizer().save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, ByteTokenizer)
    assert back.fingerprint() == ByteTokenizer().fingerprint()
    assert back.fingerprint() != CharTokenizer("ab").fingerprint()


# ----------------------------------------------------------------------------- build_tokenizer

def test_build_char_from_corpus_symbols_sorted():
    calls = []

    def symbols():
        calls.append(1)
        return {"b", " ", "a", "\n", "Z"}

    tok = build_tokenizer("char", corpus_symbols=symbols)
    assert calls == [1]
    assert tok.alphabet == "\n Zab"
    assert tok.vocab_size == 9
    assert tok.decode(tok.encode("Zab ba\n")) == "Zab ba\n"


def test_build_char_explicit_alphabet_does_not_scan_corpus():
    def boom():
        raise AssertionError("corpus scanned although an alphabet was given")

    tok = build_tokenizer("char", alphabet="qp", corpus_symbols=boom, oov="drop")
    assert tok.alphabet == "qp" and tok.oov == "drop"


def test_build_char_needs_alphabet_or_corpus():
    with pytest.raises(ValueError, match="alphabet"):
        build_tokenizer("char")


def test_build_text8_honours_oov_policy():
    tok = build_tokenizer("text8", oov="replace", oov_replacement=" ")
    assert tok.decode(tok.encode("a1b")) == "a b"
    with pytest.raises(OutOfVocabularyError):
        build_tokenizer("text8").encode("Abc")


def test_build_byte_and_unknown_kind():
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer 'sentencepiece'") as info:
        build_tokenizer("sentencepiece")
    assert "char" in str(info.value) and "gpt2" in str(info.value)
    with pytest.raises(ValueError, match="tokenizer_path"):
        build_tokenizer("hf")


def test_build_gpt2_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        build_tokenizer("gpt2", path=str(tmp_path))


# ----------------------------------------------------------------------------- HF tokenizer (synthetic)

def _word_level(vocab: dict[str, int]):
    from tokenizers import Tokenizer as TK
    from tokenizers import models, pre_tokenizers

    tk = TK(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return tk


def test_hf_tokenizer_without_bos_or_eos_raises():
    with pytest.raises(ValueError, match="neither a BOS nor an EOS"):
        HFTokenizer(_word_level({"[UNK]": 0, "a": 1, "b": 2}), source="tiny")


def test_hf_tokenizer_finds_named_specials():
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "<s>": 3, "</s>": 4, "<pad>": 5, "<mask>": 6}
    tok = HFTokenizer(_word_level(vocab))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (3, 4, 5, 6)
    assert tok.vocab_size == 7  # nothing appended
    assert tok.encode("a b a").tolist() == [1, 2, 1]


def test_hf_tokenizer_fills_missing_specials():
    tok = HFTokenizer(_word_level({"[UNK]": 0, "a": 1, "</s>": 2}))
    assert tok.bos_id == tok.eos_id == tok.pad_id == 2  # BOS and PAD fall back to EOS
    assert tok.mask_id == 3  # appended after the vocabulary
    assert tok.vocab_size == 4
    assert tok.token_str(3) == "[MASK]"


# ----------------------------------------------------------------------------- GPT-2 (shared files)

@pytest.fixture(scope="module")
def gpt2():
    if not (GPT2_DIR / "encoder.json").is_file() or not (GPT2_DIR / "vocab.bpe").is_file():
        pytest.skip(f"GPT-2 tokenizer files not found in {GPT2_DIR} (shared data absent)")
    return build_tokenizer("gpt2", path=str(GPT2_DIR))


PARAGRAPH = ("Hello, world! It's a \"test\" -- with punctuation; numbers 1,234.5 and (brackets).\n"
             "Second line:\ttabs,  double  spaces...\n\n"
             "Unicode: caf\u00e9, na\u00efve, \u00fcber, \u4e16\u754c, \u2014 \U0001F600!\n")


def test_gpt2_known_ids_and_specials(gpt2):
    assert isinstance(gpt2, HFTokenizer)
    assert gpt2.encode("Hello world").tolist() == [15496, 995]
    assert gpt2.mask_id == 50257
    assert gpt2.vocab_size == 50258
    assert gpt2.bos_id == gpt2.eos_id == gpt2.pad_id == 50256


def test_gpt2_round_trip_paragraph(gpt2):
    ids = gpt2.encode(PARAGRAPH)
    assert len(ids) < len(PARAGRAPH)  # BPE merges, not one id per character
    assert ids.max() < 50256  # encode adds no special tokens
    assert gpt2.decode(ids) == PARAGRAPH
    batch = gpt2.encode_batch([PARAGRAPH, "Hello world"])
    assert batch[0].tolist() == ids.tolist() and batch[1].tolist() == [15496, 995]


def test_gpt2_decode_specials(gpt2):
    ids = [gpt2.bos_id, 15496, gpt2.mask_id, 995, gpt2.eos_id]
    assert gpt2.decode(ids) == "Hello world"
    shown = gpt2.decode(ids, skip_special=False)
    assert shown.startswith("<|endoftext|>Hello") and "<|mask|>" in shown
    assert gpt2.token_str(gpt2.mask_id) == "[MASK]"
    assert gpt2.token_str(15496) == "Hello"


def test_gpt2_save_load_and_hf_kind(gpt2, tmp_path):
    gpt2.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, HFTokenizer)
    ids = gpt2.encode(PARAGRAPH).tolist()
    assert loaded.encode(PARAGRAPH).tolist() == ids
    assert loaded.decode(ids) == PARAGRAPH
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.mask_id, loaded.vocab_size) == \
        (50256, 50256, 50256, 50257, 50258)
    assert loaded.source == gpt2.source
    assert loaded.fingerprint() == gpt2.fingerprint()

    for path in (tmp_path / "tok" / "tokenizer.json", tmp_path / "tok"):
        hf = HFTokenizer.from_file(path)
        assert hf.encode(PARAGRAPH).tolist() == ids
        assert (hf.mask_id, hf.vocab_size, hf.eos_id) == (50257, 50258, 50256)
    hf = build_tokenizer("hf", path=str(tmp_path / "tok" / "tokenizer.json"))
    assert hf.kind == "hf" and hf.encode("Hello world").tolist() == [15496, 995]
    # gpt2 kind pointed at a tokenizer.json reads it too
    g = build_tokenizer("gpt2", path=str(tmp_path / "tok" / "tokenizer.json"))
    assert g.encode("Hello world").tolist() == [15496, 995] and g.mask_id == 50257


def test_hf_from_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer.from_file(tmp_path)
