"""The model input every dataset produces, and what the datasets share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from radgrounder.imaging import resize_nearest

TASK_PROMPT = {
    ("grounded-report", "detection"): "grounded-report-detect",
    ("grounded-report", "segmentation"): "grounded-report-segment",
    ("report", "detection"): "report",
    ("report", "segmentation"): "report",
}


@dataclass
class Example:
    id: str
    source: str
    task: str
    language: str
    image: np.ndarray  # (3, size, size) float32
    prompt: str
    target: str
    masks: list[np.ndarray] = field(default_factory=list)  # bool (size, size), text order
    meta: dict[str, Any] = field(default_factory=dict)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize to the square model grid, as the reference does."""
    return resize_nearest(mask, size, size)
