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
        raw = json.loads(path.read_text(encoding="utf-8"))
        items = [
            {
                "image": r["img_name"],
                "question": r["question"],
                "answer": r["answer"],
                "question_type": str(r.get("answer_type", "")).strip().lower(),
                "qid": r.get("qid", n),
            }
            for n, r in enumerate(raw)
            if r.get("q_lang", "en") == "en"
        ]
        super().__init__(items, root / "imgs", preset=preset, size=size)
