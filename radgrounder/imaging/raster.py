"""2D raster images (PNG, JPEG, BMP, TIFF) read with Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from radgrounder.errors import RadGrounderError
from radgrounder.imaging.volume import (
    CANONICAL_ORIENTATION,
    PathType,
    Volume,
    canonical_modality,
    check_finite,
    check_nonempty,
    check_voxels,
    reason,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Modes whose values are kept raw (e.g. 16-bit exports of CT/MR slices).
_GRAY_MODES = ("L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F", "1")

# (slice, row, col) -> RAS with spacing 1, laid out like a canonical axial slice
# (rows towards P, columns towards L) so images and scans share one convention.
IMAGE_AFFINE = np.array(
    [
        [0.0, 0.0, -1.0, 0.0],
        [0.0, -1.0, 0.0, 0.0],
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def is_image_path(path: PathType) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def open_rgb(path_or_pil: PathType | Image.Image) -> Image.Image:
    """An RGB PIL image from a path or an already open image."""
    if isinstance(path_or_pil, Image.Image):
        source = "<PIL image>"
        try:
            check_nonempty((path_or_pil.height, path_or_pil.width), source)
            return path_or_pil.convert("RGB")
        except RadGrounderError:
            raise
        except Exception as exc:
            msg = f"cannot convert image to RGB: {reason(exc)}"
            raise RadGrounderError(msg, path=source) from exc
    path = Path(path_or_pil)
    if not path.is_file():
        raise RadGrounderError("image file not found", path=path)
    try:
        with Image.open(path) as im:
            im.load()
            check_nonempty((im.height, im.width), path)
            return im.convert("RGB")
    except RadGrounderError:
        raise
    except Exception as exc:
        raise RadGrounderError(f"cannot read image file: {reason(exc)}", path=path) from exc


def read_image(
    path: PathType, *, modality: str | None = None, max_voxels: int | None = None
) -> Volume:
    """Read a raster image as one slice: grayscale raw values or RGB 0..255, float32.

    ``modality`` marks a grayscale export of a CT/MR slice; photographs stay ``None``.
    """
    path = Path(path)
    if not path.is_file():
        raise RadGrounderError("image file not found", path=path)
    mod = None if modality is None else canonical_modality(modality, path)
    try:
        with Image.open(path) as im:
            # The header gives the size; refuse before the pixels are decompressed.
            check_voxels(
                (int(getattr(im, "n_frames", 1)), im.height, im.width, len(im.getbands())),
                max_voxels,
                path,
            )
            im.load()
            check_nonempty((im.height, im.width), path)
            mode, n_frames = im.mode, int(getattr(im, "n_frames", 1))
            if n_frames > 1:
                raise RadGrounderError(
                    f"the image has {n_frames} pages/frames; radgrounder reads one picture per "
                    "file (convert a stack to NIfTI or DICOM, or save each page as its own file)",
                    path=path,
                )
            if mode in _GRAY_MODES:
                pixels = np.asarray(im).astype(np.float32)
            else:
                pixels = np.asarray(im.convert("RGB")).astype(np.float32)
    except RadGrounderError:
        raise
    except Exception as exc:
        raise RadGrounderError(f"cannot read image file: {reason(exc)}", path=path) from exc
    check_finite(pixels, path)
    if pixels.ndim == 3 and mod is not None:
        # Grayscale slices are often saved as RGB with three equal channels.
        if not (
            np.array_equal(pixels[..., 0], pixels[..., 1])
            and np.array_equal(pixels[..., 0], pixels[..., 2])
        ):
            raise RadGrounderError(
                f"colour image cannot be read as {mod} (channels differ)", path=path
            )
        pixels = pixels[..., 0]
    return Volume(
        data=np.ascontiguousarray(pixels[None]),
        affine=IMAGE_AFFINE.copy(),
        spacing=(1.0, 1.0, 1.0),
        modality=mod,
        source=str(path),
        kind="image",
        orientation=CANONICAL_ORIENTATION,
        source_orientation=CANONICAL_ORIENTATION,
        metadata={
            "image_mode": mode,
            "image_format": path.suffix.lower().lstrip("."),
            "n_frames": n_frames,
            "modality_source": "argument" if mod is not None else None,
        },
    )
