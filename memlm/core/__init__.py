"""Layer 1, the ground floor: errors, the tokenizer, ``ModelOutput``, sampling, the one
OpenAI-compatible HTTP client, checkpoint file I/O and benchmark helpers.

Imports nothing from MemLM above it (``tests/test_layers.py`` checks).
"""
