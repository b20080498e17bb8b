"""Keyword extraction with any OpenAI-compatible chat-completions server (vLLM, Ollama, llama.cpp).

The model only names keywords and their class. Offsets are located here, a keyword the sentence
does not contain verbatim is rejected, and negation comes from the lexical
:mod:`radgrounder.labels.negation`, so a model cannot invent text or decide negation.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radgrounder.anatomy import load_schema
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
from radgrounder.chat_client import retry_after as _retry_after  # noqa: F401 (kept importable)
from radgrounder.errors import RadGrounderError
from radgrounder.labels.checkpoint import CheckpointWriter, read_checkpoint
from radgrounder.labels.llm_prompt import check_language as _check_language
from radgrounder.labels.llm_prompt import mentions_schema, reply_token_budget, system_prompt
from radgrounder.labels.mentions import Mention


@dataclass
class KeywordRun:
    """What :meth:`LLMExtractor.extract_many` produced: every sentence id is in exactly one of
    ``results`` and ``failures``."""

    results: dict[str, list[Mention]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, list[str]] = field(default_factory=dict)
    n_requests: int = 0
    n_retries: int = 0
    n_rejected: int = 0
    n_resumed: int = 0
    n_other_model: int = 0  # checkpoint records of another model, requested again


@dataclass
class _Outcome:
    sentence_id: str
    mentions: list[Mention] | None
    rejected: list[str]
    reason: str
    requests: int
    retries: int


RESPONSE_FORMATS = ("json_schema", "json_object", "none")


class LLMExtractor:
    """Finds anatomy mentions in report sentences with a chat-completions server.

    ``endpoint`` is the server's base URL, e.g. ``http://127.0.0.1:8000/v1``.
    ``response_format`` asks for ``"json_schema"`` (strict, constrained decoding: vLLM,
    llama.cpp, Ollama >= 0.5), ``"json_object"`` or ``"none"`` (plain replies: the first JSON
    object in them is used). ``concurrency`` None uses the slots the server reports
    (llama.cpp) or ``DEFAULT_CONCURRENCY``. Every request carries ``max_tokens`` sized to the
    sentence (:func:`~radgrounder.labels.llm_prompt.reply_token_budget`).

    Retries change something: transport failures (connection, timeouts, HTTP 5xx/429) are
    retried ``max_retries`` times with backoff; a reply that breaks the format is deterministic
    at temperature 0, so it is retried at most ``max_reply_retries`` times, each at a higher
    temperature with another seed, and a reply cut off at ``max_tokens`` is retried once with
    twice the budget.
    """

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        api_key: str | None = None,
        concurrency: int | None = None,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        max_retries: int = 5,
        max_reply_retries: int = 2,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        temperature: float = 0.0,
        checkpoint: str | Path | None = None,
        response_format: str = "json_schema",
    ) -> None:
        self._client = ChatClient(
            endpoint, api_key=api_key, timeout=timeout, connect_timeout=connect_timeout
        )
        self.url = self._client.url
        if not isinstance(model, str) or not model.strip():
            raise RadGrounderError(f"model: expected a non-empty name, got {model!r}")
        self.model = model
        if concurrency is not None:
            check_number("concurrency", concurrency, 1, integer=True)
        check_number("max_retries", max_retries, 0, integer=True)
        check_number("max_reply_retries", max_reply_retries, 0, integer=True)
        for name, value in (("backoff", backoff), ("max_backoff", max_backoff)):
            check_number(name, value, 0)
        check_number("temperature", temperature, 0)
        if response_format not in RESPONSE_FORMATS:
            raise RadGrounderError(
                f"response_format: expected one of {', '.join(RESPONSE_FORMATS)}, "
                f"got {response_format!r}"
            )
        self.concurrency = concurrency
        self.concurrency_source = "argument" if concurrency is not None else None
        self.max_retries, self.max_reply_retries = max_retries, max_reply_retries
        self.timeout, self.backoff, self.max_backoff = timeout, backoff, max_backoff
        self.temperature = temperature
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.response_format = response_format
        self._categories = frozenset(load_schema().names)

    def resolve_concurrency(self) -> int:
        """The requests in flight (see :meth:`ChatClient.concurrency`), asked once."""
        if self.concurrency_source is None:
            self.concurrency, self.concurrency_source = self._client.concurrency(None)
        return int(self.concurrency)

    def extract(self, sentence: str, language: str) -> list[Mention]:
        """The mentions in one sentence; raises RadGrounderError with the reason on failure."""
        if not isinstance(sentence, str):
            raise RadGrounderError(f"sentence: expected a string, got {type(sentence).__name__}")
        _check_language("language", language)
        outcome = self._extract_one("sentence", sentence, language)
        if outcome.mentions is None:
            raise RadGrounderError(f"keyword extraction failed: {outcome.reason}")
        return outcome.mentions

    def extract_many(
        self, items: Iterable[tuple[str, str, str]], *, progress: bool = True
    ) -> KeywordRun:
        """Extract ``(sentence_id, sentence, language)`` items, ``concurrency`` requests at a time.

        With a checkpoint, sentences it already holds (same id, text and language) are not
        requested again and each finished sentence is appended to it as soon as it is done.
        """
        todo = _check_items(items)
        run = KeywordRun()
        if self.checkpoint is not None:
            _resume(self.checkpoint, todo, run, self.model)
        pending = [item for item in todo if item[0] not in run.results]
        writer = CheckpointWriter(self.checkpoint) if self.checkpoint is not None else None
        try:
            with progress_bar(progress, len(todo), run.n_resumed, "keywords") as advance:
                self._run_pending(pending, run, writer, advance)
        finally:
            if writer is not None:
                writer.close()
        return run

    def _run_pending(
        self,
        pending: Sequence[tuple[str, str, str]],
        run: KeywordRun,
        writer: CheckpointWriter | None,
        advance: Callable[[], None],
    ) -> None:
        by_id = {item[0]: item for item in pending}
        stop = threading.Event()
        if pending:
            self._client.check_reachable()
        workers = self.resolve_concurrency() if pending else 1
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llm")
        try:
            futures = {pool.submit(self._extract_one, *item, stop): item[0] for item in pending}
            for future in as_completed(futures):
                sid = futures[future]
                try:
                    outcome = future.result()
                except Exception as exc:  # a bug must still leave the sentence accounted for
                    outcome = _Outcome(sid, None, [], f"internal error: {exc!r}", 0, 0)
                run.n_requests += outcome.requests
                run.n_retries += outcome.retries
                _, sentence, language = by_id[sid]
                record: dict[str, Any] = {
                    "id": sid,
                    "sentence": sentence,
                    "language": language,
                    "model": self.model,
                }
                if outcome.mentions is None:
                    run.failures[sid] = record["failed"] = outcome.reason
                else:
                    run.results[sid] = outcome.mentions
                    record["mentions"] = [m.to_dict() for m in outcome.mentions]
                    record["rejected"] = outcome.rejected
                    if outcome.rejected:
                        run.rejected[sid] = outcome.rejected
                        run.n_rejected += len(outcome.rejected)
                if writer is not None:
                    writer.write(record)
                advance()
        finally:
            # On Ctrl-C, drop the queued sentences and stop retrying the running ones.
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def _extract_one(
        self, sentence_id: str, sentence: str, language: str, stop: threading.Event | None = None
    ) -> _Outcome:
        if not sentence.strip():
            return _Outcome(sentence_id, [], [], "", 0, 0)
        stop = stop or threading.Event()
        budget = reply_token_budget(sentence)
        transport = replies = requests = 0
        temperature, seed = self.temperature, None
        while True:
            body = self._payload(sentence, language, budget, temperature, seed)
            requests += 1
            try:
                content, finish = reply_content(self._client.post(json.dumps(body).encode()))
                entries = _parse_entries(content, finish, self._categories)
                mentions, rejected = _locate(sentence, language, entries)
                return _Outcome(sentence_id, mentions, rejected, "", requests, requests - 1)
            except FatalError as exc:
                return _Outcome(sentence_id, None, [], str(exc), requests, requests - 1)
            except RetryableError as exc:
                reason, wait = str(exc), exc.wait
                if exc.kind in ("reply", "length"):
                    if replies >= self.max_reply_retries:
                        n = replies + 1
                        reason = f"{n} repl{'y' if n == 1 else 'ies'} broke the format: {reason}"
                        return _Outcome(sentence_id, None, [], reason, requests, requests - 1)
                    replies += 1
                    if exc.kind == "length":  # more room, once; then a different sample
                        budget = min(4 * reply_token_budget(sentence), 2 * budget)
                    temperature, seed = max(self.temperature, 0.4 * replies), replies
                    wait = 0.0
                else:
                    if transport >= self.max_retries:
                        n = transport + 1
                        reason = f"gave up after {n} attempts: {reason}"
                        return _Outcome(sentence_id, None, [], reason, requests, requests - 1)
                    transport += 1
                    wait = self._delay(transport - 1, wait)
                if stop.wait(wait):
                    return _Outcome(
                        sentence_id, None, [], f"cancelled: {reason}", requests, requests - 1
                    )

    def _payload(
        self,
        sentence: str,
        language: str,
        max_tokens: int,
        temperature: float,
        seed: int | None,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": system_prompt(language)},
                {"role": "user", "content": sentence},
            ],
            "temperature": temperature,
            "max_tokens": max_tokens,
            "stream": False,
        }
        if seed is not None:
            payload["seed"] = seed
        if self.response_format == "json_schema":
            schema = {"name": "mentions", "strict": True, "schema": mentions_schema(sentence)}
            payload["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif self.response_format == "json_object":
            payload["response_format"] = {"type": "json_object"}
        return payload

    def _delay(self, attempt: int, wait: float | None) -> float:
        return backoff_delay(attempt, wait, self.backoff, self.max_backoff)


def _parse_entries(content: str, finish: Any, categories: frozenset[str]) -> list[tuple[str, str]]:
    text = strip_fence(content)
    try:
        data = first_json_object(text)
    except ValueError as exc:
        if finish == "length":
            raise RetryableError(
                f"reply cut off at max_tokens (finish_reason=length): {excerpt(text)!r}",
                kind="length",
            ) from None
        raise RetryableError(f"reply is not valid JSON: {exc}", kind="reply") from None
    if not isinstance(data.get("mentions"), list):
        raise RetryableError(
            f'reply violates the schema: no "mentions" list in {excerpt(text)!r}', kind="reply"
        )
    entries = []
    for i, item in enumerate(data["mentions"]):
        keyword = item.get("keyword") if isinstance(item, dict) else None
        category = item.get("category") if isinstance(item, dict) else None
        if not isinstance(keyword, str) or not isinstance(category, str):
            raise RetryableError(
                f'reply violates the schema: mentions[{i}] needs string "keyword" and '
                f'"category", got {excerpt(json.dumps(item))!r}',
                kind="reply",
            )
        if category not in categories:
            raise RetryableError(
                f"reply violates the schema: unknown category {category!r}", kind="reply"
            )
        entries.append((keyword, category))
    return entries


def _locate(
    sentence: str, language: str, entries: list[tuple[str, str]]
) -> tuple[list[Mention], list[str]]:
    schema = load_schema()
    negated = _negation()
    used: dict[tuple[str, str], set[int]] = {}
    spans: list[tuple[int, int]] = []
    mentions: list[Mention] = []
    rejected: list[str] = []
    for raw, _ in entries:
        if (not raw.strip() or raw.strip() not in sentence) and raw not in rejected:
            rejected.append(raw)
    # Longest keywords first, so "kidney" cannot take the "kidney" inside "left kidney".
    for raw, category in sorted(entries, key=lambda e: -len(e[0].strip())):
        keyword = raw.strip()
        starts = _occurrences(sentence, keyword) if keyword else []
        if not starts:
            continue
        taken = used.setdefault((keyword, category), set())
        free = [s for s in starts if s not in taken]
        if not free:
            continue  # the pair again, more often than the sentence has it: a duplicate
        size = len(keyword)

        def rank(s: int, n: int = size) -> tuple[bool, bool, int]:
            inside = any(a <= s and s + n <= b and (a, b) != (s, s + n) for a, b in spans)
            return (not _whole_word(sentence, s, s + n), inside, s)

        start = min(free, key=rank)
        taken.add(start)
        end = start + size
        spans.append((start, end))
        flag = bool(negated(sentence, start, end, language)) if negated else False
        mentions.append(Mention(start, end, keyword, category, schema.by_name(category).id, flag))
    mentions.sort(key=lambda m: (m.start, m.end, m.class_id))
    return mentions, rejected


def _negation() -> Callable[[str, int, int, str], bool] | None:
    try:
        from radgrounder.labels.negation import is_negated
    except ModuleNotFoundError as exc:
        if exc.name != "radgrounder.labels.negation":
            raise
        return None
    return is_negated


def _occurrences(sentence: str, keyword: str) -> list[int]:
    starts, i = [], sentence.find(keyword)
    while i >= 0:
        starts.append(i)
        i = sentence.find(keyword, i + 1)
    return starts


def _whole_word(sentence: str, start: int, end: int) -> bool:
    # "T1" should prefer a standalone "T1" over the start of "T12".
    before = sentence[start - 1] if start > 0 else " "
    after = sentence[end] if end < len(sentence) else " "
    return not before.isalnum() and not after.isalnum()


def _check_items(items: Iterable[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    checked: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise RadGrounderError(f"items[{i}]: expected (sentence_id, sentence, language)")
        sid, sentence, language = item
        if not isinstance(sid, str) or not sid:
            raise RadGrounderError(f"items[{i}]: sentence_id must be a non-empty string")
        if not isinstance(sentence, str):
            raise RadGrounderError(f"items[{i}] ({sid}): sentence must be a string")
        _check_language(f"items[{i}] ({sid}): language", language)
        if sid in seen:
            raise RadGrounderError(f"items[{i}]: sentence_id {sid!r} appears more than once")
        seen.add(sid)
        checked.append((sid, sentence, language))
    return checked


def _resume(path: Path, todo: list[tuple[str, str, str]], run: KeywordRun, model: str) -> None:
    if not path.exists():
        return
    if not path.is_file():
        raise RadGrounderError("checkpoint is not a file", path=path)
    records, intact = read_checkpoint(path)
    if intact < path.stat().st_size:
        os.truncate(path, intact)  # else the next append would glue onto the broken line
    for sid, sentence, language in todo:
        record = records.get(sid)
        if record is None or "failed" in record:
            continue
        if record.get("sentence") != sentence or record.get("language") != language:
            continue
        if record.get("model") != model:  # another model's answer is not this run's result
            run.n_other_model += 1
            continue
        try:
            mentions = [Mention.from_dict(m) for m in record["mentions"]]
            for mention in mentions:
                mention.check(sentence)
        except (RadGrounderError, KeyError, TypeError, AttributeError) as exc:
            raise RadGrounderError(f"line {record['_line']}: {exc}", path=path) from None
        run.results[sid] = mentions
        rejected = [str(k) for k in record.get("rejected") or []]
        if rejected:
            run.rejected[sid] = rejected
            run.n_rejected += len(rejected)
        run.n_resumed += 1
