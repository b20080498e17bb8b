"""GroundedText: plain text plus spans that point at image regions."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from radgrounder.errors import RadGrounderError

# Floating point slack for the reference's int() truncations: p*224/W can land a hair below an
# integer after division, which int() would push down a whole bin.
_EPS = 1e-9


def _trunc(value: float) -> int:
    return math.floor(value + _EPS)


def grid_step(p: float, size: int, grid: int = 224) -> int:
    """Pixel coordinate ``p`` of a ``size``-pixel axis on the ``grid``-pixel model input,
    truncated toward zero in float32 as the reference computes it."""
    return int(np.float32(p) * np.float32(grid / size))


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in normalised image coordinates, x first, each value in [0, 1]."""

    x1: float
    y1: float
    x2: float
    y2: float

    def __post_init__(self) -> None:
        values = (self.x1, self.y1, self.x2, self.y2)
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            raise RadGrounderError(f"box: coordinates must be finite numbers, got {values}")
        if not all(0.0 <= v <= 1.0 for v in values):
            raise RadGrounderError(f"box: coordinates must lie in [0, 1], got {values}")
        if self.x2 < self.x1 or self.y2 < self.y1:
            raise RadGrounderError(f"box: needs x1 <= x2 and y1 <= y2, got {values}")

    @classmethod
    def from_pixels(
        cls,
        x1: float,
        y1: float,
        x2: float,
        y2: float,
        width: int,
        height: int,
        *,
        grid: int | None = 224,
    ) -> Box:
        """A box from pixel coordinates (exclusive max) on a ``width`` x ``height`` image.

        With ``grid`` set (default 224, as the reference does, spec §2.2) each coordinate is
        first truncated onto the model-input grid in float32 arithmetic, exactly as the
        reference's ``bboxes *= np.float32(224 / W); bboxes.astype(int)``:
        ``int(float32(p) * float32(grid / W)) / grid`` (so a 97-pixel-wide slice maps x = 97
        to grid step 223, not 224). With ``grid=None`` it is just ``p / W``. Values are
        clipped to [0, 1].
        """
        if width <= 0 or height <= 0:
            raise RadGrounderError(f"box: image size must be positive, got {width}x{height}")

        def norm(p: float, size: int) -> float:
            v = grid_step(p, size, grid) / grid if grid else p / size
            return min(max(v, 0.0), 1.0)

        a, b, c, d = norm(x1, width), norm(y1, height), norm(x2, width), norm(y2, height)
        return cls(min(a, c), min(b, d), max(a, c), max(b, d))

    @classmethod
    def clipped(cls, x1: float, y1: float, x2: float, y2: float) -> Box:
        """A box from any finite values: clipped to [0, 1] and put in order."""
        vals = [min(max(float(v), 0.0), 1.0) for v in (x1, y1, x2, y2)]
        return cls(
            min(vals[0], vals[2]),
            min(vals[1], vals[3]),
            max(vals[0], vals[2]),
            max(vals[1], vals[3]),
        )

    def to_pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        return (self.x1 * width, self.y1 * height, self.x2 * width, self.y2 * height)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    @property
    def area(self) -> float:
        return (self.x2 - self.x1) * (self.y2 - self.y1)


@dataclass
class Span:
    """A grounded phrase: ``text[start:end]`` of its GroundedText, with class and regions."""

    start: int
    end: int
    label: str
    class_id: int | None = None
    class_name: str | None = None
    boxes: list[Box] = field(default_factory=list)
    mask: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Span):
            return NotImplemented
        same_mask = (self.mask is None and other.mask is None) or (
            self.mask is not None
            and other.mask is not None
            and self.mask.shape == other.mask.shape
            and bool(np.array_equal(self.mask, other.mask))
        )
        return (
            (self.start, self.end, self.label, self.class_id, self.class_name)
            == (other.start, other.end, other.label, other.class_id, other.class_name)
            and self.boxes == other.boxes
            and same_mask
            and self.meta == other.meta
        )


@dataclass
class GroundedText:
    """Plain text plus grounded spans, in text order; ``problems`` lists what decoding skipped."""

    text: str
    spans: list[Span] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.spans = sorted(self.spans, key=lambda s: (s.start, s.end))
        previous_end = 0
        for span in self.spans:
            if not 0 <= span.start <= span.end <= len(self.text):
                raise RadGrounderError(
                    f"span {span.label!r}: offsets {span.start}:{span.end} are outside the text "
                    f"(length {len(self.text)})"
                )
            if self.text[span.start : span.end] != span.label:
                raise RadGrounderError(
                    f"span {span.label!r}: text at {span.start}:{span.end} is "
                    f"{self.text[span.start : span.end]!r}"
                )
            if span.start < previous_end:
                raise RadGrounderError(f"span {span.label!r}: overlaps the previous span")
            previous_end = span.end

    @classmethod
    def from_phrases(cls, parts: Iterable[str | tuple[str, dict[str, Any]]]) -> GroundedText:
        """Build from pieces: plain strings, or ``(label, span fields)`` for grounded phrases.

        ``GroundedText.from_phrases(["The ", ("liver", {"class_id": 5, "boxes": [b]}), "."])``
        """
        text, spans = "", []
        for part in parts:
            if isinstance(part, str):
                text += part
                continue
            label, fields = part
            spans.append(Span(len(text), len(text) + len(label), label, **fields))
            text += label
        return cls(text, spans)

    def masks(self) -> list[np.ndarray | None]:
        """The span masks in text order (the order ``</seg>`` tokens appear)."""
        return [s.mask for s in self.spans]

    def with_problems(self, problems: Sequence[str]) -> GroundedText:
        return replace(self, problems=list(self.problems) + list(problems))
