"""Loopback HTTP stubs for the tests that talk to OpenAI-compatible servers (no mocks).

``JsonHandler`` is a quiet request handler with ``_read_json()`` and ``_send(code, payload)``
(a dict or list goes out as JSON, bytes as they are, None as an empty body), plus
``_send_models(*ids)`` and ``_send_chat(model, content)`` for OpenAI-shaped answers; ``serving(handler)``
runs it on a free loopback port for the length of a ``with`` block and yields its base URL;
``closed_port()`` is a port nothing listens on (a server that is down)."""
from __future__ import annotations

import json
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator


class JsonHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def _read_json(self):
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def _send(self, code: int, payload=None) -> None:
        data = payload if isinstance(payload, bytes) else b"" if payload is None else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_models(self, *ids: str) -> None:
        """A ``GET /v1/models`` answer listing ``ids``."""
        self._send(200, {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "test"} for i in ids]})

    def _send_chat(self, model: str, content: str) -> None:
        """A non-streaming chat completion whose one choice says ``content``."""
        self._send(200, {"id": "c", "object": "chat.completion", "model": model,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": "stop"}]})


@contextmanager
def serving(handler) -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of ``handler`` served from a background thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
