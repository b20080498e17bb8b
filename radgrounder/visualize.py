"""Draw grounded text on a slice: boxes and masks in class colours, a legend, a caption."""

from __future__ import annotations

import colorsys
import textwrap
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from radgrounder.grounding import GroundedText


def class_color(class_id: int | None) -> tuple[int, int, int]:
    """A stable, well-separated colour per class id (golden-ratio hue steps)."""
    if class_id is None:
        return (255, 255, 0)
    hue = (class_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return (int(r * 255), int(g * 255), int(b * 255))


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans (covers German umlauts and ß), from matplotlib or the system."""
    candidates = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"]
    try:
        import matplotlib

        candidates.insert(0, str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"))
    except ImportError:
        pass
    for path in candidates:
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default()


def render_overlay(
    image: np.ndarray,
    grounded: GroundedText,
    *,
    display_names: Mapping[int, str] | None = None,
    title: str | None = None,
    scale: int = 2,
    mask_alpha: float = 0.35,
) -> Image.Image:
    """An RGB picture of ``image`` (uint8, HxW or HxWx3) with the spans' boxes and masks,
    a legend (class display names, e.g. in the report's language) and the wrapped text."""
    base = np.asarray(image)
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=2)
    rgb = base.astype(np.float32)
    h, w = base.shape[:2]
    for span in grounded.spans:
        if span.mask is not None:
            mask = (
                np.asarray(
                    Image.fromarray(np.asarray(span.mask, np.uint8) * 255).resize(
                        (w, h), Image.Resampling.NEAREST
                    )
                )
                > 0
            )
            rgb[mask] = (1 - mask_alpha) * rgb[mask] + mask_alpha * np.array(
                class_color(span.class_id)
            )
    pic = Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).resize(
        (w * scale, h * scale), Image.Resampling.NEAREST
    )
    draw = ImageDraw.Draw(pic)
    legend: dict[int | None, str] = {}
    for span in grounded.spans:
        color = class_color(span.class_id)
        for box in span.boxes:
            x1, y1, x2, y2 = box.to_pixels(w * scale, h * scale)
            draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=color, width=2)
        name = span.label
        if display_names and span.class_id in display_names:
            name = display_names[span.class_id]
        legend.setdefault(span.class_id, name)

    font, line_h, columns = _font(14), 20, 2
    width = max(pic.width, 560)
    text_lines = textwrap.wrap(grounded.text, width=width // 8) or [""]
    legend_rows = (len(legend) + columns - 1) // columns
    header = line_h if title else 0
    height = header + pic.height + 8 + legend_rows * line_h + 8 + len(text_lines) * line_h + 8
    canvas = Image.new("RGB", (width, height), (18, 18, 18))
    d = ImageDraw.Draw(canvas)
    if title:
        d.text((6, 2), title, fill=(230, 230, 230), font=font)
    canvas.paste(pic, ((width - pic.width) // 2, header))
    y = header + pic.height + 8
    col_w = width // columns
    for i, (cid, name) in enumerate(legend.items()):
        x, yy = 6 + (i % columns) * col_w, y + (i // columns) * line_h
        d.rectangle([x, yy + 4, x + 11, yy + 15], fill=class_color(cid))
        label = name
        while len(label) > 1 and d.textlength(label, font=font) > col_w - 26:
            label = label[:-2] + "…"
        d.text((x + 16, yy), label, fill=(230, 230, 230), font=font)
    y += legend_rows * line_h + 8
    for line in text_lines:
        d.text((6, y), line, fill=(240, 240, 240), font=font)
        y += line_h
    return canvas
