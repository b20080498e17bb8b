"""Box geometry on normalised and pixel coordinates."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from radgrounder.grounding.types import Box


def union_box(boxes: Iterable[Box]) -> Box:
    """The smallest box containing all ``boxes``."""
    boxes = list(boxes)
    return Box(
        min(b.x1 for b in boxes),
        min(b.y1 for b in boxes),
        max(b.x2 for b in boxes),
        max(b.y2 for b in boxes),
    )


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union; 0 when both boxes are empty."""
    iw = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    ih = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = iw * ih
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def boxes_from_label_slice(labels: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """One union box per label id in a 2D label slice, in pixels (x1, y1, x2, y2), exclusive
    max, ascending id; background 0 is skipped. This is the reference's per-class box
    (spec §5.3: union over all 8-connected components)."""
    from scipy import ndimage

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected a 2D label slice, got shape {labels.shape}")
    ids = labels.astype(np.int32, copy=False)
    boxes = {}
    for idx, sl in enumerate(ndimage.find_objects(ids), start=1):
        if sl is not None:
            rows, cols = sl
            boxes[idx] = (cols.start, rows.start, cols.stop, rows.stop)
    return boxes
