"""From generated text to what the metrics compare (spec §1.9, §2.5)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from radgrounder.grounding import GroundedText, codec, union_box

_FINAL_ANSWER = "Final Answer:"
_DETECT_MARKUP = re.compile(r"<p bbox=.*?<seg\d+>>|</p>")
_ANY_TAG = re.compile(r"<.*?>|</.*?>")


@lru_cache(maxsize=1)
def _class_names() -> dict[int, str]:
    from radgrounder.anatomy import load_schema

    return load_schema().names_by_id()


def clean_generated(text: str, variant: str, *, compat: str = "none") -> str:
    """The generated string as the evaluators read it: for the detection model only the text
    after ``Final Answer:`` (when present), stripped. The reference does not strip the
    segmentation model's output; with ``compat="reference"`` neither do we."""
    if variant == "detection":
        if _FINAL_ANSWER in text:
            text = text.split(_FINAL_ANSWER, 1)[1]
        return text.strip()
    return text if compat == "reference" else text.strip()


def plain_text(text: str, variant: str) -> str:
    """Markup removed for the text metrics: detection ``<p bbox=…<segNNN>>`` and ``</p>``
    are deleted (the keyword stays); for segmentation every ``<…>`` tag is deleted."""
    return (_DETECT_MARKUP if variant == "detection" else _ANY_TAG).sub("", text)


def grounded(
    text: str, variant: str, masks: Sequence[np.ndarray] | None = None
) -> tuple[GroundedText, list[tuple[str, Any, dict[str, Any]]]]:
    """Decode ``text`` and list its (keyword, region, info) pairs in text order.

    Keywords are stripped and lower-cased (spec §2.5). The region of a detection span is the
    union of its boxes (spans without a box are skipped); of a segmentation span its mask,
    or an empty mask where the model produced none (the reference pads the same way).
    ``info`` carries the label, class id and name and the boxes as lists.
    """
    if variant == "detection":
        decoded = codec("radgrounder-detect", class_names=_class_names()).decode(text)
    else:
        decoded = codec("radgrounder-segment").decode(text, list(masks or []))
    shape = next((np.asarray(m).shape for m in masks or []), (224, 224))
    pairs = []
    for span in decoded.spans:
        keyword = span.label.strip().lower()
        if not keyword:
            continue
        info = {
            "label": span.label,
            "class_id": span.class_id,
            "class_name": span.class_name,
            "boxes": [list(b.as_tuple()) for b in span.boxes],
        }
        if variant == "detection":
            if not span.boxes:
                continue
            pairs.append((keyword, union_box(span.boxes), info))
        else:
            mask = span.mask if span.mask is not None else np.zeros(shape, bool)
            pairs.append((keyword, np.asarray(mask, bool), info))
    return decoded, pairs
