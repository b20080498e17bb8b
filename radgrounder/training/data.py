"""Training data: the dataset readers live in :mod:`radgrounder.datasets` (shared with
evaluation); this module keeps the seeded task mixture and the names training code imports."""

from __future__ import annotations

import numpy as np

from radgrounder.datasets import TASK_PROMPT, Example, make_source, resize_mask
from radgrounder.datasets.built import BuiltSource
from radgrounder.datasets.slake import SlakeSource
from radgrounder.datasets.vqa import VQASource
from radgrounder.datasets.vqa_rad import VqaRadSource

__all__ = [
    "TASK_PROMPT",
    "BuiltSource",
    "Example",
    "Mixture",
    "SlakeSource",
    "VQASource",
    "VqaRadSource",
    "make_source",
    "resize_mask",
]


class Mixture:
    """Sources drawn with probability ∝ weight · size^(1/temperature).

    temperature 1 samples in proportion to size (a plain concatenation); larger values move
    towards equal shares per source. Draws are a pure function of (seed, step, slot).
    """

    def __init__(self, sources: list, weights: list[float], temperature: float, seed: int):
        sizes = np.array([len(s) for s in sources], dtype=float)
        p = np.asarray(weights, float) * sizes ** (1.0 / temperature)
        self.sources, self.probs, self.seed = sources, p / p.sum(), seed

    def draw(self, step: int, slot: int) -> tuple[int, int, np.random.Generator]:
        rng = np.random.default_rng([self.seed, step, slot])
        s = int(rng.choice(len(self.sources), p=self.probs))
        return s, int(rng.integers(len(self.sources[s]))), rng

    def example(self, step: int, slot: int, prefix_style: str) -> Example:
        s, i, rng = self.draw(step, slot)
        return self.sources[s].example(i, rng, prefix_style)
