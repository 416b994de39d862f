"""OpenAI-compatible HTTP server for any MemLM checkpoint.

    python serve.py --ckpt runs/transformer_micro/version_0/checkpoints/last.ckpt [--port 8000]
        [--api-key KEY] [--memory ltml.sqlite] [--max-tokens 512] [--max-prompt-tokens 4096]

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (streaming SSE with
``"stream": true``), ``POST /v1/completions``, ``POST /v1/embeddings`` (``module.embed``),
``GET /health``. An HMST checkpoint answers chat completions (streamed too) through
:class:`~memlm.apps.hmst_engine.HMSTInferenceEngine` (memlm/apps/hmst_routes.py). Binds
127.0.0.1 unless ``--host`` says otherwise. With ``--api-key`` (or
``MEMLM_API_KEY``) every /v1 request needs ``Authorization: Bearer KEY`` (else 401). Limits
give OpenAI-style JSON errors: ``max_tokens`` above the cap or a prompt above
``--max-prompt-tokens`` -> 400, unknown model -> 404, body above ``--max-request-bytes`` -> 413.
Requests are served concurrently (uvicorn + a thread pool); access to the model itself is
serialised by a lock, so every request gets its own correct answer.

With ``--memory PATH`` LTML sits in front of the model: each chat request gets the
relevant memories in its system prompt, the turn is logged (one LTML session per
``user`` field, or per server run), and the server sleeps (consolidates) after
``--sleep-idle`` seconds without requests and on shutdown. Non-streaming responses carry
an extra ``ltml`` object saying what was injected and why.
"""
from __future__ import annotations

import argparse
import base64
import hmac
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from fastapi import Request  # module level: FastAPI resolves the endpoints' string annotations here

from memlm.core.errors import MemLMError, run_main
from memlm.core.sampling import InvalidSamplingParam, SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _num(body: dict, key: str, default, lo=None, hi=None, cast=float):
    v = body.get(key, default)
    if v is None:
        return default
    try:
        v = cast(v)
    except (TypeError, ValueError):
        raise APIError(400, f"'{key}' must be a number", param=key, code="invalid_value") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise APIError(400, f"'{key}' must be between {lo} and {hi}, got {v}", param=key, code="invalid_value")
    return v


class ServerState:
    def __init__(self, backend, model_name: str, api_key: str | None = None, max_tokens_cap: int = 512,
                 max_prompt_tokens: int = 4096, default_max_tokens: int = 128, max_request_bytes: int = 1 << 20,
                 memory=None, sleep_idle: float | None = None, model_info: dict | None = None) -> None:
        self.backend = backend
        self.model_name = model_name
        self.model_info = dict(model_info or {})  # extra /v1/models fields (architecture, parameters, step)
        self.api_key = api_key
        self.max_tokens_cap = max_tokens_cap
        self.max_prompt_tokens = max_prompt_tokens
        self.default_max_tokens = default_max_tokens
        self.max_request_bytes = max_request_bytes
        self.memory = memory
        self.sleep_idle = sleep_idle
        self.created = int(time.time())
        self.sessions: dict[str, int] = {}
        self.sessions_lock = threading.Lock()
        self.engine = None  # HMSTInferenceEngine for an HMST checkpoint (memlm/apps/hmst_routes.py)
        self.learner = None  # chat_learning.OnlineLearner with --learn
        self.chat_log = None  # chat_learning.ChatLog with --log

    def after_turn(self, user_text: str | None, reply: str) -> None:
        """--learn and --log, after each chat completion (the same code as chat.py's)."""
        if not user_text or not user_text.strip():
            return
        if self.learner is not None:
            self.learner.after_turn(user_text, reply)
        if self.chat_log is not None:
            self.chat_log.write(self.model_name, user_text, reply.strip(), learned=self.learner is not None)

    def close(self) -> None:
        if self.learner is not None:
            self.learner.close()
        if self.chat_log is not None:
            self.chat_log.close()

    # -- validation -----------------------------------------------------------------
    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model not in (None, "", self.model_name):
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def sampling(self, body: dict) -> dict:
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _num(body, key, self.default_max_tokens, 1, None, int)
        if max_tokens > self.max_tokens_cap:
            raise APIError(400, f"max_tokens is {max_tokens}, above this server's limit of {self.max_tokens_cap}",
                           param="max_tokens", code="max_tokens_exceeded")
        if _num(body, "n", 1, 1, None, int) != 1:
            raise APIError(400, "only n=1 is supported", param="n", code="invalid_value")
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise APIError(400, "'stop' must be a string or a list of strings", param="stop")
        params = {
            "max_tokens": max_tokens,
            "temperature": _num(body, "temperature", 1.0, 0.0, 2.0),  # OpenAI's range
            "top_p": _num(body, "top_p", None),
            "top_k": _num(body, "top_k", None, cast=int),
            "seed": _num(body, "seed", None, cast=int),
            "stop": stop,
        }
        # the ranges every generate() accepts, checked now so a streaming request fails before its first byte
        try:
            SamplingParams(max_new_tokens=max_tokens, temperature=params["temperature"], top_k=params["top_k"],
                           top_p=params["top_p"], seed=params["seed"])
        except InvalidSamplingParam as exc:
            param = key if exc.field == "max_new_tokens" else exc.field
            raise APIError(400, exc.message_for(param), param=param, code="invalid_value") from None
        return params

    def check_prompt(self, n_tokens: int) -> None:
        if n_tokens > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {n_tokens} tokens, above this server's limit of {self.max_prompt_tokens}; "
                                "shorten it", param="messages", code="context_length_exceeded")

    def session_for(self, user: str | None) -> int | None:
        if self.memory is None:
            return None
        key = user or "default"
        with self.sessions_lock:
            if key not in self.sessions:
                self.sessions[key] = self.memory.start_session(f"serve:{self.model_name}:{key}")
            return self.sessions[key]


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise APIError(400, "each message needs a role of system, user or assistant", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if content is not None and not isinstance(content, str):
            raise APIError(400, "message content must be a string", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content or ""})
    return out


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None, obj="chat.completion.chunk",
           **extra) -> str:
    payload = {"id": cid, "object": obj, "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    return f"data: {json.dumps(payload)}\n\n"


def create_app(state: ServerState):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="MemLM OpenAI-compatible server")
    app.state.memlm = state
    backend = state.backend
    if state.engine is not None:
        from memlm.apps.hmst_routes import add_hmst_routes

        add_hmst_routes(app, state, APIError)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(MemLMError)
    async def _memlm_error(request: Request, exc: MemLMError):
        return JSONResponse(APIError(400, str(exc)).body(), status_code=400)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if request.url.path.startswith("/v1"):
            if state.api_key:
                auth = request.headers.get("authorization", "")
                if not hmac.compare_digest(auth.encode(), f"Bearer {state.api_key}".encode()):
                    err = APIError(401, "Incorrect API key provided; pass Authorization: Bearer KEY",
                                   "invalid_request_error", code="invalid_api_key")
                    return JSONResponse(err.body(), status_code=401)
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > state.max_request_bytes:
                err = APIError(413, f"request body of {length} bytes is above the limit of {state.max_request_bytes}",
                               code="request_too_large")
                return JSONResponse(err.body(), status_code=413)
        if state.memory is not None and state.sleep_idle:
            state.memory.touch_idle(state.sleep_idle)
        return await call_next(request)

    async def _json(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > state.max_request_bytes:
            raise APIError(413, f"request body above the limit of {state.max_request_bytes} bytes", code="request_too_large")
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "memlm", **state.model_info}]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != state.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "memlm",
                **state.model_info}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json(request)
        state.check_model(body)
        params = state.sampling(body)
        messages = _messages(body)
        injection = None
        if state.memory is not None:
            messages, injection = await run_in_threadpool(state.memory.prepare, messages)
        prompt = backend.render(messages, params["max_tokens"])
        n_prompt = backend.count_tokens(prompt)
        state.check_prompt(n_prompt)
        user_text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
        session = state.session_for(body.get("user")) if state.memory is not None else None
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        stops = list(params["stop"] or []) + (["\nUser:", "\nSystem:", "\nAssistant:"] if backend.template == "chat" else [])
        gen_kw = dict(max_tokens=params["max_tokens"], temperature=params["temperature"], top_k=params["top_k"],
                      top_p=params["top_p"], seed=params["seed"], stop=stops)

        # which memories were injected, for streaming clients too (ids in score order)
        ltml_headers = {"x-ltml-injected": ",".join(str(it.memory.id) for it in injection.items)} if injection else None

        def remember(reply: str) -> None:
            if state.memory is not None and user_text:
                state.memory.record(session, user_text, reply)
            state.after_turn(user_text, reply)

        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            def pieces_of(info: dict) -> Iterator[str]:
                if state.engine is None:
                    yield from backend.stream_prompt(prompt, info=info, **gen_kw)
                    return
                # HMST: the engine verifies a whole draft before it answers, so the answer is
                # decided first and then sent; the decisions ride on the final chunk
                from memlm.apps.hmst_routes import engine_reply

                text, more, info["hmst"] = engine_reply(state.engine, backend.lock, prompt, user_text,
                                                        params["max_tokens"], backend.count_tokens)
                info.update(more)
                if text:
                    yield text

            def events() -> Iterator[str]:
                info: dict = {}
                pieces = []
                yield _chunk(cid, created, state.model_name, {"role": "assistant", "content": ""}, None)
                for piece in pieces_of(info):
                    pieces.append(piece)
                    yield _chunk(cid, created, state.model_name, {"content": piece}, None)
                yield _chunk(cid, created, state.model_name, {}, info.get("finish_reason", "length"),
                             **({"hmst": info["hmst"]} if "hmst" in info else {}))
                if include_usage:
                    usage = {"prompt_tokens": info.get("prompt_tokens", n_prompt),
                             "completion_tokens": info.get("completion_tokens", 0)}
                    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                    yield f"data: {json.dumps({'id': cid, 'object': 'chat.completion.chunk', 'created': created, 'model': state.model_name, 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
                remember("".join(pieces))

            return StreamingResponse(events(), media_type="text/event-stream", headers=ltml_headers)

        hmst: dict | None = None

        def run() -> tuple[str, dict]:
            nonlocal hmst
            info: dict = {}
            if state.engine is not None:  # HMST: the engine decides, retrieves, generates and verifies
                from memlm.apps.hmst_routes import engine_reply

                text, info, hmst = engine_reply(state.engine, backend.lock, prompt, user_text, params["max_tokens"],
                                                backend.count_tokens)
            else:
                text = "".join(backend.stream_prompt(prompt, info=info, **gen_kw))
            remember(text)
            return text, info

        text, info = await run_in_threadpool(run)
        resp: dict[str, Any] = {
            "id": cid, "object": "chat.completion", "created": created, "model": state.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": info.get("finish_reason", "length")}],
            "usage": {"prompt_tokens": info.get("prompt_tokens", n_prompt), "completion_tokens": info.get("completion_tokens", 0),
                      "total_tokens": info.get("prompt_tokens", n_prompt) + info.get("completion_tokens", 0)},
        }
        if hmst is not None:
            resp["hmst"] = hmst  # an extra field: OpenAI clients that do not read it still work
        if injection is not None:
            resp["ltml"] = {"tokens": injection.tokens, "injected": [
                {"id": it.memory.id, "text": it.memory.text, "score": round(it.score, 4), "relevance": round(it.relevance, 4),
                 "importance": round(it.importance, 4), "recency": round(it.recency, 4)} for it in injection.items]}
        return JSONResponse(resp, headers=ltml_headers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json(request)
        state.check_model(body)
        params = state.sampling(body)
        prompt = body.get("prompt", "")
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
            prompts = list(prompt)
        else:
            raise APIError(400, "'prompt' must be a string, a list of strings or a list of token ids", param="prompt")
        if not prompts:
            raise APIError(400, "'prompt' is empty", param="prompt")
        for p in prompts:
            state.check_prompt(backend.count_tokens(p) if isinstance(p, str) else len(p))
        gen_kw = dict(max_tokens=params["max_tokens"], temperature=params["temperature"], top_k=params["top_k"],
                      top_p=params["top_p"], seed=params["seed"], stop=params["stop"])
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        echo = bool(body.get("echo"))
        if body.get("stream"):
            if len(prompts) != 1:
                raise APIError(400, "streaming supports one prompt per request", param="prompt")

            def events() -> Iterator[str]:
                info: dict = {}
                def chunk(text, finish):
                    payload = {"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                               "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
                    return f"data: {json.dumps(payload)}\n\n"
                if echo and isinstance(prompts[0], str):
                    yield chunk(prompts[0], None)
                for piece in backend.stream_prompt(prompts[0], info=info, **gen_kw):
                    yield chunk(piece, None)
                yield chunk("", info.get("finish_reason", "length"))
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        def run() -> tuple[list[dict], int, int]:
            choices, n_prompt, n_completion = [], 0, 0
            for i, p in enumerate(prompts):
                info: dict = {}
                text = "".join(backend.stream_prompt(p, info=info, **gen_kw))
                if echo and isinstance(p, str):
                    text = p + text
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": info.get("finish_reason", "length")})
                n_prompt += info.get("prompt_tokens", 0)
                n_completion += info.get("completion_tokens", 0)
            return choices, n_prompt, n_completion

        choices, n_prompt, n_completion = await run_in_threadpool(run)
        return {"id": cid, "object": "text_completion", "created": created, "model": state.model_name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await _json(request)
        state.check_model(body)
        inp = body.get("input")
        if isinstance(inp, str):
            items: list = [inp]
        elif isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp):
            items = [inp]
        elif isinstance(inp, list) and inp and all(isinstance(x, (str, list)) for x in inp):
            items = list(inp)
        else:
            raise APIError(400, "'input' must be a non-empty string, list of strings or token ids", param="input")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise APIError(400, "'encoding_format' must be float or base64", param="encoding_format")
        n_tokens = 0
        for x in items:
            n = backend.count_tokens(x) if isinstance(x, str) else len(x)
            state.check_prompt(n)
            n_tokens += n
        vecs = await run_in_threadpool(backend.embed, items)
        data = []
        for i, v in enumerate(np.asarray(vecs, dtype=np.float32)):
            emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": state.model_name,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    return app


class BackgroundServer:
    """uvicorn in a daemon thread (tests, benchmarks, chat.py's own loopback use)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 20.0) -> str:
        self.thread.start()
        end = time.time() + timeout
        while not self.server.started:
            if time.time() > end or not self.thread.is_alive():
                raise MemLMError("the server did not start (port in use?)")
            time.sleep(0.02)
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}/v1"
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def build_state(args) -> ServerState:
    from memlm.apps.chat_backends import LocalBackend
    from memlm.checkpoint import load_module, served_name

    module = load_module(args.ckpt, map_location=args.device)
    step = module.checkpoint_info["global_step"]
    name = args.model_name or served_name(args.ckpt, step)
    info = {"architecture": type(module).__name__, "parameters": sum(p.numel() for p in module.parameters()),
            "global_step": step, "class_path": module.checkpoint_info["class_path"]}
    backend = LocalBackend(module, name=name)
    memory = None
    if args.memory:
        from memlm.apps.ltml_session import LTMLMemory
        from memlm.memory.ltml.wake import WakeConfig

        budget = args.memory_budget
        if backend.context_limit:  # a short-context model keeps at least half its window for the conversation
            budget = min(budget, max(0, (backend.context_limit - args.default_max_tokens) // 2))
        memory = LTMLMemory(args.memory, embedder=args.embedder, backend=backend, count_tokens=backend.count_tokens,
                            wake_config=WakeConfig(budget_tokens=budget),
                            log=lambda m: print(m, file=sys.stderr))
        print(f"ltml: memory {args.memory} (embedder {memory.embedder.name})", file=sys.stderr)
    state = ServerState(backend, name, api_key=args.api_key or os.environ.get("MEMLM_API_KEY") or None,
                        max_tokens_cap=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                        default_max_tokens=min(args.default_max_tokens, args.max_tokens),
                        max_request_bytes=args.max_request_bytes, memory=memory, sleep_idle=args.sleep_idle,
                        model_info=info)
    if type(module).__name__ == "HMSTLanguageModel":
        from memlm.apps.hmst_engine import EngineConfig, HMSTInferenceEngine

        state.engine = HMSTInferenceEngine(module, EngineConfig(gate_mode=args.hmst_gates, verify=args.hmst_verify,
                                                                threshold=args.hmst_threshold))
    attach_learning(state, args)
    return state


def attach_learning(state: ServerState, args) -> None:
    """--learn (chat_learning.OnlineLearner: learn each exchange, save the state atomically) and --log."""
    if getattr(args, "learn", False):
        from memlm.apps.chat_learning import OnlineLearner, default_state_path

        path = os.path.expanduser(args.learn_state or default_state_path(args.ckpt))
        state.learner = OnlineLearner(state.backend, path, save_every=args.save_every, learn_replies=args.learn_replies,
                                      passes=args.learn_passes, log=lambda m: print(m, file=sys.stderr))
    if getattr(args, "log", None):
        from memlm.apps.chat_learning import ChatLog

        state.chat_log = ChatLog(os.path.expanduser(args.log))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="OpenAI-compatible server for a MemLM checkpoint")
    p.add_argument("--ckpt", required=True, help="MemLM checkpoint (.ckpt) of any architecture")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set MEMLM_API_KEY)")
    p.add_argument("--model-name", default=None, help="model id in /v1/models (default: <run name>@step<N>, e.g. transformer_micro@step300)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=128)
    p.add_argument("--max-prompt-tokens", type=int, default=4096, help="longest prompt accepted, in tokens")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20)
    p.add_argument("--memory", default=None, help="LTML SQLite database to put in front of the model")
    p.add_argument("--embedder", default="auto", help="LTML embedder: auto | minilm | hash | module")
    p.add_argument("--memory-budget", type=int, default=200, help="tokens of memories injected per request")
    p.add_argument("--sleep-idle", type=float, default=300.0, help="consolidate after this many idle seconds (0 = never)")
    p.add_argument("--hmst-gates", default="controller", help="HMST engine gates: controller | schedule | all_on")
    p.add_argument("--hmst-verify", default="gate", help="HMST verification: gate (when the gate fires) | always | never")
    p.add_argument("--hmst-threshold", type=float, default=0.5, help="HMST critic score below which it retries, then abstains")
    lrn = p.add_argument_group("online learning and log (as chat.py)")
    lrn.add_argument("--learn", action="store_true", help="the model learns from each chat exchange (models that learn online: HTM)")
    lrn.add_argument("--learn-state", default=None, help="learned-state file (default: CKPT.learned.pt), loaded if present")
    lrn.add_argument("--save-every", type=int, default=1, help="save the learned state every N turns (and at exit)")
    lrn.add_argument("--learn-replies", action="store_true", help="learn the model's replies too, not only the user's turns")
    lrn.add_argument("--learn-passes", type=int, default=10,
                     help="rehearsals of each learned turn (a new segment needs 3 to connect; 10 let a taught "
                          "sentence settle, docs/htm.md)")
    lrn.add_argument("--log", default=None, help="append one JSON line per chat exchange to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    state = build_state(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not state.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use the model", file=sys.stderr)
    import uvicorn

    app = create_app(state)
    print(f"serving {state.model_name} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    except OSError as exc:
        raise MemLMError(f"cannot bind {args.host}:{args.port} ({exc}); pick another --port") from exc
    finally:
        state.close()
        if state.memory is not None:
            print("ltml: consolidating before exit", file=sys.stderr)
            state.memory.sleep()
            state.memory.close()
    return 0


def main_entry() -> None:
    run_main(main)


if __name__ == "__main__":
    main_entry()
