"""Write a built dataset in the reference's RefRad2D layout (spec §5.1, §5.7).

So the reference's own loaders and scripts can read data built here::

    dicoms/<id[:2]>/<id>.dcm.zst                     zstd-compressed single-slice DICOM
    segmented_slices_v3/<id[:2]>/<id>.npy            (H, W) unified label slice
    rsopid_2_segment_v3_<ct|mr>.json                 grounding index (pixel boxes, keywords)
    refrad2d_reports.parquet                         one row per slice id: english/german dicts
    filtered_<ct|mr>_splits/snippet2rsopids_<split>_<ct|mr>_only.json
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from radgrounder.errors import RadGrounderError
from radgrounder.fileio import atomic_write_bytes, atomic_write_json
from radgrounder.labels.dataset import GroundedDataset, decode_image, decode_labels

_SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
_LANG_KEY = {"en": "english", "de": "german"}
_KEYWORD_KEY = {"en": "keywords_eng", "de": "keywords_de"}


def _uid(*parts: object) -> str:
    """A deterministic DICOM UID under the UUID-derived root 2.25."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def slice_id(scan_id: str, axis: str, index: int) -> str:
    return hashlib.sha1(f"{scan_id}/{axis}/{index}".encode()).hexdigest()


def dicom_slice_bytes(row: dict[str, Any]) -> bytes:
    """One slice as a DICOM file: pixels stored as int16, HU/intensity via rescale."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    image = decode_image(row).astype(np.float64)
    if np.all(np.mod(image, 1) == 0) and image.min() >= -32768 and image.max() <= 32767:
        slope, intercept = 1.0, 0.0
    else:
        lo, hi = float(image.min()), float(image.max())
        intercept, slope = lo, max(hi - lo, 1e-6) / 65535.0
    stored = np.round((image - intercept) / slope - (32768 if slope != 1.0 else 0)).astype("<i2")
    if slope != 1.0:
        intercept += 32768 * slope
    modality = row["modality"]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _SOP_CLASS[modality]
    sop_uid = _uid(row["scan_id"], row["slice_axis"], row["slice_index"])
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _uid("radgrounder")
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = _SOP_CLASS[modality], sop_uid
    ds.Modality = modality
    ds.StudyInstanceUID = _uid(row["scan_id"], "study")
    ds.SeriesInstanceUID = _uid(row["scan_id"], row["slice_axis"], "series")
    ds.PatientID = row["scan_id"][:64]
    ds.InstanceNumber = int(row["slice_index"]) + 1
    ds.ImagePositionPatient = [float(v) for v in row["image_position"]]
    ds.ImageOrientationPatient = [float(v) for v in row["image_orientation"]]
    ds.PixelSpacing = [float(v) for v in row["pixel_spacing"]]
    ds.Rows, ds.Columns = int(row["height"]), int(row["width"])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
    ds.PixelData = stored.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def export_refrad2d(dataset_dir: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Export a built dataset to the RefRad2D layout; returns counts per modality."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    ds = GroundedDataset(Path(dataset_dir))
    out = Path(out_dir)
    compressor = zstandard.ZstdCompressor(level=3)
    index: dict[str, dict[str, Any]] = {"ct": {}, "mr": {}}
    reports: list[dict[str, Any]] = []
    splits: dict[tuple[str, str], dict[str, list[str]]] = {}
    by_slice: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for sample in ds.samples():
        by_slice.setdefault((sample["scan_id"], sample["slice_index"]), []).append(sample)
    for row in ds.slices():
        mod = row["modality"].lower()
        if mod not in index:
            raise RadGrounderError(f"scan {row['scan_id']!r}: modality {row['modality']!r}")
        sid = slice_id(row["scan_id"], row["slice_axis"], row["slice_index"])
        atomic_write_bytes(
            out / "dicoms" / sid[:2] / f"{sid}.dcm.zst", compressor.compress(dicom_slice_bytes(row))
        )
        mask_path = out / "segmented_slices_v3" / sid[:2] / f"{sid}.npy"
        buf = io.BytesIO()
        np.save(buf, decode_labels(row).astype(np.int64), allow_pickle=False)
        atomic_write_bytes(mask_path, buf.getvalue())
        regions = json.loads(row["regions"])
        entry: dict[str, Any] = {
            "scan_rserid": row["scan_id"],
            "scan_file": row["scan_id"],
            "slice_axis": {"axial": 2, "coronal": 1, "sagittal": 0}[row["slice_axis"]],
            "slice_idx": row["slice_index"],
            "segment_scan_path": row["scan_id"],
            "segment_slice_path": str(mask_path.relative_to(out)),
            "keywords_eng": [],
            "keywords_de": [],
            "bboxes": [[*regions["boxes"][c], int(c)] for c in sorted(regions["boxes"], key=int)],
        }
        langs: dict[str, dict[str, Any]] = {}
        for s in by_slice.get((row["scan_id"], row["slice_index"]), []):
            lang = langs.setdefault(
                s["language"],
                {
                    "dicom_vqa": [],
                    "snippet_vqa": [],
                    "CleanedSentence": "",
                    "ReportKlinischeAngabenCleaned": "",
                    "ReportFragestellungCleaned": "",
                },
            )
            if s["task"] == "grounded-report":
                lang["CleanedSentence"] = s["text"]
                lang["ReportKlinischeAngabenCleaned"] = s["clinical_info"] or ""
                lang["ReportFragestellungCleaned"] = s["clinical_question"] or ""
                keywords = {
                    (sp["label"], sp["class_name"], sp["class_id"]) for sp in json.loads(s["spans"])
                }
                entry[_KEYWORD_KEY[s["language"]]] = [
                    list(k) for k in sorted(keywords, key=lambda k: (len(k[0]), k))
                ]
            elif s["task"] == "vqa":
                lang["dicom_vqa"].append(
                    {
                        "question": s["question"],
                        "answer": s["text"],
                        "question_type": s["question_type"],
                        "choices": [],
                    }
                )
        index[mod][sid] = entry
        reports.append(
            {
                "rsopid": sid,
                "modality": row["modality"],
                "body_part": "",
                "english": langs.get("en"),
                "german": langs.get("de"),
            }
        )
        snippet = (langs.get("de") or langs.get("en") or {}).get("CleanedSentence")
        if snippet:
            bucket = splits.setdefault((mod, row["split"]), {})
            bucket.setdefault(snippet, []).append(sid)
    for mod, entries in index.items():
        if entries:
            atomic_write_json(out / f"rsopid_2_segment_v3_{mod}.json", entries)
    for (mod, split), mapping in splits.items():
        atomic_write_json(
            out / f"filtered_{mod}_splits" / f"snippet2rsopids_{split}_{mod}_only.json", mapping
        )
    table = pa.Table.from_pylist(sorted(reports, key=lambda r: r["rsopid"]))
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(out / "refrad2d_reports.parquet", sink.getvalue())
    return {mod: len(entries) for mod, entries in index.items()}
