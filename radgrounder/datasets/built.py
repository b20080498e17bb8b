"""Datasets written by ``radgrounder labels build`` (grounded reports, reports, VQA, G-VQA)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radgrounder.datasets.example import TASK_PROMPT, Example, resize_mask
from radgrounder.errors import RadGrounderError
from radgrounder.imaging import preprocess_slice
from radgrounder.labels.dataset import (
    GroundedDataset,
    decode_image,
    decode_labels,
    read_rows,
)
from radgrounder.labels.regions import group_mask
from radgrounder.prompts import build_prompt

if TYPE_CHECKING:
    from radgrounder.training.config import SourceConfig


def _column(row: dict[str, Any], name: str, shard: Path) -> Any:
    try:
        return row[name]
    except KeyError:
        raise RadGrounderError(f"no column {name!r} in the samples table", path=shard) from None


class BuiltSource:
    """Samples of a dataset folder written by ``radgrounder labels build``."""

    def __init__(
        self, cfg: SourceConfig, variant: str, *, preset: str, size: int, augment: bool = False
    ) -> None:
        self.name = cfg.name or f"built:{Path(cfg.path).name}"
        self.variant, self.preset, self.size, self.augment = variant, preset, size, augment
        ds = GroundedDataset(Path(cfg.path))
        self.root = ds.root
        wanted = set(cfg.tasks)
        unknown = wanted - {"grounded-report", "report", "vqa", "grounded-vqa"}
        if unknown:
            raise RadGrounderError(f"source {self.name}: unknown tasks {sorted(unknown)}")
        # A plain report is the grounded report's text without markup.
        base = {"report": "grounded-report"}
        rows = []
        for shard, row in ds.sample_rows(cfg.split):
            if _column(row, "language", shard) not in cfg.languages:
                continue
            for task in wanted:
                if base.get(task, task) == _column(row, "task", shard):
                    rows.append((task, row))
        if not rows:
            raise RadGrounderError(
                f"source {self.name}: no samples for split {cfg.split!r}, tasks {sorted(wanted)}",
                path=cfg.path,
            )
        rows.sort(key=lambda tr: (tr[1]["sample_id"], tr[0]))
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    @lru_cache(maxsize=64)  # noqa: B019 - one source object per run; bounded cache
    def _slice(self, split: str, scan_id: str, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        for row in read_rows(self.root / "slices" / split / f"{scan_id}.parquet"):
            if row["slice_index"] == index:
                return decode_image(row), decode_labels(row), row["modality"]
        raise RadGrounderError(f"slice {index} of {scan_id} missing", path=self.root)

    def example(self, i: int, rng: np.random.Generator, prefix_style: str) -> Example:
        task, row = self.rows[i]
        pixels, labels, modality = self._slice(row["split"], row["scan_id"], row["slice_index"])
        grounded_task = task in ("grounded-report", "grounded-vqa")
        target, mask_ids = None, []
        if self.augment:
            from radgrounder.grounding import codec
            from radgrounder.training.augment import augment_slice

            pixels, labels, gt = augment_slice(
                pixels, labels, json.loads(row["spans"]), row["text"], rng
            )
            if grounded_task:
                markup = (
                    "radgrounder-detect" if self.variant == "detection" else "radgrounder-segment"
                )
                target = codec(markup).encode(gt)
                mask_ids = [s.meta["class_ids"] for s in gt.spans]
        image = preprocess_slice(
            np.asarray(pixels, np.float32), modality, preset=self.preset, size=self.size
        )
        lang = row["language"]
        masks: list[np.ndarray] = []
        if task in ("grounded-report", "report"):
            prompt = build_prompt(
                TASK_PROMPT[(task, self.variant)],
                lang,
                clinical_info=row["clinical_info"],
                clinical_question=row["clinical_question"],
                prefix_style=prefix_style,
                rng=rng,
            )
        elif task == "vqa":
            prompt = build_prompt("vqa", lang, question=row["question"])
        else:
            prompt = build_prompt("grounded-vqa", lang, question=row["question"])
        if grounded_task:
            if target is None:
                target = (
                    row["target_detect"] if self.variant == "detection" else row["target_segment"]
                )
                mask_ids = json.loads(row["mask_class_ids"])
            if self.variant == "segmentation":
                for ids in mask_ids:
                    m = np.zeros(labels.shape, bool)
                    for cid in ids:
                        m |= group_mask(labels, cid)
                    masks.append(resize_mask(m, self.size))
        else:
            target = row["text"]
        return Example(
            f"{row['sample_id']}#{task}",
            self.name,
            task,
            lang,
            image,
            prompt,
            target,
            masks,
            {"question_type": row["question_type"]},
        )
