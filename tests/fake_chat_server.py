"""Plumbing for fake OpenAI-compatible chat-completions servers on 127.0.0.1, with scripted faults.

A fake subclasses :class:`FakeChatServer` (with its own :class:`Request`, giving the ``key`` that
faults, delays, ``count`` and ``times`` go by) and :class:`ChatHandler` (with ``_answer``, which
answers one request that was not dropped). Faults are scripted per key or for every request, for
a number of requests or forever, and every request is recorded. The shared fault kinds are
``"drop"`` (close the socket without a response) and ``"sleep"`` (answer only after ``seconds``,
past the client timeout); a fake's :class:`Fault` subclass lists all of its ``KINDS``.
"""

from __future__ import annotations

import functools
import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, TypeVar

_S = TypeVar("_S", bound="FakeChatServer")


@dataclass(frozen=True)
class Fault:
    """A scripted misbehaviour; subclasses add fields and name their ``KINDS``."""

    KINDS: ClassVar[frozenset[str]] = frozenset()

    kind: str
    status: int = 500

    def __post_init__(self) -> None:
        assert self.kind in self.KINDS, self.kind


@dataclass
class Request:
    """One recorded request: ``body`` is the decoded JSON, None when it was not JSON."""

    time: float
    path: str
    headers: dict[str, str]
    body: Any

    @property
    def key(self) -> str | None:
        """What faults, delays, ``count`` and ``times`` go by."""
        raise NotImplementedError

    @property
    def prompt(self) -> str | None:
        """The user message to answer; None answers HTTP 400."""
        raise NotImplementedError

    def messages(self, role: str) -> list[str]:
        """The contents of the messages with ``role``, in order; [] when the body has none."""
        try:
            return [m["content"] for m in self.body["messages"] if m["role"] == role]
        except (KeyError, TypeError):
            return []


class ChatHandler(BaseHTTPRequestHandler):
    """Records each POST, routes it and sends what ``_answer`` makes of it."""

    fake: FakeChatServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        """``/props`` as llama.cpp's server answers it (``total_slots``) when ``fake.slots``
        is set; 404 otherwise, as vLLM and Ollama answer."""
        self.fake.gets.append(self.path)
        self._ended = True  # not counted in flight
        if self.path == "/props" and self.fake.slots is not None:
            self._send(200, {"total_slots": self.fake.slots, "model_path": "fake.gguf"})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        request = self.fake.request_class(time.monotonic(), self.path, dict(self.headers), body)
        fault = self.fake._begin(request)
        self._ended = False
        try:
            time.sleep(self.fake.latency + self.fake.delays.get(request.key or "", 0.0))
            if self.path != "/v1/chat/completions":
                self._send_error(404, f"no route {self.path}")
            elif request.prompt is None:
                self._send_error(400, "no user message")
            elif fault is not None and fault.kind == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            else:
                if fault is not None and fault.kind == "sleep":
                    time.sleep(fault.seconds)
                self._answer(request, fault)
        except OSError:
            pass  # the client gave up (timeout) before the answer
        finally:
            self._finish()

    def _answer(self, request: Any, fault: Any) -> None:
        """Answer ``request`` (which has a prompt) under ``fault`` (None: none, never "drop")."""
        raise NotImplementedError

    def _finish(self) -> None:
        # Leave the in-flight count before the client can see the answer, or its next request
        # could arrive first and be counted on top of this one.
        if not self._ended:
            self._ended = True
            self.fake._end()

    def _send_completion(self, content: str, *, finish: str = "stop", empty: bool = False) -> None:
        """HTTP 200 with a chat completion whose one choice says ``content`` (none if ``empty``)."""
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": finish,
        }
        reply = {
            "id": f"chatcmpl-{len(self.fake.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "fake",
            "choices": [] if empty else [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        self._send(200, reply)

    def _send_error(self, status: int, message: str, retry_after: float | None = None) -> None:
        headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
        self._send(status, {"error": {"message": message}}, headers)

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self._send_bytes(status, data, "application/json", headers)

    def _send_bytes(
        self, status: int, data: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self._finish()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up on purpose (timeouts) are not errors here


class FakeChatServer:
    """``with Fake() as server: client(server.url)``; subclasses set the two classes below."""

    request_class: ClassVar[type[Request]] = Request
    handler_class: ClassVar[type[ChatHandler]] = ChatHandler

    def __init__(self) -> None:
        self.latency = 0.0  # every request takes this long, so concurrent ones overlap
        self.delays: dict[str, float] = {}  # extra latency per key
        self.requests: list[Any] = []
        self.gets: list[str] = []  # paths of GET requests
        self.slots: int | None = None  # what GET /props reports, None: no such route
        self.max_in_flight = 0
        self._in_flight = 0
        self._scripts: dict[str | None, list[list[Any]]] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def _script(self, fault: Fault, key: str | None, times: int | None) -> None:
        """Answer the next ``times`` requests (None: all) for ``key`` (None: any) with ``fault``;
        a key's own script goes before the global one."""
        with self._lock:
            self._scripts.setdefault(key, []).append([fault, times])

    def reset(self) -> None:
        """Forget the scripts, the recorded requests and ``max_in_flight``."""
        with self._lock:
            self._scripts.clear()
            self.requests.clear()
            self.max_in_flight = 0

    def count(self, key: str | None = None) -> int:
        """How many requests came for ``key`` (None: in all)."""
        with self._lock:
            return sum(key is None or r.key == key for r in self.requests)

    def times(self, key: str) -> list[float]:
        """When the requests for ``key`` came (``time.monotonic``)."""
        with self._lock:
            return [r.time for r in self.requests if r.key == key]

    def start(self: _S) -> _S:
        handler = type("Handler", (self.handler_class,), {"fake": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        serve = functools.partial(self._httpd.serve_forever, poll_interval=0.01)
        threading.Thread(target=serve, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _begin(self, request: Request) -> Any:
        """Record ``request`` and take the fault scripted for it, if any."""
        with self._lock:
            self.requests.append(request)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            for key in (request.key, None):
                script = self._scripts.get(key)
                if script:
                    fault, left = script[0]
                    if left is not None:
                        script[0][1] -= 1
                        if left <= 1:
                            script.pop(0)
                    if left is None or left > 0:
                        return fault
            return None

    def _end(self) -> None:
        with self._lock:
            self._in_flight -= 1
