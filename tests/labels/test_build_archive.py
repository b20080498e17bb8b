"""labels build on inputs as archives deliver them: a scan folder holding several series,
label maps with ids outside the schema, notes about the input carried to the user."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from radgrounder.errors import RadGrounderError
from radgrounder.labels.build import BuildOptions, build_dataset
from tests.conftest import EXAMPLES
from tests.imaging.test_archive_series import derive

LAYOUT = EXAMPLES / "layout"
REPORTS = EXAMPLES / "reports.jsonl"
# The bundled series carries no SeriesInstanceUID; archives' series always do.
SERIES_UID = pydicom.uid.generate_uid()


def _renamed(uid: str, keep: int | None = None):
    def change(k: int, ds: pydicom.Dataset) -> pydicom.Dataset | None:
        if keep is not None and k >= keep:
            return None
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, pydicom.uid.generate_uid()
        return ds

    return change


def _layout(root: Path) -> tuple[Path, Path]:
    scans, labels = root / "scans", root / "labels"
    labels.mkdir(parents=True)
    shutil.copy(LAYOUT / "labels" / "ct_dicom_series.nii.gz", labels)
    derive(scans / "ct_dicom_series" / "CT", _renamed(SERIES_UID))
    return scans, labels


def _cli(args: list[str]) -> int:
    from radgrounder.cli import main

    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _options(**kw) -> BuildOptions:
    return BuildOptions(vqa=False, **kw)


def test_the_series_on_the_label_maps_grid_is_chosen(tmp_path: Path) -> None:
    scans, labels = _layout(tmp_path)
    scout = pydicom.uid.generate_uid()
    derive(scans / "ct_dicom_series" / "SCOUT", _renamed(scout, keep=4))
    report = build_dataset(scans, labels, REPORTS, tmp_path / "out", _options(), progress=False)
    assert report.failed == {} and report.done == ["ct_dicom_series"]
    source = report.manifest["sources"]["ct_dicom_series"]
    assert source["series_uid"] == SERIES_UID
    marker = json.loads((tmp_path / "out/state/scans/ct_dicom_series.json").read_text())
    assert marker["counts"]["series_selected_by"] == "label map grid"
    assert report.manifest["counts"]["slices"]["train"] > 0


def test_two_series_on_the_grid_need_a_choice(tmp_path: Path, capsys) -> None:
    scans, labels = _layout(tmp_path)
    copy = pydicom.uid.generate_uid()
    derive(scans / "ct_dicom_series" / "COPY", _renamed(copy))
    report = build_dataset(scans, labels, REPORTS, tmp_path / "a", _options(), progress=False)
    error = report.failed["ct_dicom_series"]
    assert "holds 2 series and several are on its grid" in error
    assert "--series-uid ct_dicom_series=UID" in error and copy in error and SERIES_UID in error

    opts = _options(series={"ct_dicom_series": copy})
    report = build_dataset(scans, labels, REPORTS, tmp_path / "b", opts, progress=False)
    assert report.failed == {}
    assert report.manifest["sources"]["ct_dicom_series"]["series_uid"] == copy
    # The same choice on the command line; a typo in the scan id or a malformed value is a
    # usage error before any work.
    base = ["labels", "build", "--scans", str(scans), "--labels", str(labels),
            "--reports", str(REPORTS), "--no-vqa"]  # fmt: skip
    assert (
        _cli([*base, "--out", str(tmp_path / "c"), "--series-uid", f"ct_dicom_series={copy}"]) == 0
    )
    built = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert built["sources"]["ct_dicom_series"]["series_uid"] == copy
    capsys.readouterr()
    for value, message in (
        ("nope=1.2.3", "no scan 'nope' in the scan folder"),
        ("1.2.3", "expected SCAN_ID=UID"),
    ):
        code = _cli([*base, "--out", str(tmp_path / "d"), "--series-uid", value])
        err = capsys.readouterr().err
        assert code in (1, 2) and message in err and err.count("\n") == 1
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_a_series_off_the_grid_is_refused(tmp_path: Path) -> None:
    scans, labels = _layout(tmp_path)
    scout = pydicom.uid.generate_uid()
    derive(scans / "ct_dicom_series" / "SCOUT", _renamed(scout, keep=4))
    opts = _options(series={"ct_dicom_series": scout})
    report = build_dataset(scans, labels, REPORTS, tmp_path / "out", opts, progress=False)
    assert "does not match the scan's" in report.failed["ct_dicom_series"]


def test_label_ids_outside_the_schema_are_counted_and_reported(tmp_path: Path, capsys) -> None:
    scans, labels = tmp_path / "scans", tmp_path / "labels"
    scans.mkdir()
    labels.mkdir()
    shutil.copy(LAYOUT / "scans" / "ct_upper_abdomen.nii.gz", scans)
    img = nib.load(LAYOUT / "labels" / "ct_upper_abdomen.nii.gz")
    data = np.asanyarray(img.dataobj).copy()
    data[:3, :4, :5] = 250  # an id no TotalSegmentator task has: 60 voxels
    out = nib.Nifti1Image(data, img.affine, img.header)
    for ext in img.header.extensions:
        out.header.extensions.append(ext)
    nib.save(out, labels / "ct_upper_abdomen.nii.gz")
    args = ["--scans", str(scans), "--labels", str(labels), "--reports", str(REPORTS)]
    code = _cli(["labels", "build", *args, "--out", str(tmp_path / "out"), "--no-vqa"])
    assert code == 0
    err = capsys.readouterr().err
    assert "radgrounder: warning: ct_upper_abdomen: 1 label id(s)" in err
    assert "250: 60 voxels" in err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["sources"]["ct_upper_abdomen"]["dropped_label_ids"] == {"250": 60}
    saved = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert "250: 60 voxels" in saved["warnings"]["ct_upper_abdomen"][0]
    # The bundled maps hold only schema ids: nothing dropped, no warning.
    report = build_dataset(
        tmp_path / "scans", LAYOUT / "labels", REPORTS, tmp_path / "clean", progress=False
    )
    assert report.warnings == {}
    assert "dropped_label_ids" not in report.manifest["sources"]["ct_upper_abdomen"]


def test_unknown_scan_in_series_choice_is_refused_before_work(tmp_path: Path) -> None:
    scans, labels = _layout(tmp_path)
    with pytest.raises(RadGrounderError, match="no scan 'other'"):
        build_dataset(
            scans, labels, REPORTS, tmp_path / "o", _options(series={"other": "1.2"}),
            progress=False,
        )  # fmt: skip
    assert not (tmp_path / "o").exists()
