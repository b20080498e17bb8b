"""Question/answer items on RGB images: the reader SLAKE and VQA-RAD share (spec §4.4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from radgrounder.datasets.example import Example
from radgrounder.errors import RadGrounderError
from radgrounder.imaging import preprocess_rgb_image
from radgrounder.prompts import build_prompt


class VQASource:
    """Question/answer items on RGB images (SLAKE, VQA-RAD), English, spec §4.4 preprocessing."""

    name = "vqa"
    rgb_stats: str | None = None

    def __init__(self, items: list[dict[str, Any]], images: Path, *, preset: str, size: int):
        if not items:
            raise RadGrounderError(f"source {self.name}: no items", path=images)
        self.items, self.images, self.preset, self.size = items, images, preset, size

    def __len__(self) -> int:
        return len(self.items)

    def example(self, i: int, rng: np.random.Generator, prefix_style: str) -> Example:
        item = self.items[i]
        path = self.images / item["image"]
        image = preprocess_rgb_image(
            path,
            preset=self.preset,
            size=self.size,
            rgb_stats=self.rgb_stats if self.preset == "dataset_stats" else None,
        )
        prompt = build_prompt("vqa", "en", question=item["question"])
        return Example(
            f"{self.name}:{i}",
            self.name,
            "vqa",
            "en",
            image,
            prompt,
            str(item["answer"]),
            [],
            {"question_type": item["question_type"]},
        )
