"""Series as hospital archives export them, each derived from the bundled real CT series:
gantry tilt, gaps, dropped and preamble-less members, impossible values, several series,
nested exports. Outcomes and geometry (mm) are checked against the tags themselves."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from radgrounder.errors import RadGrounderError
from radgrounder.imaging import load_scan
from radgrounder.imaging.dicom_series import list_series

REPO = Path(__file__).resolve().parents[2]
SERIES = REPO / "data" / "totalseg_example" / "example_ct_dicom"


def _datasets() -> list[pydicom.Dataset]:
    out = []
    for p in sorted(SERIES.iterdir()):
        ds = pydicom.dcmread(p)
        ds.decompress()
        out.append(ds)
    return sorted(out, key=lambda d: float(d.ImagePositionPatient[2]))


def derive(
    folder: Path,
    change: Callable[[int, pydicom.Dataset], pydicom.Dataset | None] | None = None,
    *,
    names: Callable[[int], str] = lambda k: f"IM{k:04d}.dcm",
) -> Path:
    """Write the bundled series (inferior first) into ``folder``, each slice passed through
    ``change(k, ds)`` (None drops the slice)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, ds in enumerate(_datasets()):
        ds = change(k, ds) if change else ds
        if ds is not None:
            ds.save_as(folder / names(k), enforce_file_format=True)
    return folder


def _ras(ipp: list[float]) -> np.ndarray:
    x, y, z = (float(v) for v in ipp)
    return np.array([-x, -y, z])


def _corner_error(volume, datasets: list[pydicom.Dataset]) -> float:
    """Largest distance (mm) between each slice's first voxel as the affine places it and
    that slice's ImagePositionPatient."""
    worst = 0.0
    for k, ds in enumerate(datasets):
        placed = (volume.affine @ np.array([k, 0, 0, 1.0]))[:3]
        worst = max(worst, float(np.linalg.norm(placed - _ras(ds.ImagePositionPatient))))
    return worst


def test_the_bundled_series_is_placed_by_its_tags() -> None:
    volume = load_scan(SERIES)
    assert _corner_error(volume, _datasets()) < 1e-3
    assert volume.metadata["gantry_tilt_deg"] == 0.0


def test_a_gantry_tilted_series_is_placed_slice_by_slice(tmp_path: Path) -> None:
    tilt = math.radians(15)
    z0 = float(_datasets()[0].ImagePositionPatient[2])
    written: list[pydicom.Dataset] = []

    def tilted(k: int, ds: pydicom.Dataset) -> pydicom.Dataset:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + (z - z0) * math.tan(tilt), z]
        ds.GantryDetectorTilt = 15
        written.append(ds)
        return ds

    volume = load_scan(derive(tmp_path / "tilt", tilted))
    # Before: up to 9.8 mm off. Now every slice sits where its tags say (a sheared affine).
    assert _corner_error(volume, written) < 1e-3
    assert volume.metadata["gantry_tilt_deg"] == pytest.approx(15, abs=0.01)
    assert volume.metadata["gantry_detector_tilt_tag"] == 15.0
    # The in-plane pixel grid is untouched; the slice axis carries the tilt.
    np.testing.assert_allclose(np.linalg.norm(volume.affine[:3, 1]), 0.9765625, rtol=1e-6)


def test_a_missing_slice_is_refused_naming_the_gap(tmp_path: Path) -> None:
    folder = derive(tmp_path / "gap", lambda k, ds: None if k == 10 else ds)
    with pytest.raises(RadGrounderError) as info:
        load_scan(folder)
    msg = str(info.value)
    assert "irregular slice spacing: IM0009.dcm -> IM0011.dcm are 4.000 mm apart" in msg
    assert "spacing is 2.000 mm" in msg and "1 slice(s) missing" in msg
    # Several gaps: counted.
    folder = derive(tmp_path / "gaps", lambda k, ds: None if k in (4, 9, 10, 15) else ds)
    with pytest.raises(RadGrounderError, match=r"3 irregular step\(s\)"):
        load_scan(folder)
    # A first or last slice missing leaves a regular, shorter series.
    short = derive(tmp_path / "short", lambda k, ds: None if k == 0 else ds)
    assert load_scan(short).n_slices == 19


def test_members_without_preamble_are_read_and_other_files_are_listed(tmp_path: Path) -> None:
    folder = derive(tmp_path / "s")
    ds = pydicom.dcmread(folder / "IM0005.dcm")
    ds.preamble = None
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=False)
    (folder / "IM0005.dcm").write_bytes(buffer.getvalue())
    assert buffer.getvalue()[128:132] != b"DICM"
    (folder / "README.txt").write_text("exported by PACS\n")
    (folder / "IM0007.dcm").write_bytes(b"\0" * 300)  # unreadable: no DICOM at all
    with pytest.raises(RadGrounderError, match=r"irregular slice spacing: IM0006\.dcm -> IM0008"):
        load_scan(folder)  # the unreadable member leaves a gap: refused, not silently 19
    (folder / "IM0007.dcm").unlink()
    derive(tmp_path / "s", lambda k, d: d if k == 7 else None)
    volume = load_scan(folder)
    assert volume.n_slices == 20
    assert volume.metadata["skipped_files"] == ["README.txt"]
    assert volume.metadata["n_skipped_files"] == 1
    assert volume.metadata["warnings"] == [
        "1 file(s) in the folder are no DICOM image and were skipped: README.txt"
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda ds: setattr(ds, "RescaleSlope", "nan"), "not finite numbers"),
        (lambda ds: setattr(ds, "RescaleSlope", 0), "RescaleSlope is 0"),
        (lambda ds: setattr(ds, "PixelSpacing", [0, 0]), "PixelSpacing must be positive"),
    ],
)
def test_impossible_values_are_refused_naming_the_file(
    tmp_path: Path, change: Callable, message: str
) -> None:
    def spoil(k: int, ds: pydicom.Dataset) -> pydicom.Dataset:
        if k == 3:
            change(ds)
        return ds

    folder = derive(tmp_path / "v", spoil)
    with pytest.raises(RadGrounderError, match=message) as info:
        load_scan(folder)
    assert "IM0003.dcm" in str(info.value)


def test_float_pixels_with_nan_are_refused(tmp_path: Path) -> None:
    data = np.zeros((8, 8, 4), np.float32)
    data[2, 2, 2] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(RadGrounderError, match="1 of 256 voxels are NaN or Inf"):
        load_scan(tmp_path / "nan.nii.gz")


def test_complex_nifti_and_multipage_tiff_are_refused(tmp_path: Path) -> None:
    data = (np.ones((8, 8, 4)) + 1j).astype(np.complex64)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "c.nii.gz")
    with pytest.raises(RadGrounderError, match="stored as complex64"):
        load_scan(tmp_path / "c.nii.gz")
    pages = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 20, 30)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(RadGrounderError, match="3 pages/frames"):
        load_scan(tmp_path / "stack.tif")


def test_nested_exports_and_several_series(tmp_path: Path) -> None:
    export = tmp_path / "export"
    # A PACS export: PATIENT/STUDY/SERIES folders, the series split over two folders.
    derive(export / "P1" / "S1" / "SER1", lambda k, ds: ds if k < 10 else None)
    derive(export / "P1" / "S1" / "SER1b", lambda k, ds: ds if k >= 10 else None)
    volume = load_scan(export)
    assert volume.n_slices == 20 and _corner_error(volume, _datasets()) < 1e-3

    other_uid = pydicom.uid.generate_uid()

    def second(k: int, ds: pydicom.Dataset) -> pydicom.Dataset | None:
        if k >= 5:
            return None
        ds.SeriesInstanceUID = other_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesDescription = "scout"
        return ds

    derive(export / "P1" / "S1" / "SER2", second)
    series = list_series(export)
    assert [s["n_files"] for s in series] == [20, 5]
    assert series[1]["description"] == "scout" and series[1]["modality"] == "CT"
    assert series[1]["series_uid"] == other_uid
    assert series[1]["folders"] == ["P1/S1/SER2"]
    assert sorted(series[0]["folders"]) == ["P1/S1/SER1", "P1/S1/SER1b"]
    with pytest.raises(RadGrounderError, match="holds 2 series"):
        load_scan(export)
    assert load_scan(export, series_uid=other_uid).n_slices == 5


def test_cli_lists_several_series_and_reads_the_chosen_one(tmp_path: Path, capsys) -> None:
    from radgrounder.cli import main
    from radgrounder.modeling import init_model

    export = tmp_path / "export"
    derive(export / "A")
    uid = pydicom.uid.generate_uid()

    def other(k: int, ds: pydicom.Dataset) -> pydicom.Dataset | None:
        if k >= 4:
            return None
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, pydicom.uid.generate_uid()
        ds.SeriesDescription = "scout"
        return ds

    derive(export / "B", other)

    def run(args: list[str]) -> tuple[int, str, str]:
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        cap = capsys.readouterr()
        return code, cap.out, cap.err

    code, out, _ = run(["inspect", str(export)])
    assert code == 0 and "2 series (pick one with --series-uid)" in out
    assert uid in out and "4 files" in out and "scout" in out and "[B]" in out
    code, out, _ = run(["inspect", str(export), "--series-uid", uid, "--json"])
    assert code == 0 and json.loads(out)["n_slices"] == 4
    model = init_model("tiny", "detection", tmp_path / "m", seed=0)
    # Without a choice the folder is an archive: each series is one job of its own.
    code, out, err = run(["predict", str(export), "--model", str(model), "--out",
                          str(tmp_path / "all"), "--max-new-tokens", "2"])  # fmt: skip
    assert code == 0 and "archive: 2 scan(s)" in out, err
    lines = [json.loads(x) for x in (tmp_path / "all" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(x["slices"] for x in lines) == [4, 20]
    code, out, err = run(
        ["predict", str(export), "--model", str(model), "--out", str(tmp_path / "o"),
         "--series-uid", uid, "--all-slices", "--max-new-tokens", "2"]
    )  # fmt: skip
    assert code == 0, err
    lines = (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4


def _unsigned_ct(tmp_path: Path) -> Path:
    """The bundled small CT as a converter without an intercept writes it: HU + 1024, uint16."""
    img = nib.load(REPO / "data" / "totalseg_example" / "example_ct_sm.nii.gz")
    hu = np.asanyarray(img.dataobj).astype(np.int32)
    out = nib.Nifti1Image((np.clip(hu, -1024, None) + 1024).astype(np.uint16), img.affine)
    out.header.set_slope_inter(1.0, 0.0)
    nib.save(out, tmp_path / "ct_u16.nii.gz")
    return tmp_path / "ct_u16.nii.gz"


def test_unsigned_ct_nifti_is_not_silently_mr(tmp_path: Path, capsys) -> None:
    from radgrounder.cli import main

    path = _unsigned_ct(tmp_path)
    volume = load_scan(path)
    assert volume.modality == "MR" and volume.metadata["modality_source"] == "inferred"
    (note,) = volume.metadata["warnings"]
    assert "pass --modality CT" in note and "HU + 1024" in note
    # Stated CT: still warned that the values are no Hounsfield units.
    (note,) = load_scan(path, modality="CT").metadata["warnings"]
    assert "not Hounsfield units" in note and "scl_inter" in note
    # Stated MR, and a signed MR (the bundled one) carry no warning.
    assert load_scan(path, modality="MR").metadata["warnings"] == []
    mr = load_scan(REPO / "data" / "totalseg_example" / "example_mr_sm.nii.gz")
    assert mr.modality == "MR" and mr.metadata["warnings"] == []
    # With the intercept in the header the same voxels are HU and inferred as CT.
    img = nib.load(path)
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "ct_u16_inter.nii.gz")
    fixed = load_scan(tmp_path / "ct_u16_inter.nii.gz")
    assert fixed.modality == "CT" and fixed.metadata["warnings"] == []

    main(["inspect", str(path)])
    cap = capsys.readouterr()
    assert "MR (inferred)" in cap.out
    assert cap.err.count("\n") == 1
    assert cap.err.startswith("radgrounder: warning: modality inferred")


def test_predict_takes_the_modality_and_warns_on_stderr(tmp_path: Path, capsys) -> None:
    from radgrounder.cli import main
    from radgrounder.modeling import init_model

    path = _unsigned_ct(tmp_path)
    model = init_model("tiny", "detection", tmp_path / "m", seed=0)
    main(["predict", str(path), "--model", str(model), "--out", str(tmp_path / "o"),
          "--modality", "CT", "--max-new-tokens", "2"])  # fmt: skip
    err = capsys.readouterr().err
    assert "radgrounder: warning: CT stored as unsigned integers" in err
    main(["predict", str(path), "--model", str(model), "--out", str(tmp_path / "inferred"),
          "--max-new-tokens", "2"])  # fmt: skip
    assert "radgrounder: warning: modality inferred as MR" in capsys.readouterr().err
    # The overlays show CT through a CT window, the inferred MR through MR normalisation.
    (ct,) = (tmp_path / "o" / "overlays").iterdir()
    (mr,) = (tmp_path / "inferred" / "overlays").iterdir()
    assert ct.read_bytes() != mr.read_bytes()
