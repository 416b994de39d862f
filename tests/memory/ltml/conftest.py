"""LTML test fixtures: the real MiniLM sentence embedder, loaded once per session (offline)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm():
    from memlm.memory.ltml.embeddings import MiniLMEmbedder

    return MiniLMEmbedder()

