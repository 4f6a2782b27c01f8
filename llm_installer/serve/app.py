"""The OpenAI-compatible HTTP API (FastAPI) over one `Engine`, plus the web chat page at `/`.

Request bodies are parsed by hand (json, then a strict pydantic model) rather than by FastAPI's
parameter binding, so every bad input — broken JSON, a wrong type, an out-of-range value — comes back
as OpenAI's error JSON ``{"error": {"message", "type", "param", "code"}}`` with status 400 (FastAPI's
default would be a 422 in its own shape, which OpenAI clients do not understand). The same pydantic
models are published as the request schemas of ``/openapi.json``.

What is checked before a request joins the shared batch (docs/robustness.md): the body arrives within
`body_timeout_s` and under `max_body_bytes`; it is JSON without NaN/Infinity, nested at most
`MAX_JSON_DEPTH` levels, with no lone surrogate in any string; it fits the request model; its sampling
settings pass `SamplingParams.check`; its prompt fits the context; and the queue has room (else 429).
A 500 never carries exception text: the server log has it.

Streaming answers are server-sent events in OpenAI's chunk format ending with ``data: [DONE]``. The
engine's worker thread hands events to the event loop with ``call_soon_threadsafe``; when a client goes
away the response generator is closed and its request is cancelled, so its batch slot frees at the next
decoding step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_installer.serve.engine import SEED_MAX, SEED_MIN, Engine, EngineError, Event, SamplingParams

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: far more than any prompt this context can hold
DEFAULT_BODY_TIMEOUT_S = 30.0  # a body that takes longer to arrive is answered 408 and dropped
MAX_JSON_DEPTH = 32  # OpenAI bodies nest 5 levels; deeper ones are refused before any work


class APIError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, param=self.param, code=self.code)


def error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


# ----- request bodies (strict: "0.5" is not a number, as in OpenAI's API) -------------------------------------
class _Base(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = False
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: bool | int | None = None
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    ignore_eos: bool | None = False  # vLLM's extension: generate exactly max_tokens (benchmarks)


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Base):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Base):
    prompt: str | list[str] | list[int]
    echo: bool | None = False
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict", "any"}


def _is_type_tag(part: Any) -> bool:
    """A part of a pydantic error location that names a union member ('str', 'list[str]',
    'function-after[...]'), not a field: a field such as 'stream' must not be taken for one."""
    if isinstance(part, int):
        return False
    text = str(part)
    return text in _TYPE_TAGS or "[" in text or text.startswith(("function-", "lax-", "strict-", "json-"))


def _validation_error(exc: ValidationError) -> APIError:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if not _is_type_tag(p)]
    param = ".".join(loc) or None
    if err.get("type") == "missing":
        return APIError(
            400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    value = err.get("input")
    shown = json.dumps(value)[:80] if not isinstance(value, dict) else "an object"
    return APIError(
        400,
        f"Invalid value for '{param}': {err.get('msg')} (got {shown}).",
        param=param,
        code="invalid_value" if "type" not in str(err.get("type")) else "invalid_type",
    )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check_json(value: Any) -> None:
    """Refuse JSON that is nested deeper than MAX_JSON_DEPTH or holds a lone surrogate ("\\ud800"),
    naming the parameter. Iterative, so a deep body cannot exhaust the stack here either; lone
    surrogates are valid JSON escapes but not Unicode, and the tokenizer fails on them."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        v, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(
                400,
                f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep (at '{path}').",
                param=path.split(".")[0] or None,
                code="invalid_json",
            )
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise APIError(
                    400,
                    f"Invalid value for '{path or 'body'}': the text holds a lone surrogate "
                    f"({v[exc.start]!a}), which is not valid Unicode; send UTF-8 text.",
                    param=path or None,
                    code="invalid_value",
                ) from None
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((k, depth + 1, path))
                stack.append((x, depth + 1, f"{path}.{k}" if path else str(k)))
        elif isinstance(v, list):
            stack.extend((x, depth + 1, f"{path}.{i}" if path else str(i)) for i, x in enumerate(v))


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(
            400, f"We could not parse the JSON body of your request ({exc}).", code="invalid_json"
        ) from None
    except ValueError as exc:  # NaN / Infinity
        raise APIError(
            400, f"We could not parse the JSON body of your request ({exc}).", code="invalid_json"
        ) from None
    except RecursionError:
        raise APIError(
            400, f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    _check_json(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    except RecursionError:  # pragma: no cover - _check_json bounds the depth first
        raise APIError(400, "The JSON body is nested too deeply.", code="invalid_json") from None


def _body_schemas(*models: type[BaseModel]) -> tuple[dict[str, dict], dict[str, dict]]:
    """({model name: JSON schema}, shared definitions) for /openapi.json, from the request models."""
    schemas: dict[str, dict] = {}
    defs: dict[str, dict] = {}
    for m in models:
        schema = m.model_json_schema(ref_template="#/components/schemas/{model}")
        defs.update(schema.pop("$defs", {}))
        schemas[m.__name__] = schema
    return schemas, defs


def _body_doc(name: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{name}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _sampling(req: _Base, max_tokens: int | None) -> SamplingParams:
    if req.n not in (None, 1):
        raise APIError(
            400,
            "n > 1 is not supported by this server; send n=1 (or several requests).",
            param="n",
            code="unsupported_value",
        )
    if req.logprobs:
        raise APIError(
            400, "logprobs are not supported by this server.", param="logprobs", code="unsupported_value"
        )
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise APIError(400, "'stop' takes at most 4 sequences.", param="stop", code="invalid_value")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=[s for s in stop if s],
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        ignore_eos=bool(req.ignore_eos),
    )


def _completion_body(
    chat: bool,
    cid: str,
    created: int,
    name: str,
    text: str | None,
    finish: str | None,
    *,
    chunk: bool = False,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One response (or streamed chunk) of /v1/chat/completions (`chat`) or /v1/completions.

    A chat choice holds its text as `message` (whole answer) or `delta` (chunk; empty at the end); a text
    completion's choice holds it as `text`.
    """
    if not chat:
        content: dict[str, Any] = {"text": text or ""}
    elif chunk:
        content = {"delta": {"content": text} if text is not None else {}}
    else:
        content = {"message": {"role": "assistant", "content": text, "refusal": None}}
    out: dict[str, Any] = {
        "id": cid,
        "object": ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion",
        "created": created,
        "model": name,
    }
    if chat:
        out["system_fingerprint"] = None
    out["choices"] = [{"index": 0, **content, "logprobs": None, "finish_reason": finish}]
    if usage is not None:
        out["usage"] = usage
    return out


class _Guard:
    """Pure ASGI middleware (so streaming and disconnects pass straight through).

    401 on /v1/* without the right Bearer key. A request body is read here, whole, before the app sees
    it: 413 over `limit` bytes (by Content-Length or by counting a chunked body), 408 when it has not
    all arrived within `body_timeout_s` (a client that sends a byte a minute would otherwise hold its
    connection and a worker forever). The app then reads the buffered body.
    """

    def __init__(
        self, app: Any, limit: int, api_key: str | None, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    ):
        self.app, self.limit, self.api_key, self.body_timeout_s = app, limit, api_key, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope.get("path", "").startswith("/v1/"):
            header = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                msg = (
                    "You didn't provide an API key. Send 'Authorization: Bearer YOUR_KEY'."
                    if not header
                    else "Incorrect API key provided."
                )
                return await error_response(401, msg, code="invalid_api_key")(scope, receive, send)
        length = headers.get(b"content-length")
        too_big = error_response(
            413, f"Request body too large: the limit is {self.limit} bytes.", code="request_too_large"
        )
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        chunks: list[bytes] = []
        seen = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.001, deadline - loop.time()))
            except asyncio.TimeoutError:
                slow = error_response(
                    408,
                    f"The request body did not arrive within {self.body_timeout_s:g} s.",
                    code="request_timeout",
                )
                slow.headers["Connection"] = "close"
                return await slow(scope, receive, send)
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                return await too_big(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body"):
                break
        buffered: dict[str, Any] | None = {
            "type": "http.request",
            "body": b"".join(chunks),
            "more_body": False,
        }

        async def replay():
            nonlocal buffered
            if buffered is not None:
                message, buffered = buffered, None
                return message
            return await receive()  # after the body: disconnect notices

        return await self.app(scope, replay, send)


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> FastAPI:
    """The FastAPI app serving `engine`; `api_key` (if set) is required as a Bearer token on /v1/*."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.utils import get_openapi

    app = FastAPI(title="llm-installer", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    static_dir = resources.files("llm_installer.serve") / "static"
    body_schemas, body_defs = _body_schemas(ChatRequest, CompletionRequest)

    def openapi() -> dict[str, Any]:
        """FastAPI's document plus the request models that `_parse` validates by hand."""
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version="1", routes=app.routes)
            doc.setdefault("components", {}).setdefault("schemas", {}).update({**body_defs, **body_schemas})
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError):
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(_: Request, exc: RequestValidationError):
        err = (exc.errors() or [{}])[0]
        param = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
        return error_response(
            400, f"Invalid value for '{param}': {err.get('msg')}.", param=param, code="invalid_value"
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # The text of an exception can hold paths, prompts or library internals: it goes to the log only.
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(
            500, "The server had an error while processing your request.", type="server_error"
        )

    @app.exception_handler(RecursionError)
    async def _too_deep(_: Request, exc: RecursionError):  # pragma: no cover - bodies are depth-checked
        return error_response(400, "The request is nested too deeply.", code="invalid_json")

    # ----- pages and metadata ------------------------------------------------------------------------
    security_headers = {
        "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
        "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(str(static_dir / "index.html"), media_type="text/html", headers=security_headers)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        allowed = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in allowed:
            raise APIError(404, f"no static file {name!r}", code="not_found")
        return FileResponse(str(static_dir / name), media_type=allowed[name], headers=security_headers)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": engine.model_names, "queued": len(engine._pending)}

    @app.get("/info")
    async def info():
        """What the web page shows: model names, context length, adapter details.

        It needs no key (the page reads it before asking for one), so with a key set it leaves out
        anything that tells a stranger about this machine: file paths and the training record.
        """
        details = dict(engine.info)
        if api_key:
            details["adapter"] = "yes" if details.get("adapter") else None
            details.pop("adapter_info", None)
        return {
            "name": engine.name,
            "models": engine.model_names,
            "default_model": engine.model_names[-1],
            "context_length": engine.context_length,
            "merged_adapter": engine.merged,
            "auth_required": bool(api_key),
            **details,
        }

    def _model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": engine.created, "owned_by": "llm-installer"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(n) for n in engine.model_names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if not model_id:  # `GET /v1/models/`: no model named; "" must not resolve to the default
            raise APIError(404, "The model '' does not exist.", param="model", code="model_not_found")
        engine.resolve(model_id)
        return _model_card(model_id)

    # ----- generation --------------------------------------------------------------------------------
    def _failed(ev: Event) -> str:
        """What a client is told when its row failed in the worker: never the exception text."""
        log.error("request failed in the generation worker: %s", ev.error)
        return "The server had an error while generating this answer; other requests are not affected."

    def _submit(
        prompt_ids: list[int], adapter: str | None, params: SamplingParams
    ) -> tuple[Any, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(ev: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ev)

        return engine.submit(prompt_ids, adapter, params, sink=sink), events

    async def _collect(request: Request, handle, events: asyncio.Queue) -> tuple[str, Event]:
        parts: list[str] = []
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        handle.cancel()
                        raise APIError(499, "client closed the request") from None
                    continue
                parts.append(ev.text)
                if ev.finish_reason:
                    if ev.error:
                        raise APIError(500, _failed(ev), type="server_error")
                    return "".join(parts), ev
        finally:
            if not handle.done.is_set():
                handle.cancel()

    def _usage(ev: Event) -> dict[str, int]:
        return {
            "prompt_tokens": ev.prompt_tokens,
            "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens,
        }

    def _sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def _stream(handle, events: asyncio.Queue, make_chunk, include_usage: bool, first: dict | None):
        try:
            if first is not None:
                yield _sse(first)
            while True:
                ev = await events.get()
                if ev.error:
                    yield _sse(
                        {
                            "error": {
                                "message": _failed(ev),
                                "type": "server_error",
                                "param": None,
                                "code": None,
                            }
                        }
                    )
                    break
                if ev.text:
                    yield _sse(make_chunk(ev.text, None))
                if ev.finish_reason:
                    if ev.finish_reason != "cancelled":
                        yield _sse(make_chunk(None, ev.finish_reason))
                        if include_usage:
                            yield _sse({**make_chunk(None, None, usage=_usage(ev)), "choices": []})
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): free the slot
            handle.cancel()

    async def _answer(request: Request, req: _Base, prompt_ids, adapter, params, name: str, *, chat: bool):
        """Run a request and answer it in OpenAI's shape: a chat completion, or a text completion."""
        cid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        handle, events = _submit(prompt_ids, adapter, params)
        if req.stream:
            chunk = functools.partial(_completion_body, chat, cid, created, name, chunk=True)
            first = None
            if chat:  # the first chat chunk carries the assistant's role
                first = chunk(None, None)
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _stream(handle, events, chunk, include_usage, first),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        text, ev = await _collect(request, handle, events)
        return _completion_body(chat, cid, created, name, text, ev.finish_reason, usage=_usage(ev))

    @app.post("/v1/chat/completions", openapi_extra=_body_doc("ChatRequest"))
    async def chat_completions(request: Request):
        req: ChatRequest = await _parse(request, ChatRequest)
        if req.tools:
            raise APIError(
                400,
                "tools / function calling are not supported by this server.",
                param="tools",
                code="unsupported_value",
            )
        if req.response_format and req.response_format.get("type") not in (None, "text"):
            raise APIError(
                400,
                "only response_format {'type': 'text'} is supported.",
                param="response_format",
                code="unsupported_value",
            )
        adapter = engine.resolve(req.model)
        name = req.model or engine.model_names[-1]
        params = _sampling(req, req.max_completion_tokens or req.max_tokens)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content}
            for m in req.messages
        ]
        prompt_ids = await asyncio.to_thread(engine.chat_prompt_ids, messages)
        engine.check_prompt(prompt_ids, params, param="messages")
        return await _answer(request, req, prompt_ids, adapter, params, name, chat=True)

    @app.post("/v1/completions", openapi_extra=_body_doc("CompletionRequest"))
    async def completions(request: Request):
        req: CompletionRequest = await _parse(request, CompletionRequest)
        if req.echo or (req.best_of or 1) > 1 or req.suffix:
            bad = "echo" if req.echo else "best_of" if (req.best_of or 1) > 1 else "suffix"
            raise APIError(
                400, f"'{bad}' is not supported by this server.", param=bad, code="unsupported_value"
            )
        adapter = engine.resolve(req.model)
        name = req.model or engine.model_names[-1]
        params = _sampling(req, req.max_tokens if req.max_tokens is not None else 16)  # OpenAI's default: 16
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(
                    400,
                    "only one prompt per request is supported; send several requests.",
                    param="prompt",
                    code="unsupported_value",
                )
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = await asyncio.to_thread(engine.text_prompt_ids, prompt)
        else:
            vocab = len(engine.tokenizer)
            if any(t < 0 or t >= vocab for t in prompt):
                raise APIError(400, f"token ids in 'prompt' must be in [0, {vocab}).", param="prompt")
            prompt_ids = list(prompt)
        engine.check_prompt(prompt_ids, params, param="prompt")
        return await _answer(request, req, prompt_ids, adapter, params, name, chat=False)

    app.add_middleware(_Guard, limit=max_body_bytes, api_key=api_key, body_timeout_s=body_timeout_s)
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket up front, so a busy port is a one-line error before the model loads."""
    from llm_installer.errors import UserError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port or --host"
        ) from None
    return sock


def serve(
    engine: Engine,
    *,
    sock: socket.socket,
    api_key: str | None = None,
    log_level: str = "info",
) -> None:
    """Run the server on a bound socket in the foreground until Ctrl-C (uvicorn)."""
    import uvicorn

    engine.start()
    app = create_app(engine, api_key=api_key)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()


@contextlib.contextmanager
def background_server(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_body_bytes: int | None = None,
    host: str = "127.0.0.1",
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> Iterator[str]:
    """Run the server in a thread on a free port (tests, benchmarks, notebooks); yields its base URL.

    The socket is bound before uvicorn starts, so there is no race for the port.
    """
    import uvicorn

    engine.start()
    app = create_app(
        engine,
        api_key=api_key,
        max_body_bytes=max_body_bytes or DEFAULT_MAX_BODY,
        body_timeout_s=body_timeout_s,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
