"""Shared text datamodules, tokenizers and samplers."""
from datamodules.tokenizer import TextTokenizer, build_tokenizer  # noqa: F401
