"""Open vs closed questions (spec §7.3): from dataset metadata, and the reference's heuristic."""

from __future__ import annotations

from radgrounder.errors import RadGrounderError

_CLOSED = {"closed", "yesno", "yes/no", "multiple", "multiple_choice"}
_OPEN = {"open"}


def question_kind(question_type: str) -> str:
    """``open`` or ``closed`` from a dataset's own label: SLAKE ``answer_type`` (OPEN/CLOSED),
    VQA-RAD ``q_type`` (open/closed, stray spaces stripped), our and RefRad2D types (``yesno``
    and ``multiple`` are closed)."""
    key = str(question_type).strip().lower()
    if key in _CLOSED:
        return "closed"
    if key in _OPEN:
        return "open"
    raise RadGrounderError(
        f"question_type: unknown value {question_type!r} (open, closed, yesno or multiple)"
    )


def reference_is_closed(reference_answer: str) -> bool:
    """The reference grounding evaluators' test (``--compat reference`` only): a substring
    yes/no/ja/nein anywhere in the lower-cased answer, so "normal" and "nodule" count too."""
    text = reference_answer.lower()
    return any(word in text for word in ("yes", "no", "ja", "nein"))


def reference_yes_no(text: str) -> str | None:
    """The reference's reading of a yes/no answer: a substring yes/ja wins, then no/nein."""
    low = text.lower()
    if "yes" in low or "ja" in low:
        return "yes"
    if "no" in low or "nein" in low:
        return "no"
    return None
