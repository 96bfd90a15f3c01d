"""ASGI middleware in front of the service: bearer token, request body limit, security headers.

Pure ASGI (no `BaseHTTPMiddleware`) so that the body limit acts on the stream itself: a request
whose `Content-Length` is over the limit is answered 413 before any of its body is read, and a
chunked body is counted as it arrives and cut off at the limit (the app never buffers it whole).
"""

from __future__ import annotations

import hmac
import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'"),
]


class Guard:
    """Token check for `/api/*` (except `/api/health`), body limit, security headers.

    Args:
        app: the wrapped ASGI app.
        token: required bearer token, or None for an open service.
        max_body: largest request body in bytes (upload plus multipart envelope).
        too_large: the 413 message (default: the body limit in bytes); the app passes one that names
            `--max-upload-mb`, since a client never sees the envelope allowance.
    """

    def __init__(self, app: ASGIApp, token: str | None = None, max_body: int = 20 * 2**20,
                 too_large: str | None = None):
        self.app = app
        self.token = token.encode() if token else None
        self.max_body = max_body
        self.too_large = too_large or f"request body over the limit of {max_body} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _with_headers(send)
        if self.token and _protected(scope["path"]) and not self._authorized(scope):
            await _json(send, 401, "missing or wrong bearer token: send the header 'Authorization: Bearer TOKEN'",
                        [(b"www-authenticate", b'Bearer realm="cxrlab"')])
            return
        length = _header(scope, b"content-length")
        if length is not None and not length.isdigit():
            await _json(send, 400, f"invalid Content-Length header {length!r}: expected a number of bytes")
            return
        if length is not None and int(length) > self.max_body:
            await _json(send, 413, self.too_large)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, _counting(receive, self.max_body, self.too_large), send_tracking)
        except HTTPException as exc:  # the limit hit inside a part of the app that does not handle it
            if started or exc.status_code != 413:
                raise
            await _json(send, 413, str(exc.detail))

    def _authorized(self, scope: Scope) -> bool:
        value = _header(scope, b"authorization") or ""
        scheme, _, given = value.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token)


def _protected(path: str) -> bool:
    return path.startswith("/api/") and path.rstrip("/") != "/api/health"


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _counting(receive: Receive, limit: int, error: str) -> Receive:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, error)
        return message

    return wrapped


def _with_headers(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            names = {k.lower() for k, _ in message.get("headers", [])}
            extra = [(k, v) for k, v in _SECURITY_HEADERS if k not in names]
            message = {**message, "headers": list(message.get("headers", [])) + extra}
        await send(message)

    return wrapped


async def _json(send: Send, status: int, error: str, headers: list | None = None) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
