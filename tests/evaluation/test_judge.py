"""LLMJudge against a real chat-completions server on 127.0.0.1 with scripted faults."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from radgrounder.errors import RadGrounderError
from radgrounder.evaluation.judge import (
    FEW_SHOT,
    SYSTEM_PROMPT,
    JudgeItem,
    JudgeResult,
    LLMJudge,
    parse_judgement,
    summarize,
)
from tests.evaluation.fake_judge_server import FakeJudgeServer, Fault

FAST: dict[str, Any] = {"backoff": 0.001, "max_backoff": 0.05, "timeout": 2.0, "max_retries": 2}


@pytest.fixture
def server() -> Iterator[FakeJudgeServer]:
    with FakeJudgeServer() as fake:
        yield fake


def judge(server: FakeJudgeServer, **options: Any) -> LLMJudge:
    return LLMJudge(server.url, "fake-judge", **{**FAST, **options})


def item(candidate: str, reference: str = "liver", n: int = 0, kind: str = "vqa") -> JudgeItem:
    return JudgeItem(f"q{n}", "Which organ is enlarged?", candidate, reference, kind)


def test_scores_come_back_in_input_order(server: FakeJudgeServer) -> None:
    server.scores = {"spleen": 2, "the liver": 4, "liver and spleen": 3}
    candidates = ["liver", "spleen", "the liver", "kidney", "liver and spleen", "LIVER"]
    # The first items answer last, so completion order differs from input order.
    server.delays = {c: 0.05 * (len(candidates) - i) for i, c in enumerate(candidates)}
    items = [item(c, n=i) for i, c in enumerate(candidates)]
    results = judge(server, concurrency=6).score(items, progress=False)
    assert [r.id for r in results] == [f"q{i}" for i in range(6)]
    assert [r.score for r in results] == [5.0, 2.0, 4.0, 1.0, 3.0, 5.0]
    assert {r.status for r in results} == {"ok"} and {r.attempts for r in results} == {1}
    assert results[1].reason == "fake judgement of 'spleen'"
    assert json.loads(results[1].raw) == {"score": 2, "reason": "fake judgement of 'spleen'"}
    assert server.count() == 6


def test_request_carries_prompt_seed_and_schema(server: FakeJudgeServer) -> None:
    result = judge(server, api_key="sk-judge", seed=7, max_tokens=99).score_one(item("liver"))
    assert (result.status, result.score, result.attempts) == ("ok", 5.0, 1)
    (request,) = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["Authorization"] == "Bearer sk-judge"
    body = request.body
    assert body["model"] == "fake-judge" and body["stream"] is False
    assert body["temperature"] == 0 and body["seed"] == 7 and body["max_tokens"] == 99
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    schema = fmt["json_schema"]["schema"]
    assert schema["required"] == ["score", "reason"] and schema["additionalProperties"] is False
    assert schema["properties"]["score"] == {"type": "integer", "enum": [1, 2, 3, 4, 5]}
    assert schema["properties"]["reason"] == {"type": "string", "maxLength": 400}

    messages = body["messages"]
    assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert '{"score": <integer 1-5>, "reason": "<one or two sentences>"}' in SYSTEM_PROMPT
    roles = [m["role"] for m in messages[1:]]
    assert roles == ["user", "assistant"] * len(FEW_SHOT["vqa"]) + ["user"]
    assert messages[-1]["content"] == (
        "Question: Which organ is enlarged?\nCandidate: liver\nReference: liver"
    )
    shots = [json.loads(m["content"])["score"] for m in messages if m["role"] == "assistant"]
    assert sorted(shots) == [1, 2, 3, 4, 5]  # the examples cover the scale


def test_report_items_get_the_report_examples(server: FakeJudgeServer) -> None:
    report = JudgeItem(
        "r1", "Describe the findings.", "Line one.\nLine two.", "Line one.", "report"
    )
    judge(server, concurrency=1).score([report, item("liver")], progress=False)
    report_request, vqa_request = server.requests
    assert report_request.user == (
        "Question: Describe the findings.\nCandidate: Line one.\nLine two.\nReference: Line one."
    )
    first_example = report_request.body["messages"][1]["content"]
    assert first_example.startswith(f"Question: {FEW_SHOT['report'][0][0]}\n")
    first_example = vqa_request.body["messages"][1]["content"]
    assert first_example.startswith(f"Question: {FEW_SHOT['vqa'][0][0]}\n")
    assert len(report_request.body["messages"]) == 2 + 2 * len(FEW_SHOT["report"])


@pytest.mark.parametrize(
    ("mode", "expected"), [("json_object", {"type": "json_object"}), ("none", None)]
)
def test_other_json_modes(server: FakeJudgeServer, mode: str, expected: Any) -> None:
    judge(server, json_mode=mode).score_one(item("liver"))
    assert server.requests[0].body.get("response_format") == expected


def test_url_may_include_the_route(server: FakeJudgeServer) -> None:
    judge_ = LLMJudge(server.url + "/chat/completions/", "m", **FAST)
    assert judge_.url == server.url + "/chat/completions"
    assert judge_.score_one(item("liver")).score == 5.0


def test_requests_run_concurrently_up_to_the_limit(server: FakeJudgeServer) -> None:
    server.latency = 0.1
    items = [item(f"answer {i}", n=i) for i in range(12)]
    started = time.monotonic()
    results = judge(server, concurrency=4).score(items, progress=False)
    elapsed = time.monotonic() - started
    assert [r.status for r in results] == ["ok"] * 12
    assert 2 <= server.max_in_flight <= 4 and elapsed < 0.9  # one at a time would take 1.2 s
    server.max_in_flight = 0
    judge(server, concurrency=1).score(items[:3], progress=False)
    assert server.max_in_flight == 1


TRANSIENT = {
    "http 500": (Fault("status", status=500), "HTTP 500: "),
    "http 503": (Fault("status", status=503), "HTTP 503"),
    "http 408": (Fault("status", status=408), "HTTP 408"),
    "http 429": (Fault("status", status=429, retry_after=0.01), "HTTP 429"),
    "timeout": (Fault("sleep", seconds=0.6), "no reply within 0.3 s"),
    "dropped connection": (Fault("drop"), "connection error"),
    "body not json": (Fault("body", text="<html>Bad gateway</html>"), "not JSON: '<html>"),
    "no choices": (Fault("no_choices"), "no choices"),
}


@pytest.mark.parametrize("name", list(TRANSIENT))
def test_transport_fault_is_retried_then_succeeds(server: FakeJudgeServer, name: str) -> None:
    fault, _ = TRANSIENT[name]
    server.fail(fault, candidate="spleen", times=2)
    results = judge(server, timeout=0.3).score(
        [item("spleen", n=0), item("liver", n=1)], progress=False
    )
    assert [(r.status, r.score, r.attempts) for r in results] == [("ok", 1.0, 3), ("ok", 5.0, 1)]
    assert (server.count("spleen"), server.count("liver")) == (3, 1)


@pytest.mark.parametrize("name", list(TRANSIENT))
def test_persistent_transport_fault_is_an_error(server: FakeJudgeServer, name: str) -> None:
    fault, reason = TRANSIENT[name]
    server.fail(fault, candidate="spleen", times=None)
    bad, good = judge(server, timeout=0.3).score(
        [item("spleen", n=0), item("liver", n=1)], progress=False
    )
    assert (bad.status, bad.score, bad.raw, bad.attempts) == ("error", None, "", 3)
    assert bad.reason.startswith("gave up after 3 attempts: ") and reason in bad.reason
    assert (good.status, good.score) == ("ok", 5.0)
    assert server.count("spleen") == 3


def test_retry_after_is_honoured_and_capped(server: FakeJudgeServer) -> None:
    server.fail(Fault("status", status=429, retry_after=0.3), candidate="spleen")
    server.fail(Fault("status", status=503, retry_after=60), candidate="liver")
    started = time.monotonic()
    results = judge(server, max_backoff=0.5).score(
        [item("spleen", n=0), item("liver", n=1)], progress=False
    )
    assert [(r.status, r.attempts) for r in results] == [("ok", 2), ("ok", 2)]
    first, second = server.times("spleen")
    assert second - first >= 0.29
    first, second = server.times("liver")
    assert 0.49 <= second - first < 1.0  # 60 s capped at max_backoff
    assert time.monotonic() - started < 1.5


GARBAGE = {
    "markdown": "**5**",
    "prose": "great answer",
    "score out of range": '{"score": 7, "reason": "x"}',
    "score zero": '{"score": 0, "reason": "x"}',
    "score as string": '{"score": "5", "reason": "x"}',
    "fractional score": '{"score": 4.5, "reason": "x"}',
    "boolean score": '{"score": true, "reason": "x"}',
    "no score": '{"reason": "fine"}',
    "list": "[5]",
    "prose only": "Sure, I'd give it a 5.",
    "empty": "",
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_unparseable_reply_is_retried_then_reported(server: FakeJudgeServer, name: str) -> None:
    content = GARBAGE[name]
    server.fail(Fault("content", text=content), candidate="spleen", times=None)
    bad, good = judge(server).score([item("spleen", n=0), item("liver", n=1)], progress=False)
    assert (bad.status, bad.score, bad.raw, bad.attempts) == ("unparseable", None, content, 3)
    assert bad.reason.startswith("gave up after 3 attempts: ")
    assert (good.status, good.score) == ("ok", 5.0)
    summary = summarize([bad, good])
    assert summary == {
        "n": 2,
        "ok": 1,
        "unparseable": 1,
        "error": 0,
        "mean_score": 5.0,  # not (0 + 5) / 2
        "mean_normalized": 1.0,
    }


def test_unparseable_reply_then_valid_one_is_ok(server: FakeJudgeServer) -> None:
    server.fail(Fault("content", text="**4**"), candidate="spleen")
    result = judge(server).score_one(item("spleen"))
    assert (result.status, result.score, result.attempts) == ("ok", 1.0, 2)


def test_cut_off_reply_says_so(server: FakeJudgeServer) -> None:
    server.fail(Fault("content", text='{"score": 4, "rea', finish="length"), times=None)
    result = judge(server, max_reply_retries=0).score_one(item("spleen"))
    assert result.status == "unparseable" and result.attempts == 1
    assert result.reason.startswith("reply holds no JSON object")
    assert "finish_reason=length" in result.reason


def test_unparseable_replies_are_resampled_not_resent(server: FakeJudgeServer) -> None:
    server.fail(Fault("content", text="**4**"), candidate="spleen", times=None)
    result = judge(server, max_retries=5).score_one(item("spleen"))
    assert result.status == "unparseable" and result.attempts == 3  # 1 + max_reply_retries
    bodies = [r.body for r in server.requests]
    assert [(b["temperature"], b["seed"]) for b in bodies] == [(0, 42), (0.4, 43), (0.8, 44)]


def test_a_json_object_followed_by_prose_is_accepted(server: FakeJudgeServer) -> None:
    text = 'Sure! {"score": 5, "reason": "Same organ."} Let me know if you need more.'
    server.fail(Fault("content", text=text), candidate="spleen", times=None)
    result = judge(server, json_mode="none").score_one(item("spleen"))
    assert (result.status, result.score, result.reason, result.attempts) == (
        "ok", 5.0, "Same organ.", 1
    )  # fmt: skip
    assert "response_format" not in server.requests[0].body


def test_last_attempt_decides_the_status(server: FakeJudgeServer) -> None:
    server.fail(Fault("content", text="**4**"), candidate="spleen")
    server.fail(Fault("status", status=502), candidate="spleen", times=None)
    result = judge(server, max_retries=1).score_one(item("spleen"))
    # unparseable (resampled), then HTTP 502 twice: max_retries=1 transport retry
    assert (result.status, result.raw, result.attempts) == ("error", "", 3)
    assert "HTTP 502" in result.reason


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"score": 4, "reason": "Mostly right."}', (4, "Mostly right.")),
        ('```json\n{"score": 3, "reason": "Partly."}\n```', (3, "Partly.")),
        ('```\n{"score": 2, "reason": "x"}```', (2, "x")),
        ('  {"score": 5.0, "reason": " Same. "}\n', (5, "Same.")),
        ('{"score": 1}', (1, "")),
        ('{"score": 2, "reason": ["a", "b"], "extra": 1}', (2, '["a", "b"]')),
    ],
)
def test_parse_judgement_accepts(content: str, expected: tuple[int, str]) -> None:
    assert parse_judgement(content) == expected


@pytest.mark.parametrize("content", [*GARBAGE.values(), '{"score": NaN}', '{"score": null}'])
def test_parse_judgement_rejects(content: str) -> None:
    with pytest.raises(ValueError):
        parse_judgement(content)


def test_fenced_reply_from_the_server_is_accepted(server: FakeJudgeServer) -> None:
    server.fail(Fault("content", text='```json\n{"score": 4, "reason": "ok"}\n```'))
    result = judge(server).score_one(item("spleen"))
    assert (result.status, result.score, result.reason) == ("ok", 4.0, "ok")


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failure_raises_at_once(server: FakeJudgeServer, status: int) -> None:
    server.latency = 0.05
    server.fail(Fault("status", status=status), times=None)
    items = [item(f"answer {i}", n=i) for i in range(40)]
    started = time.monotonic()
    with pytest.raises(RadGrounderError, match=rf"HTTP {status}.*check the API key") as info:
        judge(server, concurrency=4, backoff=5.0, max_backoff=5.0).score(items, progress=False)
    assert server.url in str(info.value)
    assert time.monotonic() - started < 1.0
    time.sleep(0.1)  # requests in flight when it raised may still arrive
    assert server.count() <= 8  # the queued items were never sent
    with pytest.raises(RadGrounderError, match=f"HTTP {status}"):
        judge(server).score_one(item("liver"))


def test_wrong_url_raises_naming_the_404(server: FakeJudgeServer) -> None:
    wrong = LLMJudge(server.url.replace("/v1", "/v2"), "m", **FAST)
    with pytest.raises(RadGrounderError, match=r"/v2/chat/completions answered HTTP 404.*model"):
        wrong.score([item("liver")], progress=False)
    assert server.count() == 1


def test_bad_request_is_an_error_for_that_item_only(server: FakeJudgeServer) -> None:
    server.fail(Fault("status", status=400), candidate="spleen", times=None)
    bad, good = judge(server).score([item("spleen", n=0), item("liver", n=1)], progress=False)
    assert (bad.status, bad.score, bad.attempts) == ("error", None, 1)
    assert bad.reason.startswith("HTTP 400: ") and (good.status, good.score) == ("ok", 5.0)
    assert server.count("spleen") == 1


def test_no_items_no_requests(server: FakeJudgeServer) -> None:
    assert judge(server).score([], progress=False) == []
    assert server.count() == 0


def test_summarize_counts_statuses_and_averages_ok_scores() -> None:
    results = [
        JudgeResult("a", 5.0, "ok", "", "", 1),
        JudgeResult("b", 2.0, "ok", "", "", 1),
        JudgeResult("c", None, "unparseable", "x", "**5**", 3),
        JudgeResult("d", None, "error", "HTTP 500", "", 3),
        JudgeResult("e", 4.0, "ok", "", "", 2),
    ]
    summary = summarize(results)
    assert summary == {
        "n": 5,
        "ok": 3,
        "unparseable": 1,
        "error": 1,
        "mean_score": pytest.approx(11 / 3),
        "mean_normalized": pytest.approx((11 / 3 - 1) / 4),
    }
    assert summarize(results[2:4])["mean_score"] is None
    assert summarize([]) == {
        "n": 0,
        "ok": 0,
        "unparseable": 0,
        "error": 0,
        "mean_score": None,
        "mean_normalized": None,
    }


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"url": "ftp://127.0.0.1/v1"}, "url"),
        ({"url": "127.0.0.1:8000/v1"}, "url"),
        ({"url": "http://127.0.0.1:8000/v1#x"}, "url"),
        ({"url": None}, "url"),
        ({"model": ""}, "model"),
        ({"api_key": 123}, "api_key"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 1.5}, "concurrency"),
        ({"timeout": 0}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": True}, "max_retries"),
        ({"backoff": float("inf")}, "backoff"),
        ({"max_backoff": -1}, "max_backoff"),
        ({"seed": 1.0}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"json_mode": "grammar"}, "json_mode"),
    ],
)
def test_bad_settings_name_the_field(options: dict[str, Any], field: str) -> None:
    settings = {"url": "http://127.0.0.1:1/v1", "model": "m", **options}
    with pytest.raises(RadGrounderError, match=rf"^{field}: "):
        LLMJudge(settings.pop("url"), settings.pop("model"), **settings)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"id": ""}, r"JudgeItem.id: expected a non-empty string"),
        ({"prediction": None}, r"JudgeItem 'x': prediction must be a string"),
        ({"reference": 3}, r"JudgeItem 'x': reference must be a string"),
        ({"kind": "caption"}, r"JudgeItem 'x': kind must be one of vqa, report"),
    ],
)
def test_bad_items_are_rejected(fields: dict[str, Any], message: str) -> None:
    values = {"id": "x", "question": "q", "prediction": "a", "reference": "b", **fields}
    with pytest.raises(RadGrounderError, match=message):
        JudgeItem(**values)


def test_items_must_be_judge_items(server: FakeJudgeServer) -> None:
    with pytest.raises(RadGrounderError, match=r"items\[1\]: expected a JudgeItem, got tuple"):
        judge(server).score([item("liver"), ("q", "a", "b", "c")], progress=False)  # type: ignore[list-item]
    assert server.count() == 0
