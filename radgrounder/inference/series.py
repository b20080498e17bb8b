"""3-D grounding from 2-D predictions: each structure over consecutive slices becomes a box
in patient coordinates."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from radgrounder.errors import RadGrounderError


@dataclass
class Structure3D:
    """A structure grounded on a run of slices.

    ``slice_start``/``slice_end`` are inclusive canonical slice indices; ``n_slices`` counts
    the slices of the run where it was grounded (gaps up to ``max_gap`` are bridged).
    ``voxel_box`` is (slice0, row0, col0, slice1, row1, col1) in voxel-centre index
    coordinates covering the whole voxels (so a one-voxel box spans ±0.5); ``ras_min`` /
    ``ras_max`` are the corners of that box mapped through the volume affine (RAS mm,
    nibabel convention; DICOM LPS is (−x, −y, z)).
    """

    key: str
    class_id: int | None
    class_name: str | None
    labels: list[str]
    slice_start: int
    slice_end: int
    n_slices: int
    voxel_box: tuple[float, ...]
    ras_min: tuple[float, float, float]
    ras_max: tuple[float, float, float]
    slices: list[int] = field(default_factory=list)

    @property
    def size_mm(self) -> tuple[float, float, float]:
        return tuple(float(b - a) for a, b in zip(self.ras_min, self.ras_max, strict=True))

    def to_dict(self) -> dict[str, Any]:
        lps_min = (-self.ras_max[0], -self.ras_max[1], self.ras_min[2])
        lps_max = (-self.ras_min[0], -self.ras_min[1], self.ras_max[2])
        return {
            "key": self.key,
            "class_id": self.class_id,
            "class_name": self.class_name,
            "labels": self.labels,
            "slice_start": self.slice_start,
            "slice_end": self.slice_end,
            "n_slices": self.n_slices,
            "slices": self.slices,
            "voxel_box": [round(v, 3) for v in self.voxel_box],
            "ras_min_mm": [round(v, 3) for v in self.ras_min],
            "ras_max_mm": [round(v, 3) for v in self.ras_max],
            "lps_min_mm": [round(v, 3) for v in lps_min],
            "lps_max_mm": [round(v, 3) for v in lps_max],
            "size_mm": [round(v, 3) for v in self.size_mm],
        }


@dataclass
class SeriesPrediction:
    volume: Any
    predictions: list[Any]
    structures: list[Structure3D]

    def to_dict(self) -> dict[str, Any]:
        v = self.volume
        return {
            "source": v.source,
            "shape": list(v.shape),
            "spacing_mm": list(v.spacing),
            "affine": np.asarray(v.affine).round(6).tolist(),
            "orientation": v.orientation,
            "n_predictions": len(self.predictions),
            "structures": [s.to_dict() for s in self.structures],
        }


def span_pixel_box(span: Any, width: int, height: int) -> tuple[float, float, float, float] | None:
    """(x1, y1, x2, y2) in pixels (exclusive max) from the span's boxes, else its mask."""
    if span.boxes:
        arr = np.array([b.to_pixels(width, height) for b in span.boxes], float)
        return (*arr[:, :2].min(0), *arr[:, 2:].max(0))
    if span.mask is not None and np.any(span.mask):
        rows, cols = np.nonzero(span.mask)
        return float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)
    return None


def aggregate_structures(
    predictions: Sequence[Any], affine: np.ndarray, *, max_gap: int = 1
) -> list[Structure3D]:
    """Group grounded spans of slice predictions into 3-D structures.

    Spans are grouped by class id (or, without one, by their lower-cased phrase). A group's
    slices split into runs where consecutive grounded slices are at most ``max_gap`` + 1
    apart; per run the in-plane box is the union of the slices' boxes (or mask extents).
    Pixel box edges (x1, x2 exclusive) become voxel-centre coordinates x1 − 0.5 .. x2 − 0.5,
    slices k0 − 0.5 .. k1 + 0.5, and the eight corners are mapped through ``affine``.
    """
    if max_gap < 0:
        raise RadGrounderError(f"max_gap: must be >= 0, got {max_gap}")
    affine = np.asarray(affine, float)
    groups: dict[str, dict[str, Any]] = {}
    for pred in predictions:
        if pred.slice_index is None:
            raise RadGrounderError("aggregate_structures: every prediction needs a slice_index")
        for span in pred.grounded.spans:
            box = span_pixel_box(span, pred.width, pred.height)
            if box is None:
                continue
            key = span.class_name or span.label.strip().lower()
            g = groups.setdefault(
                key, {"class_id": span.class_id, "class_name": span.class_name,
                      "labels": set(), "boxes": {}}
            )  # fmt: skip
            g["labels"].add(span.label.strip())
            old = g["boxes"].get(pred.slice_index)
            if old is not None:
                box = (min(old[0], box[0]), min(old[1], box[1]),
                       max(old[2], box[2]), max(old[3], box[3]))  # fmt: skip
            g["boxes"][pred.slice_index] = box
    out = []
    for key, g in sorted(groups.items()):
        ks = sorted(g["boxes"])
        runs, current = [], [ks[0]]
        for k in ks[1:]:
            if k - current[-1] <= max_gap + 1:
                current.append(k)
            else:
                runs.append(current)
                current = [k]
        runs.append(current)
        for run in runs:
            b = np.array([g["boxes"][k] for k in run])
            x1, y1 = b[:, 0].min(), b[:, 1].min()
            x2, y2 = b[:, 2].max(), b[:, 3].max()
            vox = (run[0] - 0.5, y1 - 0.5, x1 - 0.5, run[-1] + 0.5, y2 - 0.5, x2 - 0.5)
            corners = np.array(
                [
                    [s, r, c, 1.0]
                    for s, r, c in itertools.product(*zip(vox[:3], vox[3:], strict=True))
                ]
            )
            ras = (affine @ corners.T).T[:, :3]
            out.append(
                Structure3D(
                    key,
                    g["class_id"],
                    g["class_name"],
                    sorted(g["labels"]),
                    run[0],
                    run[-1],
                    len(run),
                    tuple(float(v) for v in vox),
                    tuple(float(v) for v in ras.min(0)),
                    tuple(float(v) for v in ras.max(0)),
                    list(run),
                )
            )
    return out
