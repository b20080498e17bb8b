"""Task prompts in the exact layout the released checkpoints were trained on (spec §1)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from radgrounder.errors import RadGrounderError
from radgrounder.prompts.text import clean_punctuation

IMAGE_TOKEN = "<image>"
TASKS = ("report", "grounded-report-detect", "grounded-report-segment", "vqa", "grounded-vqa")
LANGUAGES = ("en", "de")
PREFIX_STYLES = ("none", "clinical_info", "clinical_question", "both", "random")
_STYLE_ALIASES = {"klinische_angaben": "clinical_info", "fragestellung": "clinical_question"}

TASK_PROMPTS = {
    ("report", "en"): "Caption this image:",
    ("report", "de"): "Beschreibe dieses Bild:",
    ("grounded-report-detect", "en"): "Caption this image and detect keywords:",
    ("grounded-report-detect", "de"): "Beschreibe dieses Bild und detektiere Schlüsselwörter:",
    ("grounded-report-segment", "en"): "Caption this image and segment keywords:",
    ("grounded-report-segment", "de"): (
        "Beschreibe dieses Bild und segmentiere die Schlüsselwörter:"
    ),
    ("vqa", "en"): "Answer:",
    ("vqa", "de"): "Antwort:",
}
FIELD_LABELS = {
    "en": ("Clinical information:", "Question:"),
    "de": ("Klinische angaben:", "Fragestellung:"),
}


def _check(value: str, valid: Sequence[str], field: str) -> str:
    if value not in valid:
        raise RadGrounderError(
            f"{field}: unknown value {value!r} (expected one of {', '.join(valid)})"
        )
    return value


def _draw_style(rng: Any) -> str:
    options = ("none", "clinical_info", "clinical_question", "both")
    return str(rng.choice(options)) if rng is not None else random.choice(options)


def build_prefix(
    language: str,
    *,
    clinical_info: str | None = None,
    clinical_question: str | None = None,
    prefix_style: str = "both",
    rng: Any = None,
) -> str:
    """The PREFIX block from the clinical context fields (spec §1.4).

    ``prefix_style`` is ``none``, ``clinical_info``, ``clinical_question``, ``both`` or
    ``random`` (each of the four drawn with probability 1/4 from ``rng``: a
    ``random.Random`` or ``numpy.random.Generator``). The reference names
    ``klinische_angaben`` and ``fragestellung`` are accepted too.
    """
    _check(language, LANGUAGES, "language")
    style = _STYLE_ALIASES.get(prefix_style, prefix_style)
    _check(style, PREFIX_STYLES, "prefix_style")
    if style == "random":
        style = _draw_style(rng)
    # Cleaned, then stripped again (the replacements can leave edge spaces), as the reference.
    info = clean_punctuation(clinical_info).strip() if clinical_info else ""
    question = clean_punctuation(clinical_question).strip() if clinical_question else ""
    info_label, question_label = FIELD_LABELS[language]
    if style == "none":
        return ""
    if style == "clinical_info":
        return f"{info_label} {info}" if info else ""
    if style == "clinical_question":
        return f"{question_label} {question}" if question else ""
    if info == question:
        return f"{info_label} {info}".strip()
    return f"{info_label} {info}\n{question_label} {question}".strip()


def build_prompt(
    task: str,
    language: str = "en",
    *,
    clinical_info: str | None = None,
    clinical_question: str | None = None,
    question: str | None = None,
    choices: Sequence[str] | None = None,
    prefix_style: str = "both",
    rng: Any = None,
) -> str:
    """The prompt string the reference feeds the processor, ``<image>`` included.

    - ``report``/``grounded-report-*``: ``"<image>\\n" + PREFIX + "\\n" + PROMPT + " "``
      (an empty PREFIX leaves an empty line).
    - ``vqa``: ``"<image>\\n" + question + "\\n" + "Answer: "`` (``Antwort: `` in German),
      each multiple-choice option on its own line after the question. SLAKE and VQA-RAD
      use this layout in English.
    - ``grounded-vqa`` (templated grounding questions): ``"<image>\\n" + question + " "``.
    """
    _check(task, TASKS, "task")
    _check(language, LANGUAGES, "language")
    if task in ("vqa", "grounded-vqa"):
        if not question or not question.strip():
            raise RadGrounderError(f"question: task {task!r} needs a non-empty question")
        if task == "grounded-vqa":
            if choices:
                raise RadGrounderError("choices: only the 'vqa' task takes answer choices")
            return f"{IMAGE_TOKEN}\n{question} "
        body = question
        if choices:
            body += "".join(f"\n{choice}" for choice in choices)
        return f"{IMAGE_TOKEN}\n{body}\n{TASK_PROMPTS[(task, language)]} "
    if question is not None or choices:
        raise RadGrounderError(f"question: task {task!r} takes no question or choices")
    prefix = build_prefix(
        language,
        clinical_info=clinical_info,
        clinical_question=clinical_question,
        prefix_style=prefix_style,
        rng=rng,
    )
    return f"{IMAGE_TOKEN}\n{prefix}\n{TASK_PROMPTS[(task, language)]} "
