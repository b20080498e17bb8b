"""The Volume and Slice containers, modality checks and the canonical reorientation."""

from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from radgrounder.errors import RadGrounderError

# Axes (slice, row, col) = inferior→superior, anterior→posterior, patient right→left:
# the radiological axial view, equal to the reference's "reorient to LPS, vol[:, :, k].T".
CANONICAL_ORIENTATION = "SPL"
MODALITIES = ("CT", "MR")

PathType = str | PathLike[str]


@dataclass
class Slice:
    """One 2D image: (rows, cols) float32, or (rows, cols, 3) for RGB."""

    pixels: np.ndarray
    modality: str | None
    index: int
    pixel_spacing: tuple[float, float]
    source: str

    @property
    def is_rgb(self) -> bool:
        return self.pixels.ndim == 3


@dataclass
class Volume:
    """A stack of slices with axes (slice, row, col) plus geometry and provenance."""

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    modality: str | None
    source: str
    kind: str
    orientation: str
    source_orientation: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]

    @property
    def n_slices(self) -> int:
        return int(self.data.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape)

    @property
    def is_rgb(self) -> bool:
        return self.data.ndim == 4

    def slice(self, k: int) -> Slice:
        """Slice ``k`` (0 = most inferior for canonical volumes)."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            raise RadGrounderError(f"slice index must be an int, got {k!r}", path=self.source)
        if not 0 <= k < self.n_slices:
            raise RadGrounderError(
                f"slice index {k} out of range (volume has {self.n_slices} slices, 0.."
                f"{self.n_slices - 1})",
                path=self.source,
            )
        return Slice(
            pixels=self.data[int(k)],
            modality=self.modality,
            index=int(k),
            pixel_spacing=(self.spacing[1], self.spacing[2]),
            source=self.source,
        )

    def value_range(self) -> tuple[float, float]:
        return float(self.data.min()), float(self.data.max())


def axcodes(affine: np.ndarray) -> str:
    """Axis codes of an affine's voxel axes, e.g. ``"RAS"``."""
    return "".join(str(c) for c in nib.aff2axcodes(affine))


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return float(zooms[0]), float(zooms[1]), float(zooms[2])


def to_canonical(
    data: np.ndarray, affine: np.ndarray, path: PathType
) -> tuple[np.ndarray, np.ndarray]:
    """Flip/permute the first three axes of ``data`` to the canonical SPL layout (no resampling)."""
    try:
        start = ornt.io_orientation(affine)
        if np.isnan(start).any():
            raise ValueError("affine has a degenerate (zero-length) axis")
        transform = ornt.ornt_transform(start, ornt.axcodes2ornt(tuple(CANONICAL_ORIENTATION)))
        new_data = ornt.apply_orientation(data, transform)
        new_affine = affine @ ornt.inv_ornt_aff(transform, data.shape[:3])
    except (ValueError, np.linalg.LinAlgError) as exc:
        msg = f"cannot determine the orientation: {reason(exc)}"
        raise RadGrounderError(msg, path=path) from exc
    # Flips leave negative strides, which torch.from_numpy refuses.
    return np.ascontiguousarray(new_data), new_affine


def canonical_modality(value: object, path: PathType | None, *, what: str = "modality") -> str:
    """Return ``"CT"`` or ``"MR"`` for a case-insensitive match, else raise."""
    text = str(value).strip().upper() if isinstance(value, str) else None
    if text not in MODALITIES:
        raise RadGrounderError(f"unsupported {what} {value!r} (expected CT or MR)", path=path)
    return text


def reason(exc: BaseException, limit: int = 300) -> str:
    """A library exception as one short line (the CLI prints errors on one line)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_finite(data: np.ndarray, path: PathType) -> None:
    if np.issubdtype(data.dtype, np.floating):
        n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if n_bad:
            raise RadGrounderError(f"{n_bad} of {data.size} voxels are NaN or Inf", path=path)


class VolumeTooLarge(RadGrounderError):
    """A scan whose headers promise more voxels than the caller's ``max_voxels``."""


def check_voxels(shape: tuple[int, ...], max_voxels: int | None, path: PathType) -> None:
    """Refuse ``shape`` (from headers, before any pixel is decoded) past ``max_voxels``."""
    if max_voxels is None:
        return
    n = 1
    for s in shape:
        n *= max(int(s), 0)
    if n > max_voxels:
        dims = " x ".join(str(int(s)) for s in shape)
        raise VolumeTooLarge(
            f"the scan has {n} voxels ({dims}); at most {max_voxels} are decoded", path=path
        )


def check_nonempty(shape: tuple[int, ...], path: PathType) -> None:
    if any(int(s) == 0 for s in shape):
        raise RadGrounderError(f"image has a zero-size dimension (shape {tuple(shape)})", path=path)
