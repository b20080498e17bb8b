"""Report text → sentences → mentions, with the lexicon (offline) or an LLM backend."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radgrounder.errors import RadGrounderError
from radgrounder.labels.mentions import Mention
from radgrounder.prompts import clean_punctuation

BACKENDS = ("lexicon", "llm")
TEXT_MODES = ("reference", "raw")


@dataclass
class SentenceResult:
    id: str
    language: str
    text: str
    mentions: list[Mention] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "language": self.language, "sentence": self.text}
        if self.error is None:
            out["mentions"] = [m.to_dict() for m in self.mentions]
        else:
            out["failed"] = self.error
        return out


def report_sentences(text: str, language: str, *, text_mode: str = "reference") -> list[str]:
    """Split a report into sentences; ``reference`` text mode applies the reference's
    ``clean_punctuation`` to each (what the released checkpoints learned to write)."""
    from radgrounder.labels.sentences import split_sentences

    if text_mode not in TEXT_MODES:
        raise RadGrounderError(
            f"text_mode: unknown value {text_mode!r} (expected one of {', '.join(TEXT_MODES)})"
        )
    out = []
    for start, end in split_sentences(text, language):
        sentence = text[start:end].strip()
        if text_mode == "reference":
            sentence = clean_punctuation(sentence)
        if sentence:
            out.append(sentence)
    return out


def extract_keywords(
    items: Iterable[tuple[str, str, str]],
    *,
    backend: str = "lexicon",
    endpoint: str | None = None,
    model: str | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = False,
    **llm_options: Any,
) -> list[SentenceResult]:
    """Mentions for ``(sentence_id, sentence, language)`` items, in input order.

    Every item comes back either with its mentions or with ``error`` set (LLM failures after
    retries); nothing is dropped.
    """
    items = list(items)
    if backend not in BACKENDS:
        raise RadGrounderError(
            f"backend: unknown value {backend!r} (expected one of {', '.join(BACKENDS)})"
        )
    if backend == "lexicon":
        from radgrounder.labels.lexicon import extract_mentions

        return [SentenceResult(i, lang, s, extract_mentions(s, lang)) for i, s, lang in items]
    if not endpoint or not model:
        raise RadGrounderError("backend llm: needs --endpoint URL and --model NAME")
    from radgrounder.labels.llm import LLMExtractor

    extractor = LLMExtractor(endpoint, model, checkpoint=checkpoint, **llm_options)
    run = extractor.extract_many(items, progress=progress)
    return [
        SentenceResult(i, lang, s, run.results.get(i, []), run.failures.get(i))
        if i in run.results or i in run.failures
        else SentenceResult(i, lang, s, error="no result")
        for i, s, lang in items
    ]


def sentence_items(
    reports: Sequence[Any], *, text_mode: str = "reference"
) -> list[tuple[str, str, str]]:
    """``(id, sentence, language)`` for every sentence of every report; ids are
    ``<scan_id>/<language>/<n>``."""
    items = []
    for rep in reports:
        for n, sentence in enumerate(report_sentences(rep.text, rep.language, text_mode=text_mode)):
            items.append((f"{rep.scan_id}/{rep.language}/{n}", sentence, rep.language))
    return items
