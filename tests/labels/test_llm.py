"""LLMExtractor against a real chat-completions server on 127.0.0.1 with scripted faults."""

from __future__ import annotations

import json
import sys
import threading
import time
import types
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radgrounder.anatomy import load_schema
from radgrounder.errors import RadGrounderError
from radgrounder.labels.llm import KeywordRun, LLMExtractor, _parse_entries, _retry_after
from tests.labels.fake_openai_server import FakeOpenAIServer, Fault

SCHEMA = load_schema()
FAST: dict[str, Any] = {"backoff": 0.001, "max_backoff": 0.05, "timeout": 2.0, "max_retries": 3}

EN = "Small cyst in the left kidney, the liver is normal."
DE = "Nieren beidseits unauffällig, keine Raumforderung der Leber."
ANSWERS = {
    EN: [
        {"keyword": "left kidney", "category": "kidney_left"},
        {"keyword": "liver", "category": "liver"},
    ],
    DE: [
        {"keyword": "Nieren", "category": "kidney_left"},
        {"keyword": "Nieren", "category": "kidney_right"},
        {"keyword": "Leber", "category": "liver"},
    ],
}


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(ANSWERS) as fake:
        yield fake


@pytest.fixture(scope="module")
def shared_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(ANSWERS) as fake:
        yield fake


def extractor(server: FakeOpenAIServer, **options: Any) -> LLMExtractor:
    return LLMExtractor(server.url, "fake-model", **{**FAST, **options})


def spans(mentions: list[Any]) -> list[tuple[int, int, str, str]]:
    return [(m.start, m.end, m.text, m.class_name) for m in mentions]


def test_english_sentence_gets_offsets_and_ids(server: FakeOpenAIServer) -> None:
    run = extractor(server, api_key="sk-test").extract_many([("s1", EN, "en")])
    mentions = run.results["s1"]
    assert spans(mentions) == [(18, 29, "left kidney", "kidney_left"), (35, 40, "liver", "liver")]
    assert [m.class_id for m in mentions] == [SCHEMA.by_name("kidney_left").id, 5]
    for mention in mentions:
        mention.check(EN)
    assert (run.failures, run.n_requests, run.n_retries, run.n_rejected) == ({}, 1, 0, 0)

    (request,) = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["Authorization"] == "Bearer sk-test"
    assert request.body["model"] == "fake-model" and request.body["temperature"] == 0.0
    assert request.sentence == EN and "English" in request.system
    assert all(name in request.system for name in SCHEMA.names)
    fmt = request.body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    item = fmt["json_schema"]["schema"]["properties"]["mentions"]["items"]
    assert item["properties"]["category"]["enum"] == list(SCHEMA.names)
    assert item["required"] == ["keyword", "category"] and item["additionalProperties"] is False


def test_german_paired_word_gives_one_mention_per_side(server: FakeOpenAIServer) -> None:
    mentions = extractor(server).extract(DE, "de")
    assert spans(mentions) == [
        (0, 6, "Nieren", "kidney_right"),
        (0, 6, "Nieren", "kidney_left"),
        (54, 59, "Leber", "liver"),
    ]
    assert "German" in server.requests[0].system
    assert "Nieren" in server.requests[0].system  # the German example


def test_json_object_fallback(server: FakeOpenAIServer) -> None:
    extractor(server, response_format="json_object").extract(EN, "en")
    assert server.requests[0].body["response_format"] == {"type": "json_object"}


def test_repeated_keywords_take_successive_occurrences(server: FakeOpenAIServer) -> None:
    sentence = "Cyst in the left kidney; the left kidney is otherwise normal, the liver too."
    pair = {"keyword": "left kidney", "category": "kidney_left"}
    liver = {"keyword": "liver", "category": "liver"}
    server.answers[sentence] = [pair, pair, pair, liver, liver]  # extras collapse
    mentions = extractor(server).extract(sentence, "en")
    assert spans(mentions) == [
        (12, 23, "left kidney", "kidney_left"),
        (29, 40, "left kidney", "kidney_left"),
        (66, 71, "liver", "liver"),
    ]


def test_offsets_prefer_whole_words_and_unclaimed_text(server: FakeOpenAIServer) -> None:
    sentence = "Fracture of T12, T1 intact; left kidney atrophic, kidney graft on the right."
    server.answers[sentence] = [
        {"keyword": "T1", "category": "vertebrae_T1"},
        {"keyword": "kidney", "category": "kidney_right"},
        {"keyword": "left kidney", "category": "kidney_left"},
        {"keyword": "T12", "category": "vertebrae_T12"},
    ]
    mentions = extractor(server).extract(sentence, "en")
    assert spans(mentions) == [
        (12, 15, "T12", "vertebrae_T12"),
        (17, 19, "T1", "vertebrae_T1"),
        (28, 39, "left kidney", "kidney_left"),
        (50, 56, "kidney", "kidney_right"),
    ]


def test_keyword_not_in_sentence_is_rejected_not_retried(server: FakeOpenAIServer) -> None:
    sentence = "The liver is enlarged."
    server.answers[sentence] = [
        {"keyword": "Leber", "category": "liver"},
        {"keyword": "liver", "category": "liver"},
    ]
    server.fail(Fault("not_verbatim"), sentence=sentence)
    run = extractor(server).extract_many([("a", sentence, "en")], progress=False)
    assert spans(run.results["a"]) == [(4, 9, "liver", "liver")]
    assert run.rejected == {"a": ["Leber", "ductus pancreaticus Wirsungi"]}
    assert (run.n_rejected, run.n_requests, run.n_retries) == (2, 1, 0)


RETRYABLE = {
    "http 500": (
        Fault("status", status=500),
        'HTTP 500: {"error": {"message": "injected status 500"}}',
    ),
    "http 502": (Fault("status", status=502), "HTTP 502"),
    "http 503": (Fault("status", status=503), "HTTP 503"),
    "429": (Fault("rate_limit", retry_after=0.01), "HTTP 429"),
    "timeout": (Fault("sleep", seconds=0.6), "no reply within 0.3 s"),
    "dropped connection": (Fault("drop"), "connection error"),
    "empty choices": (Fault("empty_choices"), "no choices"),
}
# Replies that break the format: the same request at temperature 0 gives the same reply, so
# they are retried at most max_reply_retries times, each with another temperature and seed.
BROKEN_REPLIES = {
    "invalid json": (Fault("invalid_json"), "not valid JSON"),
    "unknown category": (Fault("bad_category"), "unknown category 'left_big_toe'"),
    "missing key": (Fault("missing_key"), 'needs string "keyword" and "category"'),
}


@pytest.mark.parametrize("name", [*RETRYABLE, *BROKEN_REPLIES])
def test_fault_is_retried_then_succeeds(server: FakeOpenAIServer, name: str) -> None:
    fault, _ = {**RETRYABLE, **BROKEN_REPLIES}[name]
    server.fail(fault, sentence=EN, times=2)
    run = extractor(server, timeout=0.3).extract_many([("s", EN, "en"), ("d", DE, "de")])
    assert run.failures == {}
    assert [m.class_name for m in run.results["s"]] == ["kidney_left", "liver"]
    assert (server.count(EN), server.count(DE), run.n_retries, run.n_requests) == (3, 1, 2, 4)


@pytest.mark.parametrize("name", list(RETRYABLE))
def test_persistent_fault_fails_with_its_reason(server: FakeOpenAIServer, name: str) -> None:
    fault, reason = RETRYABLE[name]
    server.fail(fault, sentence=EN, times=None)
    run = extractor(server, timeout=0.3, max_retries=2).extract_many(
        [("s", EN, "en"), ("d", DE, "de")]
    )
    assert set(run.results) == {"d"} and set(run.failures) == {"s"}
    assert run.failures["s"].startswith("gave up after 3 attempts: ")
    assert reason in run.failures["s"]
    assert server.count(EN) == 3
    with pytest.raises(RadGrounderError, match="keyword extraction failed: gave up"):
        extractor(server, timeout=0.3, max_retries=0).extract(EN, "en")


@pytest.mark.parametrize("name", list(BROKEN_REPLIES))
def test_a_broken_reply_is_retried_with_something_changed(
    server: FakeOpenAIServer, name: str
) -> None:
    fault, reason = BROKEN_REPLIES[name]
    server.fail(fault, sentence=EN, times=None)
    run = extractor(server, max_retries=5).extract_many([("s", EN, "en")], progress=False)
    assert run.failures["s"].startswith("3 replies broke the format: ")
    assert reason in run.failures["s"]
    bodies = [r.body for r in server.requests if r.key == EN]
    assert len(bodies) == 3  # 1 + max_reply_retries (2), not 1 + max_retries (5)
    # Each retry is another sample: higher temperature, another seed.
    assert [(b["temperature"], b.get("seed")) for b in bodies] == [(0.0, None), (0.4, 1), (0.8, 2)]
    with pytest.raises(RadGrounderError, match="1 reply broke the format"):
        extractor(server, max_reply_retries=0).extract(EN, "en")


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_are_not_retried(server: FakeOpenAIServer, status: int) -> None:
    server.fail(Fault("status", status=status), times=None)
    items = [(f"s{i}", f"The liver, sentence {i}.", "en") for i in range(3)]
    run = extractor(server).extract_many(items)
    assert run.results == {} and run.n_retries == 0
    assert run.failures == {sid: f"HTTP {status}: {_body(status)}" for sid, _, _ in items}
    assert server.count() == 3


def _body(status: int) -> str:
    return json.dumps({"error": {"message": f"injected status {status}"}})


def test_wrong_path_is_a_404_failure(server: FakeOpenAIServer) -> None:
    wrong = LLMExtractor(server.url.replace("/v1", "/v2"), "m", **FAST)
    run = wrong.extract_many([("s", EN, "en")])
    assert run.failures["s"].startswith("HTTP 404: ") and server.count() == 1


def test_retry_after_is_honoured_and_capped(server: FakeOpenAIServer) -> None:
    server.fail(Fault("rate_limit", retry_after=0.3), sentence=EN)
    server.fail(Fault("rate_limit", retry_after=60), sentence=DE)
    started = time.monotonic()
    run = extractor(server, max_backoff=0.5).extract_many([("s", EN, "en"), ("d", DE, "de")])
    assert run.failures == {} and run.n_retries == 2
    first, second = server.times(EN)
    assert second - first >= 0.29
    first, second = server.times(DE)
    assert second - first < 1.0  # 60 s capped at max_backoff
    assert time.monotonic() - started < 2.0


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    soon = datetime.now(timezone.utc) + timedelta(seconds=5)
    assert 3.0 < (_retry_after(format_datetime(soon, usegmt=True)) or 0) <= 5.0
    assert (_retry_after("0.25"), _retry_after("-3"), _retry_after("soon")) == (0.25, 0.0, None)


def test_stop_event_cancels_retries(server: FakeOpenAIServer) -> None:
    server.fail(Fault("status", status=500), times=None)
    stop = threading.Event()
    stop.set()  # what extract_many does when interrupted
    slow = extractor(server, backoff=30.0, max_backoff=30.0)
    outcome = slow._extract_one("s", EN, "en", stop)
    assert outcome.mentions is None and outcome.reason.startswith("cancelled: HTTP 500")
    assert server.count() == 1


def test_requests_run_concurrently_up_to_the_limit(server: FakeOpenAIServer) -> None:
    server.latency = 0.1
    items = [(f"s{i}", f"Sentence {i} about the liver.", "en") for i in range(12)]
    run = extractor(server, concurrency=4).extract_many(items)
    assert len(run.results) == 12 and 2 <= server.max_in_flight <= 4
    server.reset()
    extractor(server, concurrency=1).extract_many(items[:3])
    assert server.max_in_flight == 1


def _items(n: int, text: str = "Sentence {i} about the liver.") -> list[tuple[str, str, str]]:
    return [(f"s{i}", text.format(i=i), "en") for i in range(n)]


def test_checkpoint_resumes_failed_and_missing_sentences(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "out" / "keywords.jsonl"
    items = _items(6)
    for i in (1, 3):
        server.fail(Fault("status", status=503), sentence=items[i][1], times=None)
    run1 = extractor(server, max_retries=1, checkpoint=checkpoint).extract_many(items)
    assert set(run1.failures) == {"s1", "s3"} and len(run1.results) == 4
    records = [json.loads(line) for line in checkpoint.read_text().splitlines()]
    assert len(records) == 6 and all("HTTP 503" in r["failed"] for r in records if "failed" in r)

    server.reset()  # healthy now
    items2 = [*items, ("s6", "The spleen is small.", "en")]
    items2[5] = ("s5", "Sentence 5 was edited: liver.", "en")
    run2 = extractor(server, checkpoint=checkpoint).extract_many(items2)
    asked = sorted(r.sentence or "" for r in server.requests)
    assert asked == sorted(items2[i][1] for i in (1, 3, 5, 6))
    assert run2.failures == {} and set(run2.results) == {sid for sid, _, _ in items2}
    assert run2.n_resumed == 3 and run2.results["s0"] == run1.results["s0"]
    assert [m.class_name for m in run2.results["s6"]] == ["spleen"]

    server.reset()
    run3 = extractor(server, checkpoint=checkpoint).extract_many(items2)
    assert server.count() == 0 and run3.results == run2.results and run3.n_resumed == 7


def test_truncated_last_line_is_ignored_and_repaired(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "keywords.jsonl"
    items = _items(3)
    extractor(server, checkpoint=checkpoint).extract_many(items)
    lines = checkpoint.read_bytes().splitlines(keepends=True)
    cut = lines[0] + lines[1] + lines[2][: len(lines[2]) // 2]  # a crash mid-write
    checkpoint.write_bytes(cut)

    server.reset()
    run = extractor(server, checkpoint=checkpoint).extract_many(items)
    assert server.count() == 1 and run.n_resumed == 2 and len(run.results) == 3
    records = [json.loads(line) for line in checkpoint.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["s0", "s1", "s2"]


def test_corrupt_middle_line_is_an_error(server: FakeOpenAIServer, tmp_path: Path) -> None:
    checkpoint = tmp_path / "keywords.jsonl"
    checkpoint.write_text('{"id": "s0", "failed": "x"}\nnot json\n{"id": "s1", "failed": "x"}\n')
    with pytest.raises(RadGrounderError, match=r"keywords\.jsonl: line 2 is not valid JSON"):
        extractor(server, checkpoint=checkpoint).extract_many(_items(2))
    assert server.count() == 0


def test_negation_flag_comes_from_the_negation_module(
    server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def is_negated(sentence: str, start: int, end: int, language: str) -> bool:
        calls.append((sentence, start, end, language))
        return sentence[start:end] == "Leber"

    fake = types.ModuleType("radgrounder.labels.negation")
    fake.is_negated = is_negated  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "radgrounder.labels.negation", fake)
    mentions = extractor(server).extract(DE, "de")
    assert [(m.text, m.negated) for m in mentions] == [
        ("Nieren", False),
        ("Nieren", False),
        ("Leber", True),
    ]
    assert (DE, 54, 59, "de") in calls


def test_fenced_json_is_accepted() -> None:
    content = '```json\n{"mentions": [{"keyword": "liver", "category": "liver"}]}\n```'
    assert _parse_entries(content, "stop", frozenset(SCHEMA.names)) == [("liver", "liver")]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"endpoint": "ftp://127.0.0.1/v1"}, "endpoint"),
        ({"endpoint": "127.0.0.1:8000/v1"}, "endpoint"),
        ({"endpoint": "http:///v1"}, "endpoint"),
        ({"endpoint": "http://127.0.0.1:8000/v1?x=1"}, "endpoint"),
        ({"model": " "}, "model"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 2.5}, "concurrency"),
        ({"timeout": 0}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
        ({"backoff": float("nan")}, "backoff"),
        ({"temperature": -1}, "temperature"),
    ],
)
def test_bad_settings_name_the_field(options: dict[str, Any], field: str) -> None:
    settings_ = {"endpoint": "http://127.0.0.1:1/v1", "model": "m", **options}
    with pytest.raises(RadGrounderError, match=rf"^{field}: "):
        LLMExtractor(settings_.pop("endpoint"), settings_.pop("model"), **settings_)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([("a", "x", "fr")], r"items\[0\] \(a\): language"),
        ([("a", "x", "en"), ("a", "y", "en")], r"items\[1\]: sentence_id 'a' appears"),
        ([("a", None, "en")], r"items\[0\] \(a\): sentence"),
        ([(1, "x", "en")], r"items\[0\]: sentence_id"),
        ([("a", "x")], r"items\[0\]: expected"),
    ],
)
def test_bad_items_are_rejected_before_any_request(
    server: FakeOpenAIServer, items: list[Any], message: str
) -> None:
    with pytest.raises(RadGrounderError, match=message):
        extractor(server).extract_many(items)
    assert server.count() == 0


def test_endpoint_may_include_the_route(server: FakeOpenAIServer) -> None:
    extractor_ = LLMExtractor(server.url + "/chat/completions/", "m", **FAST)
    assert extractor_.extract("", "en") == [] and server.count() == 0  # blank: no request
    assert [m.text for m in extractor_.extract(EN, "en")] == ["left kidney", "liver"]


FAST_FAULTS = [
    None,
    Fault("status", status=500),
    Fault("status", status=401),
    Fault("rate_limit", retry_after=0),
    Fault("drop"),
    Fault("invalid_json"),
    Fault("bad_category"),
    Fault("missing_key"),
    Fault("not_verbatim"),
    Fault("empty_choices"),
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(FAST_FAULTS), st.integers(0, 3)), min_size=1, max_size=8))
def test_every_sentence_ends_in_results_or_failures(
    shared_server: FakeOpenAIServer, plan: list[tuple[Fault | None, int]]
) -> None:
    shared_server.reset()
    items = _items(len(plan), "Sentence {i}: the liver.")
    expected_failures = set()
    for (sid, sentence, _), (fault, times) in zip(items, plan, strict=True):
        if fault is None or times == 0:
            continue
        shared_server.fail(fault, sentence=sentence, times=times)
        fatal = fault.kind == "status" and fault.status == 401
        if fatal or (fault.kind != "not_verbatim" and times > 2):  # 3 attempts, all failed
            expected_failures.add(sid)
    run: KeywordRun = extractor(shared_server, max_retries=2, concurrency=3).extract_many(items)
    assert set(run.results) | set(run.failures) == {sid for sid, _, _ in items}
    assert not set(run.results) & set(run.failures)
    assert set(run.failures) == expected_failures
    assert all(run.failures.values())


def test_requests_are_bounded_by_the_sentence(server: FakeOpenAIServer) -> None:
    from radgrounder.labels.llm_prompt import max_mentions, reply_token_budget

    extractor(server).extract(EN, "en")
    body = server.requests[-1].body
    assert body["max_tokens"] == reply_token_budget(EN) == 32 + 24 * max_mentions(EN)
    schema = body["response_format"]["json_schema"]["schema"]["properties"]["mentions"]
    assert schema["maxItems"] == max_mentions(EN) == 4 + len(EN.split())
    assert schema["items"]["properties"]["keyword"]["maxLength"] == len(EN)


def test_a_cut_off_reply_gets_more_room_once(server: FakeOpenAIServer) -> None:
    from tests.labels.fake_openai_server import Fault as F

    server.fail(F("cut_off"), sentence=EN, times=1)
    mentions = extractor(server).extract(EN, "en")
    assert [m.class_name for m in mentions] == ["kidney_left", "liver"]
    first, second = (r.body for r in server.requests if r.key == EN)
    assert second["max_tokens"] == 2 * first["max_tokens"]


def test_plain_replies_with_prose_around_the_json(server: FakeOpenAIServer) -> None:
    from tests.labels.fake_openai_server import Fault as F

    server.fail(F("prose"), sentence=EN, times=None)
    mentions = extractor(server, response_format="none").extract(EN, "en")
    assert [m.class_name for m in mentions] == ["kidney_left", "liver"]
    assert "response_format" not in server.requests[-1].body


def test_concurrency_follows_the_servers_slots(server: FakeOpenAIServer) -> None:
    items = [(f"s{i}", f"The liver, sentence {i}.", "en") for i in range(12)]
    server.latency = 0.05
    server.slots = 2
    ex = extractor(server, concurrency=None)
    ex.extract_many(items, progress=False)
    assert (ex.concurrency, ex.concurrency_source) == (2, "server")
    assert server.max_in_flight == 2 and server.gets == ["/props"]
    server.reset()
    server.slots = None  # vLLM, Ollama: no /props
    ex = extractor(server, concurrency=None)
    ex.extract_many(items, progress=False)
    assert (ex.concurrency, ex.concurrency_source) == (4, "default")
    assert server.max_in_flight <= 4


def test_resume_reuses_only_the_same_models_results(server: FakeOpenAIServer, tmp_path) -> None:
    items = [("s", EN, "en"), ("d", DE, "de")]
    ck = tmp_path / "keywords.jsonl"
    extractor(server, checkpoint=ck).extract_many(items, progress=False)
    assert server.count() == 2
    again = extractor(server, checkpoint=ck).extract_many(items, progress=False)
    assert (server.count(), again.n_resumed) == (2, 2)
    other = LLMExtractor(server.url, "another-model", checkpoint=ck, **FAST)
    run = other.extract_many(items, progress=False)
    assert (server.count(), run.n_resumed, run.n_other_model) == (4, 0, 2)
    assert {r.body["model"] for r in server.requests[-2:]} == {"another-model"}
    records = [json.loads(line) for line in ck.read_text().splitlines()]
    assert [r["model"] for r in records] == ["fake-model"] * 2 + ["another-model"] * 2


def test_the_api_key_is_sent_as_a_bearer_token(server: FakeOpenAIServer) -> None:
    extractor(server, api_key="sk-local-123").extract(EN, "en")
    assert server.requests[-1].headers["Authorization"] == "Bearer sk-local-123"
