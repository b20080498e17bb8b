"""Codecs between GroundedText and the grounding markups models read and write.

Every codec has ``encode(GroundedText) -> str`` and ``decode(str) -> GroundedText``.
Decoding model output never raises: whatever could not be parsed is reported in
``GroundedText.problems`` and the readable text is kept.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from radgrounder.errors import RadGrounderError
from radgrounder.grounding.types import Box, GroundedText, Span, _trunc

# Sequence-control tokens that may trail generated text; the reference deletes them too.
_CONTROL = re.compile(r"<pad>|<eos>|<bos>")
_STRAY = re.compile(r"<loc\d+>|<seg\d+>|</?seg>|<p bbox=|</p>", re.IGNORECASE)
_LOC = re.compile(r"<loc(\d{1,4})>", re.IGNORECASE)
_TOKEN_STARTS = ("<p bbox=", "</p>", "<seg>", "</seg>", "<eos>", "<pad>", "<bos>")
_NUMBERED_TOKEN_PREFIX = re.compile(r"<(?:l|lo|loc\d{0,4}|s|se|seg\d{0,3})$", re.IGNORECASE)


def _strip_truncated_token(text: str, problems: list[str]) -> str:
    """Drop a special token cut off at the end of generation (e.g. ``...<loc02``)."""
    cut = text.rfind("<")
    if cut < 0 or ">" in text[cut:]:
        return text
    tail = text[cut:]
    if any(t.lower().startswith(tail.lower()) for t in _TOKEN_STARTS) or (
        _NUMBERED_TOKEN_PREFIX.match(tail)
    ):
        problems.append(f"dropped a truncated token {tail!r} at the end")
        return text[:cut]
    return text


class _Builder:
    """Accumulates plain text and spans while a decoder walks its input."""

    def __init__(self) -> None:
        self.text = ""
        self.spans: list[Span] = []
        self.problems: list[str] = []

    def add_text(self, raw: str) -> None:
        cleaned = _STRAY.sub("", raw)
        if cleaned != raw:
            stray = ", ".join(sorted(set(_STRAY.findall(raw))))
            self.problems.append(f"removed stray markup {stray}")
        self.text += cleaned

    def add_span(self, label: str, **fields) -> Span | None:
        cleaned = _STRAY.sub("", label)
        if cleaned != label:
            self.problems.append(f"removed markup inside the phrase {label!r}")
        stripped = cleaned.strip()
        if not stripped:
            self.problems.append("dropped a grounded phrase with no text")
            self.text += cleaned
            return None
        lead = len(cleaned) - len(cleaned.lstrip())
        start = len(self.text) + lead
        span = Span(start, start + len(stripped), stripped, **fields)
        self.text += cleaned
        self.spans.append(span)
        return span

    def result(self) -> GroundedText:
        return GroundedText(self.text, self.spans, self.problems)


class Codec(ABC):
    """A grounding markup."""

    name: str

    @abstractmethod
    def encode(self, grounded: GroundedText) -> str:
        """The markup string for ``grounded``."""

    @abstractmethod
    def decode(self, text: str) -> GroundedText:
        """Parse markup; never raises on malformed input."""


class DetectionCodec(Codec):
    """RadGrounder detection markup (spec §2.2).

    ``<p bbox=<locX1><locY1><locX2><locY2> id=<segCCC>>keyword</p>``: x first, ``bins``
    (512) bins over [0, 1], class as the unified id in a ``<segCCC>`` token. Bins above
    ``bins`` are accepted and clipped (``<loc0512>`` is a legal right/bottom edge). A span
    with several boxes is written as several loc quadruples in one tag (an extension the
    released checkpoints do not emit); a span without boxes is written as plain text.
    """

    name = "radgrounder-detect"
    _HEAD = re.compile(r"<p bbox=((?:<loc\d{1,4}>)*)(?:\s?id=<seg(\d{1,3})>)?>", re.IGNORECASE)
    _OPEN = re.compile(r"<p bbox=", re.IGNORECASE)
    _CLOSE = re.compile(r"</p>", re.IGNORECASE)

    def __init__(self, class_names: Mapping[int, str] | None = None, bins: int = 512) -> None:
        self.class_names = dict(class_names) if class_names is not None else None
        self.bins = bins

    def _bin(self, value: float) -> int:
        return min(max(_trunc(value * self.bins), 0), self.bins)

    def encode(self, grounded: GroundedText) -> str:
        out, pos = [], 0
        for span in grounded.spans:
            out.append(grounded.text[pos : span.start])
            pos = span.end
            if not span.boxes:
                out.append(span.label)
                continue
            locs = "".join(f"<loc{self._bin(v):04d}>" for box in span.boxes for v in box.as_tuple())
            ident = ""
            if span.class_id is not None:
                if not 0 <= span.class_id <= 127:
                    raise RadGrounderError(
                        f"span {span.label!r}: class id {span.class_id} does not fit a "
                        "<segNNN> token (0-127)"
                    )
                ident = f" id=<seg{span.class_id:03d}>"
            out.append(f"<p bbox={locs}{ident}>{span.label}</p>")
        out.append(grounded.text[pos:])
        return "".join(out)

    def _boxes(self, locs: str, label: str, problems: list[str]) -> list[Box]:
        values = [int(v) for v in _LOC.findall(locs)]
        if len(values) % 4 or not values:
            problems.append(f"{label!r}: {len(values)} location tokens, expected a multiple of 4")
        if any(v > self.bins for v in values):
            problems.append(f"{label!r}: location bins above {self.bins} clipped")
        boxes = []
        for i in range(0, len(values) - len(values) % 4, 4):
            x1, y1, x2, y2 = (v / self.bins for v in values[i : i + 4])
            if x2 < x1 or y2 < y1:
                problems.append(f"{label!r}: box corners out of order, swapped")
            boxes.append(Box.clipped(x1, y1, x2, y2))
        return boxes

    def _class(
        self, raw: str | None, label: str, problems: list[str]
    ) -> tuple[int | None, str | None]:
        if raw is None:
            return None, None
        class_id = int(raw)
        if self.class_names is None:
            return class_id, None
        name = self.class_names.get(class_id)
        if name is None:
            problems.append(f"{label!r}: class id {class_id} is not in the schema")
        return class_id, name

    def decode(self, text: str) -> GroundedText:
        b = _Builder()
        text = _strip_truncated_token(_CONTROL.sub("", text), b.problems)
        pos = 0
        while pos < len(text):
            opening = self._OPEN.search(text, pos)
            if opening is None:
                b.add_text(text[pos:])
                break
            b.add_text(text[pos : opening.start()])
            head = self._HEAD.match(text, opening.start())
            if head is None:
                # A truncated or garbled tag head: drop it, keep reading after it.
                b.problems.append(f"malformed <p bbox= tag at offset {opening.start()}")
                pos = opening.end()
                continue
            body_start = head.end()
            close = self._CLOSE.search(text, body_start)
            nxt = self._OPEN.search(text, body_start)
            closed = close is not None and (nxt is None or close.start() < nxt.start())
            body_end = close.start() if closed else (nxt.start() if nxt else len(text))
            label = text[body_start:body_end]
            if not closed:
                b.problems.append(f"unclosed <p> tag for {label.strip()!r}")
            boxes = self._boxes(head.group(1), label.strip(), b.problems)
            class_id, class_name = self._class(head.group(2), label.strip(), b.problems)
            b.add_span(label, class_id=class_id, class_name=class_name, boxes=boxes)
            pos = close.end() if closed else body_end
        return b.result()


class SegmentationCodec(Codec):
    """RadGrounder segmentation markup (spec §2.3-2.4): ``<seg>keyword</seg>``.

    Masks pair with ``</seg>`` tokens in text order: pass the model's masks, in generation
    order, to :meth:`decode`. Every ``</seg>`` consumes one mask, a stray one included, as it
    does in the model. Encoding writes the markup; ``GroundedText.masks()`` gives the masks in
    the order the markup needs them.
    """

    name = "radgrounder-segment"
    _TAG = re.compile(r"<seg>|</seg>", re.IGNORECASE)

    def encode(self, grounded: GroundedText) -> str:
        out, pos = [], 0
        for span in grounded.spans:
            out.append(grounded.text[pos : span.start])
            out.append(f"<seg>{span.label}</seg>")
            pos = span.end
        out.append(grounded.text[pos:])
        return "".join(out)

    def decode(self, text: str, masks: Sequence[np.ndarray] | None = None) -> GroundedText:
        b = _Builder()
        text = _strip_truncated_token(_CONTROL.sub("", text), b.problems)
        mask_iter = iter(list(masks) if masks is not None else [])
        n_masks = len(masks) if masks is not None else 0
        open_at: int | None = None
        pos = 0

        for tag in self._TAG.finditer(text):
            is_open = tag.group(0).lower() == "<seg>"
            if is_open:
                if open_at is not None:
                    b.problems.append("<seg> opened twice; the first one was dropped")
                    b.add_text(text[open_at : tag.start()])
                else:
                    b.add_text(text[pos : tag.start()])
                open_at = tag.end()
            else:
                mask = next(mask_iter, None)
                if open_at is None:
                    b.add_text(text[pos : tag.start()])
                    b.problems.append("stray </seg> without <seg>; its mask was dropped")
                else:
                    b.add_span(text[open_at : tag.start()], mask=mask)
                    open_at = None
            pos = tag.end()
        if open_at is not None:
            b.problems.append(f"unclosed <seg> for {text[open_at:].strip()!r}")
            b.add_span(text[open_at:])
        else:
            b.add_text(text[pos:])
        if masks is not None:
            n_close = sum(1 for t in self._TAG.findall(text) if t.lower() == "</seg>")
            if n_masks > n_close:
                b.problems.append(f"{n_masks - n_close} mask(s) without a </seg> were dropped")
            elif n_masks < n_close:
                b.problems.append(f"{n_close - n_masks} </seg> without a mask")
        return b.result()


class PaliGemmaCodec(Codec):
    """Stock PaliGemma ``detect``/``segment`` output: ``<locY1><locX1><locY2><locX2> label``.

    y first, 1024 bins (value / 1024), entries separated by `` ; ``. The 16 ``<segNNN>``
    codes of a ``segment`` answer are kept in ``span.meta["seg_codes"]``; turning them into a
    mask needs PaliGemma's VQ-VAE decoder, which is not part of this package. Only spans are
    encoded: text outside spans has no place in this markup and is dropped.
    """

    name = "paligemma"
    bins = 1024
    _ENTRY = re.compile(r"((?:<loc\d{1,4}>){4})((?:<seg\d{1,3}>)*)\s*([^;<]*)", re.IGNORECASE)

    def _bin(self, value: float) -> int:
        return min(max(_trunc(value * self.bins), 0), self.bins - 1)

    def encode(self, grounded: GroundedText) -> str:
        entries = []
        for span in grounded.spans:
            for box in span.boxes or []:
                locs = "".join(f"<loc{self._bin(v):04d}>" for v in (box.y1, box.x1, box.y2, box.x2))
                codes = "".join(f"<seg{c:03d}>" for c in span.meta.get("seg_codes", ()))
                entries.append(f"{locs}{codes} {span.label}")
        return " ; ".join(entries)

    def decode(self, text: str) -> GroundedText:
        text = _CONTROL.sub("", text).strip()
        b = _Builder()
        pos = 0
        for entry in self._ENTRY.finditer(text):
            gap = text[pos : entry.start()]
            if gap.strip(" ;\n"):
                b.problems.append(f"unparsed text {gap.strip()!r}")
            if b.spans:
                b.text += " ; "
            y1, x1, y2, x2 = (int(v) / self.bins for v in _LOC.findall(entry.group(1)))
            if max(y1, x1, y2, x2) >= 1.0:
                b.problems.append("location bins above 1023 clipped")
            if x2 < x1 or y2 < y1:
                b.problems.append("box corners out of order, swapped")
            meta = {}
            if entry.group(2):
                codes = [int(c) for c in re.findall(r"\d+", entry.group(2))]
                if len(codes) != 16:
                    b.problems.append(f"{len(codes)} mask codes, expected 16")
                meta["seg_codes"] = codes
            label = entry.group(3).strip()
            if not label:
                b.problems.append("detection without a label dropped")
            else:
                b.add_span(label, boxes=[Box.clipped(x1, y1, x2, y2)], meta=meta)
            pos = entry.end()
        rest = text[pos:]
        if rest.strip(" ;\n"):
            b.problems.append(f"unparsed text {rest.strip()!r}")
        return b.result()


class BracketCodec(Codec):
    """Phrases followed by normalised boxes: ``liver [0.12, 0.30, 0.55, 0.71]`` (x first).

    A phrase may carry several boxes (``kidneys [..] [..]`` or ``[..], [..]``). When
    decoding, a phrase runs back from its boxes to the previous sentence or clause mark
    (``. , ; : ! ?``, a newline, a closing bracket) or the start of the text, so write one
    grounded phrase per clause when round trips must be exact.
    """

    name = "brackets"
    _NUM = r"\s*(-?\d+(?:\.\d+)?(?:[eE]-?\d+)?)\s*"
    _BOX = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")
    _JOIN = re.compile(r"\s*,?\s*")
    _BOUNDARY = re.compile(r"[.,;:!?\n\]]")

    def __init__(self, decimals: int = 3) -> None:
        self.decimals = decimals

    def encode(self, grounded: GroundedText) -> str:
        out, pos = [], 0
        for span in grounded.spans:
            out.append(grounded.text[pos : span.end])
            pos = span.end
            boxes = ", ".join(
                "[" + ", ".join(f"{v:.{self.decimals}f}" for v in box.as_tuple()) + "]"
                for box in span.boxes
            )
            if boxes:
                out.append(" " + boxes)
        out.append(grounded.text[pos:])
        return "".join(out)

    def decode(self, text: str) -> GroundedText:
        text = _CONTROL.sub("", text)
        b = _Builder()
        pos = 0
        for group in self._find_groups(text):
            g_start, g_end, boxes = group
            segment = text[pos:g_start]
            cut = max((m.end() for m in self._BOUNDARY.finditer(segment)), default=0)
            b.text += segment[:cut]
            phrase = segment[cut:]
            if not phrase.strip():
                b.problems.append(f"boxes at offset {g_start} follow no phrase; dropped")
                b.text += phrase
            else:
                # Whitespace before the boxes belongs to the markup, not to the text.
                b.add_span(phrase.rstrip(), boxes=boxes)
            pos = g_end
        b.text += text[pos:]
        return b.result()

    def _find_groups(self, text: str) -> list[tuple[int, int, list[Box]]]:
        """Runs of boxes separated only by commas/whitespace, as (start, end, boxes)."""
        groups: list[tuple[int, int, list[Box]]] = []
        for m in self._BOX.finditer(text):
            box = Box.clipped(*(float(v) for v in m.groups()))
            if groups and self._JOIN.fullmatch(text[groups[-1][1] : m.start()]):
                groups[-1] = (groups[-1][0], m.end(), [*groups[-1][2], box])
            else:
                groups.append((m.start(), m.end(), [box]))
        return groups


_CODECS: dict[str, Callable[..., Codec]] = {
    DetectionCodec.name: DetectionCodec,
    SegmentationCodec.name: SegmentationCodec,
    PaliGemmaCodec.name: PaliGemmaCodec,
    BracketCodec.name: BracketCodec,
}
CODEC_NAMES = tuple(_CODECS)


def codec(name: str, **options) -> Codec:
    """A codec by name: ``radgrounder-detect``, ``radgrounder-segment``, ``paligemma``,
    ``brackets``. Options go to the codec (e.g. ``class_names`` for detection)."""
    try:
        factory = _CODECS[name]
    except KeyError:
        raise RadGrounderError(
            f"codec: unknown name {name!r} (expected one of {', '.join(CODEC_NAMES)})"
        ) from None
    return factory(**options)
