"""A location prior to put grounding scores in context: every class at its mean box.

``MeanBoxBaseline`` answers each sample with the reference text itself, every grounded
phrase boxed at the mean box of its class over the training split (phrases of classes the
training split never grounded keep no box). Its text metrics are therefore trivially perfect
and meaningless; its grounding metrics say how far "where this organ usually is" gets when
the right words are given. A model whose box IoU does not beat it has not learned to look.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from radgrounder.errors import RadGrounderError
from radgrounder.grounding import Box, GroundedText, codec
from radgrounder.modeling.generation import Generated


class MeanBoxBaseline:
    """Use in place of a model: ``evaluate(MeanBoxBaseline(root), dataset, out)``."""

    variant = "detection"
    tokenizer = None

    def __init__(self, dataset_root: str | Path, split: str = "train") -> None:
        from radgrounder.labels.dataset import GroundedDataset

        self.path = Path(dataset_root)
        boxes: dict[int, list[tuple[float, ...]]] = defaultdict(list)
        for row in GroundedDataset(self.path).samples(split, task="grounded-report"):
            for span in json.loads(row["spans"]):
                for b in span["boxes"]:
                    boxes[int(span["class_id"])].append(tuple(b))
        if not boxes:
            raise RadGrounderError(
                f"no grounded boxes in the {split!r} split to average", path=self.path
            )
        self.mean_boxes = {c: Box(*np.mean(v, axis=0)) for c, v in boxes.items()}
        self.config = SimpleNamespace(radgrounder={"mask_threshold": "probability"})
        self._codec = codec("radgrounder-detect")

    def answer(self, target: str) -> str:
        """``target`` (detection markup) with every box replaced by its class's mean box."""
        g = self._codec.decode(target)
        spans = [
            replace(s, boxes=[self.mean_boxes[s.class_id]])
            for s in g.spans
            if s.class_id in self.mean_boxes
        ]
        text = g.text
        return self._codec.encode(GroundedText(text, spans))

    def generate_examples(self, examples: Sequence[Any], **_: Any) -> list[Generated]:
        return [Generated(self.answer(ex.target), []) for ex in examples]
