"""Batch segmentation over real example scans.

TotalSegmentator cannot run here (no package, no weights), so an injected segmenter stands in
for it: a top-level function (picklable for the worker-process tests) that writes a real
NIfTI label map by thresholding the input and logs each call to a JSON-lines file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from radgrounder.errors import RadGrounderError
from radgrounder.imaging import load_scan
from radgrounder.labels.segment import (
    ScanInput,
    find_scans,
    run_segmentation,
    totalsegmentator_segmenter,
)

DATA = Path(__file__).resolve().parents[2] / "data" / "totalseg_example"
GOOD = ["a/ct", "b/mr", "c/series"]


def fake_segmenter(
    input_path: Path,
    output_path: Path,
    *,
    task: str,
    fast: bool,
    device: str,
    log: Path,
    fail: tuple[str, ...] = (),
    mode: str = "raise",
) -> None:
    """Stand-in for TotalSegmentator; scans whose path ends with an entry of ``fail`` fail."""
    call = {"input": str(input_path), "task": task, "fast": fast, "device": device}
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(call) + "\n")
    if any(str(input_path).endswith(f) for f in fail):
        if mode == "raise":
            raise RuntimeError("simulated segmentation failure")
        Path(output_path).write_bytes(b"\x1f\x8b\x08 half a label map")
        if mode == "exit":
            os._exit(3)  # a hard crash: no exception handler, no cleanup runs
        raise RuntimeError("simulated crash after a partial write")
    if Path(input_path).is_dir():
        files = sorted(Path(input_path).iterdir())
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        labels = np.zeros((int(ds.Columns), int(ds.Rows), len(files)), np.uint8)
        labels[100:400, 150:350, 5:15] = 1
        affine = np.eye(4)
    else:
        img = nib.load(str(input_path))
        data = np.asanyarray(img.dataobj)
        labels = (data > np.percentile(data, 60)).astype(np.uint8)
        labels[data > np.percentile(data, 95)] = 2
        affine = img.affine
    nib.save(nib.Nifti1Image(labels, affine), str(output_path))


def calls(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def _called_rel(given: str, root: Path) -> str:
    """The scan a segmenter call was for: an input under ``root``, or the NIfTI written from a
    DICOM series, ``<root>/../out/<rel dir>/.<name>.part-<id>.input.nii.gz``."""
    path = Path(given)
    if path.is_relative_to(root):
        return path.relative_to(root).as_posix().removesuffix(".nii.gz")
    name = re.fullmatch(r"\.(.+)\.part-[0-9a-f]+\.input\.nii\.gz", path.name)
    assert name is not None, given
    return (path.parent.relative_to(root.parent / "out") / name[1]).as_posix()


def called_rels(log: Path, root: Path) -> list[str]:
    return sorted(_called_rel(c["input"], root) for c in calls(log))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    for rel, src in [
        ("a/ct.nii.gz", "example_ct_sm.nii.gz"),
        ("b/mr.nii.gz", "example_mr_sm.nii.gz"),
    ]:
        (root / rel).parent.mkdir(parents=True)
        shutil.copyfile(DATA / src, root / rel)
    (root / "c").mkdir()
    (root / "c" / "series").symlink_to(DATA / "example_ct_dicom", target_is_directory=True)
    (root / "notes.txt").write_text("not a scan\n")
    (root / "d").mkdir()
    (root / "d" / "broken.nii.gz").write_bytes((DATA / "example_ct_sm.nii.gz").read_bytes()[:2000])
    (root / ".cache").mkdir()
    shutil.copyfile(DATA / "example_mr_sm.nii.gz", root / ".cache" / "hidden.nii.gz")
    return root


@pytest.fixture
def seg(tmp_path: Path) -> partial:
    return partial(fake_segmenter, log=tmp_path / "calls.jsonl")


def run(root: Path, out: Path, segmenter: partial, **kw) -> object:
    kw.setdefault("progress", False)
    return run_segmentation(root, out, segmenter=segmenter, **kw)


def test_find_scans(tree: Path, tmp_path: Path) -> None:
    dicom = sorted((DATA / "example_ct_dicom").iterdir())
    study = tree / "e" / "study"
    for i, sub in enumerate(["s1", "s2"]):
        (study / sub).mkdir(parents=True)
        shutil.copyfile(dicom[i], study / sub / dicom[i].name)
    (study / "s1" / "notes").mkdir()  # subfolder of a series without DICOM: not a scan
    (study / "s1" / "notes" / "readme.txt").write_text("x")
    out = tree / "seg"
    (out / "a").mkdir(parents=True)
    shutil.copyfile(DATA / "example_seg.nii.gz", out / "a" / "ct.nii.gz")

    scans = find_scans(tree, exclude=[out])
    assert [s.rel for s in scans] == [*GOOD, "d/broken", "e/study/s1", "e/study/s2"]
    assert [s.kind for s in scans] == ["nifti", "nifti", "dicom", "nifti", "dicom", "dicom"]
    assert scans[0] == ScanInput(tree / "a" / "ct.nii.gz", "nifti", "a/ct")
    assert scans[2].path == tree / "c" / "series"
    assert find_scans(tree / "c" / "series") == [
        ScanInput(tree / "c" / "series", "dicom", "series")
    ]
    with pytest.raises(RadGrounderError, match="input folder not found"):
        find_scans(tmp_path / "nope")


def test_run_picks_task_by_modality_and_mirrors_input(tree: Path, tmp_path: Path, seg) -> None:
    out = tmp_path / "out"
    report = run(tree, out, seg, progress=True)
    assert report.done == GOOD and report.skipped == []
    assert list(report.failed) == ["d/broken"]
    assert "cannot determine the modality" in report.failed["d/broken"]
    assert "broken.nii.gz" in report.failed["d/broken"]
    tasks = {
        (
            Path(c["input"]).relative_to(tree).as_posix()
            if Path(c["input"]).is_relative_to(tree)
            else Path(c["input"]).relative_to(out).as_posix()
        ): c["task"]
        for c in calls(seg.keywords["log"])
    }
    # The DICOM series reaches the segmenter as a NIfTI radgrounder wrote from it (removed
    # afterwards), so its label map lies on the grid every other command reads the series on.
    (converted,) = [k for k in tasks if k.startswith("c/.series.part-")]
    assert converted.endswith(".input.nii.gz") and not (out / converted).exists()
    assert tasks == {"a/ct.nii.gz": "total", "b/mr.nii.gz": "total_mr", converted: "total"}
    series_labels = nib.load(out / "c" / "series.nii.gz")
    series = load_scan(tree / "c" / "series")
    assert series_labels.shape == series.shape
    assert np.allclose(series_labels.affine, series.affine)

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        "a/ct.json", "a/ct.nii.gz", "b/mr.json", "b/mr.nii.gz",
        "c/series.json", "c/series.nii.gz", "segment_report.json",
    ]  # fmt: skip
    for rel, kind, modality, source in [
        ("a/ct", "nifti", "CT", "inferred"),
        ("b/mr", "nifti", "MR", "inferred"),
        ("c/series", "dicom", "CT", "tag"),
    ]:
        marker = json.loads((out / f"{rel}.json").read_text())
        assert (marker["kind"], marker["modality"], marker["modality_source"]) == (
            kind, modality, source
        )  # fmt: skip
        assert marker["scan"] == str(tree / (rel + (".nii.gz" if kind == "nifti" else "")))
        assert marker["fast"] is False and marker["device"] == "gpu"
        assert marker["seconds"] >= 0 and marker["started"] <= marker["finished"]
        assert {"radgrounder", "totalsegmentator", "nibabel"} <= set(marker["versions"])
        assert marker["segmenter"].endswith("fake_segmenter")
    ct_labels = np.asanyarray(nib.load(str(out / "a" / "ct.nii.gz")).dataobj)
    assert ct_labels.shape == (122, 101, 30) and set(np.unique(ct_labels)) == {0, 1, 2}

    saved = json.loads(report.report_path.read_text())
    assert report.report_path == out / "segment_report.json"
    assert saved["counts"] == {"scans": 4, "done": 3, "skipped": 0, "failed": 1}
    assert saved["failed"][0]["scan"] == "d/broken"
    assert saved["failed"][0]["path"] == str(tree / "d" / "broken.nii.gz")


def test_resume_skips_and_force_redoes(tree: Path, tmp_path: Path, seg) -> None:
    out, log = tmp_path / "out", seg.keywords["log"]
    run(tree, out, seg)
    first = (out / "a" / "ct.json").read_text()
    log.unlink()
    again = run(tree, out, seg)
    assert again.skipped == GOOD and again.done == [] and list(again.failed) == ["d/broken"]
    assert calls(log) == []
    assert (out / "a" / "ct.json").read_text() == first
    assert json.loads(again.report_path.read_text())["counts"]["skipped"] == 3

    forced = run(tree, out, seg, force=True)
    assert forced.done == GOOD and called_rels(log, tree) == GOOD


def test_explicit_task_and_options(tree: Path, tmp_path: Path, seg) -> None:
    out = tmp_path / "out"
    report = run(tree, out, seg, task="total_mr", fast=True, device="gpu:1")
    # A fixed task needs no modality; the broken file then fails in the segmenter itself.
    assert report.done == GOOD and list(report.failed) == ["d/broken"]
    assert {(c["task"], c["fast"], c["device"]) for c in calls(seg.keywords["log"])} == {
        ("total_mr", True, "gpu:1")
    }
    assert json.loads((out / "a" / "ct.json").read_text())["task"] == "total_mr"
    # The earlier results conflict with other settings: reported, not silently kept.
    clash = run(tree, out, seg, task="total")
    assert set(clash.failed) == {*GOOD, "d/broken"}
    assert "force=True" in clash.failed["a/ct"]


def test_sidecar_modality(tmp_path: Path, seg) -> None:
    root = tmp_path / "in"
    root.mkdir()
    shutil.copyfile(DATA / "example_ct_sm.nii.gz", root / "x.nii.gz")
    (root / "x.json").write_text(json.dumps({"Modality": "MR"}))
    report = run(root, tmp_path / "out", seg)
    assert report.done == ["x"]
    marker = json.loads((tmp_path / "out" / "x.json").read_text())
    assert (marker["task"], marker["modality_source"]) == ("total_mr", "sidecar")


def test_failing_scan_is_reported_and_retried(tree: Path, tmp_path: Path, seg) -> None:
    out, log = tmp_path / "out", seg.keywords["log"]
    report = run(tree, out, partial(seg, fail=("b/mr.nii.gz",)))
    assert report.done == ["a/ct", "c/series"]
    assert report.failed["b/mr"] == "RuntimeError: simulated segmentation failure"
    entries = json.loads(report.report_path.read_text())["failed"]
    assert {
        "scan": "b/mr",
        "path": str(tree / "b/mr.nii.gz"),
        "error": report.failed["b/mr"],
    } in entries
    assert not (out / "b" / "mr.json").exists() and not (out / "b" / "mr.nii.gz").exists()
    log.unlink()
    retry = run(tree, out, seg)
    assert retry.done == ["b/mr"] and called_rels(log, tree) == ["b/mr"]


def test_crash_after_partial_write_leaves_nothing_done(tree: Path, tmp_path: Path, seg) -> None:
    out, log = tmp_path / "out", seg.keywords["log"]
    report = run(tree, out, partial(seg, fail=("a/ct.nii.gz",), mode="partial"))
    assert "simulated crash" in report.failed["a/ct"]
    assert sorted(p.name for p in (out / "a").iterdir()) == []  # no marker, map or temp file
    log.unlink()
    assert run(tree, out, seg).done == ["a/ct"] and called_rels(log, tree) == ["a/ct"]


def test_leftovers_of_a_killed_run_are_redone(tree: Path, tmp_path: Path, seg) -> None:
    out, log = tmp_path / "out", seg.keywords["log"]
    run(tree, out, seg)
    # Killed between the rename and the marker, with a stale temp file from an older crash.
    (out / "c" / "series.json").unlink()
    stale = out / "c" / ".series.part-deadbeef.nii.gz"
    stale.write_bytes(b"partial")
    log.unlink()
    report = run(tree, out, seg)
    assert report.done == ["c/series"] and report.skipped == ["a/ct", "b/mr"]
    assert called_rels(log, tree) == ["c/series"]
    assert not stale.exists() and (out / "c" / "series.json").exists()


def test_workers_match_in_process(tree: Path, tmp_path: Path, seg) -> None:
    one = run(tree, tmp_path / "one", seg, workers=1)
    two = run(tree, tmp_path / "two", seg, workers=2)
    assert one.done == two.done == GOOD and one.failed == two.failed
    for rel in GOOD:
        a, b = (nib.load(str(tmp_path / d / f"{rel}.nii.gz")) for d in ("one", "two"))
        assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
        assert np.array_equal(a.affine, b.affine)
        m1, m2 = (json.loads((tmp_path / d / f"{rel}.json").read_text()) for d in ("one", "two"))
        assert (m1["task"], m1["modality"]) == (m2["task"], m2["modality"])
    assert run(tree, tmp_path / "two", seg, workers=2).skipped == GOOD  # nothing left to run


def test_dead_worker_is_a_failure_and_rerun_redoes_it(tree: Path, tmp_path: Path, seg) -> None:
    out, log = tmp_path / "out", seg.keywords["log"]
    report = run(tree, out, partial(seg, fail=("b/mr.nii.gz",), mode="exit"), workers=2)
    assert "worker process died" in report.failed["b/mr"]
    assert not (out / "b" / "mr.json").exists() and not (out / "b" / "mr.nii.gz").exists()
    # Scans running beside the crash may fail too; exactly the unfinished ones are redone.
    unfinished = sorted(set(GOOD) - set(report.done))
    log.unlink()
    assert run(tree, out, seg).done == unfinished and called_rels(log, tree) == unfinished
    assert not list(out.rglob(".*part-*"))


def test_output_inside_input_is_not_walked(tree: Path, seg) -> None:
    out = tree / "derivatives" / "totalseg"
    assert run(tree, out, seg).done == GOOD
    again = run(tree, out, seg)
    assert again.skipped == GOOD and again.done == []


def test_clashing_output_names_fail_both(tmp_path: Path, seg) -> None:
    root = tmp_path / "in"
    root.mkdir()
    shutil.copyfile(DATA / "example_ct_sm.nii.gz", root / "ct.nii.gz")
    nib.save(nib.load(str(DATA / "example_ct_sm.nii.gz")), str(root / "ct.nii"))
    report = run(root, tmp_path / "out", seg)
    assert report.done == [] and sorted(report.failed) == ["ct.nii", "ct.nii.gz"]
    assert "shared with" in report.failed["ct.nii"]


def test_missing_totalsegmentator_is_one_clear_error(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes the import fail, installed or not.
    monkeypatch.setitem(sys.modules, "totalsegmentator", None)
    monkeypatch.setitem(sys.modules, "totalsegmentator.python_api", None)
    with pytest.raises(RadGrounderError, match=r"pip install 'radgrounder\[totalseg\]'"):
        run_segmentation(tree, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(RadGrounderError, match="TotalSegmentator is not installed"):
        totalsegmentator_segmenter(tree / "a/ct.nii.gz", tmp_path / "x.nii.gz", task="total",
                                   fast=False, device="cpu")  # fmt: skip


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"input_dir": "missing"}, "input folder not found"),
        ({"input_dir": "a/ct.nii.gz"}, "input must be a folder"),
        ({"output_dir": "."}, "must not be the input folder"),
        ({"output_dir": ".."}, "must not be the input folder"),
        ({"workers": 0}, "workers must be an integer >= 1"),
        ({"workers": 1.5}, "workers must be an integer >= 1"),
        ({"device": "cuda"}, "device must be 'gpu', 'cpu', 'mps' or 'gpu:N'"),
        ({"device": "gpu:x"}, "device must be"),
        ({"task": ""}, "task must be a TotalSegmentator task name"),
        ({"task": "total --fast"}, "task must be"),
        ({"workers": 2, "segmenter": lambda *a, **k: None}, "segmenter must be picklable"),
    ],
)
def test_bad_arguments(tree: Path, tmp_path: Path, seg, change: dict, match: str) -> None:
    kw = {"input_dir": tree, "output_dir": tmp_path / "out", "segmenter": seg, "progress": False}
    for key in ("input_dir", "output_dir"):
        if key in change:
            change[key] = tree / change[key]
    kw.update(change)
    with pytest.raises(RadGrounderError, match=re.escape(match)):
        run_segmentation(**kw)
    assert not (tmp_path / "out").exists()


def test_dicom_series_follow_the_readers_geometry_rules(tmp_path: Path, seg) -> None:
    from tests.imaging.test_archive_series import derive

    root = tmp_path / "in"
    derive(root / "gap", lambda k, ds: None if k == 7 else ds)
    derive(root / "ok")
    report = run(root, tmp_path / "out", seg)
    assert report.done == ["ok"]
    assert "irregular slice spacing" in report.failed["gap"]
    assert called_rels(seg.keywords["log"], root) == ["ok"]  # never given to the segmenter
