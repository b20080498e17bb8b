"""DICOM reading: single files (grid as stored) and series (sorted, canonical)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from radgrounder.errors import RadGrounderError
from radgrounder.imaging.volume import (
    PathType,
    Volume,
    axcodes,
    canonical_modality,
    check_finite,
    check_nonempty,
    check_voxels,
    reason,
    spacing_from_affine,
)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


def has_dicm_prefix(path: PathType) -> bool:
    """True when the file carries the DICOM Part 10 preamble + ``DICM`` marker."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dcmread(path: Path, **kwargs: Any) -> tuple[Dataset, bool]:
    """Read a Part 10 file; returns the dataset and whether pydicom hit end-of-file early."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, force=False, **kwargs)
        except InvalidDicomError as exc:
            raise RadGrounderError("not a DICOM file (no 'DICM' header)", path=path) from exc
        except Exception as exc:
            raise RadGrounderError(f"cannot read DICOM file: {reason(exc)}", path=path) from exc
    truncated = any("end of file" in str(w.message).lower() for w in caught)
    return ds, truncated


@contextmanager
def malformed_tags(path: Path) -> Iterator[None]:
    """pydicom parses values lazily, so a bad tag value surfaces as a plain Python error."""
    try:
        yield
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError) as exc:
        msg = f"malformed DICOM attribute: {reason(exc)}"
        raise RadGrounderError(msg, path=path) from exc


def sop_class(ds: Dataset) -> UID:
    uid = ds.get("SOPClassUID") or ds.get("file_meta", Dataset()).get("MediaStorageSOPClassUID")
    return UID(str(uid or ""))


def has_pixels(ds: Dataset) -> bool:
    return any(k in ds for k in _PIXEL_KEYWORDS)


def require_pixels(ds: Dataset, path: Path, truncated: bool) -> None:
    if not has_pixels(ds):
        hint = "the file is truncated" if truncated else "truncated file or not an image object"
        raise RadGrounderError(f"DICOM file has no PixelData ({hint})", path=path)


def _lookup(ds: Dataset, keyword: str, group: str) -> Any:
    """A top-level attribute, else the one in the enhanced-IOD shared/first per-frame group."""
    if ds.get(keyword) is not None:
        return ds.get(keyword)
    for seq_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(seq_name)
        if seq:
            inner = seq[0].get(group)
            if inner and inner[0].get(keyword) is not None:
                return inner[0].get(keyword)
    return None


def transfer_syntax(ds: Dataset) -> UID:
    return UID(str(ds.get("file_meta", Dataset()).get("TransferSyntaxUID", "")))


def _frame_rescale(ds: Dataset, n_frames: int) -> list[tuple[float, float]]:
    """(slope, intercept) per frame; enhanced IODs may carry them per frame."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if "RescaleSlope" not in ds and per_frame and len(per_frame) == n_frames:
        out = []
        for item in per_frame:
            pvt = item.get("PixelValueTransformationSequence")
            src = pvt[0] if pvt else Dataset()
            out.append(
                (float(src.get("RescaleSlope", 1.0)), float(src.get("RescaleIntercept", 0.0)))
            )
        if any(o != (1.0, 0.0) for o in out):
            return out
    slope = _lookup(ds, "RescaleSlope", "PixelValueTransformationSequence")
    inter = _lookup(ds, "RescaleIntercept", "PixelValueTransformationSequence")
    pair = (float(1.0 if slope is None else slope), float(0.0 if inter is None else inter))
    return [pair] * n_frames


def decode(ds: Dataset, path: Path) -> np.ndarray:
    """Decoded, rescaled pixels as float32 (frames, rows, cols)."""
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise RadGrounderError(
            f"colour DICOM (SamplesPerPixel={samples}) is not supported for CT/MR", path=path
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = ds.pixel_array
    except Exception as exc:
        raise RadGrounderError(
            f"cannot decode pixel data (transfer syntax {transfer_syntax(ds).name or 'unknown'}): "
            f"{reason(exc)}",
            path=path,
        ) from exc
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if raw.ndim == 2:
        raw = raw[None]
    if raw.ndim != 3 or raw.shape[0] != n_frames:
        raise RadGrounderError(
            f"pixel data shape {raw.shape} does not match NumberOfFrames={n_frames}", path=path
        )
    check_nonempty(raw.shape, path)
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    out = raw.astype(np.float32)
    for i, (slope, inter) in enumerate(_frame_rescale(ds, n_frames)):
        if not (np.isfinite(slope) and np.isfinite(inter)):
            raise RadGrounderError(
                f"RescaleSlope/RescaleIntercept are not finite numbers ({slope}, {inter})",
                path=path,
            )
        if slope == 0:
            raise RadGrounderError(
                "RescaleSlope is 0: every pixel would get the same value", path=path
            )
        if (slope, inter) != (1.0, 0.0):
            out[i] = (raw[i].astype(np.float64) * slope + inter).astype(np.float32)
    check_finite(out, path)
    return out


def resolve_modality(ds_modalities: set[str], argument: str | None, path: Path) -> tuple[str, str]:
    if argument is not None:
        return canonical_modality(argument, path), "argument"
    if len(ds_modalities) > 1:
        raise RadGrounderError(
            f"files disagree on the Modality tag: {sorted(ds_modalities)}", path=path
        )
    tag = next(iter(ds_modalities), "")
    if not tag:
        raise RadGrounderError(
            "DICOM Modality tag (0008,0060) is missing; pass modality='CT' or 'MR'", path=path
        )
    if tag.strip().upper() not in ("CT", "MR"):
        raise RadGrounderError(
            f"unsupported modality {tag!r} (expected CT or MR) in DICOM tag (0008,0060)",
            path=path,
        )
    return tag.strip().upper(), "tag"


def floats(value: Any, n: int, name: str, path: Path, *, positive: bool = False) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise RadGrounderError(f"{name} is missing or malformed: {value!r}", path=path) from exc
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise RadGrounderError(f"{name} must have {n} finite numbers, got {value!r}", path=path)
    if positive and not (arr > 0).all():
        raise RadGrounderError(f"{name} must be positive, got {arr.tolist()}", path=path)
    return arr


def geometry_affine(
    origin: np.ndarray, iop: np.ndarray, pixel_spacing: np.ndarray, slice_vec: np.ndarray
) -> np.ndarray:
    """Affine (slice, row, col, 1) -> RAS mm from DICOM LPS geometry."""
    aff = np.eye(4)
    aff[:3, 0] = slice_vec
    # IOP[3:] is the direction rows advance in; PixelSpacing[0] is the spacing between rows.
    aff[:3, 1] = iop[3:] * pixel_spacing[0]
    aff[:3, 2] = iop[:3] * pixel_spacing[1]
    aff[:3, 3] = origin
    return _LPS_TO_RAS @ aff


def normal_of(iop: np.ndarray, path: Path) -> np.ndarray:
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        raise RadGrounderError(f"ImageOrientationPatient is degenerate: {iop.tolist()}", path=path)
    return normal / norm


def common_metadata(ds: Dataset) -> dict[str, Any]:
    ts = transfer_syntax(ds)
    return {
        "transfer_syntax": str(ts),
        "transfer_syntax_name": ts.name,
        "series_uid": str(ds.get("SeriesInstanceUID", "")) or None,
        "study_uid": str(ds.get("StudyInstanceUID", "")) or None,
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "")) or None,
    }


def read_dicom(
    path: PathType, *, modality: str | None = None, max_voxels: int | None = None
) -> Volume:
    """Read one DICOM file; frames become slices, the pixel grid is kept as stored
    (``max_voxels``: refuse a larger image from its header, before decoding)."""
    path = Path(path)
    if not path.is_file():
        raise RadGrounderError("DICOM file not found", path=path)
    with malformed_tags(path):
        return _read_dicom(path, modality, max_voxels)


def _read_dicom(path: Path, modality: str | None, max_voxels: int | None = None) -> Volume:
    ds, truncated = dcmread(path)
    require_pixels(ds, path, truncated)
    check_voxels(
        tuple(
            int(ds.get(tag, 1) or 1)
            for tag in ("NumberOfFrames", "Rows", "Columns", "SamplesPerPixel")
        ),
        max_voxels,
        path,
    )
    mod, mod_source = resolve_modality({str(ds.get("Modality", "") or "")}, modality, path)
    data = decode(ds, path)

    iop_v = _lookup(ds, "ImageOrientationPatient", "PlaneOrientationSequence")
    ipp_v = _lookup(ds, "ImagePositionPatient", "PlanePositionSequence")
    ps_v = _lookup(ds, "PixelSpacing", "PixelMeasuresSequence")
    pixel_spacing = (
        floats(ps_v, 2, "PixelSpacing", path, positive=True) if ps_v is not None else np.ones(2)
    )
    thickness = _lookup(ds, "SpacingBetweenSlices", "PixelMeasuresSequence") or _lookup(
        ds, "SliceThickness", "PixelMeasuresSequence"
    )
    dz = float(thickness) if thickness else 1.0
    if iop_v is not None and ipp_v is not None:
        iop = floats(iop_v, 6, "ImageOrientationPatient", path)
        origin = floats(ipp_v, 3, "ImagePositionPatient", path)
        slice_vec = normal_of(iop, path) * dz
        frames = ds.get("PerFrameFunctionalGroupsSequence")
        if frames and len(frames) > 1 and frames[1].get("PlanePositionSequence"):
            second = frames[1].PlanePositionSequence[0].get("ImagePositionPatient")
            slice_vec = floats(second, 3, "ImagePositionPatient", path) - origin
        geometry = "tags"
    else:
        # No geometry: assume the standard axial display (rows → P, cols → L).
        iop = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
        origin, slice_vec = np.zeros(3), np.array([0.0, 0.0, dz])
        geometry = "assumed"
    affine = geometry_affine(origin, iop, pixel_spacing, slice_vec)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise RadGrounderError("frame positions coincide; cannot build a geometry", path=path)
    meta = common_metadata(ds)
    meta.update(
        modality_source=mod_source,
        modality_tag=str(ds.get("Modality", "")) or None,
        geometry=geometry,
        n_frames=data.shape[0],
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")) or None,
    )
    return Volume(
        data=data,
        affine=affine,
        spacing=spacing_from_affine(affine),
        modality=mod,
        source=str(path),
        kind="dicom-file",
        orientation=axcodes(affine),
        source_orientation=axcodes(affine[:, [2, 1, 0, 3]]),
        metadata=meta,
    )
