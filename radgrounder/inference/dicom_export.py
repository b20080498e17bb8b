"""Grounded model output as DICOM: a SEG for masks, a TID 1500 SR for boxes.

Both objects reference the source series the canonical :class:`Volume` was read from, so a
PACS viewer shows them on top of the original images.

Coordinates:

* Canonical space is the volume's ``(slice, row, col)`` grid (SPL: inferior→superior,
  anterior→posterior, patient right→left); ``volume.affine`` maps voxel centres to RAS mm.
* Source space is ``(instance, row, col)`` with the series' images sorted by position along
  their slice normal, as :func:`radgrounder.imaging.read_dicom_series` sorts them; each image's
  pixel ``(row, col)`` centre lies at ``IPP + col·ΔC·IOP[:3] + row·ΔR·IOP[3:]`` (LPS mm, with
  ``PixelSpacing = (ΔR, ΔC)``).
* The two grids differ only by an axis permutation and flips. That map is derived from the
  headers (``inv(volume.affine) @ source_affine`` must be a signed permutation with integer
  offsets), so masks are copied voxel for voxel, never resampled.
* Boxes ``(x1, y1, x2, y2)`` are pixel edges in a canonical slice: pixel ``(row, col)`` covers
  ``[col, col+1) × [row, row+1)`` and ``x2``/``y2`` are exclusive. SR SCOORDs use DICOM image
  coordinates, ``(column, row)`` with ``(0, 0)`` the top-left corner of the top-left pixel
  (pixel centres at ``+0.5``), so box edges map to SCOORD points without any half-pixel shift.

Anonymised series often lack SOPClassUID/SOPInstanceUID (taken from the file meta then) and
Study/Series/FrameOfReference UIDs; missing UIDs are replaced by deterministic ones derived
from the instance UIDs (same values for the SEG and the SR) and a :class:`DicomExportWarning`
names them.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from radgrounder import __version__
from radgrounder.errors import RadGrounderError
from radgrounder.fileio import atomic_write_bytes
from radgrounder.imaging.dicom import dcmread, floats, geometry_affine, has_dicm_prefix, normal_of
from radgrounder.imaging.volume import Volume

SEG_SERIES_NUMBER = 900
SR_SERIES_NUMBER = 901
# TID 1500 row 12 container; the code is not in pydicom's dictionary (PS3.16 TID 1500).
_QUALITATIVE_EVALUATIONS = ("C0034375", "UMLS", "Qualitative Evaluations")
_LO_MAX = 64  # DICOM LO value length

# Unified anatomy name stem (laterality and numbering removed) → pydicom ``codes.SCT`` keyword.
_SCT_KEYWORDS = {
    "spleen": "Spleen", "kidney": "Kidney", "gallbladder": "Gallbladder", "liver": "Liver",
    "stomach": "Stomach", "pancreas": "Pancreas", "adrenal_gland": "AdrenalGland",
    "lung_upper_lobe": "UpperLobeOfLung", "lung_lower_lobe": "LowerLobeOfLung",
    "lung_middle_lobe": "MiddleLobeOfRightLung", "esophagus": "Esophagus",
    "trachea": "Trachea", "thyroid_gland": "Thyroid", "small_bowel": "SmallIntestine",
    "duodenum": "Duodenum", "colon": "Colon", "urinary_bladder": "Bladder",
    "prostate": "Prostate", "sacrum": "Sacrum", "heart": "Heart", "aorta": "Aorta",
    "pulmonary_vein": "PulmonaryVein", "brachiocephalic_trunk": "BrachiocephalicTrunk",
    "subclavian_artery": "SubclavianArtery", "common_carotid_artery": "CommonCarotidArtery",
    "brachiocephalic_vein": "BrachiocephalicVein", "atrial_appendage": "LeftAuricularAppendage",
    "superior_vena_cava": "SuperiorVenaCava", "inferior_vena_cava": "InferiorVenaCava",
    "iliac_artery": "IliacArtery", "iliac_vena": "IliacVein", "humerus": "Humerus",
    "scapula": "Scapula", "clavicula": "Clavicle", "femur": "Femur",
    "spinal_cord": "SpinalCord", "autochthon": "ErectorSpinaeMuscle", "brain": "Brain",
    "skull": "Skull", "rib": "Rib", "sternum": "Sternum", "costal_cartilages": "CostalCartilage",
    "lung": "Lung", "vertebrae": "Vertebra",
}  # fmt: skip
_ABNORMAL = {"kidney_cyst": ("Cyst", "Kidney")}  # stem → (morphology keyword, site keyword)


class DicomExportWarning(UserWarning):
    """Something was dropped or substituted while exporting (empty segment or box, missing
    UID); ``dropped`` counts the segments or boxes left out."""

    def __init__(self, message: str, dropped: int = 0) -> None:
        super().__init__(message)
        self.dropped = dropped


@dataclass
class Segment3D:
    """One mask: bool array of the canonical volume's shape ``(slices, rows, cols)``."""

    label: str
    mask: np.ndarray
    class_id: int | None = None
    class_name: str | None = None


@dataclass
class Finding:
    """One box ``(x1, y1, x2, y2)`` on canonical slice ``slice_index``.

    ``x`` runs along columns, ``y`` along rows, in pixel-edge units of the canonical slice
    (pixel ``(row, col)`` spans ``[col, col+1) × [row, row+1)``; ``x2``/``y2`` exclusive).
    """

    label: str
    slice_index: int
    box_px: tuple[float, float, float, float]
    class_id: int | None = None
    class_name: str | None = None


@dataclass
class _Anatomy:
    code: Any | None  # the structure (anatomical) or the morphology (abnormal classes)
    laterality: Any | None
    site: Any | None  # for abnormal classes: where it is
    name: str | None


@dataclass
class _Series:
    """Source images sorted like the reader, and the source→canonical axis map."""

    datasets: list[Dataset]
    perm: tuple[int, int, int]  # canonical axis of source axis (instance, row, col)
    flip: tuple[bool, bool, bool]  # whether that source axis runs against the canonical one
    canonical_shape: tuple[int, int, int]

    def to_source(self, mask: np.ndarray) -> np.ndarray:
        """Canonical ``(slice, row, col)`` array → source ``(instance, row, col)`` array."""
        out = np.transpose(mask, self.perm)
        for axis, flipped in enumerate(self.flip):
            if flipped:
                out = np.flip(out, axis)
        return np.ascontiguousarray(out)

    def _edge(self, source_axis: int, canonical_coords: dict[int, float]) -> float:
        p = self.perm[source_axis]
        q = canonical_coords[p]
        return self.canonical_shape[p] - q if self.flip[source_axis] else q

    def box_to_source(self, k: int, box: Sequence[float]) -> tuple[Dataset, np.ndarray]:
        """Canonical slice + box edges → source image and closed polyline ``(column, row)``."""
        if self.perm[0] != 0:
            raise RadGrounderError(
                "the source images are not axial; a box on a canonical slice does not lie in "
                "one source image"
            )
        index = self.canonical_shape[0] - 1 - k if self.flip[0] else k
        x1, y1, x2, y2 = box
        corners = [(x1, y1), (x2, y1), (x2, y2), (x1, y2), (x1, y1)]
        points = [(self._edge(2, {1: y, 2: x}), self._edge(1, {1: y, 2: x})) for x, y in corners]
        return self.datasets[index], np.asarray(points, dtype=np.float64)


def _highdicom() -> Any:
    try:
        import highdicom
    except ImportError as exc:
        raise RadGrounderError(
            "DICOM SEG/SR export needs highdicom: pip install 'radgrounder[dicom]'"
        ) from exc
    return highdicom


def _lo(text: str) -> str:
    """A valid LO value: no backslash or control characters, at most 64 characters."""
    clean = re.sub(r"[\x00-\x1f\\]", " ", text).strip()
    return clean[:_LO_MAX] or "unnamed"


def _anatomy(class_id: int | None, class_name: str | None) -> _Anatomy:
    """SNOMED CT codes (from pydicom's dictionary) for a unified anatomy class, if known."""
    name = class_name
    if name is None and class_id is not None:
        from radgrounder.anatomy import load_schema

        name = load_schema().by_id(int(class_id)).name
    if name is None:
        return _Anatomy(None, None, None, None)
    parts = name.split("_")
    side = next((p for p in parts if p in ("left", "right")), None)
    stem = "_".join(p for p in parts if p not in ("left", "right") and not p.isdigit())
    lat = {"left": codes.SCT.Left, "right": codes.SCT.Right}.get(side or "")
    if stem in _ABNORMAL:
        morph, site = _ABNORMAL[stem]
        return _Anatomy(getattr(codes.SCT, morph), lat, getattr(codes.SCT, site), name)
    level = re.fullmatch(r"vertebrae_([CTLS]\d+)", stem)
    keyword = _SCT_KEYWORDS.get(stem)
    if level and f"{level.group(1)}Vertebra" in codes.SCT:
        keyword = f"{level.group(1)}Vertebra"
    elif level:
        keyword = "Vertebra"
    if stem == "atrial_appendage":
        lat = None  # the code itself is the left auricular appendage
    code = getattr(codes.SCT, keyword) if keyword else None
    return _Anatomy(code, lat if code is not None else None, None, name)


def _read_series(series_dir: str | Path, volume: Volume) -> _Series:
    """Read the folder's images, check they are the volume's series, derive the axis map."""
    folder = Path(series_dir)
    if not folder.is_dir():
        raise RadGrounderError("DICOM series folder not found", path=folder)
    if volume.data.ndim != 3:
        raise RadGrounderError(f"expected a 3D volume, got shape {volume.shape}", path=folder)
    from radgrounder.imaging.dicom_series import _files

    groups: dict[str, list[Dataset]] = {}
    for p in _files(folder):  # nested exports too, as the series reader
        if has_dicm_prefix(p):
            ds, _ = dcmread(p, defer_size=4096)
            if "PixelData" in ds:
                groups.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append(ds)
    want = volume.metadata.get("series_uid")
    if want and want in groups:
        datasets = groups[want]
    elif len(groups) == 1 and not want:
        datasets = next(iter(groups.values()))
    else:
        raise RadGrounderError(
            f"not the series the volume was read from: folder holds {len(groups)} image "
            f"series, none with the volume's SeriesInstanceUID {want!r}",
            path=folder,
        )
    try:
        return _match_geometry(datasets, volume, folder)
    except (AttributeError, TypeError, ValueError) as exc:
        raise RadGrounderError(f"malformed image geometry: {exc}", path=folder) from exc


def _match_geometry(datasets: list[Dataset], volume: Volume, folder: Path) -> _Series:
    first = datasets[0]
    iop = floats(first.ImageOrientationPatient, 6, "ImageOrientationPatient", folder)
    ps = floats(first.PixelSpacing, 2, "PixelSpacing", folder)
    normal = normal_of(iop, folder)
    for ds in datasets:
        if not np.allclose(floats(ds.ImageOrientationPatient, 6, "IOP", folder), iop, atol=1e-3):
            raise RadGrounderError("images differ in ImageOrientationPatient", path=folder)
    pos = [float(floats(ds.ImagePositionPatient, 3, "IPP", folder) @ normal) for ds in datasets]
    order = np.argsort(pos, kind="stable")
    datasets = [datasets[i] for i in order]
    positions = np.asarray(pos)[order]
    if len(datasets) > 1:
        dz = float(np.median(np.diff(positions)))
    else:
        dz = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    from radgrounder.imaging.dicom_series import _slice_step

    origin = floats(datasets[0].ImagePositionPatient, 3, "ImagePositionPatient", folder)
    src_shape = (len(datasets), int(first.Rows), int(first.Columns))
    # The reader's slice step: normal * dz, or the sheared step of a gantry-tilted series.
    step, _ = _slice_step([(Path(str(ds.filename)), ds) for ds in datasets], normal, dz, folder)
    t = np.linalg.inv(volume.affine) @ geometry_affine(origin, iop, ps, step)
    rot = np.rint(t[:3, :3])
    perm = tuple(int(i) for i in np.argmax(np.abs(rot), axis=0))
    ok = np.allclose(t[:3, :3], rot, atol=1e-3) and sorted(perm) == [0, 1, 2]
    ok = ok and bool(np.all(np.abs(rot).sum(axis=0) == 1))
    flip = tuple(bool(rot[perm[a], a] < 0) for a in range(3))
    mapped = [0, 0, 0]
    for a in range(3):
        mapped[perm[a]] = src_shape[a]
    if ok and tuple(mapped) == volume.shape:
        offsets = [t[perm[a], 3] - ((src_shape[a] - 1) if flip[a] else 0) for a in range(3)]
        ok = bool(np.allclose(offsets, 0.0, atol=1e-2))
    ref = volume.metadata.get("slice_positions")
    if ok and ref is not None and len(ref) == len(positions):
        ok = bool(np.allclose(ref, positions, atol=1e-3))
    if not ok or tuple(mapped) != volume.shape:
        raise RadGrounderError(
            f"not the series the volume was read from: {src_shape[0]} images of "
            f"{src_shape[1]}x{src_shape[2]} px do not map onto the volume's grid "
            f"{volume.shape} (slices, rows, cols)",
            path=folder,
        )
    _fill_uids(datasets)
    return _Series(datasets, perm, flip, volume.shape)  # type: ignore[arg-type]


def _fill_uids(datasets: list[Dataset]) -> None:
    """Fill UIDs anonymisation blanked: SOP ones from the file meta, others derived."""
    for ds in datasets:
        meta = ds.get("file_meta", Dataset())
        for key, meta_key in (
            ("SOPClassUID", "MediaStorageSOPClassUID"),
            ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
        ):
            if not ds.get(key):
                value = meta.get(meta_key)
                if not value:
                    raise RadGrounderError(f"a source image has no {key}")
                ds[key] = pydicom.DataElement(key, "UI", str(value))
    sop_uids = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    filled = []
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(key, "") or "") for ds in datasets}
        if values == {""}:
            uid = generate_uid(entropy_srcs=[key, *sop_uids])
            for ds in datasets:
                ds[key] = pydicom.DataElement(key, "UI", uid)
            filled.append(key)
    if filled:
        warnings.warn(
            f"source images lack {', '.join(filled)}; using UIDs derived from the instance UIDs",
            DicomExportWarning,
            stacklevel=5,
        )


def _write(ds: Dataset, out_path: str | Path) -> Path:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    out = Path(out_path)
    atomic_write_bytes(out, buf.getvalue())
    return out


def export_dicom_seg(
    series_dir: str | Path,
    volume: Volume,
    segments: Sequence[Segment3D],
    out_path: str | Path,
    *,
    algorithm_name: str = "RadGrounder",
    algorithm_version: str | None = None,
    series_description: str = "RadGrounder segmentation",
) -> Path:
    """Write a BINARY DICOM SEG with one segment per non-empty :class:`Segment3D`.

    Each canonical mask is mapped exactly onto the source images' pixel grids (see the module
    docstring). Segment label = ``label`` (LO, cut to 64 characters). Anatomical classes get
    category SCT 91723000 "Anatomical Structure" and their SNOMED CT structure as type (with
    a laterality modifier); known classes without a code use "Anatomical Structure" as type;
    abnormal classes (kidney cyst) and unclassified phrases get category SCT 49755003
    "Morphologically Abnormal Structure" and type Cyst / SCT 52988006 "Lesion". Empty masks
    are dropped with a :class:`DicomExportWarning`; all empty raises :class:`RadGrounderError`.
    """
    hd = _highdicom()
    kept: list[tuple[Segment3D, np.ndarray]] = []
    dropped: list[str] = []
    for seg in segments:
        mask = np.asarray(seg.mask)
        if mask.shape != volume.shape:
            raise RadGrounderError(
                f"segment {seg.label!r}: mask shape {mask.shape} != volume shape {volume.shape}"
            )
        if mask.dtype != bool:
            if not np.isin(mask, (0, 1)).all():
                raise RadGrounderError(f"segment {seg.label!r}: mask must be boolean or 0/1")
            mask = mask.astype(bool)
        if mask.any():
            kept.append((seg, mask))
        else:
            dropped.append(seg.label)
    if not kept:
        raise RadGrounderError(f"every segment is empty ({dropped}); nothing to export")
    if dropped:
        warnings.warn(
            DicomExportWarning(f"empty segments dropped: {dropped}", len(dropped)), stacklevel=2
        )
    series = _read_series(series_dir, volume)
    version, name = algorithm_version or __version__, _lo(algorithm_name)
    algo = hd.AlgorithmIdentificationSequence(
        name=name, family=codes.cid7162.ArtificialIntelligence, version=version
    )
    descriptions = []
    for number, (seg, _) in enumerate(kept, start=1):
        anat = _anatomy(seg.class_id, seg.class_name)
        category, ptype = codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion
        if anat.site is None and anat.name is not None:
            category = codes.SCT.AnatomicalStructure
            ptype = anat.code or codes.SCT.AnatomicalStructure
        elif anat.site is not None:
            ptype = anat.code
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=_lo(seg.label),
            segmented_property_category=category,
            segmented_property_type=ptype,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_uid=hd.UID(),
            tracking_id=seg.label,
            anatomic_regions=None if anat.site is None else [anat.site],
        )
        if anat.laterality is not None and anat.site is None:
            desc.SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept.from_code(anat.laterality)
            ]
        descriptions.append(desc)
    seg_ds = hd.seg.Segmentation(
        source_images=series.datasets,
        pixel_array=np.stack([series.to_source(mask) for _, mask in kept], axis=-1),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="RadGrounder",
        manufacturer_model_name=name,
        software_versions=version,
        device_serial_number="0",
        series_description=_lo(series_description),
        content_label="RADGROUNDER",
        specific_character_set="ISO_IR 192",
    )
    return _write(seg_ds, out_path)


def export_dicom_sr(
    series_dir: str | Path,
    volume: Volume,
    findings: Sequence[Finding],
    out_path: str | Path,
    *,
    report_text: str | None = None,
    algorithm_name: str = "RadGrounder",
    series_description: str = "RadGrounder grounded report",
) -> Path:
    """Write a Comprehensive 3D SR (TID 1500) with one planar ROI group per :class:`Finding`.

    Each box becomes a closed 5-point POLYLINE SCOORD on the source image at the finding's
    canonical slice, in that image's ``(column, row)`` coordinates (boxes are clipped to the
    slice first; a box empty after clipping, as a model's zero-height box is, is dropped with a
    :class:`DicomExportWarning`, and only when none is left is it an error).
    Tracking identifier = ``label``; finding type = the class's SNOMED CT code
    (SCT 404684003 "Finding" when no class is given), finding site = the structure with its
    laterality. ``report_text`` goes in a TEXT item (121070, DCM, "Findings") inside TID 1500's
    (C0034375, UMLS, "Qualitative Evaluations") container, the template's place for free text.
    """
    hd = _highdicom()
    if not findings:
        raise RadGrounderError("no findings to export")
    n_slices, rows, cols = volume.shape[:3]
    boxes, kept, dropped = [], [], []
    for f in findings:
        k = f.slice_index
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= k < n_slices:
            raise RadGrounderError(
                f"finding {f.label!r}: slice index {k!r} not in 0..{n_slices - 1}"
            )
        box = np.asarray(f.box_px, dtype=np.float64)
        if box.shape != (4,) or not np.isfinite(box).all():
            raise RadGrounderError(f"finding {f.label!r}: box must be 4 finite numbers")
        box = np.clip(box, 0.0, [cols, rows, cols, rows])
        if box[2] <= box[0] or box[3] <= box[1]:  # zero width/height, or outside the slice
            dropped.append(
                f"{f.label!r} on slice {k} {tuple(round(float(v), 1) for v in f.box_px)}"
            )
            continue
        boxes.append(box.tolist())
        kept.append(f)
    if dropped:
        if not kept:
            raise RadGrounderError(
                f"all {len(dropped)} box(es) are empty in their slice (zero width or height, or "
                f"outside the image, after clipping): nothing to export ({', '.join(dropped[:3])}"
                + (", ..." if len(dropped) > 3 else "")
                + ")"
            )
        more = f", ... ({len(dropped) - 5} more)" if len(dropped) > 5 else ""
        warnings.warn(
            DicomExportWarning(
                f"{len(dropped)} box(es) empty in their slice dropped: "
                f"{', '.join(dropped[:5])}{more}",
                len(dropped),
            ),
            stacklevel=2,
        )
    findings = kept
    series, name = _read_series(series_dir, volume), _lo(algorithm_name)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=name
        ),
    )
    groups, evidence = [], {}
    for f, box in zip(findings, boxes, strict=True):
        image, points = series.box_to_source(int(f.slice_index), box)
        evidence[str(image.SOPInstanceUID)] = image
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=points,
            source_image=hd.sr.SourceImageForRegion.from_source_image(image),
        )
        anat = _anatomy(f.class_id, f.class_name)
        site = anat.site or anat.code
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f.label),
                referenced_region=region,
                finding_type=anat.code or codes.SCT.Finding,
                algorithm_id=hd.sr.AlgorithmIdentification(name=name, version=__version__),
                finding_sites=[hd.sr.FindingSite(site, laterality=anat.laterality)]
                if site is not None
                else None,
            )
        )
    mr = (volume.modality or "").upper() == "MR"
    procedure = getattr(codes.cid100, f"{'MRI' if mr else 'CT'}UnspecifiedBodyRegion")
    images = list(evidence.values())
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=procedure,
        imaging_measurements=groups,
        referenced_images=images,
    )
    if report_text:
        container = hd.sr.ContainerContentItem(
            name=hd.sr.CodedConcept(*_QUALITATIVE_EVALUATIONS), relationship_type="CONTAINS"
        )
        container.ContentSequence = [
            hd.sr.TextContentItem(
                name=codes.DCM.Findings, value=report_text, relationship_type="CONTAINS"
            )
        ]
        report[0].ContentSequence.append(container)
    sr = hd.sr.Comprehensive3DSR(
        evidence=images,
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="RadGrounder",
        is_complete=True,
        series_description=_lo(series_description),
        specific_character_set="ISO_IR 192",
    )
    return _write(sr, out_path)
