"""A chat-completions server on 127.0.0.1 that plays an LLM judge, with scripted faults.

The "judge" reads the last user message (``Question: …\\nCandidate: …\\nReference: …``) and
answers ``{"score": s, "reason": …}``, with ``s`` from ``scores`` keyed by the candidate, else 5
when candidate and reference agree (ignoring case) and 1 when not. Faults are scripted per
candidate or for every request, for a number of requests or forever; every request is recorded.
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

KINDS = frozenset(
    {
        "status",  # HTTP `status`, with Retry-After: `retry_after` when it is set
        "sleep",  # answer only after `seconds` (past the client timeout)
        "drop",  # close the socket without a response
        "body",  # HTTP 200 with `text` as the whole body (not JSON)
        "content",  # HTTP 200 with `text` as the message content, `finish` as finish_reason
        "no_choices",  # "choices": []
    }
)


@dataclass(frozen=True)
class Fault:
    kind: str
    status: int = 500
    retry_after: float | None = None
    seconds: float = 0.0
    text: str = ""
    finish: str = "stop"

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind


@dataclass
class Request:
    time: float
    path: str
    headers: dict[str, str]
    body: Any

    @property
    def user(self) -> str | None:
        """The last user message: the item being judged."""
        try:
            return [m["content"] for m in self.body["messages"] if m["role"] == "user"][-1]
        except (KeyError, TypeError, IndexError):
            return None

    @property
    def fields(self) -> dict[str, str]:
        lines = (self.user or "").split("\n")
        return dict(line.split(": ", 1) for line in lines if ": " in line)

    @property
    def candidate(self) -> str | None:
        return self.fields.get("Candidate")


class FakeJudgeServer:
    """``with FakeJudgeServer() as server: LLMJudge(server.url, "fake")``."""

    def __init__(self, scores: dict[str, int] | None = None) -> None:
        self.scores = dict(scores or {})
        self.latency = 0.0  # every request takes this long, so concurrent ones overlap
        self.delays: dict[str, float] = {}  # extra latency per candidate
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

    def fail(self, fault: Fault, *, candidate: str | None = None, times: int | None = 1) -> None:
        """Answer the next ``times`` requests (None: all) for ``candidate`` (None: any) with
        ``fault``; a candidate's own script goes before the global one."""
        assert times is None or times >= 1, times
        with self._lock:
            self._scripts.setdefault(candidate, []).append([fault, times])

    def count(self, candidate: str | None = None) -> int:
        with self._lock:
            return sum(candidate is None or r.candidate == candidate for r in self.requests)

    def times(self, candidate: str) -> list[float]:
        with self._lock:
            return [r.time for r in self.requests if r.candidate == candidate]

    def start(self) -> FakeJudgeServer:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        serve = functools.partial(self._httpd.serve_forever, poll_interval=0.01)
        threading.Thread(target=serve, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> FakeJudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def judge(self, request: Request) -> dict[str, Any]:
        fields = request.fields
        candidate, reference = fields.get("Candidate", ""), fields.get("Reference", "")
        same = candidate.strip().lower() == reference.strip().lower()
        score = self.scores.get(candidate, 5 if same else 1)
        return {"score": score, "reason": f"fake judgement of {candidate!r}"}

    def _begin(self, request: Request) -> Fault | None:
        with self._lock:
            self.requests.append(request)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            for key in (request.candidate, None):
                script = self._scripts.get(key)
                if script:
                    fault, left = script[0]
                    if left is not None:
                        script[0][1] -= 1
                        if left <= 1:
                            script.pop(0)
                    return fault
            return None

    def _end(self) -> None:
        with self._lock:
            self._in_flight -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up on purpose (timeouts) are not errors here


class _Handler(BaseHTTPRequestHandler):
    fake: FakeJudgeServer

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
            time.sleep(self.fake.latency + self.fake.delays.get(request.candidate or "", 0.0))
            if self.path != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
            elif request.user is None:
                self._send(400, {"error": {"message": "no user message"}})
            else:
                self._answer(request, fault)
        except OSError:
            pass  # the client gave up (timeout) before the answer
        finally:
            self._finish()

    def _finish(self) -> None:
        # Leave the in-flight count before the client sees the answer, or its next request could
        # arrive first and be counted on top of this one.
        if not self._ended:
            self._ended = True
            self.fake._end()

    def _answer(self, request: Request, fault: Fault | None) -> None:
        kind = fault.kind if fault is not None else None
        if fault is not None and kind == "status":
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = f"{fault.retry_after:g}"
            self._send(fault.status, {"error": {"message": f"injected {fault.status}"}}, headers)
            return
        if kind == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and kind == "body":
            self._send_bytes(200, fault.text.encode("utf-8"), "text/html")
            return
        if fault is not None and kind == "sleep":
            time.sleep(fault.seconds)
        content = json.dumps(self.fake.judge(request))
        finish = "stop"
        if fault is not None and kind == "content":
            content, finish = fault.text, fault.finish
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
            "choices": [] if kind == "no_choices" else [choice],
        }
        self._send(200, reply)

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
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


@pytest.fixture
def fake_judge_server() -> Iterator[FakeJudgeServer]:
    """A fresh server per test, stopped afterwards."""
    with FakeJudgeServer() as server:
        yield server
