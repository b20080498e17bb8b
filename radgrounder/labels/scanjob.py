"""Build one scan's slices and samples: the unit of work, resume and parallelism."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radgrounder.anatomy import totalseg_to_unified
from radgrounder.errors import RadGrounderError
from radgrounder.fileio import atomic_write_json, sha256_file, stable_int
from radgrounder.grounding import GroundedText, codec
from radgrounder.imaging import Volume, list_series, load_scan, read_label_map
from radgrounder.imaging.dicom_series import SeveralSeries
from radgrounder.labels.dataset import SAMPLE_SCHEMA, SLICE_SCHEMA, spans_to_json, write_table
from radgrounder.labels.regions import (
    extract_regions,
    slice_geometry,
    slices_along,
    unify_label_volume,
)
from radgrounder.labels.targets import SentenceMentions, grounded_report, vqa_items


@dataclass
class ScanJob:
    """Everything one worker needs; plain data so it pickles to any process or Ray node."""

    scan_id: str
    scan_path: str
    label_path: str
    split: str
    out_dir: str
    reports: dict[str, dict[str, Any]]  # language -> {clinical_info, clinical_question, sentences}
    config: dict[str, Any]
    fingerprint: str  # inputs + config; a marker with another fingerprint is stale
    languages: tuple[str, ...] = ("en", "de")
    series_uid: str | None = None  # the series of a DICOM folder that holds several


@dataclass
class ScanResult:
    scan_id: str
    ok: bool
    skipped: bool = False
    error: str | None = None
    counts: dict[str, Any] = field(default_factory=dict)


def marker_path(out_dir: str | Path, scan_id: str) -> Path:
    return Path(out_dir) / "state" / "scans" / f"{scan_id}.json"


def _targets(grounded: GroundedText, seg_ids: list[list[int]]) -> dict[str, str]:
    return {
        "spans": spans_to_json(grounded),
        "target_detect": codec("radgrounder-detect").encode(grounded),
        "target_segment": codec("radgrounder-segment").encode(grounded),
        "mask_class_ids": json.dumps(seg_ids),
    }


def _sample(
    job: ScanJob,
    modality: str,
    k: int,
    lang: str,
    task: str,
    n: int,
    grounded: GroundedText,
    **extra: Any,
) -> dict[str, Any]:
    seg_ids = [s.meta.get("class_ids", [s.class_id]) for s in grounded.spans]
    row = {
        "sample_id": f"{job.scan_id}/{job.config['slice_axis']}/{k:04d}/{lang}/{task}/{n}",
        "scan_id": job.scan_id,
        "split": job.split,
        "modality": modality,
        "slice_axis": job.config["slice_axis"],
        "slice_index": k,
        "language": lang,
        "task": task,
        "question_type": None,
        "template_type": None,
        "question": None,
        "clinical_info": None,
        "clinical_question": None,
        "text": grounded.text,
        **_targets(grounded, seg_ids),
    }
    row.update(extra)
    return row


def _image_dtype(data: np.ndarray) -> np.dtype:
    finite_ints = np.all(np.mod(data, 1) == 0)
    if finite_ints and data.min() >= -32768 and data.max() <= 32767:
        return np.dtype("<i2")
    return np.dtype("<f4")


def _check_same_grid(labels: Volume, volume: Volume, label_path: str | Path) -> None:
    if labels.shape[:3] != volume.shape[:3]:
        raise RadGrounderError(
            f"label map shape {labels.shape} does not match the scan's {volume.shape}",
            path=label_path,
        )
    if not np.allclose(labels.affine, volume.affine, atol=1e-2):
        raise RadGrounderError("label map and scan have different affines", path=label_path)


def _load_matching_scan(job: ScanJob, labels: Volume) -> tuple[Volume, str]:
    """The scan of ``job`` and how its series was chosen: the job's ``series_uid``, the only
    series of the folder, or the one series whose grid equals the label map's."""
    modality = job.config.get("modality")
    path = Path(job.scan_path)
    if job.series_uid is not None or not path.is_dir():
        return load_scan(path, modality=modality, series_uid=job.series_uid), "option"
    try:  # one pass over the folder's headers in the common case of one series
        return load_scan(path, modality=modality), "only series"
    except SeveralSeries:
        series = list_series(path)
    # A label map is made from one series: the series on its grid is the one it labels.
    want = sorted(labels.shape[:3])
    matches = []
    for s in series:
        if sorted((int(s["n_files"]), int(s["rows"]), int(s["columns"]))) != want:
            continue
        volume = load_scan(path, modality=modality, series_uid=s["series_uid"] or "")
        try:
            _check_same_grid(labels, volume, job.label_path)
        except RadGrounderError:
            continue
        matches.append(volume)
    if len(matches) == 1:
        return matches[0], "label map grid"
    uids = ", ".join(str(s["series_uid"] or "<no SeriesInstanceUID>") for s in series)
    why = "none is on the label map's grid" if not matches else "several are on its grid"
    raise RadGrounderError(
        f"folder holds {len(series)} series and {why}; pick one with "
        f"--series-uid {job.scan_id}=UID (series: {uids})",
        path=path,
    )


def build_scan(job: ScanJob) -> ScanResult:
    """Write ``slices/<split>/<id>.parquet`` and ``samples/<split>/<id>.parquet``, then the
    completion marker. Never raises for bad input: the error goes into the result."""
    try:
        return _build(job)
    except RadGrounderError as exc:
        return ScanResult(job.scan_id, False, error=str(exc))
    except Exception as exc:  # a broken file must not stop the other scans
        return ScanResult(job.scan_id, False, error=f"{type(exc).__name__}: {exc}")


def _build(job: ScanJob) -> ScanResult:
    out = Path(job.out_dir)
    marker = marker_path(out, job.scan_id)
    if marker.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        if done.get("fingerprint") == job.fingerprint:
            return ScanResult(job.scan_id, True, skipped=True, counts=done["counts"])
    cfg = job.config
    labels = read_label_map(job.label_path)
    volume, selected_by = _load_matching_scan(job, labels)
    _check_same_grid(labels, volume, job.label_path)
    label_names = labels.metadata.get("label_names")
    task = cfg.get("label_task") or ("total_mr" if volume.modality == "MR" else "total")
    dropped: dict[int, int] = {}
    unified = unify_label_volume(labels, label_task=task, dropped=dropped)
    notes = list(volume.metadata.get("warnings") or [])
    if dropped:
        names = label_names or {}
        listed = ", ".join(
            f"{i}" + (f" ({names[i]})" if i in names else "") + f": {n} voxels"
            for i, n in sorted(dropped.items())[:8]
        )
        notes.append(
            f"{len(dropped)} label id(s) of the label map are not in the {task} schema and were "
            f"dropped: {listed}" + (" ..." if len(dropped) > 8 else "")
        )
    candidates = sorted(set(totalseg_to_unified(task, label_names=label_names).values()))
    axis = cfg["slice_axis"]
    images = slices_along(volume.data, axis)
    dtype = _image_dtype(volume.data)
    spacing = list(volume.spacing)
    rows_spacing = {0: spacing[1:], 1: [spacing[0], spacing[2]], 2: [spacing[0], spacing[1]]}
    pixel_spacing = rows_spacing[{"axial": 0, "coronal": 1, "sagittal": 2}[axis]]
    label_stack = slices_along(unified, axis)
    geometry = slice_geometry(volume.affine, volume.shape[:3], axis)

    slice_rows, sample_rows = [], []
    counts: dict[str, Any] = {
        "slices": 0,
        "tasks": {},
        "languages": {},
        "classes": {},
        "dropped_label_ids": {str(i): n for i, n in sorted(dropped.items())},
        "warnings": notes,
    }
    if volume.kind == "dicom-series":
        counts.update(series_uid=volume.metadata.get("series_uid"), series_selected_by=selected_by)
    for regions in extract_regions(
        unified, axis=axis, instances=True, min_area=cfg.get("min_area", 0)
    ):
        if not regions.boxes:
            continue
        k = regions.index
        image = np.ascontiguousarray(images[k]).astype(dtype)
        slice_rows.append(
            {
                "scan_id": job.scan_id,
                "split": job.split,
                "modality": volume.modality,
                "slice_axis": axis,
                "slice_index": k,
                "height": image.shape[0],
                "width": image.shape[1],
                "pixel_spacing": [float(v) for v in pixel_spacing],
                "image_position": geometry[k][0],
                "image_orientation": geometry[k][1],
                "image_dtype": dtype.str,
                "image": image.tobytes(),
                "labels": np.ascontiguousarray(label_stack[k]).astype(np.uint8).tobytes(),
                "regions": json.dumps(regions.to_dict(), separators=(",", ":")),
            }
        )
        counts["slices"] += 1
        new: list[dict[str, Any]] = []
        for lang, rep in sorted(job.reports.items()):
            sentences = [SentenceMentions(s["text"], s["mentions"]) for s in rep["sentences"]]
            gt = grounded_report(sentences, regions, instances=cfg.get("instances", False))
            if gt is not None:
                new.append(
                    _sample(
                        job,
                        volume.modality,
                        k,
                        lang,
                        "grounded-report",
                        0,
                        gt,
                        question_type="report",
                        clinical_info=rep.get("clinical_info") or None,
                        clinical_question=rep.get("clinical_question") or None,
                    )
                )
        if cfg.get("vqa", True):
            for li, lang in enumerate(job.languages):
                rng = np.random.default_rng([cfg.get("seed", 0), stable_int(job.scan_id), k, li])
                for n, item in enumerate(vqa_items(regions, lang, rng, candidate_ids=candidates)):
                    common = {
                        "question_type": item.question_type,
                        "template_type": item.template_type,
                        "question": item.question,
                    }
                    new.append(
                        _sample(
                            job, volume.modality, k, lang, "grounded-vqa", n, item.answer, **common
                        )
                    )
                    new.append(
                        _sample(
                            job,
                            volume.modality,
                            k,
                            lang,
                            "vqa",
                            n,
                            GroundedText(item.answer.text),
                            **common,
                        )
                    )
        for row in new:
            counts["tasks"][row["task"]] = counts["tasks"].get(row["task"], 0) + 1
            counts["languages"][row["language"]] = counts["languages"].get(row["language"], 0) + 1
            for s in json.loads(row["spans"]):
                for cid in s["class_ids"]:
                    counts["classes"][str(cid)] = counts["classes"].get(str(cid), 0) + 1
        sample_rows.extend(new)

    slices_file = out / "slices" / job.split / f"{job.scan_id}.parquet"
    samples_file = out / "samples" / job.split / f"{job.scan_id}.parquet"
    write_table(slices_file, slice_rows, SLICE_SCHEMA)
    write_table(samples_file, sample_rows, SAMPLE_SCHEMA)
    counts["samples"] = len(sample_rows)
    atomic_write_json(
        marker,
        {
            "scan_id": job.scan_id,
            "split": job.split,
            "fingerprint": job.fingerprint,
            "counts": counts,
            "modality": volume.modality,
            "files": {
                "slices": sha256_file(slices_file),
                "samples": sha256_file(samples_file),
            },
        },
    )
    return ScanResult(job.scan_id, True, counts=counts)
