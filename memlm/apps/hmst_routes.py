"""serve.py's HMST additions: chat answers through :class:`HMSTInferenceEngine` and the memory routes.

- A non-streaming chat completion of an HMST checkpoint is answered by the engine; the
  response carries its decisions in an extra ``hmst`` object (gates, retrieved items with
  scores, critic score, metered compute, latency), which OpenAI clients ignore.
- ``POST /v1/hmst/ingest`` ``{"text": ...}`` -> ``{"ids": [...]}``; ``POST /v1/hmst/forget``
  ``{"ids": [...]}`` -> ``{"removed": n}``; ``GET /v1/hmst/memory?limit=N`` -> ``{"items": [...]}``.
  They sit under ``/v1``, so the server's API key guards them.
"""
from __future__ import annotations

from fastapi import Request  # module level: FastAPI resolves the endpoints' string annotations here


def engine_reply(engine, lock, prompt: str, user_text: str | None, max_tokens: int, count_tokens) -> tuple[str, dict, dict]:
    """(answer text, usage info, decisions) for one chat turn."""
    from memlm.core.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=min(max_tokens, engine.cfg.max_new_tokens), temperature=0.0,
                            eos_id=engine.tok.eos_id)
    with lock:
        res = engine.answer(prompt, query=user_text, params=params)
    info = {"prompt_tokens": count_tokens(prompt), "completion_tokens": count_tokens(res.text) if res.text else 0,
            "finish_reason": "stop"}
    return res.text, info, res.to_dict()


def add_hmst_routes(app, state, api_error) -> None:
    from starlette.concurrency import run_in_threadpool

    engine, lock = state.engine, state.backend.lock

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise api_error(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise api_error(400, "the request body must be a JSON object")
        return body

    def locked(fn, *args):
        with lock:
            return fn(*args)

    @app.post("/v1/hmst/ingest")
    async def ingest(request: Request):
        text = (await body_of(request)).get("text")
        if not isinstance(text, str) or not text.strip():
            raise api_error(400, "'text' must be a non-empty string", param="text")
        return {"ids": await run_in_threadpool(locked, engine.ingest, text)}

    @app.post("/v1/hmst/forget")
    async def forget(request: Request):
        ids = (await body_of(request)).get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise api_error(400, "'ids' must be a list of integers", param="ids")
        return {"removed": await run_in_threadpool(locked, engine.forget, ids)}

    @app.get("/v1/hmst/memory")
    async def memory(limit: int | None = None):
        return {"items": await run_in_threadpool(locked, engine.list, limit)}
