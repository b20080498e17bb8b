"""DICOM series: every image of one series in a folder, sorted by position, canonical SPL."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
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


def _scan_folder(folder: Path) -> tuple[dict[str, list[tuple[Path, Dataset]]], list[str]]:
    """Image datasets grouped by SeriesInstanceUID, plus the names of skipped files."""
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    skipped: list[str] = []
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        if not has_dicm_prefix(p):
            skipped.append(p.name)
            continue
        # Defer the pixel bytes: only the chosen series is decoded later.
        ds, truncated = dcmread(p, defer_size=4096)
        if not has_pixels(ds):
            sop = sop_class(ds)
            if str(sop) == DICOMDIR_SOP_CLASS or "Image Storage" not in sop.name:
                skipped.append(p.name)  # DICOMDIR, SR, presentation states, ...
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
    if not np.allclose(floats(ds.get("PixelSpacing"), 2, "PixelSpacing", p), ps, rtol=1e-4):
        raise RadGrounderError(f"PixelSpacing differs from {first_path.name}'s", path=p)
    ipp = floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", p)
    return float(ipp @ normal_of(iop, p))


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


def _read_series(
    folder: Path, series_uid: str | None, modality: str | None, max_voxels: int | None = None
) -> Volume:
    groups, skipped = _scan_folder(folder)
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
        raise RadGrounderError(
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
    ps = floats(first.get("PixelSpacing"), 2, "PixelSpacing", first_path)
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
    else:
        thick = first.get("SpacingBetweenSlices") or first.get("SliceThickness")
        dz = float(thick) if thick else 1.0

    data = np.empty((len(files), *shape), dtype=np.float32)
    for i, (p, ds) in enumerate(files):
        with malformed_tags(p):
            data[i] = decode(ds, p)[0]
    origin = floats(files[0][1].ImagePositionPatient, 3, "ImagePositionPatient", files[0][0])
    affine = geometry_affine(origin, iop, ps, normal * dz)
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
        slice_positions=positions.tolist(),
        irregular_spacing=bool(len(diffs) and np.ptp(diffs) > 0.01 * dz + 1e-3),
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


def _describe(groups: dict[str, list[tuple[Path, Dataset]]]) -> str:
    return ", ".join(
        f"{uid or '<no SeriesInstanceUID>'} ({len(v)} files)" for uid, v in groups.items()
    )
