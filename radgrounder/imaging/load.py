"""One entry point for any scan (DICOM file/folder, NIfTI, raster image) and a summary of it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from radgrounder.errors import RadGrounderError
from radgrounder.imaging.dicom import has_dicm_prefix, read_dicom
from radgrounder.imaging.dicom_series import read_dicom_series
from radgrounder.imaging.nifti import (
    is_nifti_path,
    nifti_label_names,
    read_label_map,
    read_nifti,
)
from radgrounder.imaging.raster import is_image_path, read_image
from radgrounder.imaging.volume import PathType, Volume


def load_scan(
    path: PathType,
    *,
    modality: str | None = None,
    series_uid: str | None = None,
    max_voxels: int | None = None,
) -> Volume:
    """Load a DICOM folder, DICOM file, NIfTI or raster image, dispatching on what ``path`` is.

    With ``max_voxels`` a scan whose headers promise more voxels (slices x rows x columns x
    samples) is refused with :class:`~radgrounder.imaging.volume.VolumeTooLarge` before its
    pixels are decoded."""
    path = Path(path)
    if not path.exists():
        raise RadGrounderError("no such file or folder", path=path)
    if path.is_dir():
        return read_dicom_series(
            path, series_uid=series_uid, modality=modality, max_voxels=max_voxels
        )
    if series_uid is not None:
        raise RadGrounderError("series_uid only applies to a DICOM folder", path=path)
    if is_nifti_path(path):
        return read_nifti(path, modality=modality, max_voxels=max_voxels)
    if is_image_path(path):
        return read_image(path, modality=modality, max_voxels=max_voxels)
    if not path.is_file():
        raise RadGrounderError("not a regular file", path=path)
    if not has_dicm_prefix(path):
        raise RadGrounderError("not a DICOM, NIfTI or image file", path=path)
    return read_dicom(path, modality=modality, max_voxels=max_voxels)


@dataclass
class ScanInfo:
    """What ``radgrounder inspect`` shows about a scan."""

    path: str
    kind: str
    modality: str | None
    modality_source: str | None
    shape: tuple[int, ...]
    n_slices: int
    spacing: tuple[float, float, float]
    orientation: str
    source_orientation: str
    value_min: float
    value_max: float
    dtype: str
    extra: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["spacing"] = list(self.spacing)
        return out


_DICOM_EXTRA = (
    "transfer_syntax",
    "transfer_syntax_name",
    "transfer_syntaxes",
    "series_uid",
    "n_files",
    "n_skipped_files",
    "n_frames",
    "geometry",
    "irregular_spacing",
    "gantry_tilt_deg",
    "skipped_files",
)


def inspect_scan(
    path: PathType, *, modality: str | None = None, series_uid: str | None = None
) -> ScanInfo:
    """Load ``path`` with :func:`load_scan` (``series_uid`` picks one series of a folder)
    and summarise it."""
    label_names = nifti_label_names(path) if is_nifti_path(Path(path)) else None
    # A label map read as an image would get an invented modality.
    vol = (
        read_label_map(path, modality=modality)
        if label_names is not None
        else load_scan(path, modality=modality, series_uid=series_uid)
    )
    meta = vol.metadata
    extra: dict[str, Any] = {}
    if vol.kind.startswith("dicom"):
        extra = {k: meta[k] for k in _DICOM_EXTRA if k in meta}
    elif label_names is not None:
        present = meta.get("labels_present") or []
        extra = {
            "label_map": True,
            "n_label_names": len(label_names),
            "n_labels_present": len([v for v in present if v]),
        }
    elif vol.kind == "nifti":
        extra = {"on_disk_dtype": meta.get("on_disk_dtype"), "sidecar": meta.get("sidecar")}
    elif vol.kind == "image":
        extra = {"image_mode": meta.get("image_mode"), "image_format": meta.get("image_format")}
    low, high = vol.value_range()
    return ScanInfo(
        path=str(path),
        kind=vol.kind,
        modality=vol.modality,
        modality_source=meta.get("modality_source"),
        shape=vol.shape,
        n_slices=vol.n_slices,
        spacing=vol.spacing,
        orientation=vol.orientation,
        source_orientation=vol.source_orientation,
        value_min=low,
        value_max=high,
        dtype=str(vol.data.dtype),
        extra=extra,
        warnings=list(meta.get("warnings") or []),
    )
