"""``radgrounder predict``: load the input, choose slices, predict, write the results.

Outputs in the chosen folder: ``predictions.jsonl`` (one line per slice), ``overlays/``
(one PNG per slice: boxes/masks in class colours, a legend in the chosen language, the
text), ``masks/`` (one PNG per grounded mask) and, in series mode, ``series.json`` with the
3-D structures; optionally a DICOM Segmentation or Structured Report.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from radgrounder.errors import RadGrounderError
from radgrounder.fileio import atomic_write_bytes, atomic_write_json
from radgrounder.imaging import Slice, Volume, display_image, load_scan

EXPORTS = ("dicom-seg", "dicom-sr")


@dataclass
class PredictRun:
    out: Path
    n: int
    files: dict[str, Path]
    warnings: list[str] = field(default_factory=list)  # about the input (see Volume.metadata)
    export_dropped: int = 0  # boxes or segments the DICOM export left out (see the warnings)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def select_slices(volume: Volume, slice_index: int | None, all_slices: bool) -> list[int]:
    """The slices to predict: all, the given one, or the middle one."""
    if all_slices and slice_index is not None:
        raise RadGrounderError("--slice and --all-slices exclude each other")
    if all_slices:
        return list(range(volume.n_slices))
    if slice_index is None:
        return [volume.n_slices // 2]
    volume.slice(slice_index)  # raises with the valid range
    return [slice_index]


def write_predictions(
    out: Path,
    predictions: Sequence[Any],
    slices: Sequence[Slice],
    *,
    window: str = "soft_tissue",
    overlays: bool = True,
    write: Callable[[str, bytes], None] | None = None,
) -> dict[str, Path]:
    """Write ``predictions.jsonl``, overlays and mask PNGs for ``predictions`` (one per
    slice, same order); every file is written atomically (or handed to ``write`` with its
    path relative to ``out``)."""
    from radgrounder.anatomy import load_schema
    from radgrounder.visualize import render_overlay

    if write is None:

        def write(rel: str, data: bytes) -> None:
            atomic_write_bytes(out / rel, data)

    lines = []
    for pred, sl in zip(predictions, slices, strict=True):
        tag = f"slice_{pred.slice_index:04d}" if pred.slice_index is not None else "image"
        record = pred.to_dict()
        for n, span in enumerate(pred.grounded.spans):
            if span.mask is not None:
                rel = f"masks/{tag}_span{n:02d}.png"
                write(rel, _png(np.asarray(span.mask, np.uint8) * 255))
                record["spans"][n]["mask"] = rel
        if overlays:
            rel = f"overlays/{tag}.png"
            names = load_schema().display_names(pred.language)
            title = f"{Path(pred.source or '').name} {tag} - {pred.task}"
            # RGB pictures as they are; grey ones without a modality stretched like MR
            shown = display_image(sl.pixels, sl.modality, preset=window)
            pic = render_overlay(shown, pred.grounded, display_names=names,
                                 title=title)  # fmt: skip
            buf = io.BytesIO()
            pic.save(buf, format="PNG")
            write(rel, buf.getvalue())
            record["overlay"] = rel
        lines.append(json.dumps(record, ensure_ascii=False))
    write("predictions.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))
    return {"predictions": out / "predictions.jsonl"}


def model_inputs(
    volume: Volume, input_path: str | Path, indices: Sequence[int]
) -> tuple[list[Slice], list[Any]]:
    """The slices ``indices`` of ``volume`` (for the overlays) and what the model is given
    for them: the slices, or for a colour picture without a modality the file itself."""
    slices = [replace(volume.slice(k), source=str(input_path)) for k in indices]
    if volume.kind == "image" and volume.modality is None:
        return slices, [Path(input_path)]
    return slices, list(slices)


def series_summary(volume: Volume, preds: Sequence[Any]) -> dict[str, Any]:
    """``series.json``: the volume's geometry and the 3-D structures of ``preds``."""
    from radgrounder.inference.series import SeriesPrediction, aggregate_structures

    structures = aggregate_structures(preds, volume.affine)
    return SeriesPrediction(volume, list(preds), structures).to_dict()


def run_predict(
    predictor: Any,
    input_path: str | Path,
    out: str | Path,
    *,
    task: str,
    language: str = "en",
    slice_index: int | None = None,
    all_slices: bool = False,
    window: str = "soft_tissue",
    export: str | None = None,
    max_new_tokens: int = 200,
    series_uid: str | None = None,
    modality: str | None = None,
    **task_fields: Any,
) -> PredictRun:
    """Predict on a DICOM file or folder, NIfTI or PNG/JPG and write the outputs to ``out``
    (``series_uid`` picks one series of a folder that holds several; ``modality`` overrides
    the tag, sidecar or intensity inference)."""
    from radgrounder.imaging import WINDOWS

    if window not in WINDOWS:
        raise RadGrounderError(f"--window: unknown {window!r} (expected {', '.join(WINDOWS)})")
    if export is not None and export not in EXPORTS:
        raise RadGrounderError(f"--export: unknown {export!r} (expected {', '.join(EXPORTS)})")
    out = Path(out)
    volume = load_scan(input_path, series_uid=series_uid, modality=modality)
    if export and volume.kind != "dicom-series":
        raise RadGrounderError("--export needs a DICOM series folder as input", path=input_path)
    indices = select_slices(volume, slice_index, all_slices)
    slices, inputs = model_inputs(volume, input_path, indices)
    preds = predictor.predict(inputs, task, language, max_new_tokens=max_new_tokens,
                              **task_fields)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    files = write_predictions(out, preds, slices, window=window)
    if len(indices) > 1 or export:
        atomic_write_json(out / "series.json", series_summary(volume, preds))
        files["series"] = out / "series.json"
    notes = list(volume.metadata.get("warnings") or [])
    if export:
        from radgrounder.inference.dicom_export import DicomExportWarning

        variant = getattr(predictor, "variant", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DicomExportWarning)
            files[export] = _export(export, Path(input_path), volume, preds, out, variant)
        dropped = 0
        for w in caught:
            if issubclass(w.category, DicomExportWarning):
                notes.append(f"--export {export}: {w.message}")
                dropped += getattr(w.message, "dropped", 0)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return PredictRun(out, len(preds), files, notes, dropped)
    return PredictRun(out, len(preds), files, notes)


def _export(
    kind: str,
    series_dir: Path,
    volume: Volume,
    preds: Sequence[Any],
    out: Path,
    variant: str | None = None,
) -> Path:
    from radgrounder.inference import dicom_export as dx
    from radgrounder.inference.series import span_pixel_box

    if kind == "dicom-sr":
        findings = []
        for p in preds:
            for span in p.grounded.spans:
                box = span_pixel_box(span, p.width, p.height)
                if box is not None:
                    findings.append(dx.Finding(span.label, p.slice_index,
                                               tuple(float(v) for v in box),
                                               span.class_id, span.class_name))  # fmt: skip
        if not findings:
            raise RadGrounderError(
                "--export dicom-sr: no grounded phrase with a box or mask in the predictions; "
                "nothing to export"
            )
        text = "\n".join(f"[slice {p.slice_index}] {p.grounded.text}" for p in preds)
        return dx.export_dicom_sr(series_dir, volume, findings, out / "grounded_report_sr.dcm",
                                  report_text=text)  # fmt: skip
    segments: dict[str, Any] = {}
    for p in preds:
        for span in p.grounded.spans:
            if span.mask is None:
                continue
            key = span.class_name or span.label.strip().lower()
            seg = segments.setdefault(
                key, dx.Segment3D(span.label.strip(), np.zeros(volume.shape, bool),
                                  span.class_id, span.class_name)
            )  # fmt: skip
            seg.mask[p.slice_index] |= span.mask
    if not segments and variant == "segmentation":
        raise RadGrounderError(
            f"--export dicom-seg: the model emitted no mask in its {len(preds)} answer(s) "
            "(no grounded phrase with a <seg> token); nothing to export"
        )
    if not segments:
        raise RadGrounderError(
            "--export dicom-seg needs masks: use the segmentation model and a grounding task "
            "(the detection model's boxes go into --export dicom-sr)"
        )
    return dx.export_dicom_seg(series_dir, volume, list(segments.values()),
                               out / "grounded_segmentation.dcm")  # fmt: skip
