"""Documents -> one token-id array, through the ``tokenizers`` library's parallel batch encoder.

``Tokenizer.encode`` of one long string runs on one core; ``encode_batch`` spreads a list
of strings over all cores (Rust threads, no GIL). So every document is cut into pieces of
about ``piece_chars`` characters and the pieces are encoded in batches, at cut points that
leave the ids equal to those of encoding the document whole (see :func:`pieces`).
"""
from __future__ import annotations

import itertools
import os
import re
from typing import Iterator, Sequence

import numpy as np

PIECE_CHARS = 1 << 12  # small pieces balance best across threads (measured: 4 KB > 64 KB)
BATCH_PIECES = 4096  # ~16 MB of text per encode_batch call


_CUT = re.compile(r"(?<=\S)[ \n]")  # a space or newline right after a non-space character


def pieces(text: str, size: int | None = PIECE_CHARS) -> Iterator[str]:
    """Consecutive slices of ``text`` of about ``size`` characters (``None``: the text whole).

    Each cut falls just before a space or newline that follows a non-space character. The
    byte-level pre-tokenizer always ends a pre-token there (only a *leading* space joins a
    word), and the text after the cut starts a pre-token the same way in both cases, so the
    pieces encode to exactly the ids of the whole text.
    """
    if size is None:
        if text:
            yield text
        return
    start, n = 0, len(text)
    while start < n:
        m = _CUT.search(text, start + size) if start + size < n else None
        end = m.start() if m else n
        yield text[start:end]
        start = end


def id_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max else np.uint32


def _pieces_of(docs: Sequence[str], piece_chars: int | None) -> Iterator[tuple[str, bool]]:
    """(piece, ends_a_document) for every piece of every document; an empty document is one empty piece."""
    for doc in docs:
        parts = list(pieces(doc, piece_chars)) or [""]
        for i, part in enumerate(parts):
            yield part, i == len(parts) - 1


def encode_documents(tok, docs: Sequence[str], eos_id: int, piece_chars: int | None = PIECE_CHARS,
                     batch_pieces: int = BATCH_PIECES) -> np.ndarray:
    """Token ids of ``docs`` with ``eos_id`` after each document, as uint16 (or uint32)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    dtype = id_dtype(tok.vocab_size)
    eos = np.asarray([eos_id], dtype=dtype)
    out: list[np.ndarray] = []
    stream = _pieces_of(docs, piece_chars)
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets nobody here reads
    encode_batch = getattr(tok.tok, "encode_batch_fast", tok.tok.encode_batch)
    while batch := list(itertools.islice(stream, batch_pieces)):
        encoded = encode_batch([text for text, _ in batch], add_special_tokens=False)
        for enc, (_, doc_end) in zip(encoded, batch):
            out.append(np.asarray(enc.ids, dtype=dtype))
            if doc_end:
                out.append(eos)
    return np.concatenate(out) if out else np.zeros(0, dtype=dtype)
