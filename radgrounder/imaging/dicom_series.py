"""DICOM series: every image of one series in a folder, sorted by position, canonical SPL."""

from __future__ import annotations

import os
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from radgrounder.errors import RadGrounderError
from radgrounder.imaging.dicom import (
    DICOMDIR_SOP_CLASS,
    common_metadata,
    dcmread,
    decode,
    floats,
    geometry_affine,
    has_dicm_prefix,
    has_pixels,
    malformed_tags,
    normal_of,
    require_pixels,
    resolve_modality,
    sop_class,
    transfer_syntax,
)
from radgrounder.imaging.volume import (
    PathType,
    Volume,
    axcodes,
    check_voxels,
    spacing_from_affine,
    to_canonical,
)


class SeveralSeries(RadGrounderError):
    """A folder read without ``series_uid`` holds more than one series."""


def _files(folder: Path) -> list[Path]:
    """Every file under ``folder``, nested exports (PATIENT/STUDY/SERIES, DICOMDIR trees)
    included, in a stable order; links to folders are not followed."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        out += [Path(root) / n for n in sorted(names)]
    return out


def _relative(p: Path, folder: Path) -> str:
    return str(p.relative_to(folder)) if p.is_relative_to(folder) else p.name


def _headerless_dicom(p: Path) -> Dataset | None:
    """A DICOM image stored without the 128-byte preamble and ``DICM`` (common in old
    exports): read by force, kept if it carries image pixel attributes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom guessing at a file that is no DICOM
            ds = pydicom.dcmread(p, force=True, defer_size=4096)
    except Exception:
        return None
    needed = ("SOPInstanceUID", "Rows", "Columns", "ImagePositionPatient")
    return ds if all(k in ds for k in needed) and has_pixels(ds) else None


def _scan_folder(folder: Path) -> tuple[dict[str, list[tuple[Path, Dataset]]], list[str]]:
    """Image datasets grouped by SeriesInstanceUID, plus the (relative) names of skipped
    files, for ``folder`` and every folder below it."""
    return _scan_files(_files(folder), folder)


def _scan_files(
    files: list[Path], folder: Path
) -> tuple[dict[str, list[tuple[Path, Dataset]]], list[str]]:
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    skipped: list[str] = []
    for p in files:
        if not has_dicm_prefix(p):
            ds = _headerless_dicom(p)
            if ds is None:
                skipped.append(_relative(p, folder))
            else:
                groups[str(ds.get("SeriesInstanceUID", "") or "")].append((p, ds))
            continue
        # Defer the pixel bytes: only the chosen series is decoded later.
        ds, truncated = dcmread(p, defer_size=4096)
        if not has_pixels(ds):
            sop = sop_class(ds)
            if str(sop) == DICOMDIR_SOP_CLASS or "Image Storage" not in sop.name:
                skipped.append(_relative(p, folder))  # DICOMDIR, SR, presentation states
                continue
            require_pixels(ds, p, truncated)
        groups[str(ds.get("SeriesInstanceUID", "") or "")].append((p, ds))
    return groups, skipped


def _member_position(
    p: Path,
    ds: Dataset,
    first_path: Path,
    iop: np.ndarray,
    ps: np.ndarray,
    shape: tuple[int, int],
) -> float:
    """Check one series member against the first file; its position along the slice normal."""
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise RadGrounderError("multi-frame file inside a series folder; read it alone", path=p)
    this_iop = floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", p)
    if not np.allclose(this_iop, iop, atol=1e-3):
        raise RadGrounderError(
            f"ImageOrientationPatient {this_iop.tolist()} differs from {first_path.name}'s "
            f"{iop.tolist()}",
            path=p,
        )
    size = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    if size != shape:
        msg = f"rows x cols {size} differ from {first_path.name}'s {shape}"
        raise RadGrounderError(msg, path=p)
    if not np.allclose(
        floats(ds.get("PixelSpacing"), 2, "PixelSpacing", p, positive=True), ps, rtol=1e-4
    ):
        raise RadGrounderError(f"PixelSpacing differs from {first_path.name}'s", path=p)
    ipp = floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", p)
    return float(ipp @ normal_of(iop, p))


def _skipped_note(skipped: list[str], shown: int = 5) -> str:
    names = ", ".join(skipped[:shown]) + (f", ... ({len(skipped) - shown} more)" if len(
        skipped) > shown else "")  # fmt: skip
    return f"{len(skipped)} file(s) in the folder are no DICOM image and were skipped: {names}"


def list_series(folder: PathType) -> list[dict[str, object]]:
    """The DICOM image series under ``folder`` (nested exports included), in the order their
    first files appear: ``series_uid``, ``n_files``, ``modality``, ``description``,
    ``series_number``, ``rows``/``columns``, ``folders`` (relative) and ``n_skipped_files``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RadGrounderError("DICOM folder not found", path=folder)
    with malformed_tags(folder):
        groups, skipped = _scan_folder(folder)
    out: list[dict[str, object]] = []
    for uid, files in groups.items():
        first = files[0][1]
        out.append(
            {
                "series_uid": uid or None,
                "n_files": len(files),
                "modality": str(first.get("Modality", "") or "") or None,
                "description": str(first.get("SeriesDescription", "") or "") or None,
                "series_number": _float_or_none(first.get("SeriesNumber")),
                "rows": int(first.get("Rows", 0) or 0),
                "columns": int(first.get("Columns", 0) or 0),
                "folders": sorted({_relative(p.parent, folder) for p, _ in files}),
                "n_skipped_files": len(skipped),
            }
        )
    return out


def read_dicom_series(
    folder: PathType,
    *,
    series_uid: str | None = None,
    modality: str | None = None,
    max_voxels: int | None = None,
) -> Volume:
    """Read every DICOM image of one series in ``folder`` into a canonical (SPL) volume
    (``max_voxels``: refuse a larger series from its headers, before decoding)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RadGrounderError("DICOM folder not found", path=folder)
    with malformed_tags(folder):
        return _read_series(folder, series_uid, modality, max_voxels)


def read_dicom_files(
    files: list[PathType],
    *,
    series_uid: str | None = None,
    modality: str | None = None,
    max_voxels: int | None = None,
) -> Volume:
    """Read one series from the DICOM files ``files`` (which may lie in several folders: an
    archive's series split over two exports); the volume's source is their common folder."""
    paths = [Path(f) for f in files]
    if not paths:
        raise RadGrounderError("read_dicom_files: no files given")
    folder = Path(os.path.commonpath([str(p.parent) for p in paths]))
    with malformed_tags(folder):
        return _read_series(folder, series_uid, modality, max_voxels, files=paths)


def _read_series(
    folder: Path,
    series_uid: str | None,
    modality: str | None,
    max_voxels: int | None = None,
    files: list[Path] | None = None,
) -> Volume:
    groups, skipped = _scan_folder(folder) if files is None else _scan_files(files, folder)
    if not groups:
        raise RadGrounderError(
            f"no DICOM image files in folder ({len(skipped)} other files skipped)", path=folder
        )
    if series_uid is not None:
        if series_uid not in groups:
            raise RadGrounderError(
                f"series {series_uid!r} not found; available: {_describe(groups)}", path=folder
            )
        uid = series_uid
    elif len(groups) > 1:
        raise SeveralSeries(
            f"folder holds {len(groups)} series; pick one with series_uid: {_describe(groups)}",
            path=folder,
        )
    else:
        uid = next(iter(groups))
    files = groups[uid]
    first_path, first = files[0]
    mod, mod_source = resolve_modality(
        {str(ds.get("Modality", "") or "") for _, ds in files}, modality, folder
    )

    iop = floats(first.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", first_path)
    ps = floats(first.get("PixelSpacing"), 2, "PixelSpacing", first_path, positive=True)
    shape = (int(first.get("Rows", 0) or 0), int(first.get("Columns", 0) or 0))
    samples = int(first.get("SamplesPerPixel", 1) or 1)
    check_voxels((len(files), *shape, samples), max_voxels, folder)
    normal = normal_of(iop, first_path)
    keys: list[float] = []
    for p, ds in files:
        with malformed_tags(p):
            keys.append(_member_position(p, ds, first_path, iop, ps, shape))

    order = np.argsort(keys, kind="stable")
    positions = np.asarray(keys)[order]
    files = [files[i] for i in order]
    diffs = np.diff(positions)
    duplicates = np.flatnonzero(diffs < 1e-4)
    if duplicates.size:
        i = int(duplicates[0])
        raise RadGrounderError(
            f"{files[i][0].name} and {files[i + 1][0].name} share slice position "
            f"{positions[i]:.4f} mm (duplicate or multi-phase series)",
            path=folder,
        )
    if len(files) > 1:
        dz = float(np.median(diffs))
        _check_regular(diffs, dz, files, folder)
    else:
        thick = first.get("SpacingBetweenSlices") or first.get("SliceThickness")
        dz = float(thick) if thick else 1.0
    slice_vec, tilt = _slice_step(files, normal, dz, folder)

    data = np.empty((len(files), *shape), dtype=np.float32)
    for i, (p, ds) in enumerate(files):
        with malformed_tags(p):
            data[i] = decode(ds, p)[0]
    origin = floats(files[0][1].ImagePositionPatient, 3, "ImagePositionPatient", files[0][0])
    affine = geometry_affine(origin, iop, ps, slice_vec)
    source_orientation = axcodes(affine[:, [2, 1, 0, 3]])
    data, affine = to_canonical(data, affine, folder)

    meta = common_metadata(first)
    syntaxes = Counter(transfer_syntax(ds).name for _, ds in files)
    meta.update(
        transfer_syntaxes=dict(syntaxes),
        modality_source=mod_source,
        modality_tag=str(first.get("Modality", "")) or None,
        n_files=len(files),
        n_skipped_files=len(skipped),
        skipped_files=skipped,
        n_series_in_folder=len(groups),
        warnings=[_skipped_note(skipped)] if skipped else [],
        slice_positions=positions.tolist(),
        irregular_spacing=False,  # irregular series are refused (_check_regular)
        gantry_tilt_deg=round(tilt, 3),
        gantry_detector_tilt_tag=_float_or_none(first.get("GantryDetectorTilt")),
    )
    return Volume(
        data=data,
        affine=affine,
        spacing=spacing_from_affine(affine),
        modality=mod,
        source=str(folder),
        kind="dicom-series",
        orientation=axcodes(affine),
        source_orientation=source_orientation,
        metadata=meta,
    )


def _tolerance(dz: float) -> float:
    return 0.01 * abs(dz) + 1e-3


def _check_regular(
    diffs: np.ndarray, dz: float, files: list[tuple[Path, Dataset]], folder: Path
) -> None:
    """Refuse a series whose slices are not evenly spaced (a missing file, a gap between two
    acquisitions): one affine cannot place them, and resampling would invent slices."""
    off = np.abs(diffs - dz)
    if not off.size or float(off.max()) <= _tolerance(dz):
        return
    i = int(np.argmax(off))
    missing = diffs[i] / dz - 1
    hint = (
        f"about {round(missing)} slice(s) missing there"
        if missing > 0.5
        else "slices closer than the rest"
    )
    raise RadGrounderError(
        f"irregular slice spacing: {_relative(files[i][0], folder)} -> "
        f"{_relative(files[i + 1][0], folder)} are {diffs[i]:.3f} mm apart, the series' "
        f"spacing is {dz:.3f} mm ({hint}); {int(np.sum(off > _tolerance(dz)))} irregular "
        "step(s) in all. radgrounder reads evenly spaced series only: export the complete "
        "series, or split it into its regular parts",
        path=folder,
    )


def _slice_step(
    files: list[tuple[Path, Dataset]], normal: np.ndarray, dz: float, folder: Path
) -> tuple[np.ndarray, float]:
    """The vector (LPS mm) from one slice origin to the next, and the gantry tilt in degrees.

    Without tilt the step is ``normal * dz``. A gantry-tilted CT moves each slice origin
    along the table, not along the slice normal: the step then has an in-plane part, and the
    affine's slice axis is that step (a sheared affine, so every voxel sits where its
    ImagePositionPatient says, with no resampling)."""
    if len(files) < 2:
        return normal * dz, 0.0
    ipp = np.array(
        [floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", p) for p, ds in files]
    )
    steps = np.diff(ipp, axis=0)
    step = (ipp[-1] - ipp[0]) / (len(files) - 1)
    worst = int(np.argmax(np.linalg.norm(steps - step, axis=1)))
    if float(np.linalg.norm(steps[worst] - step)) > _tolerance(dz):
        a, b = _relative(files[worst][0], folder), _relative(files[worst + 1][0], folder)
        raise RadGrounderError(
            f"slice origins do not advance in a straight line: {a} -> {b} steps "
            f"{np.round(steps[worst], 3).tolist()} mm, the series' mean step is "
            f"{np.round(step, 3).tolist()} mm",
            path=folder,
        )
    along = float(step @ normal)
    cos = abs(along) / max(float(np.linalg.norm(step)), 1e-12)
    tilt = float(np.degrees(np.arccos(min(1.0, cos))))
    if float(np.linalg.norm(step - along * normal)) <= _tolerance(dz):
        return normal * dz, 0.0
    return step, tilt


def _float_or_none(value: object) -> float | None:
    try:
        return None if value in (None, "") else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _describe(groups: dict[str, list[tuple[Path, Dataset]]]) -> str:
    return ", ".join(
        f"{uid or '<no SeriesInstanceUID>'} ({len(v)} files)" for uid, v in groups.items()
    )
