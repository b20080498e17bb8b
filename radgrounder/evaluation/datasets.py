"""Evaluation datasets: SLAKE, VQA-RAD (Wu et al. split and the official split), our built
datasets and RefRad2D folders, as lists of items that load one example each.

``split="test"`` always means the test split. ``compat="reference"`` reproduces the
reference's choice of evaluating SLAKE on ``validate.json`` when it says test (spec §7.1).
The examples come from the same readers and preprocessing as training, so an evaluated
prompt is byte for byte what the model was trained on.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radgrounder.datasets import Example
from radgrounder.datasets.slake import SlakeSource
from radgrounder.datasets.vqa import VQASource
from radgrounder.datasets.vqa_rad import OFFICIAL_FILE, VqaRadOfficialSource, VqaRadSource
from radgrounder.errors import RadGrounderError
from radgrounder.training.config import SourceConfig

log = logging.getLogger(__name__)

DATASETS = ("slake", "vqa-rad", "vqa-rad-official", "built", "refrad2d")
COMPAT_MODES = ("none", "reference")
BUILT_TASKS = ("grounded-report", "report", "vqa", "grounded-vqa")


@dataclass(frozen=True)
class EvalItem:
    """One sample to evaluate: ``index`` into the dataset's reader, a stable ``id`` and a
    reference to its image (a path relative to the data root or ``scan#slice``)."""

    index: int
    id: str
    image_ref: str


class EvalDataset:
    """Items of one dataset split, each loadable as a training-style :class:`Example`."""

    def __init__(
        self,
        name: str,
        split: str,
        root: Path,
        source: Any,
        items: list[EvalItem],
        files: list[Path],
        *,
        prefix_style: str,
        seed: int,
        file_split: str,
    ) -> None:
        self.name, self.split, self.root, self.source = name, split, root, source
        self.items, self._files = items, files
        self.prefix_style, self.seed, self.file_split = prefix_style, seed, file_split

    def __len__(self) -> int:
        return len(self.items)

    def example(self, item: EvalItem) -> Example:
        """The example of ``item``; any random choice (e.g. RefRad2D's report-or-question) is
        drawn from a generator seeded by (seed, index), so runs are repeatable."""
        rng = np.random.default_rng([self.seed, item.index])
        return self.source.example(item.index, rng, self.prefix_style)

    def fingerprint(self) -> str:
        """SHA-256 over the annotation files and the bytes of every image the items use."""
        h = hashlib.sha256()
        for f in sorted(set(self._files)):
            h.update(f.name.encode())
            if f.is_file():
                h.update(hashlib.sha256(f.read_bytes()).digest())
            else:
                h.update(b"<missing>")
        return h.hexdigest()


def _vqa_items(source: VQASource, prefix: str) -> tuple[list[EvalItem], list[Path]]:
    items, files = [], []
    for i, it in enumerate(source.items):
        qid = it.get("qid", i)
        items.append(EvalItem(i, f"{prefix}:{qid}", str(it["image"])))
        files.append(source.images / str(it["image"]))
    return items, files


def open_dataset(
    name: str,
    root: str | Path,
    *,
    split: str = "test",
    variant: str = "detection",
    preset: str = "reference",
    size: int = 224,
    images: str | Path | None = None,
    tasks: list[str] | None = None,
    languages: list[str] | None = None,
    compat: str = "none",
    prefix_style: str = "both",
    seed: int = 0,
) -> EvalDataset:
    """Open ``name`` (one of :data:`DATASETS`) under ``root`` for evaluation.

    - ``slake``: ``root/{train,validate,test}.json`` and ``root/imgs/``; English questions.
    - ``vqa-rad``: the Wu et al. split shipped with the package; images in ``root/images``
      (or ``images``). ``val`` is the split's validation file.
    - ``vqa-rad-official``: ``root/VQA_RAD Dataset Public.json``; images as above.
    - ``built``: a folder written by ``radgrounder labels build``; ``tasks`` (default all
      present) and ``languages`` (default en and de) filter the samples.
    - ``refrad2d``: a RefRad2D-layout folder (``snippet2rsopids_<split>_*`` split files).
    """
    if name not in DATASETS:
        raise RadGrounderError(f"dataset: unknown {name!r} (expected one of {', '.join(DATASETS)})")
    if compat not in COMPAT_MODES:
        raise RadGrounderError(f"compat: unknown {compat!r} (expected none or reference)")
    root = Path(root)
    if not root.exists():
        raise RadGrounderError("data root does not exist", path=root)
    file_split = split
    langs = list(languages or ["en", "de"])
    if name == "slake":
        if compat == "reference" and split == "test":
            log.warning("compat=reference: SLAKE 'test' reads validate.json, as the reference")
            file_split = "validate"
        src = SlakeSource(
            SourceConfig(kind="slake", path=str(root), split=file_split), preset=preset, size=size
        )
        items, files = _vqa_items(src, "slake")
        files.append(root / f"{'validate' if file_split == 'val' else file_split}.json")
    elif name == "vqa-rad":
        img = Path(images) if images else root / "images"
        src = VqaRadSource(
            SourceConfig(kind="vqa_rad", path=str(root), split=split, images=str(img)),
            preset=preset,
            size=size,
        )
        items, files = _vqa_items(src, "vqa-rad")
    elif name == "vqa-rad-official":
        img = Path(images) if images else root / "images"
        src = VqaRadOfficialSource(root, split, img, preset=preset, size=size)
        items, files = _vqa_items(src, "vqa-rad-official")
        files.append(root / OFFICIAL_FILE)
    elif name == "built":
        src, items, files = _built(root, split, variant, preset, size, tasks, langs)
    else:
        from radgrounder.datasets.refrad2d import RefRad2DSource

        src = RefRad2DSource(
            SourceConfig(kind="refrad2d", path=str(root), split=split, languages=langs),
            variant,
            preset=preset,
            size=size,
        )
        items = [
            EvalItem(i, f"{rsopid}/{lang}", rsopid) for i, (rsopid, lang, _) in enumerate(src.items)
        ]
        files = sorted(root.glob(f"filtered_*_splits/snippet2rsopids_{split}_*.json"))
        files.append(root / "refrad2d_reports.parquet")
    return EvalDataset(
        name,
        split,
        root,
        src,
        items,
        files,
        prefix_style=prefix_style,
        seed=seed,
        file_split=file_split,
    )


def _built(root, split, variant, preset, size, tasks, langs):
    from radgrounder.datasets.built import BuiltSource
    from radgrounder.labels.dataset import GroundedDataset

    if tasks is None:
        present = {row.get("task") for _, row in GroundedDataset(Path(root)).sample_rows(split)}
        tasks = [t for t in BUILT_TASKS if t in present] or ["grounded-report"]
    bad = set(tasks) - set(BUILT_TASKS)
    if bad:
        raise RadGrounderError(
            f"task: unknown {sorted(bad)} (expected some of {', '.join(BUILT_TASKS)})"
        )
    cfg = SourceConfig(
        kind="built", path=str(root), name="built", split=split, tasks=tasks, languages=langs
    )
    src = BuiltSource(cfg, variant, preset=preset, size=size)
    items = [
        EvalItem(i, f"{row['sample_id']}#{task}", f"{row['scan_id']}#{row['slice_index']}")
        for i, (task, row) in enumerate(src.rows)
    ]
    files = [root / "manifest.json"]
    for kind in ("samples", "slices"):
        files += sorted((root / kind / split).glob("*.parquet"))
    return src, items, files
