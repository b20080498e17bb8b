"""NIfTI reading: images, label maps and their Caret XML label names."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

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
    to_canonical,
)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Air is about -1000 HU; MR intensities are (almost) never this negative.
_CT_AIR_THRESHOLD = -500.0
# Unsigned CT saved as HU + 1024 reaches bone (> 1500 stored) somewhere in any body scan.
_UNSIGNED_CT_HIGH = 1500.0
_MAX_LABEL = np.iinfo(np.int32).max


def is_nifti_path(path: PathType) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def sidecar_path(path: PathType) -> Path:
    """BIDS sidecar next to the image: ``scan.nii.gz`` -> ``scan.json``."""
    path = Path(path)
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(name + ".json")


def sidecar_modality(path: PathType) -> tuple[str, Path] | None:
    """The ``Modality`` of a BIDS-style JSON sidecar next to a NIfTI, with the sidecar's path."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RadGrounderError(f"cannot read JSON sidecar: {reason(exc)}", path=sidecar) from exc
    if isinstance(meta, dict) and "Modality" in meta:
        return canonical_modality(meta["Modality"], sidecar, what="sidecar Modality"), sidecar
    return None


def _load(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise RadGrounderError("NIfTI file not found", path=path)
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise RadGrounderError(f"cannot read NIfTI file: {reason(exc)}", path=path) from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise RadGrounderError(f"not a NIfTI image ({type(img).__name__})", path=path)
    return img


def _spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    check_nonempty(shape, path)
    if len(shape) == 2:
        return (shape[0], shape[1], 1)
    if len(shape) < 2:
        raise RadGrounderError(f"{len(shape)}D NIfTI is not an image (shape {shape})", path=path)
    n_volumes = math.prod(shape[3:])
    if n_volumes != 1:
        raise RadGrounderError(
            f"{len(shape)}D NIfTI with {n_volumes} volumes is not supported (shape {shape})",
            path=path,
        )
    return (shape[0], shape[1], shape[2])


def _voxels(img: nib.Nifti1Image, path: Path, *, labels: bool) -> np.ndarray:
    shape = _spatial_shape(tuple(int(s) for s in img.shape), path)
    stored = np.dtype(img.get_data_dtype())
    if np.issubdtype(stored, np.complexfloating) or stored.fields is not None:
        raise RadGrounderError(
            f"voxels are stored as {stored} (complex or RGB): radgrounder reads real-valued "
            "CT/MR intensities; save the magnitude image",
            path=path,
        )
    try:
        # Label maps keep their stored integers; images go through scl_slope/scl_inter.
        data = np.asanyarray(img.dataobj) if labels else img.get_fdata(dtype=np.float32)
    except Exception as exc:
        raise RadGrounderError(
            f"cannot read voxel data (truncated or corrupt file?): {reason(exc)}", path=path
        ) from exc
    return np.asarray(data).reshape(shape)


def _canonical(img: nib.Nifti1Image, data: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise RadGrounderError("affine contains NaN/Inf", path=path)
    return to_canonical(data, affine, path)


def _base_metadata(img: nib.Nifti1Image) -> dict[str, Any]:
    header = img.header
    return {
        "on_disk_dtype": str(header.get_data_dtype()),
        "on_disk_shape": tuple(int(s) for s in img.shape),
        "sform_code": int(header["sform_code"]),
        "qform_code": int(header["qform_code"]),
    }


def _low_high(data: np.ndarray) -> tuple[float, float]:
    """The 0.5th percentile (a strided sample keeps it cheap on large volumes) and the maximum."""
    flat = data.ravel()
    if flat.size > 4_000_000:
        flat = flat[:: flat.size // 4_000_000 + 1]
    return float(np.percentile(flat, 0.5)), float(data.max())


def _unscaled_unsigned(img: nib.Nifti1Image) -> bool:
    """Unsigned integers on disk with no intercept: CT saved this way is not in HU."""
    if np.dtype(img.get_data_dtype()).kind != "u":
        return False
    inter = img.header["scl_inter"]
    slope = img.header["scl_slope"]
    return not (np.isfinite(slope) and slope != 0 and np.isfinite(inter) and inter != 0)


def _modality(
    img: nib.Nifti1Image, path: Path, data: np.ndarray, argument: str | None
) -> tuple[str, str, str | None, list[str]]:
    """(modality, modality_source, sidecar path or None, warnings)."""
    unsigned = _unscaled_unsigned(img)
    if argument is not None:
        mod = canonical_modality(argument, path)
        notes = []
        if mod == "CT" and unsigned and _low_high(data)[0] >= 0:
            notes.append(
                "CT stored as unsigned integers without scl_inter: the values start at 0, so "
                "they are not Hounsfield units (often HU + 1024) and the CT windows will be "
                "off; set scl_inter (e.g. -1024) in the header"
            )
        return mod, "argument", None, notes
    from_sidecar = sidecar_modality(path)
    if from_sidecar is not None:
        return from_sidecar[0], "sidecar", str(from_sidecar[1]), []
    low, high = _low_high(data)
    if low < _CT_AIR_THRESHOLD:
        return "CT", "inferred", None, []
    notes = []
    if unsigned and high >= _UNSIGNED_CT_HIGH:
        notes.append(
            f"modality inferred as MR (0.5th percentile {low:g} is not air in HU), but the "
            f"voxels are unsigned integers up to {high:g} without scl_inter, as CT saved as "
            "HU + 1024 would be; pass --modality CT (or a JSON sidecar with Modality) if "
            "it is CT"
        )
    return "MR", "inferred", None, notes


def read_nifti(
    path: PathType, *, modality: str | None = None, max_voxels: int | None = None
) -> Volume:
    """Read a 3D (or 2D, or 4D with one volume) NIfTI image as float32 in canonical SPL order
    (``max_voxels``: refuse a larger image from its header, before decoding)."""
    path = Path(path)
    img = _load(path)
    check_voxels(tuple(int(s) for s in img.shape), max_voxels, path)
    data = _voxels(img, path, labels=False)
    check_finite(data, path)
    mod, mod_source, sidecar, notes = _modality(img, path, data, modality)
    canon, affine = _canonical(img, data, path)
    meta = _base_metadata(img)
    meta.update(modality_source=mod_source, sidecar=sidecar, warnings=notes)
    return Volume(
        data=canon,
        affine=affine,
        spacing=spacing_from_affine(affine),
        modality=mod,
        source=str(path),
        kind="nifti",
        orientation=axcodes(affine),
        source_orientation=axcodes(img.affine),
        metadata=meta,
    )


def read_label_map(path: PathType, *, modality: str | None = None) -> Volume:
    """Read an integer NIfTI label map (int32, canonical SPL order) with its label names."""
    path = Path(path)
    img = _load(path)
    raw = _voxels(img, path, labels=True)
    if np.issubdtype(raw.dtype, np.floating):
        check_finite(raw, path)
        rounded = np.rint(raw)
        worst = float(np.abs(raw - rounded).max())
        if worst > 1e-3:
            raise RadGrounderError(
                f"label map has non-integer values (off by up to {worst:.4g})", path=path
            )
        raw = rounded
    elif not np.issubdtype(raw.dtype, np.integer) and raw.dtype != np.bool_:
        raise RadGrounderError(f"label map has unsupported data type {raw.dtype}", path=path)
    low, high = raw.min(), raw.max()
    if low < 0:
        raise RadGrounderError(f"label map has negative values (min {low})", path=path)
    if high > _MAX_LABEL:
        raise RadGrounderError(f"label value {high} does not fit in int32", path=path)
    canon, affine = _canonical(img, raw.astype(np.int32), path)
    names = _label_names(img)
    meta = _base_metadata(img)
    meta.update(
        modality_source="argument" if modality is not None else None,
        label_names=names,
        labels_present=[int(v) for v in np.unique(canon)],
    )
    return Volume(
        data=canon,
        affine=affine,
        spacing=spacing_from_affine(affine),
        modality=None if modality is None else canonical_modality(modality, path),
        source=str(path),
        kind="nifti",
        orientation=axcodes(affine),
        source_orientation=axcodes(img.affine),
        metadata=meta,
    )


def _label_names(img: nib.Nifti1Image) -> dict[int, str] | None:
    for ext in img.header.extensions:
        if ext.get_code() != 0:
            continue
        content = ext.get_content()
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
        try:
            root = ET.fromstring(text.strip().strip("\x00").strip())
        except ET.ParseError:
            continue  # code 0 is "unknown": not every such extension is Caret XML
        names: dict[int, str] = {}
        for label in root.iter("Label"):
            try:
                key = int(label.get("Key", ""))
            except ValueError:
                continue
            names[key] = (label.text or "").strip()
        if names:
            return names
    return None


def nifti_label_names(path: PathType) -> dict[int, str] | None:
    """Label id -> name from a Caret XML ``<LabelTable>`` NIfTI extension, or None."""
    path = Path(path)
    return _label_names(_load(path))
