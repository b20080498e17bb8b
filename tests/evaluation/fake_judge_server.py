"""A chat-completions server on 127.0.0.1 that plays an LLM judge, with scripted faults.

The "judge" reads the last user message (``Question: …\\nCandidate: …\\nReference: …``) and
answers ``{"score": s, "reason": …}``, with ``s`` from ``scores`` keyed by the candidate, else 5
when candidate and reference agree (ignoring case) and 1 when not. Faults are scripted per
candidate or for every request, for a number of requests or forever; every request is recorded
(see :mod:`tests.fake_chat_server`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from tests import fake_chat_server as chat

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
class Fault(chat.Fault):
    KINDS: ClassVar[frozenset[str]] = KINDS

    retry_after: float | None = None
    seconds: float = 0.0
    text: str = ""
    finish: str = "stop"


class Request(chat.Request):
    @property
    def user(self) -> str | None:
        """The last user message: the item being judged."""
        users = self.messages("user")
        return users[-1] if users else None

    @property
    def fields(self) -> dict[str, str]:
        lines = (self.user or "").split("\n")
        return dict(line.split(": ", 1) for line in lines if ": " in line)

    @property
    def candidate(self) -> str | None:
        return self.fields.get("Candidate")

    key, prompt = candidate, user


class _Handler(chat.ChatHandler):
    fake: FakeJudgeServer

    def _answer(self, request: Request, fault: Fault | None) -> None:
        kind = fault.kind if fault is not None else None
        if fault is not None and kind == "status":
            self._send_error(fault.status, f"injected {fault.status}", fault.retry_after)
        elif fault is not None and kind == "body":
            self._send_bytes(200, fault.text.encode("utf-8"), "text/html")
        elif fault is not None and kind == "content":
            self._send_completion(fault.text, finish=fault.finish)
        else:
            content = json.dumps(self.fake.judge(request))
            self._send_completion(content, empty=kind == "no_choices")


class FakeJudgeServer(chat.FakeChatServer):
    """``with FakeJudgeServer() as server: LLMJudge(server.url, "fake")``.

    ``count``, ``times`` and ``delays`` (extra latency) go by candidate.
    """

    request_class = Request
    handler_class = _Handler

    def __init__(self, scores: dict[str, int] | None = None) -> None:
        super().__init__()
        self.scores = dict(scores or {})

    def fail(self, fault: Fault, *, candidate: str | None = None, times: int | None = 1) -> None:
        """Answer the next ``times`` requests (None: all) for ``candidate`` (None: any) with
        ``fault``; a candidate's own script goes before the global one."""
        assert times is None or times >= 1, times
        self._script(fault, candidate, times)

    def judge(self, request: Request) -> dict[str, Any]:
        fields = request.fields
        candidate, reference = fields.get("Candidate", ""), fields.get("Reference", "")
        same = candidate.strip().lower() == reference.strip().lower()
        score = self.scores.get(candidate, 5 if same else 1)
        return {"score": score, "reason": f"fake judgement of {candidate!r}"}


@pytest.fixture
def fake_judge_server() -> Iterator[FakeJudgeServer]:
    """A fresh server per test, stopped afterwards."""
    with FakeJudgeServer() as server:
        yield server
