"""A minimal client for OpenAI-compatible chat-completions servers (vLLM, Ollama, llama.cpp).

:class:`ChatClient` sends one request and sorts what can go wrong into :class:`RetryableError`
(timeouts, dropped connections, HTTP 5xx/408/409/425/429, a body that is not JSON) and
:class:`FatalError` (other HTTP errors, which repeating cannot fix). The retry loop, and what
counts as a usable answer, belong to the callers (:mod:`radgrounder.labels.llm`,
:mod:`radgrounder.evaluation.judge`); the helpers here are what they share.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import math
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from radgrounder.errors import RadGrounderError

DEFAULT_CONCURRENCY = 4


class RetryableError(Exception):
    """An attempt worth repeating; ``wait`` (from a Retry-After header, as servers send with 429
    and 503) replaces the backoff delay. ``kind`` says what went wrong, so a caller can retry
    with something changed instead of resending the same request: ``"transport"`` (connection,
    HTTP 5xx/429), ``"timeout"`` (no reply in time), ``"reply"`` (the reply broke the format:
    at temperature 0 the same request gives the same reply) or ``"length"`` (the reply was cut
    off at ``max_tokens``)."""

    def __init__(self, reason: str, wait: float | None = None, kind: str = "transport") -> None:
        super().__init__(reason)
        self.wait = wait
        self.kind = kind


class FatalError(Exception):
    """An attempt that repeating cannot fix (bad request, auth, wrong URL); ``status`` is the
    HTTP status code."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


def _timed_connection(base: type[http.client.HTTPConnection], connect_timeout: float):
    """An ``http.client`` connection class that connects (TCP, and TLS for https) within
    ``connect_timeout`` and then waits for the reply with the request's own timeout."""

    class Connection(base):  # type: ignore[misc, valid-type]
        def connect(self) -> None:
            read_timeout = self.timeout
            self.timeout = connect_timeout
            try:
                super().connect()
            finally:
                self.timeout = read_timeout
            self.sock.settimeout(read_timeout)

    return Connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, connect_timeout: float) -> None:
        super().__init__()
        self._conn = _timed_connection(http.client.HTTPConnection, connect_timeout)

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(self._conn, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, connect_timeout: float) -> None:
        super().__init__()
        self._conn = _timed_connection(http.client.HTTPSConnection, connect_timeout)

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(self._conn, req, context=self._context)


class ChatClient:
    """Posts chat-completions requests to ``{endpoint}/chat/completions``.

    ``endpoint`` is the server's base URL, e.g. ``http://127.0.0.1:8000/v1``; a trailing
    ``/chat/completions`` is accepted too. ``field`` names the argument in error messages.
    ``connect_timeout`` bounds reaching the server (a dead or wrong address fails fast);
    ``timeout`` bounds waiting for its reply, which includes the time the request waits in
    the server's queue when all its slots are busy (keep the concurrency at or below the
    server's parallel slots). Servers on this machine are reached directly, never through
    environment proxies.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        field: str = "endpoint",
    ) -> None:
        self.base = check_endpoint(endpoint, field)
        self.field = field
        self.url = self.base + "/chat/completions"
        check_number("timeout", timeout, 0, exclusive=True)
        check_number("connect_timeout", connect_timeout, 0, exclusive=True)
        if api_key is not None and not isinstance(api_key, str):
            raise RadGrounderError(f"api_key: expected a string, got {type(api_key).__name__}")
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        host = urllib.parse.urlsplit(self.url).hostname or ""
        handlers: list[Any] = [_HTTPHandler(connect_timeout), _HTTPSHandler(connect_timeout)]
        if is_loopback(host):
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    def post(self, body: bytes) -> Any:
        """One POST of the JSON ``body``; returns the decoded JSON reply.

        Raises :class:`RetryableError` or :class:`FatalError` with a one-line reason.
        """
        request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        return self._send(request)

    def get(self, path: str) -> Any:
        """GET ``path`` relative to the server's root (``/props``) or base URL (``models``)."""
        if path.startswith("/"):
            parts = urllib.parse.urlsplit(self.base)
            url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        else:
            url = f"{self.base}/{path}"
        headers = {k: v for k, v in self._headers.items() if k != "Content-Type"}
        return self._send(urllib.request.Request(url, headers=headers, method="GET"))

    def _send(self, request: urllib.request.Request) -> Any:
        waited = (
            f"no reply within {self.timeout:g} s (a busy server queues requests: lower the "
            "concurrency to its parallel slots, or raise the timeout)"
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise http_error(exc) from None
        except TimeoutError:  # connected and sent; the reply did not come in time
            raise RetryableError(waited, kind="timeout") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise RetryableError(
                    f"could not connect within {self.connect_timeout:g} s"
                ) from None
            raise RetryableError(f"connection error: {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise RetryableError(f"connection error: {type(exc).__name__}: {exc}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise RetryableError(f"response body is not JSON: {excerpt(raw)!r}") from None

    def check_reachable(self) -> None:
        """Fail in one line when nothing listens at the endpoint (refused, unknown host, no
        answer within the connect timeout), before a batch spends minutes retrying; a
        server that answers, even with an error, passes."""
        parts = urllib.parse.urlsplit(self.base)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((parts.hostname, port), timeout=self.connect_timeout):
                return
        except TimeoutError:
            why = f"no answer within {self.connect_timeout:g} s"
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
        raise RadGrounderError(
            f"{self.field} {self.base}: cannot connect ({why}); is the server running there?"
        )

    def concurrency(self, requested: int | None) -> tuple[int, str]:
        """Requests to keep in flight and where the number came from: ``requested``
        (``"argument"``), else the server's parallel slots (``"server"``), else
        ``DEFAULT_CONCURRENCY`` (``"default"``), at or below common servers' slot counts
        (llama-server 4 by default, Ollama often 1-4), so requests do not wait in a queue."""
        if requested is not None:
            return requested, "argument"
        slots = self.server_slots()
        return (slots, "server") if slots else (DEFAULT_CONCURRENCY, "default")

    def server_slots(self) -> int | None:
        """How many requests the server works on at once, where it says so (llama.cpp's
        ``/props`` ``total_slots``); None when it does not or cannot be asked."""
        try:
            props = self.get("/props")
        except (RetryableError, FatalError):
            return None
        slots = props.get("total_slots") if isinstance(props, dict) else None
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            return None
        return slots


def http_error(exc: urllib.error.HTTPError) -> RetryableError | FatalError:
    """Classify an HTTP error response, keeping an excerpt of its body in the reason."""
    try:
        text = excerpt(exc.read(2000))
    except (OSError, http.client.HTTPException):
        text = ""
    finally:
        exc.close()
    reason = f"HTTP {exc.code}: {text}" if text else f"HTTP {exc.code}"
    if exc.code >= 500 or exc.code in (408, 409, 425, 429):
        return RetryableError(reason, retry_after(exc.headers.get("Retry-After")))
    return FatalError(reason, exc.code)


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); None if unusable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def backoff_delay(attempt: int, wait: float | None, backoff: float, max_backoff: float) -> float:
    """Seconds to sleep before retry number ``attempt + 1``: the server's ``wait`` if it gave
    one, else exponential backoff with jitter; never more than ``max_backoff``."""
    if wait is not None:
        return min(wait, max_backoff)
    # Jitter keeps many workers that failed together from retrying in lockstep.
    base = min(max_backoff, backoff * 2.0**attempt)
    return base * random.uniform(0.5, 1.0)


def excerpt(raw: bytes | str, limit: int = 200) -> str:
    """The text on one line, cut to ``limit`` characters, for error messages."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def reply_content(reply: Any, *, allow_empty: bool = False) -> tuple[str, Any]:
    """``(content, finish_reason)`` of the first choice of a chat-completions reply.

    A reply without choices raises :class:`RetryableError`; so does a blank content unless
    ``allow_empty`` (then it comes back as ``""``).
    """
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices:
        raise RetryableError(f"reply has no choices: {excerpt(json.dumps(reply))!r}")
    first = choices[0] if isinstance(choices[0], dict) else {}
    message = first.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str) or not content.strip():
        if not allow_empty:
            raise RetryableError("reply has no message content")
        content = content if isinstance(content, str) else ""
    return content, first.get("finish_reason")


def first_json_object(content: str) -> Any:
    """The first JSON object in a reply: after an optional Markdown fence or leading prose,
    and ignoring anything after it (servers without constrained decoding often add an
    explanation). Raises ValueError when the reply holds no complete JSON object."""
    text = strip_fence(content)
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start >= 0:
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    raise ValueError(f"no JSON object in the reply: {excerpt(text)!r}")


def read_api_key(path: Path) -> str:
    """The API key in the file ``path`` (one line). Refused when others may read the file."""
    import os
    import stat

    try:
        info = os.stat(path)
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise RadGrounderError(f"cannot read the API key file: {exc.strerror}", path=path) from None
    except UnicodeDecodeError:
        raise RadGrounderError("the API key file is not UTF-8 text", path=path) from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise RadGrounderError(
            f"the API key file is readable by others (mode {stat.S_IMODE(info.st_mode):o}); "
            "chmod 600 it",
            path=path,
        )
    if not text or len(text.splitlines()) != 1:
        raise RadGrounderError("the API key file must hold the key on one line", path=path)
    return text


def strip_fence(content: str) -> str:
    """The content without surrounding whitespace and a Markdown code fence (```json … ```),
    which servers without constrained decoding often put around JSON."""
    text = content.strip()
    if text.startswith("```") and text.endswith("```") and len(text) >= 6:
        text = text[3:-3].removeprefix("json").strip()
    return text


def check_endpoint(endpoint: object, field: str = "endpoint") -> str:
    """The base URL without a trailing slash or ``/chat/completions``; raises
    RadGrounderError (naming ``field``) for anything but an http(s) URL with a host."""
    if not isinstance(endpoint, str):
        raise RadGrounderError(f"{field}: expected a URL string, got {endpoint!r}")
    parts = urllib.parse.urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RadGrounderError(
            f"{field}: {endpoint!r} is not an http(s) URL with a host "
            "(expected e.g. http://127.0.0.1:8000/v1)"
        )
    if parts.query or parts.fragment:
        raise RadGrounderError(f"{field}: {endpoint!r} must not have a query or fragment")
    base = endpoint.strip().rstrip("/")
    return base.removesuffix("/chat/completions")


def check_number(
    name: str, value: object, low: float, *, integer: bool = False, exclusive: bool = False
) -> None:
    """Raise RadGrounderError unless ``value`` is a finite number (an int if ``integer``,
    never a bool) that is >= ``low`` (> ``low`` if ``exclusive``)."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (exclusive and value == low):
        bound = f"> {low:g}" if exclusive else f">= {low:g}"
        kind = "an integer" if integer else "a number"
        raise RadGrounderError(f"{name}: expected {kind} {bound}, got {value!r}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine (``localhost`` or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def progress_bar(
    enabled: bool, total: int, done: int = 0, label: str = ""
) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr (only when it is a terminal); yields ``advance()``."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    bar = Progress(console=console, disable=not (enabled and console.is_terminal))
    task = bar.add_task(label, total=total, completed=done)
    with bar:
        yield lambda: bar.advance(task)
