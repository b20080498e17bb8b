"""SLAKE 1.0 (English questions), for training and evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from radgrounder.datasets.vqa import VQASource
from radgrounder.errors import RadGrounderError

if TYPE_CHECKING:
    from radgrounder.training.config import SourceConfig


class SlakeSource(VQASource):
    """SLAKE 1.0: ``<root>/{train,validate,test}.json`` and ``<root>/imgs/``; English only."""

    rgb_stats = "slake"

    def __init__(self, cfg: SourceConfig, *, preset: str, size: int) -> None:
        self.name = cfg.name or "slake"
        root = Path(cfg.path)
        split_file = {
            "train": "train",
            "val": "validate",
            "validate": "validate",
            "test": "test",
        }.get(cfg.split)
        if split_file is None:
            raise RadGrounderError(f"source {self.name}: unknown split {cfg.split!r}")
        path = root / f"{split_file}.json"
        if not path.is_file():
            raise RadGrounderError("SLAKE split file not found", path=path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise RadGrounderError(f"not valid JSON ({exc})", path=path) from None
        if not isinstance(raw, list):
            raise RadGrounderError(
                f"expected a list of questions, got a {type(raw).__name__}", path=path
            )
        items = []
        for n, r in enumerate(raw):
            try:
                if r.get("q_lang", "en") != "en":
                    continue
                items.append(
                    {
                        "image": str(r["img_name"]),
                        "question": str(r["question"]),
                        "answer": r["answer"],
                        "question_type": str(r.get("answer_type", "")).strip().lower(),
                        "qid": r.get("qid", n),
                    }
                )
            except (KeyError, TypeError, AttributeError) as exc:
                raise RadGrounderError(
                    f"entry {n}: missing or malformed field {exc}", path=path
                ) from None
        super().__init__(items, root / "imgs", preset=preset, size=size)
