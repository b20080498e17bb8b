"""load_scan dispatch, inspect_scan, and the Volume/Slice containers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radgrounder.errors import RadGrounderError
from radgrounder.imaging import ScanInfo, Volume, inspect_scan, load_scan


def test_dispatch_by_path(data_dir: Path, dicom_files: list[Path], tmp_path: Path) -> None:
    assert load_scan(data_dir / "example_ct_sm.nii.gz").kind == "nifti"
    # The example files have no suffix: any other existing file is tried as DICOM.
    single = load_scan(dicom_files[3])
    assert single.kind == "dicom-file" and single.shape == (1, 512, 512)
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "x.PNG")
    assert load_scan(tmp_path / "x.PNG").kind == "image"
    folder = tmp_path / "series"
    folder.mkdir()
    for f in dicom_files[:2]:
        shutil.copyfile(f, folder / f.name)
    series = load_scan(folder, modality="CT")
    assert series.kind == "dicom-series" and series.shape == (2, 512, 512)
    assert series.metadata["modality_source"] == "argument"


def test_dispatch_errors(dicom_files: list[Path], tmp_path: Path) -> None:
    with pytest.raises(RadGrounderError, match=r"nowhere\.nii\.gz: no such file or folder"):
        load_scan(tmp_path / "nowhere.nii.gz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(RadGrounderError, match=r"notes\.txt: not a DICOM, NIfTI or image file"):
        load_scan(tmp_path / "notes.txt")
    with pytest.raises(RadGrounderError, match="series_uid only applies to a DICOM folder"):
        load_scan(dicom_files[0], series_uid="1.2.3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RadGrounderError, match=r"empty: no DICOM image files"):
        load_scan(tmp_path / "empty")


def test_inspect_nifti_and_label_map(data_dir: Path) -> None:
    info = inspect_scan(data_dir / "example_ct_sm.nii.gz")
    assert isinstance(info, ScanInfo)
    assert info.kind == "nifti" and info.modality == "CT" and info.modality_source == "inferred"
    assert info.shape == (30, 101, 122) and info.n_slices == 30
    assert info.spacing == (3.0, 3.0, 3.0)
    assert (info.orientation, info.source_orientation) == ("SPL", "RAS")
    assert (info.value_min, info.value_max) == (-1100.0, 1207.0)
    assert info.dtype == "float32"
    assert "n_label_names" not in info.extra
    seg = inspect_scan(data_dir / "example_seg.nii.gz", modality="CT")
    assert seg.extra["n_label_names"] == 117
    assert seg.modality_source == "argument" and seg.extra["label_map"] is True
    plain = inspect_scan(data_dir / "example_seg.nii.gz")
    assert plain.modality is None and plain.dtype == "int32"
    assert plain.extra["n_labels_present"] == 41


def test_inspect_dicom_series_to_dict(dicom_dir: Path) -> None:
    info = inspect_scan(dicom_dir)
    assert info.kind == "dicom-series" and info.modality_source == "tag"
    assert info.extra["transfer_syntax_name"] == "JPEG 2000 Image Compression (Lossless Only)"
    assert info.extra["series_uid"] is None  # anonymised: the tag is present but empty
    assert info.extra["n_files"] == 20
    d = info.to_dict()
    assert d["shape"] == [20, 512, 512] and d["spacing"] == [2.0, 0.9765625, 0.9765625]
    assert json.loads(json.dumps(d))["value_min"] == -1024.0


def test_volume_slice_bounds(ct_sm: Volume) -> None:
    sl = ct_sm.slice(29)
    assert sl.index == 29 and sl.pixels.shape == (101, 122) and not sl.is_rgb
    np.testing.assert_array_equal(sl.pixels, ct_sm.data[29])
    assert sl.source.endswith("example_ct_sm.nii.gz")
    for bad in (30, -1):
        with pytest.raises(RadGrounderError, match=rf"example_ct_sm\.nii\.gz: slice index {bad}"):
            ct_sm.slice(bad)
    with pytest.raises(RadGrounderError, match="must be an int"):
        ct_sm.slice(1.5)  # type: ignore[arg-type]


def test_imaging_depends_only_on_errors() -> None:
    import radgrounder.imaging as imaging

    package = Path(imaging.__file__).parent
    for source in package.glob("*.py"):
        for line in source.read_text().splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] in ("from", "import"):
                module = words[1]
                if module.startswith("radgrounder"):
                    assert module == "radgrounder.errors" or module.startswith(
                        "radgrounder.imaging"
                    ), f"{source.name}: {line}"


def test_to_canonical_rejects_degenerate_affine() -> None:
    from radgrounder.imaging import to_canonical

    affine = np.diag([1.0, 0.0, 1.0, 1.0])
    with pytest.raises(RadGrounderError, match=r"flat\.nii: cannot determine the orientation"):
        to_canonical(np.zeros((2, 2, 2)), affine, "flat.nii")
    data, new_affine = to_canonical(np.arange(8).reshape(2, 2, 2), np.eye(4), "ras.nii")
    np.testing.assert_array_equal(data, np.arange(8).reshape(2, 2, 2)[::-1, ::-1].T)
    np.testing.assert_allclose(new_affine @ [0, 0, 0, 1], [1, 1, 0, 1])
