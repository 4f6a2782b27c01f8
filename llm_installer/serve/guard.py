"""The ASGI middleware in front of the API: the Bearer key, and a body read whole under a size and time
limit before FastAPI sees it (docs/robustness.md)."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from llm_installer.serve.protocol import error_response

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: far more than any prompt this context can hold
DEFAULT_BODY_TIMEOUT_S = 30.0  # a body that takes longer to arrive is answered 408 and dropped


class BodyGuard:
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
        refusal = self._key_refusal(scope, headers) or self._length_refusal(headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, refusal = await self._read_body(receive)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if body is None:  # the client went away while sending
            return None
        buffered: dict[str, Any] | None = {"type": "http.request", "body": body, "more_body": False}

        async def replay():
            nonlocal buffered
            if buffered is not None:
                message, buffered = buffered, None
                return message
            return await receive()  # after the body: disconnect notices

        return await self.app(scope, replay, send)

    def _key_refusal(self, scope: dict, headers: dict[bytes, bytes]) -> Any:
        """The 401 for a /v1/ request without the right Bearer key (compared in constant time)."""
        if not self.api_key or not scope.get("path", "").startswith("/v1/"):
            return None
        header = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return None
        msg = (
            "You didn't provide an API key. Send 'Authorization: Bearer YOUR_KEY'."
            if not header
            else "Incorrect API key provided."
        )
        return error_response(401, msg, code="invalid_api_key")

    def _too_big(self) -> Any:
        return error_response(
            413, f"Request body too large: the limit is {self.limit} bytes.", code="request_too_large"
        )

    def _length_refusal(self, headers: dict[bytes, bytes]) -> Any:
        """The 413 for a body whose Content-Length is over the limit, before reading any of it."""
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return self._too_big()
        return None

    async def _read_body(self, receive) -> tuple[bytes | None, Any]:
        """(the whole body, None), or (None, the 408/413 to answer), or (None, None) on a disconnect."""
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
                return None, slow
            if message["type"] == "http.disconnect":
                return None, None
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                return None, self._too_big()
            chunks.append(body)
            if not message.get("more_body"):
                return b"".join(chunks), None
