"""VQA-RAD: the Wu et al. split shipped in the package and the dataset's own public split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from radgrounder.datasets.vqa import VQASource
from radgrounder.errors import RadGrounderError
from radgrounder.resources import load_json

if TYPE_CHECKING:
    from radgrounder.training.config import SourceConfig

OFFICIAL_FILE = "VQA_RAD Dataset Public.json"


class VqaRadSource(VQASource):
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


class VqaRadOfficialSource(VQASource):
    """VQA-RAD's own public split (``VQA_RAD Dataset Public.json``): questions whose
    ``phrase_type`` starts with ``test`` form the test split (451), the rest train."""

    rgb_stats = "vqa_rad"

    def __init__(self, root: Path, split: str, images: Path, *, preset: str, size: int) -> None:
        self.name = "vqa-rad-official"
        path = root / OFFICIAL_FILE
        if not path.is_file():
            raise RadGrounderError(f"VQA-RAD official file {OFFICIAL_FILE!r} not found", path=path)
        if split not in ("train", "test"):
            raise RadGrounderError(
                f"split: the official VQA-RAD split has train and test, not {split!r}"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise RadGrounderError(f"not valid JSON ({exc})", path=path) from None
        items = []
        for n, r in enumerate(raw):
            try:
                is_test = str(r["phrase_type"]).strip().lower().startswith("test")
                if is_test != (split == "test"):
                    continue
                items.append(
                    {
                        "image": r["image_name"],
                        "question": r["question"],
                        "answer": str(r["answer"]),
                        "question_type": str(r["answer_type"]).strip().lower(),
                        "qid": r.get("qid", n),
                    }
                )
            except (KeyError, TypeError) as exc:
                raise RadGrounderError(f"entry {n}: missing field {exc}", path=path) from None
        if not images.is_dir():
            raise RadGrounderError("VQA-RAD image folder not found", path=images)
        super().__init__(items, images, preset=preset, size=size)
