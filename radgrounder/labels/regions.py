"""Per-slice regions of a label map: classes present, union and instance boxes, class masks.

Boxes are pixel boxes ``(x1, y1, x2, y2)`` with exclusive max (x = column, y = row), as the
reference computes them (spec §5.3). Each pass runs over whole slices in C (scipy.ndimage,
scikit-image); nothing loops over classes in Python.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from radgrounder.anatomy import load_schema, totalseg_to_unified
from radgrounder.errors import RadGrounderError
from radgrounder.grounding import boxes_from_label_slice
from radgrounder.imaging import Volume

PixelBox = tuple[int, int, int, int]
SLICE_AXES = {"axial": 0, "coronal": 1, "sagittal": 2}

# Generic classes a label map may only show through their parts (CT maps have lobes, not
# lungs); a mention of the whole is grounded on the union of the parts present.
_PARTS = {
    "lung_left": ("lung_upper_lobe_left", "lung_lower_lobe_left"),
    "lung_right": ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"),
}


@dataclass
class SliceRegions:
    """What one slice of a unified label map shows."""

    index: int
    shape: tuple[int, int]
    areas: dict[int, int]
    boxes: dict[int, PixelBox]
    instances: dict[int, list[PixelBox]] = field(default_factory=dict)

    @property
    def classes(self) -> tuple[int, ...]:
        return tuple(self.boxes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "shape": list(self.shape),
            "classes": list(self.classes),
            "areas": {str(k): v for k, v in self.areas.items()},
            "boxes": {str(k): list(v) for k, v in self.boxes.items()},
            "instances": {str(k): [list(b) for b in v] for k, v in self.instances.items()},
        }


def part_ids(class_id: int) -> tuple[int, ...]:
    """The unified ids that stand for ``class_id`` in a label map: itself, plus its parts for
    a generic class (left lung → its lobes; the generic spine → every vertebra and the sacrum)."""
    schema = load_schema()
    name = schema.by_id(class_id).name
    parts = _PARTS.get(name, ())
    if name == "vertebrae":
        parts = (*(n for n in schema.names if n.startswith("vertebrae_")), "sacrum")
    return (class_id, *(schema.by_name(p).id for p in parts))


def unify_label_volume(
    labels: Volume | np.ndarray,
    *,
    label_task: str | None = None,
    label_names: Mapping[int, str] | None = None,
    dropped: dict[int, int] | None = None,
) -> np.ndarray:
    """A TotalSegmentator label map in unified ids (uint8), matched by class name.

    Names come from ``label_names``, else from the map's NIfTI extension, else from
    ``label_task`` (``total`` or ``total_mr``). Ids whose names are not in the schema become 0;
    with ``dropped`` their voxel counts are stored there (``{label id: voxels}``).
    """
    data = labels.data if isinstance(labels, Volume) else np.asarray(labels)
    if label_names is None and isinstance(labels, Volume):
        label_names = labels.metadata.get("label_names")
    if label_names is None and label_task is None:
        source = labels.source if isinstance(labels, Volume) else "label map"
        raise RadGrounderError(
            "label map has no label names; pass label_task ('total' for CT, 'total_mr' for MR)",
            path=source,
        )
    mapping = totalseg_to_unified(label_task, label_names=label_names)
    if data.size and (data.min() < 0):
        raise RadGrounderError("label map has negative values")
    top = int(data.max()) if data.size else 0
    lut = np.zeros(max(top, max(mapping, default=0)) + 1, dtype=np.uint8)
    for ts_id, unified in mapping.items():
        lut[ts_id] = unified
    out = lut[data]
    if dropped is not None:
        ids, voxels = np.unique(data[(out == 0) & (data != 0)], return_counts=True)
        dropped.update({int(i): int(n) for i, n in zip(ids, voxels, strict=True)})
    return out


def slices_along(data: np.ndarray, axis: str | int = "axial") -> np.ndarray:
    """A canonical (S, P, L) volume as a stack of 2D slices along ``axis``.

    Axial slices have rows anterior→posterior and columns patient right→left; coronal and
    sagittal slices have superior at the top. Returns a view where possible.
    """
    a = SLICE_AXES.get(axis, axis) if isinstance(axis, str) else axis
    if a not in (0, 1, 2):
        raise RadGrounderError(
            f"slice_axis: unknown value {axis!r} (expected axial, coronal, sagittal or 0-2)"
        )
    if a == 0:
        return data
    if a == 1:
        return np.moveaxis(data, 1, 0)[:, ::-1]
    return np.moveaxis(data, 2, 0)[:, ::-1]


def _slice_index_map(axis: int, shape: tuple[int, int, int]) -> np.ndarray:
    """4x4 map from (k, row, col, 1) of a slice stack to canonical (slice, row, col, 1)."""
    s = shape[0]
    m = np.zeros((4, 4))
    m[3, 3] = 1
    if axis == 0:
        m[0, 0] = m[1, 1] = m[2, 2] = 1
    elif axis == 1:  # k -> P index, row -> flipped S, col -> L
        m[1, 0], m[0, 1], m[0, 3], m[2, 2] = 1, -1, s - 1, 1
    else:  # k -> L index, row -> flipped S, col -> P
        m[2, 0], m[0, 1], m[0, 3], m[1, 2] = 1, -1, s - 1, 1
    return m


def slice_geometry(
    affine: np.ndarray, shape: Sequence[int], axis: str | int = "axial"
) -> list[tuple[list[float], list[float]]]:
    """Per slice of :func:`slices_along`: (ImagePositionPatient, ImageOrientationPatient) in
    DICOM's LPS convention, from a canonical volume's RAS affine."""
    a = SLICE_AXES.get(axis, axis) if isinstance(axis, str) else axis
    shape3 = (int(shape[0]), int(shape[1]), int(shape[2]))
    to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    m = to_lps @ np.asarray(affine, dtype=float) @ _slice_index_map(a, shape3)
    n = shape3[a]
    row_dir = m[:3, 2] / np.linalg.norm(m[:3, 2])  # along increasing column
    col_dir = m[:3, 1] / np.linalg.norm(m[:3, 1])  # along increasing row
    orientation = [round(float(v), 6) for v in (*row_dir, *col_dir)]
    return [
        ([round(float(v), 4) for v in (m @ np.array([k, 0, 0, 1.0]))[:3]], orientation)
        for k in range(n)
    ]


def _instances(label_slice: np.ndarray, min_area: int) -> dict[int, list[PixelBox]]:
    from skimage.measure import label as connected

    # Same-value 8-connectivity: touching organs of different classes stay separate.
    comps = connected(label_slice, background=0, connectivity=2)
    n = int(comps.max())
    if n == 0:
        return {}
    comp_class = np.zeros(n + 1, dtype=np.int64)
    comp_class[comps.ravel()] = label_slice.ravel()
    comp_area = np.bincount(comps.ravel(), minlength=n + 1)
    out: dict[int, list[PixelBox]] = {}
    for comp_id, sl in enumerate(ndimage.find_objects(comps), start=1):
        if sl is None or comp_area[comp_id] < min_area:
            continue
        rows, cols = sl
        out.setdefault(int(comp_class[comp_id]), []).append(
            (cols.start, rows.start, cols.stop, rows.stop)
        )
    return {k: sorted(v) for k, v in sorted(out.items())}


def slice_regions(
    label_slice: np.ndarray, index: int = 0, *, instances: bool = True, min_area: int = 0
) -> SliceRegions:
    """Regions of one 2D slice of unified ids."""
    s = np.ascontiguousarray(label_slice)
    if s.ndim != 2:
        raise RadGrounderError(f"label slice must be 2D, got shape {s.shape}")
    areas_all = np.bincount(s.ravel().astype(np.int64), minlength=1)
    boxes = boxes_from_label_slice(s)
    areas = {cid: int(areas_all[cid]) for cid in boxes}
    inst = _instances(s, min_area) if instances and boxes else {}
    return SliceRegions(index, (int(s.shape[0]), int(s.shape[1])), areas, boxes, inst)


def extract_regions(
    unified: np.ndarray,
    *,
    axis: str | int = "axial",
    instances: bool = True,
    min_area: int = 0,
) -> Iterator[SliceRegions]:
    """Regions of every slice of a unified label volume along ``axis``, in slice order."""
    if min_area < 0:
        raise RadGrounderError(f"min_area: must be >= 0, got {min_area}")
    stack = slices_along(np.asarray(unified), axis)
    for k in range(stack.shape[0]):
        yield slice_regions(stack[k], k, instances=instances, min_area=min_area)


def union_pixel_box(boxes: Sequence[PixelBox]) -> PixelBox | None:
    """The smallest pixel box containing all ``boxes``; None for none."""
    if not boxes:
        return None
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def group_box(regions: SliceRegions, class_id: int) -> PixelBox | None:
    """The union box over ``class_id`` and its parts present in the slice, or None."""
    return union_pixel_box([regions.boxes[c] for c in part_ids(class_id) if c in regions.boxes])


def group_mask(label_slice: np.ndarray, class_id: int) -> np.ndarray:
    """Binary mask of ``class_id`` and its parts in a unified label slice."""
    return np.isin(label_slice, part_ids(class_id))
