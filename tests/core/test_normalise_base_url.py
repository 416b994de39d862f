"""normalise_base_url: every address form of an OpenAI-compatible server gives its .../v1 base."""
from __future__ import annotations

import pytest

from memlm.core.errors import MemLMError
from memlm.core.openai_client import normalise_base_url


@pytest.mark.parametrize("given, base", [
    # host and port, with or without a scheme
    ("http://localhost:11434", "http://localhost:11434/v1"),
    ("127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
    ("myhost", "http://myhost/v1"),
    ("https://api.example.com", "https://api.example.com/v1"),
    # the base itself, trailing slashes and blanks
    ("http://localhost:11434/", "http://localhost:11434/v1"),
    ("http://localhost:11434/v1", "http://localhost:11434/v1"),
    ("http://localhost:11434/v1/", "http://localhost:11434/v1"),
    ("  http://h:1/v1  ", "http://h:1/v1"),
    ("127.0.0.1:1234/v1", "http://127.0.0.1:1234/v1"),
    # full endpoint addresses: the endpoint is cut off
    ("http://h:1/v1/chat/completions", "http://h:1/v1"),
    ("http://h:1/v1/chat/completions/", "http://h:1/v1"),
    ("http://h:1/v1/completions", "http://h:1/v1"),
    ("http://h:1/v1/embeddings", "http://h:1/v1"),
    ("http://h:1/v1/models", "http://h:1/v1"),
    ("10.0.0.2:11434/v1/chat/completions", "http://10.0.0.2:11434/v1"),
    # a server under a path prefix keeps it
    ("https://h/api/v1/chat/completions", "https://h/api/v1"),
    ("https://h/openai/v1", "https://h/openai/v1"),
])
def test_address_forms(given, base):
    assert normalise_base_url(given) == base
    assert normalise_base_url(base) == base  # idempotent


@pytest.mark.parametrize("bad", ["ftp://h/v1", "file:///tmp/x", "ws://h:1", "", "   ", "http://", None])
def test_not_an_http_address_is_one_line_error(bad):
    with pytest.raises(MemLMError) as info:
        normalise_base_url(bad)
    msg = str(info.value)
    assert "not an http(s) address" in msg and "http://localhost:11434/v1" in msg and "\n" not in msg


def test_a_host_name_with_a_port_and_no_scheme():
    assert normalise_base_url("localhost:11434") == "http://localhost:11434/v1"
