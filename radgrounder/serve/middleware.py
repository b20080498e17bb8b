"""ASGI middleware: request ids, access logs without patient data, and the bearer token."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

logger = logging.getLogger("radgrounder.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Paths open without a token: the health check and the viewer page with its static files
# (the page then asks for the token and sends it with every API call).
OPEN_PATHS = ("/v1/health", "/", "/index.html")
OPEN_PREFIXES = ("/static/",)


async def send_json(send: Send, status: int, body: dict[str, Any], headers=()) -> None:
    """Send a whole JSON response."""
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class RequestMiddleware:
    """Gives every HTTP request an id (``scope["state"]["request_id"]`` and the
    ``X-Request-ID`` response header), checks the bearer token when one is set, turns
    unexpected errors into a JSON 500, and logs one line per request: id, method, path,
    status and duration. Query strings, bodies, file names and exception messages are
    never logged."""

    def __init__(self, app: ASGIApp, *, token: str | None = None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    def _authorized(self, scope: Scope) -> bool:
        if self.token is None:
            return True
        path = scope.get("path", "")
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return True
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                scheme, _, given = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(given.strip(), self.token)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        response_started = False
        id_header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                response_started = True
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        try:
            if not self._authorized(scope):
                await send_json(
                    send_with_id,
                    401,
                    {"detail": "missing or wrong token: send 'Authorization: Bearer <token>'"},
                    headers=[(b"www-authenticate", b"Bearer")],
                )
            else:
                await self.app(scope, receive, send_with_id)
        except Exception as exc:
            logger.error("request_id=%s unhandled %s", request_id, type(exc).__name__)
            logger.debug("request_id=%s traceback", request_id, exc_info=True)
            if not response_started:
                await send_json(
                    send_with_id,
                    500,
                    {"detail": f"internal server error (request id {request_id})"},
                )
        finally:
            logger.info(
                "request_id=%s method=%s path=%s status=%d duration_ms=%.1f",
                request_id,
                scope.get("method", "-"),
                scope.get("path", "-"),
                status,
                (time.perf_counter() - started) * 1000,
            )
