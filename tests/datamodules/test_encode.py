"""The batched, piece-wise encoder gives exactly the ids of encoding each document whole."""
from __future__ import annotations

import numpy as np
import pytest

from memlm.core.tokenizer import build_tokenizer
from memlm.datamodules.encode import encode_documents, pieces

# whitespace runs, leading spaces after newlines (WikiText style), tabs, non-ASCII, digits, contractions
TEXT = (" = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : it's the 2011 game , \t  he'd said .\n"
        "\n\n   indented   line with    runs of spaces\nnext line\u00a0nbsp and naïve café 12345 !!\n") * 40
DOCS = [TEXT, "", "short doc", TEXT[:997], "   ", "x\n"]


def whole(tok, docs) -> np.ndarray:
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d) + [tok.eos_id]
    return np.asarray(ids, dtype=np.int64)


@pytest.mark.parametrize("kind", ["bpe", "char", "byte"])
@pytest.mark.parametrize("piece_chars,batch_pieces", [(7, 3), (64, 1000), (None, 2)])
def test_pieces_encode_like_whole_documents(kind, piece_chars, batch_pieces):
    tok = build_tokenizer(kind, [TEXT], 400)
    got = encode_documents(tok, DOCS, tok.eos_id, piece_chars=piece_chars, batch_pieces=batch_pieces)
    assert got.dtype == np.uint16
    assert np.array_equal(got.astype(np.int64), whole(tok, DOCS))
    assert int((got == tok.eos_id).sum()) == len(DOCS)  # one EOS per document, empty ones included


def test_pieces_cover_the_text_and_cut_only_before_whitespace_after_a_word():
    parts = list(pieces(TEXT, 16))
    assert "".join(parts) == TEXT and len(parts) > 100
    for prev, nxt in zip(parts, parts[1:]):
        assert not prev[-1].isspace() and nxt[0] in " \n", (prev[-5:], nxt[:5])
    assert list(pieces(TEXT, None)) == [TEXT] and list(pieces("", 16)) == []


def test_uint32_for_large_vocabularies():
    class Big:
        vocab_size = 70_000
        tok = build_tokenizer("byte").tok

    assert encode_documents(Big(), ["ab"], 69_999).dtype == np.uint32


def test_other_local_ranks_wait_for_rank_zeros_tokenizer(tmp_path, monkeypatch):
    from memlm.core.errors import MemLMError
    from memlm.datamodules import text
    from memlm.datamodules.text import TextDataModule

    cache = str(tmp_path / "cache")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MEMLM_PREP_TIMEOUT", "0.5")
    with pytest.raises(MemLMError, match="local rank 0"):
        TextDataModule(tokenizer="char", cache_dir=cache).tokenizer  # nobody builds it
    monkeypatch.setenv("LOCAL_RANK", "0")
    built = TextDataModule(tokenizer="char", cache_dir=cache).tokenizer
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(text, "build_tokenizer", lambda *a, **k: pytest.fail("rank 1 built its own tokenizer"))
    assert TextDataModule(tokenizer="char", cache_dir=cache).tokenizer.fingerprint() == built.fingerprint()
