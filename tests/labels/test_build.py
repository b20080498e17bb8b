"""labels build end to end on the bundled real scans, label maps and reports."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import zstandard

from radgrounder.anatomy import load_schema
from radgrounder.imaging import load_scan
from radgrounder.labels.build import BuildOptions, assign_splits, build_dataset
from radgrounder.labels.dataset import GroundedDataset, decode_image, decode_labels
from radgrounder.labels.export_refrad2d import export_refrad2d
from radgrounder.labels.regions import group_mask, part_ids
from tests.conftest import EXAMPLES

LAYOUT = EXAMPLES / "layout"
REPORTS = EXAMPLES / "reports.jsonl"
SCHEMA = load_schema()
SMALL = ("ct_upper_abdomen", "mr_upper_abdomen", "ct_dicom_series")


def small_layout(root: Path, ids=SMALL) -> tuple[Path, Path]:
    scans, labels = root / "scans", root / "labels"
    scans.mkdir(parents=True)
    labels.mkdir()
    for sid in ids:
        for src_dir, dst_dir in ((LAYOUT / "scans", scans), (LAYOUT / "labels", labels)):
            for src in src_dir.glob(f"{sid}*"):
                (dst_dir / src.name).symlink_to(src.resolve())
    return scans, labels


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".tmp")
    }


def naive_box(mask: np.ndarray) -> list[int]:
    rows, cols = np.nonzero(mask)
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    scans, labels = small_layout(root)
    report = build_dataset(scans, labels, REPORTS, root / "out", progress=False)
    return root, report


def test_every_box_is_its_classes_bounding_box_in_the_slice_mask(built):
    root, report = built
    assert report.failed == {} or set(report.failed) <= {"ct_abdomen_pelvis"}
    ds = GroundedDataset(root / "out")
    label_slices = {(r["scan_id"], r["slice_index"]): decode_labels(r) for r in ds.slices()}
    n_boxes = 0
    for sample in ds.samples():
        labels = label_slices[(sample["scan_id"], sample["slice_index"])]
        for span in json.loads(sample["spans"]):
            mask = np.zeros_like(labels, dtype=bool)
            for cid in span["class_ids"]:
                mask |= group_mask(labels, cid)
            assert span["pixel_boxes"] == [naive_box(mask)], sample["sample_id"]
            h, w = labels.shape
            x1, y1, x2, y2 = span["pixel_boxes"][0]
            assert span["boxes"][0] == [
                int(x1 * 224 / w) / 224,
                int(y1 * 224 / h) / 224,
                int(x2 * 224 / w) / 224,
                int(y2 * 224 / h) / 224,
            ]
            n_boxes += 1
    assert n_boxes > 200


def test_grounded_reports_in_both_languages_and_images_keep_units(built):
    root, _ = built
    ds = GroundedDataset(root / "out")
    reports = list(ds.samples(task="grounded-report"))
    assert {r["language"] for r in reports} == {"en", "de"}
    de_liver = [r for r in reports if r["language"] == "de" and "Leber" in r["target_detect"]]
    assert de_liver and "id=<seg005>>Leber</p>" in de_liver[0]["target_detect"]
    assert all(
        r["target_segment"].count("</seg>") == len(json.loads(r["mask_class_ids"])) for r in reports
    )
    row = next(r for r in ds.slices() if r["scan_id"] == "ct_dicom_series")
    volume = load_scan(LAYOUT / "scans" / "ct_dicom_series")
    assert np.array_equal(decode_image(row), volume.data[row["slice_index"]])
    assert decode_image(row).min() < -900  # HU kept
    tasks = ds.manifest["counts"]["tasks"]
    assert any("grounded-vqa" in t and "vqa" in t for t in tasks.values())


def test_splits_are_by_scan_and_reproducible(built):
    root, _ = built
    ds = GroundedDataset(root / "out")
    scan_split = {}
    for s in ds.samples():
        assert scan_split.setdefault(s["scan_id"], s["split"]) == s["split"]
    ids = [f"scan{i}" for i in range(50)]
    a, b = assign_splits(ids, (0.8, 0.1, 0.1), 3), assign_splits(reversed(ids), (0.8, 0.1, 0.1), 3)
    assert a == b and sorted(a.values()).count("train") == 40
    assert assign_splits(ids, (0.8, 0.1, 0.1), 4) != a


def test_resume_skips_done_scans_and_rebuilds_identically(built, tmp_path):
    root, _ = built
    scans, labels = root / "scans", root / "labels"
    again = build_dataset(scans, labels, REPORTS, root / "out", progress=False)
    assert again.done == [] and sorted(again.skipped) == sorted(SMALL)
    fresh = build_dataset(
        scans, labels, REPORTS, tmp_path / "fresh", BuildOptions(workers=2), progress=False
    )
    assert sorted(fresh.done) == sorted(SMALL)
    assert tree_bytes(tmp_path / "fresh") == tree_bytes(root / "out")


def test_failures_are_collected_and_the_rest_is_built(tmp_path):
    scans, labels = small_layout(tmp_path, ids=("ct_upper_abdomen", "mr_upper_abdomen"))
    (scans / "orphan.nii.gz").symlink_to((EXAMPLES / "example_ct_sm.nii.gz").resolve())
    (scans / "broken.nii.gz").write_bytes(b"not a nifti")
    shutil.copy(EXAMPLES / "example_seg.nii.gz", labels / "broken.nii.gz")
    report = build_dataset(
        scans, labels, REPORTS, tmp_path / "out", BuildOptions(vqa=False), progress=False
    )
    assert sorted(report.done) == ["ct_upper_abdomen", "mr_upper_abdomen"]
    assert "no label map" in report.failed["orphan"]
    assert "broken.nii.gz" in report.failed["broken"]
    saved = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert set(saved["failed_scans"]) >= {"orphan", "broken"}
    assert "ct_dicom_series" in saved["reports_without_scan"]


def test_build_with_the_llm_backend(tmp_path):
    from tests.labels.fake_openai_server import FakeOpenAIServer

    scans, labels = small_layout(tmp_path, ids=("ct_upper_abdomen",))
    with FakeOpenAIServer() as server:
        opts = BuildOptions(
            keyword_backend="llm",
            vqa=False,
            llm={"endpoint": server.url, "model": "m", "backoff": 0.01},
        )
        report = build_dataset(scans, labels, REPORTS, tmp_path / "out", opts, progress=False)
        assert server.count() > 0
    assert report.done == ["ct_upper_abdomen"]
    assert (tmp_path / "out" / "state" / "keywords_llm.jsonl").is_file()
    rows = list(GroundedDataset(tmp_path / "out").samples(task="grounded-report"))
    assert any("id=<seg005>>liver</p>" in r["target_detect"] for r in rows)


def test_refrad2d_export_boxes_masks_and_dicoms(built, tmp_path):
    root, _ = built
    counts = export_refrad2d(root / "out", tmp_path / "refrad2d")
    assert counts["ct"] > 0 and counts["mr"] > 0
    index = json.loads((tmp_path / "refrad2d" / "rsopid_2_segment_v3_ct.json").read_text())
    ds = GroundedDataset(root / "out")
    images = {(r["scan_id"], r["slice_index"]): decode_image(r) for r in ds.slices()}
    for sid, entry in list(index.items())[:40]:
        mask = np.load(tmp_path / "refrad2d" / entry["segment_slice_path"])
        for x1, y1, x2, y2, cid in entry["bboxes"]:
            assert [x1, y1, x2, y2] == naive_box(mask == cid)
        raw = zstandard.ZstdDecompressor().decompress(
            (tmp_path / "refrad2d" / "dicoms" / sid[:2] / f"{sid}.dcm.zst").read_bytes()
        )
        dcm = pydicom.dcmread(io.BytesIO(raw))
        hu = dcm.pixel_array * float(dcm.RescaleSlope) + float(dcm.RescaleIntercept)
        assert np.array_equal(hu, images[(entry["scan_rserid"], entry["slice_idx"])])
        for _keyword, name, cid in entry["keywords_eng"] + entry["keywords_de"]:
            assert SCHEMA.by_id(cid).name == name
            assert any(b[4] in part_ids(cid) for b in entry["bboxes"])
    split_files = list((tmp_path / "refrad2d").glob("filtered_*_splits/*.json"))
    assert split_files


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_9_then_resume_gives_byte_identical_output(tmp_path):
    scans, labels = small_layout(
        tmp_path, ids=("ct_upper_abdomen", "mr_upper_abdomen", "ct_dicom_series")
    )
    cmd = [
        sys.executable,
        "-m",
        "radgrounder",
        "labels",
        "build",
        "--scans",
        str(scans),
        "--labels",
        str(labels),
        "--reports",
        str(REPORTS),
    ]
    reference = subprocess.run(
        [*cmd, "--out", str(tmp_path / "ref")], capture_output=True, text=True, timeout=300
    )
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    markers = out / "state" / "scans"
    deadline = time.time() + 120
    while time.time() < deadline and not (markers.is_dir() and any(markers.iterdir())):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    resumed = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")


@pytest.mark.slow
def test_ray_executor_gives_identical_output(built, tmp_path):
    pytest.importorskip("ray")
    import ray

    root, _ = built
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        report = build_dataset(
            root / "scans",
            root / "labels",
            REPORTS,
            tmp_path / "ray",
            BuildOptions(executor="ray"),
            progress=False,
        )
    finally:
        ray.shutdown()
    assert sorted(report.done) == sorted(SMALL)
    assert tree_bytes(tmp_path / "ray") == tree_bytes(root / "out")


def test_grounded_from_row_rebuilds_the_target_with_masks(built):
    from radgrounder.grounding import codec
    from radgrounder.labels.dataset import grounded_from_row

    root, _ = built
    ds = GroundedDataset(root / "out")
    sample = next(ds.samples(task="grounded-report", language="en"))
    labels = decode_labels(ds.slice_row(sample["split"], sample["scan_id"], sample["slice_index"]))
    gt = grounded_from_row(sample, labels)
    assert codec("radgrounder-detect").encode(gt) == sample["target_detect"]
    for span in gt.spans:
        expected = np.zeros_like(labels, dtype=bool)
        for cid in span.meta["class_ids"]:
            expected |= group_mask(labels, cid)
        assert np.array_equal(span.mask, expected)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_a_killed_pool_worker_never_aborts_the_build(tmp_path):
    scans, labels = small_layout(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "radgrounder", "labels", "build", "--scans", str(scans),
         "--labels", str(labels), "--reports", str(REPORTS), "--out", str(out),
         "--workers", "2", "--no-vqa"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # Kill one pool worker while scans are still being built (the pool's two processes are
    # grandchildren: the resource tracker is a child too and never builds anything).
    deadline, killed = time.time() + 120, None
    while time.time() < deadline and killed is None and proc.poll() is None:
        workers = [c for c in _children(proc.pid) if "spawn_main" in _cmdline(c)]
        if len(workers) == 2 and (out / "state").is_dir():
            killed = workers[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    _, stderr = proc.communicate(timeout=300)
    assert killed is not None, "the build finished before a worker could be killed"
    assert "Traceback" not in stderr and proc.returncode in (0, 3), stderr
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "build_report.json").read_text())
    # Every scan is accounted for: built (the killed worker's scans were retried) or failed.
    assert set(manifest["sources"]) | set(report["failed_scans"]) == set(SMALL)
    assert set(manifest["sources"]) == set(SMALL) or proc.returncode == 3


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
