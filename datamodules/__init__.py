"""Shared text datamodules and samplers; the tokenizer itself is ``memlm.core.tokenizer``."""
