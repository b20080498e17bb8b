"""A small hospital-style archive made from the bundled real data, for the archive tests:
a CT series (given a SeriesInstanceUID) split over two export folders, NIfTI volumes in
nested folders, a label map beside them, a corrupt .dcm and a text file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pydicom

from tests.conftest import EXAMPLES

SERIES_UID = "1.2.826.0.1.3680043.8.498.77000000000000000000000000000001"
# key prefix -> status the manifest must give it
EXPECTED = {
    "patient1_study1": "done",  # the series, split over part1/ and part2/
    "patient2_nifti_mr.nii.gz": "done",
    "patient2_ct_sm.nii.gz": "done",
    "patient3_broken.dcm": "failed",
}
SKIPPED = {"README.txt", "patient2/nifti/mr_seg.nii.gz"}


def make_archive(root: Path) -> Path:
    files = sorted((EXAMPLES / "example_ct_dicom").iterdir())
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = SERIES_UID
        folder = root / "patient1" / "study1" / ("part1" if i < len(files) // 2 else "part2")
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / f.name, enforce_file_format=True)
    (root / "patient2" / "nifti").mkdir(parents=True)
    shutil.copy(EXAMPLES / "example_mr_sm.nii.gz", root / "patient2" / "nifti" / "mr.nii.gz")
    shutil.copy(EXAMPLES / "example_seg_mr.nii.gz", root / "patient2" / "nifti" / "mr_seg.nii.gz")
    shutil.copy(EXAMPLES / "example_ct_sm.nii.gz", root / "patient2" / "ct_sm.nii.gz")
    (root / "patient3").mkdir()
    (root / "patient3" / "broken.dcm").write_bytes(b"\x00not a dicom file\n" * 64)
    (root / "README.txt").write_text("exported from PACS\n")
    return root


def manifest(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def comparable(out: Path) -> dict[str, Any]:
    """Everything an archive run wrote, with what differs between two runs of the same
    inputs removed: timings, seconds and the model-load id."""
    tree: dict[str, Any] = {}
    for p in sorted(out.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(out).as_posix()
        if p.name == "predictions.jsonl":
            tree[rel] = [_drop(json.loads(x), "timings") for x in p.read_text().splitlines()]
        elif p.name == "manifest.jsonl":
            tree[rel] = [_drop(json.loads(x), "seconds") for x in p.read_text().splitlines()]
        elif p.name == "job.json":
            data = json.loads(p.read_text())
            tree[rel] = {**data, "record": _drop(data["record"], "seconds")}
        else:
            tree[rel] = p.read_bytes()
    return tree


def _drop(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}
