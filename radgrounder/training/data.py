"""Training examples from our built datasets, SLAKE and VQA-RAD, and a seeded task mixture.

An example is a preprocessed image, the exact prompt string, the target in the model
variant's markup and, for the segmentation variant, one mask per ``</seg>`` in text order.
Every random choice is drawn from a generator seeded by (seed, step, position), so any step
can be reproduced without replaying the ones before it: that is what makes resume exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from radgrounder.errors import RadGrounderError
from radgrounder.imaging import preprocess_rgb_image, preprocess_slice, resize_nearest
from radgrounder.labels.dataset import GroundedDataset, decode_image, decode_labels
from radgrounder.labels.regions import group_mask
from radgrounder.prompts import build_prompt
from radgrounder.resources import load_json
from radgrounder.training.config import SourceConfig

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


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize to the square model grid, as the reference does."""
    return resize_nearest(mask, size, size)


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
        for row in ds.samples(cfg.split):
            if row["language"] not in cfg.languages:
                continue
            for task in wanted:
                if base.get(task, task) == row["task"]:
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
        import pyarrow.parquet as pq

        table = pq.read_table(self.root / "slices" / split / f"{scan_id}.parquet")
        for row in table.to_pylist():
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
                    masks.append(_resize_mask(m, self.size))
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


class _VQASource:
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


class SlakeSource(_VQASource):
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


class VqaRadSource(_VQASource):
    """VQA-RAD with the Wu et al. split shipped in the package; images from ``images``."""

    rgb_stats = "vqa_rad"

    def __init__(self, cfg: SourceConfig, *, preset: str, size: int) -> None:
        self.name = cfg.name or "vqa_rad"
        files = {
            "train": "train_fixed_split.json",
            "val": "validation_fixed_split.json",
            "test": "test_fixed_split.json",
        }
        if cfg.split not in files:
            raise RadGrounderError(f"source {self.name}: unknown split {cfg.split!r}")
        raw = load_json(f"vqa_rad/{files[cfg.split]}")
        images = Path(cfg.images or Path(cfg.path) / "images")
        if not images.is_dir():
            raise RadGrounderError("VQA-RAD image folder not found", path=images)
        items = [
            {
                "image": r["image_name"],
                "question": r["question"],
                "answer": r["answer"],
                "question_type": str(r["q_type"]).strip().lower(),
            }
            for r in raw
        ]
        super().__init__(items, images, preset=preset, size=size)


def make_source(cfg: SourceConfig, variant: str, *, preset: str, size: int, augment: bool = False):
    if cfg.kind == "built":
        return BuiltSource(cfg, variant, preset=preset, size=size, augment=augment)
    if cfg.kind == "refrad2d":
        from radgrounder.training.refrad2d import RefRad2DSource

        return RefRad2DSource(cfg, variant, preset=preset, size=size)
    if cfg.kind == "slake":
        return SlakeSource(cfg, preset=preset, size=size)
    return VqaRadSource(cfg, preset=preset, size=size)


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
