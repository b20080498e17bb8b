"""Intensity normalisation and resizing exactly as the released checkpoints saw them (spec §4)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from radgrounder.errors import RadGrounderError
from radgrounder.imaging.raster import open_rgb
from radgrounder.imaging.volume import PathType, Slice, canonical_modality

HU_FLOOR = -1000.0
_EPS = 1e-5

# (width, level) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (1500.0, -600.0),
    "soft_tissue": (400.0, 40.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
    "liver": (150.0, 30.0),
    "reference_lung": (2250.0, -100.0),
    "reference_soft_tissue": (350.0, 40.0),
    "reference_brain": (80.0, 40.0),
}
# The reference's 3-channel CT input, in channel order.
REFERENCE_CT_WINDOWS = ("reference_lung", "reference_soft_tissue", "reference_brain")
VIEWING_PRESETS = ("lung", "soft_tissue", "bone", "brain", "liver")
PRESETS: tuple[str, ...] = ("reference", "dataset_stats", "min_max", *VIEWING_PRESETS)
# The reference code calls the "reference" preset "medgemma".
PRESET_ALIASES = {"medgemma": "reference"}

# (mean, std) of the training data.
CT_STATS = (-610.19085, 737.38825)
MR_STATS = (141.11550, 255.40430)
RGB_STATS: dict[str, tuple[float, float]] = {
    "slake": (0.2526479, 0.2969230),
    "vqa_rad": (0.3090255, 0.2935555),
}
_CLAMP_LIMITS = {"CT": (-1000.0, 3000.0), "MR": (0.0, 4096.0)}


def clamp_ct(hu: np.ndarray) -> np.ndarray:
    """Lower clamp at -1000 HU (no upper clamp), as the reference does before normalising."""
    return np.maximum(np.asarray(hu, dtype=np.float32), np.float32(HU_FLOOR))


def _preset(preset: str) -> str:
    name = PRESET_ALIASES.get(preset, preset) if isinstance(preset, str) else preset
    if name not in PRESETS:
        raise RadGrounderError(
            f"unknown normalisation preset {preset!r}; valid presets: {', '.join(PRESETS)}"
        )
    return name


def _modality(modality: str | None) -> str | None:
    return None if modality is None else canonical_modality(modality, None)


def _as_pixels(pixels: np.ndarray) -> np.ndarray:
    """float32 (H, W) grayscale or (H, W, 3) RGB; anything else is rejected."""
    x = np.asarray(pixels, dtype=np.float32)
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] == 3)):
        raise RadGrounderError(f"expected (H, W) or (H, W, 3) pixels, got shape {x.shape}")
    if x.size == 0:
        raise RadGrounderError(f"pixels have a zero-size dimension (shape {x.shape})")
    n_bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if n_bad:
        raise RadGrounderError(f"{n_bad} of {x.size} pixel values are NaN or Inf")
    return x


def _window(x: np.ndarray, width: float, level: float) -> np.ndarray:
    lo, hi = level - width / 2, level + width / 2
    return (np.clip(x, lo, hi) - lo) / (hi - lo + _EPS) * 2 - 1


def _unit_min_max(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo + _EPS)


def _chw(x: np.ndarray) -> np.ndarray:
    out = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    return np.ascontiguousarray(out, dtype=np.float32)


def normalize(
    pixels: np.ndarray,
    modality: str | None,
    preset: str = "reference",
    *,
    rgb_stats: str | None = None,
) -> np.ndarray:
    """Normalise one (H, W) or (H, W, 3) image to (C, H, W) float32 (spec §4.3).

    CT is clamped at -1000 HU first, as the reference pipeline does.
    """
    name = _preset(preset)
    mod = _modality(modality)
    if rgb_stats is not None and rgb_stats not in RGB_STATS:
        raise RadGrounderError(f"unknown rgb_stats {rgb_stats!r}; valid: {', '.join(RGB_STATS)}")
    x = _as_pixels(pixels)
    if x.ndim == 3 and mod is not None:
        raise RadGrounderError(f"RGB pixels need modality None, got {mod}")
    if mod == "CT":
        x = clamp_ct(x)

    if name == "reference":
        if mod == "CT":
            return np.stack([_window(x, *WINDOWS[w]) for w in REFERENCE_CT_WINDOWS]).astype(
                np.float32
            )
        return _chw(_unit_min_max(x) * 2 - 1)
    if name == "dataset_stats":
        if mod is None:
            if rgb_stats is None:
                raise RadGrounderError(
                    "preset 'dataset_stats' needs rgb_stats ('slake' or 'vqa_rad') for images "
                    "without a CT/MR modality"
                )
            mean, std = RGB_STATS[rgb_stats]
            # RGB images (SLAKE, VQA-RAD) are standardised without the [-2, 2] clamp the
            # reference applies to CT/MR only.
            return _chw((x - mean) / std)
        mean, std = CT_STATS if mod == "CT" else MR_STATS
        return _chw(np.clip((x - mean) / std, -2.0, 2.0))
    if name == "min_max":
        if mod is not None:
            x = np.clip(x, *_CLAMP_LIMITS[mod])
        return _chw(_unit_min_max(x))
    if mod != "CT":
        raise RadGrounderError(
            f"preset {name!r} is a CT window and cannot be used for {mod or 'non-CT'} images"
        )
    return _chw(_window(x, *WINDOWS[name]))


def resize_bilinear(chw: np.ndarray, size: int = 224) -> np.ndarray:
    """Bilinear resize to (C, size, size), align_corners=False, no antialias (spec §4.2 step 6)."""
    import torch
    import torch.nn.functional as F

    arr = np.asarray(chw, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise RadGrounderError(f"expected a non-empty (C, H, W) array, got shape {arr.shape}")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise RadGrounderError(f"size must be a positive int, got {size!r}")
    tensor = torch.from_numpy(np.ascontiguousarray(arr))[None]
    with torch.no_grad():
        out = F.interpolate(
            tensor,
            size=(int(size), int(size)),
            mode="bilinear",
            align_corners=False,
            antialias=False,
        )
    return out[0].numpy()


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D mask to (height, width), as the reference resizes
    label masks: output row r takes input row ``r * H_in // height`` (columns alike)."""
    mask = np.asarray(mask)
    rows = (np.arange(height) * mask.shape[0] // height).clip(0, mask.shape[0] - 1)
    cols = (np.arange(width) * mask.shape[1] // width).clip(0, mask.shape[1] - 1)
    return mask[rows][:, cols]


def _to_three(chw: np.ndarray) -> np.ndarray:
    return np.repeat(chw, 3, axis=0) if chw.shape[0] == 1 else chw


def preprocess_slice(
    slice_or_pixels: Slice | np.ndarray,
    modality: str | None = None,
    *,
    preset: str = "reference",
    size: int = 224,
    rgb_stats: str | None = None,
) -> np.ndarray:
    """Model input (3, size, size) float32 for one slice: clamp, normalise, resize, repeat."""
    if isinstance(slice_or_pixels, Slice):
        pixels = slice_or_pixels.pixels
        mod = modality if modality is not None else slice_or_pixels.modality
    else:
        pixels, mod = slice_or_pixels, modality
    x = _as_pixels(pixels)
    if _modality(mod) == "CT":
        x = clamp_ct(x)
    chw = normalize(x, mod, preset, rgb_stats=rgb_stats)
    return _to_three(resize_bilinear(chw, size))


def preprocess_rgb_image(
    path_or_pil: PathType | Image.Image,
    *,
    preset: str = "reference",
    size: int = 224,
    rgb_stats: str | None = None,
) -> np.ndarray:
    """Model input (3, size, size) for a photographic image the SLAKE/VQA-RAD way (spec §4.4)."""
    _preset(preset)
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise RadGrounderError(f"size must be a positive int, got {size!r}")
    rgb = open_rgb(path_or_pil)
    resized = rgb.resize((int(size), int(size)), Image.Resampling.BICUBIC)
    x = np.asarray(resized, dtype=np.float32) / np.float32(255.0)
    return _to_three(normalize(x, None, preset, rgb_stats=rgb_stats))


def display_image(
    pixels: np.ndarray, modality: str | None, *, preset: str = "soft_tissue"
) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) for people: CT windowed, MR/other 1st–99th percentile stretch."""
    x = _as_pixels(pixels)
    mod = _modality(modality)
    if x.ndim == 3:
        if mod is not None:
            raise RadGrounderError(f"RGB pixels need modality None, got {mod}")
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if preset not in WINDOWS:
        raise RadGrounderError(
            f"unknown display window {preset!r}; valid windows: {', '.join(WINDOWS)}"
        )
    if mod == "CT":
        width, level = WINDOWS[preset]
        lo, hi = level - width / 2, level + width / 2
    else:
        lo, hi = (float(v) for v in np.percentile(x, [1.0, 99.0]))
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.uint8)
    scaled = (np.clip(x, lo, hi) - lo) / (hi - lo) * 255.0
    return np.rint(scaled).astype(np.uint8)
