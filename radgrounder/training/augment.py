"""Training augmentations that keep image, boxes and masks consistent (spec §4.5).

A random crop keeps 90-100 % of each side; boxes are intersected with the crop, moved to its
origin and clipped, and a box left with less than 1 px² is dropped (a phrase that loses all
its boxes becomes plain text). Masks are cut from the cropped label slice, so they follow the
image by construction. Intensity: gamma contrast (probability 0.3, γ ~ U(0.7, 1.2)) and a
shift (probability 0.5, ±20 in HU or raw MR units), on the raw values before normalisation.
Every draw comes from the generator the caller seeds per (seed, step, slot), so augmented
batches are reproducible and differ across data-loader workers and processes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from radgrounder.grounding import Box, GroundedText
from radgrounder.labels.dataset import span_from_record

PixelBox = tuple[int, int, int, int]


def crop_box(box: PixelBox, x0: int, y0: int, w: int, h: int) -> PixelBox | None:
    x1, y1, x2, y2 = box
    nx1, ny1 = min(max(x1 - x0, 0), w), min(max(y1 - y0, 0), h)
    nx2, ny2 = min(max(x2 - x0, 0), w), min(max(y2 - y0, 0), h)
    if (nx2 - nx1) * (ny2 - ny1) < 1:
        return None
    return (nx1, ny1, nx2, ny2)


def augment_slice(
    pixels: np.ndarray,
    labels: np.ndarray,
    spans: list[dict[str, Any]],
    text: str,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, GroundedText]:
    """Crop and intensity-augment one slice with its grounded target (spans as stored in a
    built dataset: ``pixel_boxes`` in slice pixels)."""
    h, w = pixels.shape
    ch, cw = (max(1, round(s * f)) for s, f in zip((h, w), rng.uniform(0.9, 1.0, 2), strict=True))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    pixels = pixels[y0 : y0 + ch, x0 : x0 + cw].astype(np.float32)
    labels = labels[y0 : y0 + ch, x0 : x0 + cw]
    if rng.random() < 0.3:
        lo, hi = float(pixels.min()), float(pixels.max())
        if hi > lo:
            gamma = rng.uniform(0.7, 1.2)
            pixels = ((pixels - lo) / (hi - lo)) ** gamma * (hi - lo) + lo
    if rng.random() < 0.5:
        pixels = pixels + np.float32(rng.uniform(-20, 20))
    new_spans = []
    for s in spans:
        kept = [b for b in (crop_box(tuple(pb), x0, y0, cw, ch) for pb in s["pixel_boxes"]) if b]
        if not kept:
            continue
        new_spans.append(
            span_from_record(
                s,
                boxes=[Box.from_pixels(*b, cw, ch) for b in kept],
                pixel_boxes=[list(b) for b in kept],
            )
        )
    return pixels, labels, GroundedText(text, new_spans)
