"""A chat-completions server on 127.0.0.1 for testing LLMExtractor, with scripted faults.

The "model" answers from canned answers keyed by the user message (the sentence), else by finding
class display names verbatim. Faults are scripted per sentence or for every request, for a number
of requests or forever, and every request is recorded (see :mod:`tests.fake_chat_server`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest

from radgrounder.anatomy import load_schema
from tests import fake_chat_server as chat

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
        "cut_off",  # the first half of the answer, finish_reason "length"
        "prose",  # the answer inside explanatory text, as unconstrained models write
    }
)


@dataclass(frozen=True)
class Fault(chat.Fault):
    KINDS: ClassVar[frozenset[str]] = KINDS

    retry_after: float = 0.0
    seconds: float = 0.0


class Request(chat.Request):
    @property
    def sentence(self) -> str | None:
        """The (first) user message: the sentence to extract keywords from."""
        return next(iter(self.messages("user")), None)

    @property
    def system(self) -> str:
        return self.messages("system")[0]

    key = prompt = sentence


class _Handler(chat.ChatHandler):
    fake: FakeOpenAIServer

    def _answer(self, request: Request, fault: Fault | None) -> None:
        kind = fault.kind if fault is not None else None
        if fault is not None and kind == "status":
            self._send_error(fault.status, f"injected status {fault.status}")
            return
        if fault is not None and kind == "rate_limit":
            self._send_error(429, "rate limited", fault.retry_after)
            return
        sentence = request.sentence or ""
        mentions = self.fake.mentions_for(sentence)
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
        if kind == "cut_off":
            self._send_completion(content[: len(content) // 2], finish="length")
            return
        if kind == "prose":
            content = f'Here are the mentions:\n{content}\nI hope this helps {{"a": 1}}.'
        self._send_completion(content, empty=kind == "empty_choices")


class FakeOpenAIServer(chat.FakeChatServer):
    """``with FakeOpenAIServer() as server: LLMExtractor(server.url, "fake")``.

    ``count``, ``times`` and ``delays`` go by sentence.
    """

    request_class = Request
    handler_class = _Handler

    def __init__(self, answers: dict[str, list[dict[str, str]]] | None = None) -> None:
        super().__init__()
        self.answers = dict(answers or {})

    def fail(self, fault: Fault, *, sentence: str | None = None, times: int | None = 1) -> None:
        """Answer the next ``times`` requests (None: all) for ``sentence`` (None: any) with
        ``fault``; a sentence's own script goes before the global one."""
        self._script(fault, sentence, times)

    def mentions_for(self, sentence: str) -> list[dict[str, str]]:
        if sentence in self.answers:
            return list(self.answers[sentence])
        found = []
        for cls in load_schema():
            for name in (cls.name_en, cls.name_de):
                if name in sentence:
                    found.append({"keyword": name, "category": cls.name})
        return found


@pytest.fixture
def fake_openai_server() -> Iterator[FakeOpenAIServer]:
    """A fresh server per test, stopped afterwards."""
    with FakeOpenAIServer() as server:
        yield server
