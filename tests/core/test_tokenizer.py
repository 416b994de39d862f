"""Tokenizer round-trips, byte counts for bits-per-byte, JSON persistence and error paths."""
from __future__ import annotations

import json

import pytest

from memlm.core.tokenizer import EOS, SPECIALS, UNK, TextTokenizer, build_tokenizer
from memlm.core.errors import MemLMError

TRAIN = [
    "The quick brown fox jumps over the lazy dog.\n" * 20,
    "def f(x):\n\treturn x ** 2  # naïve café, déjà vu\n" * 20,
    "Ünïcödé: 日本語のテキスト, emoji 😀🚀, math ∑∫√.\n" * 10,
]
SAMPLES = [
    "hello world",
    "The lazy dog.\n\n\tdef f(x): return x",
    "naïve café déjà vu",
    "日本語のテキスト 😀🚀 ∑∫√",
    "  leading and trailing spaces  ",
    "",
]


@pytest.fixture(scope="module")
def toks() -> dict[str, TextTokenizer]:
    return {
        "char": build_tokenizer("char", TRAIN),
        "byte": build_tokenizer("byte"),
        "bpe": build_tokenizer("bpe", TRAIN, vocab_size=320),
    }


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(toks, kind, text):
    tok = toks[kind]
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
@pytest.mark.parametrize("text", SAMPLES)
def test_token_bytes_sum_to_utf8_length(toks, kind, text):
    """bits-per-byte relies on this: the bytes of the tokens are the bytes of the text."""
    tok = toks[kind]
    tb = tok.token_bytes()
    assert len(tb) == tok.vocab_size
    assert sum(tb[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


def test_specials_and_eos(toks):
    for tok in toks.values():
        assert tok.eos_id is not None and tok.decode([tok.eos_id]) == ""
        assert tok.decode([tok.eos_id], skip_special_tokens=False) == EOS
        tb = tok.token_bytes()
        assert tb[tok.eos_id] == 1  # a document separator counts as the newline it replaces
        assert tb[tok.tok.token_to_id(UNK)] == 0 and tb[tok.pad_id] == 0


def test_char_is_one_token_per_character(toks):
    tok = toks["char"]
    text = "naïve 日本 😀"
    assert len(tok.encode(text)) == len(text)
    # vocabulary = specials + every distinct training character
    chars = set("".join(TRAIN))
    assert tok.vocab_size == len(SPECIALS) + len(chars)
    # unseen characters become <unk> (dropped on decode), known ones survive
    unk = tok.tok.token_to_id(UNK)
    ids = tok.encode("hZq")  # 'Z' and 'q'... 'q' is in "quick"; 'Z' is not in the training text
    assert ids[1] == unk and ids[0] != unk and ids[2] != unk
    assert tok.decode(ids) == "hq"


def test_byte_never_unknown(toks):
    tok = toks["byte"]
    assert tok.vocab_size == 256 + len(SPECIALS)
    text = "\x00\x7f\u0800\U0010ffff 😀"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_bpe_compresses_and_respects_vocab(toks):
    tok = toks["bpe"]
    assert tok.vocab_size == 320
    text = "The quick brown fox jumps over the lazy dog."
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_json_round_trip_is_identical(toks, kind, tmp_path):
    tok = toks[kind]
    again = TextTokenizer.from_json(tok.to_json())
    assert again.kind == kind
    assert again.fingerprint() == tok.fingerprint()
    assert again.vocab_size == tok.vocab_size and again.eos_id == tok.eos_id
    assert again.token_bytes() == tok.token_bytes()
    for text in SAMPLES:
        assert again.encode(text) == tok.encode(text)
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = build_tokenizer(str(path))
    assert loaded.fingerprint() == tok.fingerprint() and loaded.kind == kind


def test_plain_hf_tokenizer_json_loads(toks, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(toks["bpe"].tok.to_str(), encoding="utf-8")
    loaded = TextTokenizer.load(path)
    assert loaded.kind == "custom"
    assert loaded.encode("naïve café") == toks["bpe"].encode("naïve café")
    # a plain byte-level tokenizer.json still counts bytes correctly
    text = "déjà vu 😀"
    assert sum(loaded.token_bytes()[i] for i in loaded.encode(text)) == len(text.encode())


def test_fingerprints_differ_between_tokenizers(toks):
    prints = {t.fingerprint() for t in toks.values()}
    assert len(prints) == 3
    assert build_tokenizer("char", TRAIN).fingerprint() == toks["char"].fingerprint()  # deterministic
    assert build_tokenizer("char", TRAIN + ["Z"]).fingerprint() != toks["char"].fingerprint()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda tmp: build_tokenizer("wordpiece", ["x"]), "unknown tokenizer"),
        (lambda tmp: build_tokenizer("bpe", ["x"], vocab_size=100), "vocab_size must be >= 300"),
        (lambda tmp: build_tokenizer("char", None), "needs training text"),
        (lambda tmp: build_tokenizer("bpe", None), "needs training text"),
        (lambda tmp: build_tokenizer(str(tmp / "missing.json")), "not found"),
        (lambda tmp: TextTokenizer.from_json("{not json"), "corrupt tokenizer"),
        (lambda tmp: TextTokenizer.from_json(json.dumps({"kind": "bpe"})), "corrupt tokenizer"),
    ],
)
def test_errors_are_one_line(call, match, tmp_path):
    with pytest.raises(MemLMError, match=match) as info:
        call(tmp_path)
    assert "\n" not in str(info.value)


def test_bad_tokenizer_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("not json at all", encoding="utf-8")
    with pytest.raises(MemLMError, match="not valid JSON"):
        TextTokenizer.load(bad)
    weird = tmp_path / "weird.json"
    weird.write_text(json.dumps({"model": 1}), encoding="utf-8")
    with pytest.raises(MemLMError, match="cannot read tokenizer"):
        TextTokenizer.load(weird)
