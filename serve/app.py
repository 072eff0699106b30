"""The HTTP layer: OpenAI-compatible endpoints over the steering runtime (FastAPI).

``POST /v1/chat/completions`` and ``POST /v1/completions`` (the ``user`` field names the
user; a ``fints`` object chooses the algorithm, the prompt mode and overrides),
``GET /v1/models``, ``GET /health``.  Every error has OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.  Bodies are read with a size cap and
validated here; a valid request is queued for the batching thread
(:class:`serve.scheduler.Scheduler`) and awaited with a deadline.  ``stream: true``
answers with server-sent events once the answer is ready: its text in word-sized
chunks (so the chunks join to exactly the non-streaming text), then ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from data_process.schema import SAFE_NAME_RULE, is_safe_name
from serve.requests import ApiError, ChatRequest, CompletionRequest, fints_options, parse_json, validate
from serve.runtime import Request as Job
from serve.runtime import Runtime
from serve.scheduler import Scheduler

_PIECES = re.compile(r"\s*\S+|\s+")  # streamed pieces: each word with the space before it


def create_app(runtime: Runtime, api_key: str = "") -> FastAPI:
    """The FastAPI app serving ``runtime`` (``api_key``: required Bearer token, '' for none)."""
    cfg = runtime.cfg
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["scheduler"] = Scheduler(runtime, cfg.max_batch_size, cfg.batch_window_ms / 1000, cfg.max_queue)
        yield
        await asyncio.to_thread(state["scheduler"].stop)  # in-flight requests have been answered by now

    app = FastAPI(title="Fints", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body, status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}").body,
                            status_code=err.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        scheduler = state["scheduler"]
        return {"status": "ok", "model": runtime.name, "task": runtime.task.name, "algos": runtime.algos,
                "users": len(runtime.users), "queued": scheduler.queued, "batches": scheduler.batches,
                "rows": scheduler.rows}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request, api_key)
        return {"object": "list", "data": [{"id": runtime.name, "object": "model", "created": started,
                                            "owned_by": "fints"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request, api_key)
        parsed = validate(ChatRequest, await read_body(request, cfg.max_body_bytes))
        return await complete(runtime, state["scheduler"], "chat", parsed)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request, api_key)
        parsed = validate(CompletionRequest, await read_body(request, cfg.max_body_bytes))
        return await complete(runtime, state["scheduler"], "text", parsed)

    return app


def authorize(request: Request, api_key: str) -> None:
    """401 unless the request carries ``Authorization: Bearer <api_key>`` (no key set: anyone)."""
    if not api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest: how long the comparison takes says nothing about how much of the key matched
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def read_body(request: Request, limit: int) -> dict[str, Any]:
    """The JSON object of the body, read no further than ``limit`` bytes (413 beyond; a
    chunked body declares no length, so the count is kept while reading)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body has {declared} bytes; the limit is {limit} (--max-body-bytes)",
                       code="body_too_large")
    raw, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is over {limit} bytes (--max-body-bytes)", code="body_too_large")
        raw.append(chunk)
    return parse_json(b"".join(raw))


async def complete(runtime: Runtime, scheduler: Scheduler, kind: str, parsed) -> Any:
    """Queue one validated request, await its answer (504 past the deadline), reply."""
    timeout = runtime.cfg.request_timeout_s
    job, headers = to_job(runtime, kind, parsed)
    future = scheduler.submit(job, timeout)
    try:
        result, notes = await asyncio.wait_for(asyncio.wrap_future(future), timeout)
    except TimeoutError:
        raise ApiError(504, f"no answer within {timeout:g} s (--request-timeout-s); the server is overloaded "
                            "or the request too long", code="timeout") from None
    headers["x-fints-algo"] = job.cfg.algo
    if notes:
        headers["x-fints-note"] = "; ".join(notes)
    reply = Reply(kind, runtime.name, result)
    if parsed.stream:
        usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        return StreamingResponse(reply.events(usage), media_type="text/event-stream", headers=headers)
    return JSONResponse(reply.whole(), headers=headers)


def to_job(runtime: Runtime, kind: str, parsed) -> tuple[Job, dict[str, str]]:
    """The runtime request of a validated body (every check that needs no model happens here)."""
    cfg, headers = runtime.cfg, {}
    if parsed.model != runtime.name:
        raise ApiError(404, f"model {parsed.model!r} is not served here; GET /v1/models lists {runtime.name!r}",
                       "model", "model_not_found")
    user = parsed.user
    if user is None:
        raise ApiError(400, "user: required, the id of the user whose answer this is", "user", "invalid_value")
    if not is_safe_name(user):
        raise ApiError(400, f"user: {user!r} is not a user id ({SAFE_NAME_RULE})", "user", "invalid_value")
    mode, overrides, fields = fints_options(parsed.fints, "chat" if kind == "chat" else "task")
    if user not in runtime.users:
        if cfg.unknown_user == "reject":
            raise ApiError(404, f"unknown user {user!r}: this run has no history, vectors or adapter for it",
                           "user", "user_not_found")
        overrides = {**overrides, "algo": "zeroshot"}
        headers["x-fints-fallback"] = f"zeroshot (unknown user {user})"
    allowed = (*runtime.task.record_fields, "user_profile")
    for name in fields if mode == "task" else []:
        if name not in allowed:
            raise ApiError(400, f"fints.fields.{name}: not a sample field of task {runtime.task.name!r} "
                                f"(allowed: {list(allowed)})", f"fints.fields.{name}", "invalid_value")
    if fields and mode == "chat":
        raise ApiError(400, "fints.fields: only task mode builds a sample", "fints.fields", "invalid_value")
    max_tokens = getattr(parsed, "max_completion_tokens", None) or parsed.max_tokens
    if max_tokens is not None and max_tokens > cfg.max_tokens_limit:
        raise ApiError(400, f"max_tokens: {max_tokens} is over this server's limit {cfg.max_tokens_limit} "
                            "(--max-tokens-limit)", "max_tokens", "invalid_value")
    job = Job(user, mode, runtime.settings(mode, overrides), fields=fields, max_tokens=max_tokens,
              temperature=parsed.temperature, top_p=parsed.top_p, seed=parsed.seed, stops=parsed.stops())
    if kind == "text":
        messages = [{"role": "user", "content": parsed.text()}]
    else:
        messages = [{"role": m.role, "content": m.text} for m in parsed.messages]
    if mode == "task":
        if [m["role"] for m in messages] != ["user"]:
            raise ApiError(400, "messages: task mode takes exactly one user message, the task input (fints.mode "
                                "'chat' sends a conversation as given)", "messages", "invalid_value")
        job.text = messages[0]["content"]
    else:
        asked = [m["content"] for m in messages if m["role"] == "user"]
        if not asked:
            raise ApiError(400, "messages: chat mode needs a user message (its text retrieves the user's pairs)",
                           "messages", "invalid_value")
        job.messages, job.text = messages, asked[-1]
    return job, headers


class Reply:
    """One answer as an OpenAI response body, or as its server-sent events."""

    def __init__(self, kind: str, model: str, result):
        self.kind, self.model, self.result = kind, model, result
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _usage(self) -> dict[str, int]:
        r = self.result
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens}

    def _body(self, obj: str, choices: list[dict], usage: dict | None = None) -> dict[str, Any]:
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def _choice(self, text: str | None, finish: str | None, delta: bool) -> dict[str, Any]:
        if self.kind == "text":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if not delta:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}
        return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                "finish_reason": finish}

    def whole(self) -> dict[str, Any]:
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return self._body(obj, [self._choice(self.result.text, self.result.finish_reason, False)], self._usage())

    async def events(self, usage: bool):
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"

        def event(body: dict) -> str:
            return f"data: {json.dumps(body)}\n\n"

        if self.kind == "chat":
            yield event(self._body(obj, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]))
        for piece in _PIECES.findall(self.result.text):
            yield event(self._body(obj, [self._choice(piece, None, True)]))
        yield event(self._body(obj, [self._choice(None if self.kind == "chat" else "", self.result.finish_reason,
                                                  True)]))
        if usage:
            yield event(self._body(obj, [], self._usage()))
        yield "data: [DONE]\n\n"
