"""OpenAI's wire format for the server: the error JSON, the request bodies, and the response bodies.

FastAPI validates each body against the strict pydantic models here (strict: "0.5" is not a number, as
in OpenAI's API); `app.py`'s handler for its RequestValidationError answers with `validation_error`'s
OpenAI-shaped 400, not FastAPI's own 422. The checks pydantic does not make — NaN/Infinity, nesting
deeper than MAX_JSON_DEPTH, lone surrogates — are `check_json`'s, run on the parsed body first.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from llm_installer.serve.request import SEED_MAX, SEED_MIN, SamplingParams

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
class RequestBase(BaseModel):
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


class ChatRequest(RequestBase):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(RequestBase):
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


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """OpenAI's 400 for the first of FastAPI's request-validation errors, naming the parameter.

    FastAPI's locations start with where the value came from ("body", "path"); a location that is only
    "body" means the body as a whole was no JSON object (or no JSON at all)."""
    err = errors[0] if errors else {}
    where, *loc = [str(p) for p in err.get("loc", ("body",)) if not _is_type_tag(p)] or ["body"]
    if where == "body" and err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "invalid JSON")
        return APIError(
            400, f"We could not parse the JSON body of your request ({detail}).", code="invalid_json"
        )
    if where == "body" and not loc:
        return APIError(
            400,
            "The request body must be a JSON object, sent with 'Content-Type: application/json'.",
            code="invalid_json",
        )
    param = ".".join(loc) or None
    if err.get("type") == "missing":
        return APIError(
            400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    value = err.get("input")
    shown = json.dumps(value, default=str)[:80] if not isinstance(value, dict) else "an object"
    return APIError(
        400,
        f"Invalid value for '{param}': {err.get('msg')} (got {shown}).",
        param=param,
        code="invalid_value" if "type" not in str(err.get("type")) else "invalid_type",
    )


def check_json(value: Any) -> None:
    """Refuse a parsed body holding NaN/Infinity, nested deeper than MAX_JSON_DEPTH or holding a lone
    surrogate ("\\ud800"), naming the parameter. Python's json module accepts all three; NaN is not
    JSON, and the tokenizer fails on lone surrogates (valid JSON escapes, but not Unicode). Iterative,
    so a deep body cannot exhaust the stack here either."""
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
        if isinstance(v, float) and not math.isfinite(v):
            raise APIError(
                400,
                f"We could not parse the JSON body of your request ({v!r} at '{path}' is not valid JSON).",
                param=path or None,
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


def sampling_params(req: RequestBase, max_tokens: int | None) -> SamplingParams:
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


def completion_body(
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
