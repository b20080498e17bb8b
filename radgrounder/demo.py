"""The demo on the bundled example scans: read, inspect, ground one slice, draw it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from radgrounder.anatomy import load_schema
from radgrounder.errors import RadGrounderError
from radgrounder.fileio import atomic_write_bytes
from radgrounder.grounding import Box, GroundedText, boxes_from_label_slice, codec
from radgrounder.imaging import display_image, inspect_scan, load_scan, read_label_map
from radgrounder.labels.regions import unify_label_volume
from radgrounder.prompts import build_prompt
from radgrounder.visualize import render_overlay

EXAMPLE_DIR_ENV = "RADGROUNDER_EXAMPLE_DATA"


def example_dir() -> Path:
    """The bundled example scans: ``$RADGROUNDER_EXAMPLE_DATA`` or ``data/totalseg_example``
    of a source checkout."""
    env = os.environ.get(EXAMPLE_DIR_ENV)
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1] / "data" / "totalseg_example")
    for c in candidates:
        if (c / "example_ct_sm.nii.gz").is_file():
            return c
    raise RadGrounderError(
        f"example data not found (looked in {', '.join(map(str, candidates))}); "
        f"set {EXAMPLE_DIR_ENV} to the folder with example_ct_sm.nii.gz"
    )


@dataclass
class GroundedSlice:
    """One slice with its grounded caption in both languages."""

    index: int
    pixels: np.ndarray
    captions: dict[str, GroundedText]


def ground_slice(scan_path: Path, label_path: Path, index: int | None = None) -> GroundedSlice:
    """Caption the structures a TotalSegmentator label map shows on one axial slice, with
    one union box per class (the reference's boxes), in English and German."""
    volume = load_scan(scan_path)
    labels = read_label_map(label_path)
    if labels.shape[:3] != volume.shape[:3]:
        raise RadGrounderError(
            f"label map shape {labels.shape} does not match the scan's {volume.shape}",
            path=label_path,
        )
    unified_vol = unify_label_volume(
        labels, label_task="total_mr" if volume.modality == "MR" else "total"
    )
    if index is None:
        index = int(np.argmax((unified_vol > 0).reshape(unified_vol.shape[0], -1).sum(1)))
    label_slice = unified_vol[index]
    h, w = label_slice.shape
    schema = load_schema()
    boxes = boxes_from_label_slice(label_slice)
    ordered = sorted(boxes, key=lambda cid: -int((label_slice == cid).sum()))[:8]
    captions = {}
    wording = {
        "en": ("Axial {m} slice {k}: the ", ", the ", " and the ", " are visible."),
        "de": ("Axiales {m}, Schicht {k}: ", ", ", " und ", " sind abgebildet."),
    }
    for lang, (lead, comma, last, end) in wording.items():
        parts: list = [lead.format(m=volume.modality, k=index)]
        for i, cid in enumerate(ordered):
            if i:
                parts.append(comma if i < len(ordered) - 1 else last)
            box = Box.from_pixels(*boxes[cid], w, h)
            parts.append(
                (
                    schema.by_id(cid).display_name(lang),
                    {
                        "class_id": cid,
                        "class_name": schema.by_id(cid).name,
                        "boxes": [box],
                        "mask": label_slice == cid,
                    },
                )
            )
        parts.append(end)
        captions[lang] = GroundedText.from_phrases(parts)
    return GroundedSlice(index, volume.slice(index).pixels, captions)


def run_demo(out_dir: str | Path = "demo_output", *, console=None) -> dict:
    """Inspect every bundled scan, ground one CT and one MR slice, write overlays and JSON."""
    from rich.console import Console

    console = console or Console()
    out = Path(out_dir)
    data = example_dir()
    console.rule("radgrounder demo")
    scans = [
        "example_ct_sm.nii.gz",
        "example_mr_sm.nii.gz",
        "example_ct_dicom",
        "example_seg.nii.gz",
    ]
    infos = []
    for name in scans:
        info = inspect_scan(data / name)
        infos.append(info.to_dict())
        console.print(
            f"[bold]{name}[/]: {info.modality or '-'} {info.shape} spacing "
            f"{tuple(round(s, 3) for s in info.spacing)} {info.orientation} "
            f"range {info.value_min:g}..{info.value_max:g}"
        )
    det = codec("radgrounder-detect")
    seg = codec("radgrounder-segment")
    results = []
    pairs = [
        ("ct", "example_ct_sm.nii.gz", "example_seg.nii.gz"),
        ("mr", "example_mr_sm.nii.gz", "example_seg_mr.nii.gz"),
    ]
    for tag, scan, labels in pairs:
        with console.status(f"grounding {scan}"):
            gs = ground_slice(data / scan, data / labels)
        modality = "CT" if tag == "ct" else "MR"
        shown = (
            display_image(gs.pixels, modality, preset="soft_tissue")
            if modality == "CT"
            else display_image(gs.pixels, modality)
        )
        for lang, caption in gs.captions.items():
            names = load_schema().display_names(lang)
            pic = render_overlay(
                shown,
                caption,
                display_names=names,
                title=f"{scan} slice {gs.index} ({lang})",
                scale=3,
            )
            png = out / f"{tag}_slice{gs.index:03d}_{lang}.png"
            import io

            buf = io.BytesIO()
            pic.save(buf, format="PNG")
            atomic_write_bytes(png, buf.getvalue())
            results.append(
                {
                    "scan": scan,
                    "slice": gs.index,
                    "language": lang,
                    "overlay": png.name,
                    "prompt_detect": build_prompt(
                        "grounded-report-detect", lang, prefix_style="none"
                    ),
                    "target_detect": det.encode(caption),
                    "target_segment": seg.encode(caption),
                    "text": caption.text,
                }
            )
            console.print(f"wrote [green]{png}[/]")
    summary = {"scans": infos, "grounded": results}
    atomic_write_bytes(
        out / "demo.json", json.dumps(summary, indent=2, ensure_ascii=False).encode()
    )
    console.print(f"wrote [green]{out / 'demo.json'}[/]")
    console.print(results[0]["target_detect"])
    return summary
