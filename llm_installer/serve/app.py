"""The OpenAI-compatible HTTP API (FastAPI) over one `Engine`, plus the web chat page at `/`.

The routes are module-level functions on one APIRouter; each finds its engine (and the API key) on
``request.app.state``, so a test can mount any of them on its own app. FastAPI validates the bodies
against the strict request models of `protocol.py` and publishes them in ``/openapi.json``; every
error — broken JSON, a wrong type, an out-of-range value, an engine refusal — is answered as OpenAI's
error JSON ``{"error": {"message", "type", "param", "code"}}``, with status 400 for bad input (FastAPI's
default would be a 422 in its own shape, which OpenAI clients do not understand).

What is checked before a request joins the shared batch (docs/robustness.md): the body arrives within
`body_timeout_s` and under `max_body_bytes` (`guard.py`); it is JSON (sent as application/json) without
NaN/Infinity, nested at most `MAX_JSON_DEPTH` levels, with no lone surrogate in any string; it fits the
request model; its sampling settings pass `SamplingParams.check`; its prompt fits the context; and the
queue has room (else 429). A 500 never carries exception text: the server log has it.

Streaming answers are server-sent events in OpenAI's chunk format ending with ``data: [DONE]``. The
engine's worker thread hands events to the event loop with ``call_soon_threadsafe``; when a client goes
away the response generator is closed and its request is cancelled, so its batch slot frees at the next
decoding step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_installer.serve.engine import Engine, EngineError, Event, SamplingParams
from llm_installer.serve.guard import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY, BodyGuard
from llm_installer.serve.protocol import (
    MAX_JSON_DEPTH,
    APIError,
    ChatRequest,
    CompletionRequest,
    Message,
    RequestBase,
    check_json,
    completion_body,
    error_response,
    sampling_params,
    validation_error,
)

__all__ = [
    "DEFAULT_BODY_TIMEOUT_S",
    "DEFAULT_MAX_BODY",
    "MAX_JSON_DEPTH",
    "APIError",
    "ChatRequest",
    "CompletionRequest",
    "Message",
    "background_server",
    "bind_socket",
    "create_app",
    "error_response",
    "router",
    "serve",
]

log = logging.getLogger(__name__)
router = APIRouter()
STATIC_DIR = resources.files("llm_installer.serve") / "static"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _engine(request: Request) -> Engine:
    return request.app.state.engine


async def checked_json(request: Request) -> None:
    """A dependency of the generation routes: `check_json` on the body FastAPI parsed (cached by
    Starlette, so not parsed twice), before FastAPI validates it against the request model."""
    if await request.body():
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):  # FastAPI reports those
            check_json(await request.json())


# ----- error handlers: everything in OpenAI's error JSON --------------------------------------------------
async def _api_error(_: Request, exc: APIError):
    return exc.response()


async def _engine_error(_: Request, exc: EngineError):
    return error_response(exc.status, exc.message, param=exc.param, code=exc.code)


async def _http_error(_: Request, exc: StarletteHTTPException):
    if exc.status_code == 400:  # FastAPI's "There was an error parsing the body" (e.g. nested too deep)
        return error_response(400, "We could not parse the JSON body of your request.", code="invalid_json")
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(exc.status_code, str(exc.detail), code=code)


async def _request_invalid(_: Request, exc: RequestValidationError):
    return validation_error(list(exc.errors())).response()


async def _unexpected(request: Request, exc: Exception):
    # The text of an exception can hold paths, prompts or library internals: it goes to the log only.
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "The server had an error while processing your request.", type="server_error")


async def _too_deep(_: Request, exc: RecursionError):  # pragma: no cover - bodies are depth-checked
    return error_response(400, "The request is nested too deeply.", code="invalid_json")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    APIError: _api_error,
    EngineError: _engine_error,
    StarletteHTTPException: _http_error,
    RequestValidationError: _request_invalid,
    Exception: _unexpected,
    RecursionError: _too_deep,
}


# ----- pages and metadata ---------------------------------------------------------------------------------
@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(str(STATIC_DIR / "index.html"), media_type="text/html", headers=SECURITY_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str):
    allowed = {"app.js": "text/javascript", "style.css": "text/css"}
    if name not in allowed:
        raise APIError(404, f"no static file {name!r}", code="not_found")
    return FileResponse(str(STATIC_DIR / name), media_type=allowed[name], headers=SECURITY_HEADERS)


@router.get("/health")
async def health(request: Request):
    engine = _engine(request)
    return {"status": "ok", "models": engine.model_names, "queued": engine.queued}


@router.get("/info")
async def info(request: Request):
    """What the web page shows: model names, context length, adapter details.

    It needs no key (the page reads it before asking for one), so with a key set it leaves out
    anything that tells a stranger about this machine: file paths and the training record.
    """
    engine, api_key = _engine(request), request.app.state.api_key
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


def _model_card(engine: Engine, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": engine.created, "owned_by": "llm-installer"}


@router.get("/v1/models")
async def models(request: Request):
    engine = _engine(request)
    return {"object": "list", "data": [_model_card(engine, n) for n in engine.model_names]}


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str):
    if not model_id:  # `GET /v1/models/`: no model named; "" must not resolve to the default
        raise APIError(404, "The model '' does not exist.", param="model", code="model_not_found")
    engine = _engine(request)
    engine.resolve(model_id)
    return _model_card(engine, model_id)


# ----- generation -----------------------------------------------------------------------------------------
def _failed(ev: Event) -> str:
    """What a client is told when its row failed in the worker: never the exception text."""
    log.error("request failed in the generation worker: %s", ev.error)
    return "The server had an error while generating this answer; other requests are not affected."


def _submit(
    engine: Engine, prompt_ids: list[int], adapter: str | None, params: SamplingParams
) -> tuple[Any, asyncio.Queue]:
    """Queue a request on the engine; its events arrive on the returned asyncio queue."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def sink(ev: Event) -> None:
        loop.call_soon_threadsafe(events.put_nowait, ev)

    return engine.submit(prompt_ids, adapter, params, sink=sink), events


async def _collect(request: Request, handle, events: asyncio.Queue) -> tuple[str, Event]:
    """The whole answer of a non-streaming request; cancels it when the client goes away."""
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
    """Server-sent events of one request, ending with [DONE]; closing it cancels the request."""
    try:
        if first is not None:
            yield _sse(first)
        while True:
            ev = await events.get()
            if ev.error:
                error = {"message": _failed(ev), "type": "server_error", "param": None, "code": None}
                yield _sse({"error": error})
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


async def _answer(
    request: Request, req: RequestBase, prompt_ids, adapter, params, name: str, *, chat: bool
) -> Any:
    """Run a request and answer it in OpenAI's shape: a chat completion, or a text completion."""
    cid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
    handle, events = _submit(_engine(request), prompt_ids, adapter, params)
    if req.stream:
        chunk = functools.partial(completion_body, chat, cid, created, name, chunk=True)
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
    return completion_body(chat, cid, created, name, text, ev.finish_reason, usage=_usage(ev))


def _unsupported(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_value")


@router.post("/v1/chat/completions", dependencies=[Depends(checked_json)])
async def chat_completions(request: Request, req: ChatRequest):
    if req.tools:
        raise _unsupported("tools / function calling are not supported by this server.", "tools")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise _unsupported("only response_format {'type': 'text'} is supported.", "response_format")
    engine = _engine(request)
    adapter = engine.resolve(req.model)
    name = req.model or engine.model_names[-1]
    params = sampling_params(req, req.max_completion_tokens or req.max_tokens)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in req.messages
    ]
    prompt_ids = await asyncio.to_thread(engine.chat_prompt_ids, messages)
    engine.check_prompt(prompt_ids, params, param="messages")
    return await _answer(request, req, prompt_ids, adapter, params, name, chat=True)


async def _completion_prompt_ids(engine: Engine, prompt: str | list[str] | list[int]) -> list[int]:
    """The token ids of a /v1/completions prompt: one text, a list of one text, or token ids."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise _unsupported("only one prompt per request is supported; send several requests.", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return await asyncio.to_thread(engine.text_prompt_ids, prompt)
    vocab = len(engine.tokenizer)
    if any(t < 0 or t >= vocab for t in prompt):  # type: ignore[operator]
        raise APIError(400, f"token ids in 'prompt' must be in [0, {vocab}).", param="prompt")
    return [int(t) for t in prompt]


@router.post("/v1/completions", dependencies=[Depends(checked_json)])
async def completions(request: Request, req: CompletionRequest):
    if req.echo or (req.best_of or 1) > 1 or req.suffix:
        bad = "echo" if req.echo else "best_of" if (req.best_of or 1) > 1 else "suffix"
        raise _unsupported(f"'{bad}' is not supported by this server.", bad)
    engine = _engine(request)
    adapter = engine.resolve(req.model)
    name = req.model or engine.model_names[-1]
    params = sampling_params(req, req.max_tokens if req.max_tokens is not None else 16)  # OpenAI's default
    prompt_ids = await _completion_prompt_ids(engine, req.prompt)
    engine.check_prompt(prompt_ids, params, param="prompt")
    return await _answer(request, req, prompt_ids, adapter, params, name, chat=False)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with the request models' schemas as pydantic writes them: FastAPI's own
    OpenAPI models hold bounds as floats, which would turn the seed's maximum 2**63 - 1 into 2**63."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version="1", routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for m in (ChatRequest, CompletionRequest):
            schema = m.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[m.__name__] = schema
        app.openapi_schema = doc
    return app.openapi_schema


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> FastAPI:
    """The FastAPI app serving `engine`; `api_key` (if set) is required as a Bearer token on /v1/*."""
    app = FastAPI(
        title="llm-installer",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.engine, app.state.api_key = engine, api_key
    app.openapi = functools.partial(_openapi, app)  # type: ignore[method-assign]
    app.include_router(router)
    app.add_middleware(BodyGuard, limit=max_body_bytes, api_key=api_key, body_timeout_s=body_timeout_s)
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
