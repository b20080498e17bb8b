"""Scoring answers with an LLM judge on any OpenAI-compatible chat-completions server.

The judge reads the question, the candidate (model) answer and the reference answer as text and
rates how well the candidate conveys the reference's clinical information from 1 (completely
wrong) to 5 (completely right). Replies that are not a JSON object with an integer score in 1..5
are never turned into a number: they come back with status ``"unparseable"`` and ``score=None``,
and :func:`summarize` leaves them out of the mean.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from radgrounder.chat_client import (
    ChatClient,
    FatalError,
    RetryableError,
    backoff_delay,
    check_number,
    excerpt,
    first_json_object,
    progress_bar,
    reply_content,
    strip_fence,
)
from radgrounder.errors import RadGrounderError

KINDS = ("vqa", "report")
JSON_MODES = ("json_schema", "json_object", "none")
_MISCONFIGURED = {
    401: "check the API key",
    403: "check the API key",
    404: "check the URL and the model name",
}

SYSTEM_PROMPT = """\
You grade the answers of a radiology model. Each message gives a question (for a report: the \
task the model was given), a candidate answer from the model and a reference answer written by \
a radiologist. Rate how well the candidate conveys the same clinical information as the \
reference:
5 = completely right: the same clinical content, possibly in other words;
4 = mostly right: only minor details are missing or imprecise;
3 = partly right: some key content is correct, but important parts are missing or wrong;
2 = mostly wrong: only a small part is correct;
1 = completely wrong: the candidate contradicts the reference or misses its content.
Judge the text alone. You cannot see the image, so do not imagine what it shows: the reference \
is the truth. Wording, style, length and spelling do not matter; findings, their presence or \
absence, location, side, size and nature do. Clinically relevant claims in the candidate that \
the reference does not support count against it.
Reply with a JSON object and nothing else: \
{"score": <integer 1-5>, "reason": "<one or two sentences>"}"""

# (question, candidate, reference, score, reason): worked examples shown before each item.
FEW_SHOT: dict[str, tuple[tuple[str, str, str, int, str], ...]] = {
    "vqa": (
        ("Which organ contains the lesion?", "The liver.", "liver", 5, "Same organ."),
        (
            "Where is the mass located?",
            "In the left kidney.",
            "upper pole of the left kidney",
            4,
            "Organ and side are right; the upper pole is not mentioned.",
        ),
        (
            "What is seen in the chest?",
            "Pleural effusions on both sides.",
            "right pleural effusion",
            3,
            "The effusion is right, but the reference has it on the right side only.",
        ),
        (
            "What abnormality is shown?",
            "A mass in the right lung.",
            "abscess in the left lung",
            2,
            "A lung lesion is named, but its side and nature are wrong.",
        ),
        ("Is the heart enlarged?", "No.", "yes", 1, "The candidate contradicts the reference."),
    ),
    "report": (
        (
            "Describe the findings of this abdominal CT.",
            "Liver normal without focal lesions. Small cyst in the right kidney. No free fluid.",
            "Small right renal cyst. The liver is unremarkable. No ascites.",
            5,
            "All findings agree, in different words.",
        ),
        (
            "Describe the findings of this abdominal CT.",
            "Splenomegaly. Otherwise normal.",
            "Splenomegaly of 16 cm. Small accessory spleen. No other findings.",
            4,
            "The main finding is right; the size and a minor accessory spleen are missing.",
        ),
        (
            "Describe the findings of this chest CT.",
            "Consolidation in the right lower lobe.",
            "Right lower lobe consolidation, moderate right pleural effusion and a 2 cm nodule "
            "in the left upper lobe.",
            3,
            "The consolidation is right, but the effusion and the nodule are missing.",
        ),
        (
            "Describe the findings of this abdominal CT.",
            "Multiple liver metastases.",
            "Single 1 cm hemangioma in liver segment 6. Gallstones.",
            2,
            "A liver lesion is mentioned, but its number and nature are wrong and the gallstones "
            "are missing.",
        ),
        (
            "Describe the findings of this abdominal CT.",
            "Normal study without acute findings.",
            "Acute appendicitis with a periappendiceal abscess.",
            1,
            "The candidate calls the study normal; the reference has acute appendicitis.",
        ),
    ),
}

RESPONSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "score": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
        # Bounded, so a constrained reply always closes within max_tokens (llama.cpp answers
        # HTTP 500 for a reply cut off inside its grammar).
        "reason": {"type": "string", "maxLength": 400},
    },
    "required": ["score", "reason"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class JudgeItem:
    """One answer to score. ``question`` is the question, or the task prompt for reports;
    ``prediction`` and ``reference`` are the cleaned model and reference answers; ``kind``
    (``"vqa"`` or ``"report"``) selects the worked examples the judge sees."""

    id: str
    question: str
    prediction: str
    reference: str
    kind: str = "vqa"

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise RadGrounderError(f"JudgeItem.id: expected a non-empty string, got {self.id!r}")
        for name in ("question", "prediction", "reference"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise RadGrounderError(
                    f"JudgeItem {self.id!r}: {name} must be a string, got {type(value).__name__}"
                )
        if self.kind not in KINDS:
            raise RadGrounderError(
                f"JudgeItem {self.id!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}"
            )


@dataclass
class JudgeResult:
    """The judgement of one item.

    ``status`` is ``"ok"`` (``score`` is 1..5 and ``reason`` the judge's reasoning),
    ``"unparseable"`` (every reply broke the format; ``raw`` is the last one) or ``"error"``
    (the server failed; ``raw`` is empty). A failure never has a score. When attempts ended
    differently, the last one decides the status. ``attempts`` counts the requests sent.
    """

    id: str
    score: float | None
    status: str
    reason: str
    raw: str
    attempts: int


class LLMJudge:
    """Scores :class:`JudgeItem` s with a chat-completions server.

    ``url`` is the server's base URL, e.g. ``http://127.0.0.1:8000/v1`` (a trailing
    ``/chat/completions`` is accepted). Requests use temperature 0 and ``seed``; ``json_mode``
    asks the server for a ``"json_schema"`` (strict), a ``"json_object"`` or, with ``"none"``,
    no constrained reply (the first JSON object in the reply is used, text around it ignored).
    Timeouts, dropped connections and HTTP 5xx/408/429 are retried ``max_retries`` times with
    exponential backoff (Retry-After honoured, at most ``max_backoff`` seconds). An unparseable
    reply is what the same request gives again at temperature 0, so it is retried at most
    ``max_reply_retries`` times, each at a higher temperature with another seed. HTTP
    401/403/404 raise :class:`RadGrounderError`, because every other item would fail the same
    way. ``concurrency`` None uses the slots the server reports (llama.cpp) or 4.
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        concurrency: int | None = None,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        max_retries: int = 4,
        max_reply_retries: int = 2,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        seed: int = 42,
        max_tokens: int = 512,
        json_mode: str = "json_schema",
    ) -> None:
        self._client = ChatClient(
            url, api_key=api_key, timeout=timeout, connect_timeout=connect_timeout, field="url"
        )
        self.url = self._client.url
        if not isinstance(model, str) or not model.strip():
            raise RadGrounderError(f"model: expected a non-empty name, got {model!r}")
        if concurrency is not None:
            check_number("concurrency", concurrency, 1, integer=True)
        check_number("max_retries", max_retries, 0, integer=True)
        check_number("max_reply_retries", max_reply_retries, 0, integer=True)
        check_number("backoff", backoff, 0)
        check_number("max_backoff", max_backoff, 0)
        check_number("seed", seed, -(2**63), integer=True)
        check_number("max_tokens", max_tokens, 1, integer=True)
        if json_mode not in JSON_MODES:
            raise RadGrounderError(
                f"json_mode: expected one of {', '.join(JSON_MODES)}, got {json_mode!r}"
            )
        self.model, self.concurrency, self.timeout = model, concurrency, timeout
        self.concurrency_source = "argument" if concurrency is not None else None
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.max_reply_retries = max_reply_retries
        self.seed, self.max_tokens, self.json_mode = seed, max_tokens, json_mode

    def resolve_concurrency(self) -> int:
        """The requests in flight (see :meth:`ChatClient.concurrency`), asked once."""
        if self.concurrency_source is None:
            self.concurrency, self.concurrency_source = self._client.concurrency(None)
        return int(self.concurrency)

    def score(self, items: Sequence[JudgeItem], *, progress: bool = True) -> list[JudgeResult]:
        """One result per item, in the order of ``items``, ``concurrency`` requests at a time.

        Raises RadGrounderError (and stops the other requests) when the server rejects the run
        as a whole: HTTP 401/403 (credentials) or 404 (URL or model).
        """
        items = list(items)
        for i, item in enumerate(items):
            if not isinstance(item, JudgeItem):
                raise RadGrounderError(
                    f"items[{i}]: expected a JudgeItem, got {type(item).__name__}"
                )
        results: list[JudgeResult | None] = [None] * len(items)
        stop = threading.Event()
        if items:
            self._client.check_reachable()
        workers = self.resolve_concurrency() if items else 1
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge")
        try:
            with progress_bar(progress, len(items), label="judge") as advance:
                futures = {pool.submit(self._judge, item, stop): i for i, item in enumerate(items)}
                for future in as_completed(futures):
                    i = futures[future]
                    try:
                        results[i] = future.result()
                    except RadGrounderError:
                        raise
                    except Exception as exc:  # a bug must still leave the item accounted for
                        reason = f"internal error: {exc!r}"
                        results[i] = JudgeResult(items[i].id, None, "error", reason, "", 0)
                    advance()
        finally:
            # Queued items are dropped and running ones stop retrying; a request in flight is
            # not waited for, so a misconfigured run fails at once.
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
        return [r for r in results if r is not None]

    def score_one(self, item: JudgeItem) -> JudgeResult:
        """The judgement of one item (HTTP 401/403/404 raise RadGrounderError)."""
        if not isinstance(item, JudgeItem):
            raise RadGrounderError(f"item: expected a JudgeItem, got {type(item).__name__}")
        return self._judge(item, threading.Event())

    def messages(self, item: JudgeItem) -> list[dict[str, str]]:
        """The chat messages for ``item``: the instructions, the worked examples of its kind as
        user/assistant turns, then the item itself."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        for question, candidate, reference, score, reason in FEW_SHOT[item.kind]:
            answer = json.dumps({"score": score, "reason": reason})
            messages.append({"role": "user", "content": _user(question, candidate, reference)})
            messages.append({"role": "assistant", "content": answer})
        messages.append(
            {"role": "user", "content": _user(item.question, item.prediction, item.reference)}
        )
        return messages

    def _payload(self, item: JudgeItem, retry: int = 0) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": self.messages(item),
            # A retry after an unparseable reply samples again: temperature 0 would repeat it.
            "temperature": round(0.4 * retry, 2),
            "seed": self.seed + retry,
            "max_tokens": self.max_tokens,
            "stream": False,
        }
        if self.json_mode == "json_schema":
            schema = {"name": "judgement", "strict": True, "schema": RESPONSE_SCHEMA}
            payload["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif self.json_mode == "json_object":
            payload["response_format"] = {"type": "json_object"}
        return payload

    def _judge(self, item: JudgeItem, stop: threading.Event) -> JudgeResult:
        status, reason, raw = "error", "", ""
        transport = replies = attempts = 0
        while True:
            if stop.is_set():  # the run was stopped while this item waited for a worker
                return JudgeResult(item.id, None, "error", "cancelled", "", attempts)
            body = json.dumps(self._payload(item, replies)).encode("utf-8")
            attempts += 1
            wait = None
            try:
                content, finish = reply_content(self._client.post(body), allow_empty=True)
            except FatalError as exc:
                hint = _MISCONFIGURED.get(exc.status or 0)
                if hint:
                    raise RadGrounderError(
                        f"judge server {self.url} answered {exc}; {hint}"
                    ) from None
                return JudgeResult(item.id, None, "error", str(exc), "", attempts)
            except RetryableError as exc:
                status, reason, raw, wait = "error", str(exc), "", exc.wait
                if transport >= self.max_retries:
                    return JudgeResult(item.id, None, status, _gave_up(attempts, reason), raw,
                                       attempts)  # fmt: skip
                transport += 1
                delay = backoff_delay(transport - 1, wait, self.backoff, self.max_backoff)
            else:
                try:
                    score, why = parse_judgement(content)
                except ValueError as exc:
                    cut = " (cut off: finish_reason=length)" if finish == "length" else ""
                    status, reason, raw = "unparseable", f"{exc}{cut}", content
                    if replies >= self.max_reply_retries:
                        return JudgeResult(item.id, None, status, _gave_up(attempts, reason),
                                           raw, attempts)  # fmt: skip
                    replies += 1
                    delay = 0.0
                else:
                    return JudgeResult(item.id, float(score), "ok", why, content, attempts)
            if stop.wait(delay):
                return JudgeResult(item.id, None, status, f"cancelled: {reason}", raw, attempts)


def _gave_up(attempts: int, reason: str) -> str:
    return f"gave up after {attempts} attempts: {reason}" if attempts > 1 else reason


def parse_judgement(content: str) -> tuple[int, str]:
    """``(score, reason)`` from a judge reply: a JSON object (optionally in a ```json fence) with
    an integer ``score`` in 1..5 (``4.0`` counts as 4; strings such as ``"4"`` do not) and a
    ``reason`` string (missing: ``""``); the first JSON object of the reply counts, text
    around it is ignored. Raises ValueError saying what is wrong otherwise."""
    text = strip_fence(content)
    if not text:
        raise ValueError("reply has no message content")
    try:
        data = first_json_object(text)
    except ValueError:
        raise ValueError(f"reply holds no JSON object: {excerpt(text)!r}") from None
    score = data.get("score")
    integral = isinstance(score, int) or (isinstance(score, float) and score.is_integer())
    if isinstance(score, bool) or not integral or not 1 <= score <= 5:
        raise ValueError(f'"score" is not an integer from 1 to 5: {excerpt(text)!r}')
    reason = data.get("reason")
    if reason is None:
        reason = ""
    elif not isinstance(reason, str):
        reason = json.dumps(reason, ensure_ascii=False)
    return int(score), reason.strip()


def summarize(results: Sequence[JudgeResult]) -> dict[str, Any]:
    """Counts per status and the mean score of the ``"ok"`` results.

    ``mean_score`` is on the 1..5 scale and ``mean_normalized`` is ``(mean - 1) / 4`` in 0..1;
    both are None when no result is ok. Failures are counted, never scored.
    """
    scores = [r.score for r in results if r.status == "ok" and r.score is not None]
    mean = sum(scores) / len(scores) if scores else None
    return {
        "n": len(results),
        "ok": len(scores),
        "unparseable": sum(r.status == "unparseable" for r in results),
        "error": sum(r.status == "error" for r in results),
        "mean_score": mean,
        "mean_normalized": None if mean is None else (mean - 1.0) / 4.0,
    }


def _user(question: str, candidate: str, reference: str) -> str:
    return f"Question: {question}\nCandidate: {candidate}\nReference: {reference}"
