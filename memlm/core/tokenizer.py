"""Tokenizers for every MemLM model, all backed by the Hugging Face ``tokenizers`` library.

Three kinds share one wrapper, :class:`TextTokenizer`:

- ``char``: one token per Unicode character seen in the training text (unknowns -> ``<unk>``);
- ``byte``: one token per UTF-8 byte (256 + specials), never unknown;
- ``bpe``:  byte-level BPE trained on the corpus with a configurable vocabulary size;

or an existing ``tokenizer.json`` file. The tokenizer serialises to a JSON string, which
is what checkpoints store (no pickle), so chat and serving never depend on the data.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from memlm.core.errors import MemLMError

EOS = "<|endoftext|>"
UNK = "<unk>"
PAD = "<pad>"
SPECIALS = [EOS, UNK, PAD]


class TextTokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` with the few things models need."""

    def __init__(self, tokenizer: Tokenizer, kind: str = "custom"):
        self.tok = tokenizer
        self.kind = kind
        self.eos_id = self.tok.token_to_id(EOS)
        self.pad_id = self.tok.token_to_id(PAD)
        self._token_bytes: list[int] | None = None

    # -- core API -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(int(i) for i in ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self) -> list[int]:
        """UTF-8 byte count of each token id, for tokenizer-independent bits-per-byte.

        The end-of-text token stands for a document separator and counts as one byte
        (the newline it replaces); other special tokens count zero.
        """
        if self._token_bytes is None:
            vocab = self.tok.get_vocab(with_added_tokens=True)
            out = [0] * self.vocab_size
            byte_level = self.kind in ("byte", "bpe") or _is_byte_level(self.tok)
            inv = _byte_level_inverse() if byte_level else None
            for token, idx in vocab.items():
                if token in SPECIALS:
                    out[idx] = 1 if token == EOS else 0
                elif inv is not None:
                    out[idx] = sum(1 for ch in token if ch in inv) or len(token.encode("utf-8"))
                else:
                    out[idx] = len(token.encode("utf-8"))
            self._token_bytes = out
        return self._token_bytes

    # -- persistence ----------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "tokenizer": json.loads(self.tok.to_str())})

    @classmethod
    def from_json(cls, payload: str) -> "TextTokenizer":
        try:
            data = json.loads(payload)
            return cls(Tokenizer.from_str(json.dumps(data["tokenizer"])), kind=data.get("kind", "custom"))
        except (ValueError, KeyError, Exception) as exc:  # tokenizers raises plain Exception
            raise MemLMError(f"corrupt tokenizer payload ({exc}); re-create the tokenizer") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise MemLMError(f"tokenizer file not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise MemLMError(f"tokenizer file {path} is not valid JSON: {exc}") from exc
        if "tokenizer" in data and "kind" in data:
            return cls.from_json(text)
        try:  # a plain Hugging Face tokenizer.json
            return cls(Tokenizer.from_str(text), kind="custom")
        except Exception as exc:
            raise MemLMError(f"cannot read tokenizer {path}: {exc}") from exc

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha1(self.tok.to_str().encode()).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"TextTokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def _byte_level_inverse() -> set[str]:
    return set(pre_tokenizers.ByteLevel.alphabet())


def _is_byte_level(tok: Tokenizer) -> bool:
    return "ByteLevel" in tok.to_str()[:4000]


def _char_tokenizer(texts: Iterable[str]) -> Tokenizer:
    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(chars):
        vocab.setdefault(ch, len(vocab))
    # BPE with no merges over the unsplit text is exactly "one token per character".
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return tok


def _byte_tokenizer() -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def _bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build_tokenizer(kind: str, texts: Iterable[str] | None = None, vocab_size: int = 4096) -> TextTokenizer:
    """Build a tokenizer of ``kind`` (``char``, ``byte``, ``bpe``) or load a ``.json`` path."""
    if kind == "byte":
        return TextTokenizer(_byte_tokenizer(), kind="byte")
    if kind == "char":
        if texts is None:
            raise MemLMError("the char tokenizer needs training text")
        return TextTokenizer(_char_tokenizer(texts), kind="char")
    if kind == "bpe":
        if texts is None:
            raise MemLMError("the bpe tokenizer needs training text")
        if vocab_size < 300:
            raise MemLMError(f"bpe vocab_size must be >= 300 (256 bytes + specials), got {vocab_size}")
        return TextTokenizer(_bpe_tokenizer(texts, vocab_size), kind="bpe")
    if kind.endswith(".json"):
        return TextTokenizer.load(kind)
    raise MemLMError(f"unknown tokenizer {kind!r}: use char, byte, bpe or a path to tokenizer.json")


def iter_chunks(text: str, size: int = 1 << 16) -> Iterator[str]:
    for i in range(0, len(text), size):
        yield text[i : i + size]
