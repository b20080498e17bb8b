"""A report's mention of an anatomical structure: what keyword extraction produces."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from radgrounder.errors import RadGrounderError


@dataclass(frozen=True)
class Mention:
    """``sentence[start:end] == text`` names the unified class ``class_name`` (id ``class_id``).

    One phrase may name several classes ("both kidneys"): that is one Mention per class with the
    same offsets. ``negated`` marks a mention inside a negation scope ("no liver lesion"); it is
    recorded, not used to drop grounding.
    """

    start: int
    end: int
    text: str
    class_name: str
    class_id: int
    negated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Mention:
        try:
            return cls(
                int(data["start"]),
                int(data["end"]),
                str(data["text"]),
                str(data["class_name"]),
                int(data["class_id"]),
                bool(data.get("negated", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RadGrounderError(f"mention: malformed record {data!r} ({exc})") from exc

    def check(self, sentence: str) -> None:
        """Raise if the offsets do not point at ``text`` in ``sentence``."""
        if sentence[self.start : self.end] != self.text:
            raise RadGrounderError(
                f"mention {self.text!r}: offsets {self.start}:{self.end} point at "
                f"{sentence[self.start : self.end]!r}"
            )
