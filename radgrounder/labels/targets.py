"""Per-slice training targets: grounded reports and templated (grounding) VQA."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from radgrounder.anatomy import load_schema
from radgrounder.grounding import Box, GroundedText, Span
from radgrounder.labels.mentions import Mention
from radgrounder.labels.regions import SliceRegions, group_box, part_ids, union_pixel_box
from radgrounder.resources import load_json

_PLACEHOLDER = re.compile(r"\{(organ_name|organ_list_comma_separated|organ_list_bulleted)\}")
_LANG_FILE = {"en": "english", "de": "german"}


@dataclass
class SentenceMentions:
    """One (cleaned) report sentence and the mentions found in it."""

    text: str
    mentions: list[Mention]


def _span_for(
    label: str,
    start: int,
    class_ids: Sequence[int],
    regions: SliceRegions,
    *,
    instances: bool,
    negated: bool = False,
) -> Span | None:
    """A span grounded on the classes of ``class_ids`` that the slice shows, or None."""
    h, w = regions.shape
    present = [c for c in class_ids if group_box(regions, c) is not None]
    if not present:
        return None
    if instances:
        pixel_boxes = sorted(
            b for c in present for p in part_ids(c) for b in regions.instances.get(p, [])
        )
    else:
        pixel_boxes = [union_pixel_box([group_box(regions, c) for c in present])]
    schema = load_schema()
    first = min(present)
    return Span(
        start,
        start + len(label),
        label,
        class_id=first,
        class_name=schema.by_id(first).name,
        boxes=[Box.from_pixels(*b, w, h) for b in pixel_boxes],
        meta={
            "class_ids": sorted(present),
            "pixel_boxes": [list(b) for b in pixel_boxes],
            "negated": negated,
        },
    )


def grounded_report(
    sentences: Sequence[SentenceMentions], regions: SliceRegions, *, instances: bool = False
) -> GroundedText | None:
    """The sentences that mention a structure this slice shows, each such mention grounded.

    A phrase naming several classes ("both kidneys") becomes one span grounded on the union
    of the named classes present (``meta["class_ids"]`` lists them). Mentions of structures
    the slice does not show stay plain text. None when no sentence qualifies.
    """
    text, spans = "", []
    for sentence in sentences:
        groups: dict[tuple[int, int], list[Mention]] = {}
        for m in sentence.mentions:
            groups.setdefault((m.start, m.end), []).append(m)
        sentence_spans = []
        taken_until = -1
        for (start, end), ms in sorted(groups.items()):
            if start < taken_until:
                continue  # overlapping phrases cannot both be marked up
            span = _span_for(
                sentence.text[start:end],
                len(text) + (1 if text else 0) + start,
                sorted({m.class_id for m in ms}),
                regions,
                instances=instances,
                negated=any(m.negated for m in ms),
            )
            if span is not None:
                sentence_spans.append(span)
                taken_until = end
        if sentence_spans:
            text += (" " if text else "") + sentence.text
            spans.extend(sentence_spans)
    return GroundedText(text, spans) if spans else None


@cache
def _templates(language: str) -> dict[str, list[dict[str, str]]]:
    grouped: dict[str, list[dict[str, str]]] = {}
    for t in load_json(f"detect_vqa/vqa_templates_{_LANG_FILE[language]}.json"):
        grouped.setdefault(t["question_type"], []).append(t)
    return grouped


def _fill(
    template: str, names: Sequence[str], grounded: Sequence[dict[str, Any]] | None
) -> GroundedText:
    """Fill a template; with ``grounded`` each name becomes a span with those fields."""
    parts: list[Any] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(template[pos : m.start()])
        joiner = {"organ_list_bulleted": "\n- ", "organ_list_comma_separated": ", "}.get(
            m.group(1), ""
        )
        chosen = names if m.group(1) != "organ_name" else names[:1]
        for i, name in enumerate(chosen):
            if i:
                parts.append(joiner)
            parts.append((name, dict(grounded[i])) if grounded else name)
        pos = m.end()
    parts.append(template[pos:])
    return GroundedText.from_phrases(parts)


@dataclass
class VQAItem:
    question: str
    answer: GroundedText
    question_type: str  # "closed" or "open"
    template_type: str  # the reference template kind


def vqa_items(
    regions: SliceRegions,
    language: str,
    rng: np.random.Generator,
    *,
    candidate_ids: Sequence[int],
    max_listed: int = 12,
) -> list[VQAItem]:
    """One affirmative, one negative and one open templated question for a slice.

    Answers name structures by their display names; in an affirmative or open answer each
    name is a span grounded on that class. Negative answers name a structure from
    ``candidate_ids`` (the classes the label map could show) that this slice does not show.
    """
    schema = load_schema()
    templates = _templates(language)
    present = list(regions.classes)
    absent = [c for c in candidate_ids if c not in regions.boxes]
    h, w = regions.shape

    def fields(cid: int) -> dict[str, Any]:
        return {
            "class_id": cid,
            "class_name": schema.by_id(cid).name,
            "boxes": [Box.from_pixels(*regions.boxes[cid], w, h)],
            "meta": {"class_ids": [cid], "pixel_boxes": [list(regions.boxes[cid])]},
        }

    items = []
    if present:
        cid = present[int(rng.integers(len(present)))]
        t = templates["yes_no_affirmative"][int(rng.integers(len(templates["yes_no_affirmative"])))]
        name = schema.by_id(cid).display_name(language)
        items.append(
            VQAItem(
                _fill(t["question"], [name], None).text,
                _fill(t["answer"], [name], [fields(cid)]),
                "closed",
                t["question_type"],
            )
        )
    if absent:
        cid = absent[int(rng.integers(len(absent)))]
        t = templates["yes_no_negative"][int(rng.integers(len(templates["yes_no_negative"])))]
        name = schema.by_id(cid).display_name(language)
        items.append(
            VQAItem(
                _fill(t["question"], [name], None).text,
                _fill(t["answer"], [name], None),
                "closed",
                t["question_type"],
            )
        )
    if present:
        listed = sorted(present, key=lambda c: -regions.areas.get(c, 0))[:max_listed]
        listed.sort()
        t = templates["open"][int(rng.integers(len(templates["open"])))]
        names = [schema.by_id(c).display_name(language) for c in listed]
        items.append(
            VQAItem(
                t["question"],
                _fill(t["answer"], names, [fields(c) for c in listed]),
                "open",
                t["question_type"],
            )
        )
    return items
