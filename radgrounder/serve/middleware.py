"""ASGI middleware: request ids, access logs without patient data, the bearer token, the
Host allowlist, cross-origin refusal and the security headers of every response."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger("radgrounder.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Paths open without a token: the health check, the viewer page with its static files (the
# page then asks for the token and sends it with every API call) and the API description
# (Swagger UI's "Authorize" button takes the token).
OPEN_PATHS = ("/v1/health", "/", "/index.html", "/docs", "/openapi.json", "/docs/oauth2-redirect")
OPEN_PREFIXES = ("/static/",)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = (b"GET", b"HEAD", b"OPTIONS")

# The viewer loads only its own files; nothing may frame it.
VIEWER_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# FastAPI's Swagger UI page: an inline bootstrap script and the Swagger bundle from its CDN.
DOCS_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "img-src 'self' data: https://fastapi.tiangolo.com; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


def _host_name(value: str) -> str | None:
    """The host name of a Host header value (``[::1]:8000`` -> ``::1``); None if malformed."""
    value = value.strip().lower()
    if not value or any(c in value for c in " /\\@?#"):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or (value[end + 1 :] and not value[end + 1 :].startswith(":")):
            return None
        name = value[1:end]
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
        return name
    name, _, port = value.partition(":")
    if port and not port.isdigit():
        return None
    return name.rstrip(".") or None


def allowed_hosts(bind_host: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """Host names the server answers to: loopback names, the bound address when it is a
    specific one, and ``extra`` (``--allowed-host``; ``*`` allows any)."""
    names = list(LOOPBACK_HOSTS)
    bind = bind_host.strip().strip("[]").lower()
    if bind and bind not in ("0.0.0.0", "::"):
        names.append(bind)
    names += [h.strip().strip("[]").lower().rstrip(".") for h in extra if h.strip()]
    return tuple(dict.fromkeys(names))


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
    ``X-Request-ID`` response header), refuses a Host header outside ``hosts`` (400: DNS
    rebinding), refuses state-changing requests a browser sends from another origin (403:
    CSRF; judged by ``Sec-Fetch-Site`` and ``Origin``, which browsers always send
    cross-origin and scripts cannot forge, so curl and Python clients are unaffected),
    checks the bearer token when one is set, adds the security headers to every response,
    turns unexpected errors into a JSON 500, and logs one line per request: id, method,
    path, status and duration. Query strings, bodies, file names and exception messages are
    never logged."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None = None,
        hosts: Iterable[str] | None = LOOPBACK_HOSTS,
    ) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.hosts = None if hosts is None or "*" in hosts else frozenset(hosts)

    def _header(self, scope: Scope, name: bytes) -> str | None:
        for key, value in scope.get("headers", []):
            if key.lower() == name:
                return value.decode("latin-1")
        return None

    def _host_refusal(self, scope: Scope) -> str | None:
        if self.hosts is None:
            return None
        host = self._header(scope, b"host")
        if host is None:  # HTTP/1.0 without Host: no browser (and no rebinding) sends that
            return None
        name = _host_name(host)
        if name is None or name not in self.hosts:
            return (
                "Host header not allowed: this server answers to "
                f"{', '.join(sorted(self.hosts))}; start it with --allowed-host NAME to add one"
            )
        return None

    def _origin_refusal(self, scope: Scope) -> str | None:
        if scope.get("method", "GET").encode() in SAFE_METHODS:
            return None
        site = self._header(scope, b"sec-fetch-site")
        if site is not None and site.lower() not in ("same-origin", "none"):
            return "cross-origin request refused (Sec-Fetch-Site: " + site[:20] + ")"
        origin = self._header(scope, b"origin")
        if origin is None:
            return None
        host = self._header(scope, b"host") or ""
        parts = urlsplit(origin)
        if origin == "null" or not parts.netloc or parts.netloc.lower() != host.lower():
            return "cross-origin request refused: Origin does not match Host"
        return None

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
        path = scope.get("path", "")
        extra = [
            (b"x-request-id", request_id.encode()),
            *SECURITY_HEADERS,
            (
                b"content-security-policy",
                (DOCS_CSP if path.startswith("/docs") else VIEWER_CSP).encode(),
            ),
        ]
        if path.startswith("/v1/"):
            extra.append((b"cache-control", b"no-store"))

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                response_started = True
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [
                    *message.get("headers", []),
                    *((k, v) for k, v in extra if k not in names),
                ]
            await send(message)

        try:
            refusal = self._host_refusal(scope)
            if refusal is not None:
                await send_json(send_with_id, 400, {"detail": refusal})
                return
            refusal = self._origin_refusal(scope)
            if refusal is not None:
                await send_json(send_with_id, 403, {"detail": refusal})
                return
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
