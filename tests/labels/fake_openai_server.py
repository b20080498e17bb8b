"""A chat-completions server on 127.0.0.1 for testing LLMExtractor, with scripted faults.

The "model" answers from canned answers keyed by the user message (the sentence), else by finding
class display names verbatim. Faults are scripted per sentence or for every request, for a number
of requests or forever, and every request is recorded.
"""

from __future__ import annotations

import functools
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from radgrounder.anatomy import load_schema

KINDS = frozenset(
    {
        "status",  # HTTP error with `status`
        "rate_limit",  # HTTP 429 with Retry-After: `retry_after`
        "sleep",  # answer only after `seconds` (past the client timeout)
        "drop",  # close the socket without a response
        "invalid_json",  # message content that is not JSON
        "bad_category",  # a category outside the schema
        "missing_key",  # an entry without "category"
        "not_verbatim",  # an extra keyword that the sentence does not contain
        "empty_choices",  # "choices": []
    }
)


@dataclass(frozen=True)
class Fault:
    kind: str
    status: int = 500
    retry_after: float = 0.0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind


@dataclass
class Request:
    time: float
    path: str
    headers: dict[str, str]
    body: Any

    @property
    def sentence(self) -> str | None:
        try:
            return next(m["content"] for m in self.body["messages"] if m["role"] == "user")
        except (KeyError, TypeError, StopIteration):
            return None

    @property
    def system(self) -> str:
        return next(m["content"] for m in self.body["messages"] if m["role"] == "system")


class FakeOpenAIServer:
    """``with FakeOpenAIServer() as server: LLMExtractor(server.url, "fake")``."""

    def __init__(self, answers: dict[str, list[dict[str, str]]] | None = None) -> None:
        self.answers = dict(answers or {})
        self.latency = 0.0  # every request takes this long, so concurrent ones overlap
        self.requests: list[Request] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._scripts: dict[str | None, list[list[Any]]] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def fail(self, fault: Fault, *, sentence: str | None = None, times: int | None = 1) -> None:
        """Answer the next ``times`` requests (None: all) for ``sentence`` (None: any) with
        ``fault``; a sentence's own script goes before the global one."""
        with self._lock:
            self._scripts.setdefault(sentence, []).append([fault, times])

    def reset(self) -> None:
        with self._lock:
            self._scripts.clear()
            self.requests.clear()
            self.max_in_flight = 0

    def count(self, sentence: str | None = None) -> int:
        with self._lock:
            return sum(sentence is None or r.sentence == sentence for r in self.requests)

    def times(self, sentence: str) -> list[float]:
        with self._lock:
            return [r.time for r in self.requests if r.sentence == sentence]

    def start(self) -> FakeOpenAIServer:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        serve = functools.partial(self._httpd.serve_forever, poll_interval=0.01)
        threading.Thread(target=serve, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _begin(self, request: Request) -> Fault | None:
        with self._lock:
            self.requests.append(request)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            for key in (request.sentence, None):
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

    def mentions_for(self, sentence: str) -> list[dict[str, str]]:
        if sentence in self.answers:
            return list(self.answers[sentence])
        found = []
        for cls in load_schema():
            for name in (cls.name_en, cls.name_de):
                if name in sentence:
                    found.append({"keyword": name, "category": cls.name})
        return found


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up on purpose (timeouts) are not errors here


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAIServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        request = Request(time.monotonic(), self.path, dict(self.headers), body)
        fault = self.fake._begin(request)
        self._ended = False
        try:
            time.sleep(self.fake.latency)
            if self.path != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
            elif request.sentence is None:
                self._send(400, {"error": {"message": "no user message"}})
            else:
                self._answer(request.sentence, fault)
        except OSError:
            pass  # the client gave up (timeout) before the answer
        finally:
            self._finish()

    def _finish(self) -> None:
        # Leave the in-flight count before the client can see the answer, or its next request
        # could arrive first and be counted on top of this one.
        if not self._ended:
            self._ended = True
            self.fake._end()

    def _answer(self, sentence: str, fault: Fault | None) -> None:
        kind = fault.kind if fault else None
        if fault is not None and kind == "status":
            self._send(fault.status, {"error": {"message": f"injected status {fault.status}"}})
            return
        if fault is not None and kind == "rate_limit":
            headers = {"Retry-After": f"{fault.retry_after:g}"}
            self._send(429, {"error": {"message": "rate limited"}}, headers)
            return
        if kind == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and kind == "sleep":
            time.sleep(fault.seconds)
        mentions: list[dict[str, str]] = self.fake.mentions_for(sentence)
        content = json.dumps({"mentions": mentions}, ensure_ascii=False)
        if kind == "invalid_json":
            content = content[: len(content) // 2] + " (and more)"
        elif kind == "bad_category":
            mentions.append({"keyword": sentence.split()[0], "category": "left_big_toe"})
        elif kind == "missing_key":
            mentions.append({"keyword": sentence.split()[0]})
        elif kind == "not_verbatim":
            mentions.append({"keyword": "ductus pancreaticus Wirsungi", "category": "pancreas"})
        if kind in ("bad_category", "missing_key", "not_verbatim"):
            content = json.dumps({"mentions": mentions}, ensure_ascii=False)
        choices = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ]
        reply = {
            "id": f"chatcmpl-{len(self.fake.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "fake",
            "choices": [] if kind == "empty_choices" else choices,
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        self._send(200, reply)

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self._finish()
        self.wfile.write(data)


@pytest.fixture
def fake_openai_server() -> Iterator[FakeOpenAIServer]:
    """A fresh server per test, stopped afterwards."""
    with FakeOpenAIServer() as server:
        yield server
