"""The on-disk grounded dataset: per-scan Parquet shards of slices and samples.

Layout of a dataset folder::

    manifest.json                     counts, sources, config, tool version
    build_report.json                 scans that failed, with reasons
    slices/<split>/<scan_id>.parquet  one row per slice: image, label slice, regions
    samples/<split>/<scan_id>.parquet one row per training sample (task x language)
    state/scans/<scan_id>.json        per-scan completion marker (resume)

Images keep their original units (HU for CT) as raw little-endian bytes with dtype and
shape columns; label slices are unified class ids (uint8). ``image_position`` and
``image_orientation`` give each slice's geometry the DICOM way (LPS mm of the first pixel;
row and column direction cosines), so results map back to patient coordinates. Masks are
not stored per sample: ``mask_class_ids`` names the classes whose union is the mask of each
``</seg>``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from radgrounder.errors import RadGrounderError
from radgrounder.fileio import atomic_write_bytes
from radgrounder.grounding import Box, GroundedText, Span
from radgrounder.labels.regions import part_ids

SPLITS = ("train", "val", "test")

SLICE_SCHEMA = pa.schema(
    [
        ("scan_id", pa.string()),
        ("split", pa.string()),
        ("modality", pa.string()),
        ("slice_axis", pa.string()),
        ("slice_index", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("pixel_spacing", pa.list_(pa.float64())),
        ("image_position", pa.list_(pa.float64())),
        ("image_orientation", pa.list_(pa.float64())),
        ("image_dtype", pa.string()),
        ("image", pa.binary()),
        ("labels", pa.binary()),
        ("regions", pa.string()),
    ]
)

SAMPLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("scan_id", pa.string()),
        ("split", pa.string()),
        ("modality", pa.string()),
        ("slice_axis", pa.string()),
        ("slice_index", pa.int32()),
        ("language", pa.string()),
        ("task", pa.string()),
        ("question_type", pa.string()),
        ("template_type", pa.string()),
        ("question", pa.string()),
        ("clinical_info", pa.string()),
        ("clinical_question", pa.string()),
        ("text", pa.string()),
        ("spans", pa.string()),
        ("target_detect", pa.string()),
        ("target_segment", pa.string()),
        ("mask_class_ids", pa.string()),
    ]
)


def spans_to_json(grounded: GroundedText) -> str:
    return json.dumps(
        [
            {
                "start": s.start,
                "end": s.end,
                "label": s.label,
                "class_id": s.class_id,
                "class_name": s.class_name,
                "class_ids": s.meta.get("class_ids", [s.class_id]),
                "boxes": [list(b.as_tuple()) for b in s.boxes],
                "pixel_boxes": s.meta.get("pixel_boxes", []),
                "negated": bool(s.meta.get("negated", False)),
            }
            for s in grounded.spans
        ],
        ensure_ascii=False,
        separators=(",", ":"),
    )


def span_from_record(
    s: dict[str, Any],
    *,
    boxes: list[Box] | None = None,
    pixel_boxes: list[list[int]] | None = None,
    mask: np.ndarray | None = None,
) -> Span:
    """A Span from a stored span record; ``boxes``/``pixel_boxes`` replace the stored ones."""
    return Span(
        s["start"],
        s["end"],
        s["label"],
        s["class_id"],
        s["class_name"],
        boxes if boxes is not None else [Box(*b) for b in s["boxes"]],
        mask,
        {
            "class_ids": s["class_ids"],
            "pixel_boxes": pixel_boxes if pixel_boxes is not None else s["pixel_boxes"],
            "negated": bool(s.get("negated", False)),
        },
    )


def grounded_from_row(row: dict[str, Any], label_slice: np.ndarray | None = None) -> GroundedText:
    """The sample's target as GroundedText; with the slice's labels, masks are attached."""
    spans = []
    for s in json.loads(row["spans"]):
        mask = None
        if label_slice is not None:
            mask = np.isin(label_slice, [p for cid in s["class_ids"] for p in part_ids(cid)])
        spans.append(span_from_record(s, mask=mask))
    return GroundedText(row["text"], spans)


def write_table(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    """A deterministic Parquet file (same rows → same bytes), written atomically."""
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=4096, write_statistics=True)
    atomic_write_bytes(path, buf.getvalue())


def decode_image(row: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(
        row["image"], dtype=np.dtype(row["image_dtype"]).newbyteorder("<")
    ).reshape(row["height"], row["width"])


def decode_labels(row: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(row["labels"], dtype=np.uint8).reshape(row["height"], row["width"])


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of one Parquet shard; a file that is not readable Parquet is named."""
    import pyarrow as pa

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise RadGrounderError(f"not a readable Parquet file ({exc})", path=path) from None


@dataclass
class GroundedDataset:
    """Read access to a built dataset folder."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not (self.root / "manifest.json").is_file():
            raise RadGrounderError("not a built dataset (no manifest.json)", path=self.root)
        path = self.root / "manifest.json"
        try:
            self.manifest = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise RadGrounderError(f"not valid JSON ({exc})", path=path) from None

    def _files(self, kind: str, split: str | None) -> list[Path]:
        if split is not None and split not in SPLITS:
            raise RadGrounderError(f"split: unknown value {split!r} (expected {', '.join(SPLITS)})")
        splits = [split] if split else list(SPLITS)
        return [f for s in splits for f in sorted((self.root / kind / s).glob("*.parquet"))]

    def sample_rows(self, split: str | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
        """``(shard, row)`` for every sample row (the shard names a file in errors)."""
        for f in self._files("samples", split):
            for row in read_rows(f):
                yield f, row

    def samples(self, split: str | None = None, **filters: str) -> Iterator[dict[str, Any]]:
        """Sample rows, optionally filtered by column values (e.g. ``task="grounded-report"``)."""
        for _, row in self.sample_rows(split):
            if all(row.get(k) == v for k, v in filters.items()):
                yield row

    def slices(self, split: str | None = None) -> Iterator[dict[str, Any]]:
        for f in self._files("slices", split):
            yield from read_rows(f)

    def slice_row(self, split: str, scan_id: str, slice_index: int) -> dict[str, Any]:
        for row in read_rows(self.root / "slices" / split / f"{scan_id}.parquet"):
            if row["slice_index"] == slice_index:
                return row
        raise RadGrounderError(f"slice {slice_index} of scan {scan_id!r} not in the dataset")
