"""Every kind of bad input raises RadGrounderError naming the file (never a library error)."""

from __future__ import annotations

import gzip
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate

from radgrounder.errors import RadGrounderError
from radgrounder.imaging import (
    display_image,
    load_scan,
    nifti_label_names,
    normalize,
    read_dicom,
    read_dicom_series,
    read_image,
    read_label_map,
    read_nifti,
    resize_bilinear,
)
from tests.helpers import copy_files, edit_dicom

Maker = Callable[[Path, list[Path]], Path]


def _truncated(n_bytes: int) -> Maker:
    def make(tmp: Path, files: list[Path]) -> Path:
        path = tmp / f"cut_{n_bytes}.dcm"
        path.write_bytes(files[0].read_bytes()[:n_bytes])
        return path

    return make


def _edited_dicom(name: str, edit: Callable[[pydicom.Dataset], None]) -> Maker:
    def make(tmp: Path, files: list[Path]) -> Path:
        ds = pydicom.dcmread(files[0])
        edit(ds)
        path = tmp / name
        ds.save_as(path)
        return path

    return make


def _nifti(name: str, data: np.ndarray) -> Maker:
    def make(tmp: Path, files: list[Path]) -> Path:
        path = tmp / name
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)
        return path

    return make


def _raw(name: str, content: bytes) -> Maker:
    def make(tmp: Path, files: list[Path]) -> Path:
        path = tmp / name
        path.write_bytes(content)
        return path

    return make


def _half_nifti(tmp: Path, files: list[Path]) -> Path:
    src = files[0].parents[1] / "example_ct_sm.nii.gz"
    path = tmp / "half.nii.gz"
    path.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return path


def _half_png(tmp: Path, files: list[Path]) -> Path:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(tmp / "full.png")
    full = (tmp / "full.png").read_bytes()
    path = tmp / "half.png"
    path.write_bytes(full[: len(full) // 2])
    return path


def _gz_garbage(tmp: Path, files: list[Path]) -> Path:
    path = tmp / "garbage.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header" * 40))
    return path


def _nan_volume() -> np.ndarray:
    data = np.zeros((4, 4, 4), np.float32)
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    return data


def _no_pixels(ds: pydicom.Dataset) -> None:
    del ds.PixelData


def _garbage_j2k(ds: pydicom.Dataset) -> None:
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 4])


def _wrong_rows(ds: pydicom.Dataset) -> None:
    ds.Rows = 1024


CASES: dict[str, tuple[Maker, Callable[[Path], object], str]] = {
    "truncated DICOM header": (_truncated(2000), load_scan, "no PixelData"),
    "truncated DICOM pixels": (_truncated(100_000), read_dicom, "file is truncated"),
    "DICOM without PixelData": (
        _edited_dicom("nopix.dcm", _no_pixels),
        load_scan,
        "no PixelData",
    ),
    "undecodable JPEG 2000": (
        _edited_dicom("garbage.dcm", _garbage_j2k),
        read_dicom,
        "cannot decode pixel data \\(transfer syntax JPEG 2000",
    ),
    "rows do not match data": (
        _edited_dicom("rows.dcm", _wrong_rows),
        read_dicom,
        "cannot decode pixel data",
    ),
    "not DICOM at all": (_raw("text.dcm", b"hello" * 100), read_dicom, "not a DICOM file"),
    "empty file": (_raw("empty.dcm", b""), load_scan, "not a DICOM, NIfTI or image file"),
    "4D NIfTI": (
        _nifti("four_d.nii.gz", np.zeros((4, 4, 4, 3), np.float32)),
        read_nifti,
        "4D NIfTI with 3 volumes is not supported",
    ),
    "NaN/Inf voxels": (_nifti("nan.nii.gz", _nan_volume()), load_scan, "4 of 64 voxels are NaN"),
    "zero-size NIfTI": (
        _nifti("empty.nii.gz", np.zeros((0, 4, 4), np.float32)),
        read_nifti,
        "zero-size dimension",
    ),
    "truncated NIfTI": (_half_nifti, read_nifti, "cannot read voxel data"),
    "gzip garbage NIfTI": (_gz_garbage, load_scan, "cannot read NIfTI file"),
    "random bytes NIfTI": (_raw("noise.nii", bytes(range(256)) * 3), read_nifti, "cannot read"),
    "label names from corrupt NIfTI": (_gz_garbage, nifti_label_names, "cannot read NIfTI"),
    "non-integer labels": (
        _nifti("frac.nii.gz", np.full((2, 2, 2), 1.5, np.float32)),
        read_label_map,
        "non-integer values",
    ),
    "negative labels": (
        _nifti("neg.nii.gz", np.full((2, 2, 2), -3, np.int16)),
        read_label_map,
        "negative values",
    ),
    "NaN labels": (_nifti("nanlab.nii.gz", _nan_volume()), read_label_map, "NaN or Inf"),
    "corrupt PNG": (_raw("broken.png", b"\x89PNG\r\n\x1a\n" + b"x" * 50), load_scan, "cannot read"),
    "truncated PNG": (_half_png, read_image, "cannot read image file"),
    "JPEG that is text": (_raw("photo.jpg", b"plain text"), read_image, "cannot read image"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_raises_named_error(case: str, tmp_path: Path, dicom_files: list[Path]) -> None:
    make, reader, message = CASES[case]
    path = make(tmp_path, dicom_files)
    with pytest.raises(RadGrounderError, match=message) as err:
        reader(path)
    assert path.name in str(err.value)
    assert err.value.path == str(path)
    assert "\n" not in str(err.value)


def test_sidecar_problems(tmp_path: Path) -> None:
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)), path)
    (tmp_path / "scan.json").write_text("{not json")
    with pytest.raises(RadGrounderError, match=r"scan\.json: cannot read JSON sidecar"):
        read_nifti(path)
    (tmp_path / "scan.json").write_text('{"Modality": "PT"}')
    with pytest.raises(RadGrounderError, match=r"scan\.json: unsupported sidecar Modality 'PT'"):
        read_nifti(path)
    with pytest.raises(RadGrounderError, match=r"scan\.nii\.gz: unsupported modality 'XR'"):
        read_nifti(path, modality="XR")


def _series_copy(files: list[Path], dest: Path, n: int = 3) -> Path:
    return copy_files(files[:n], dest)


def test_series_duplicate_position(tmp_path: Path, dicom_files: list[Path]) -> None:
    folder = _series_copy(dicom_files, tmp_path / "dup")
    shutil.copyfile(dicom_files[1], folder / "copy_of_second")
    with pytest.raises(RadGrounderError, match="share slice position") as err:
        read_dicom_series(folder)
    assert "copy_of_second" in str(err.value) and dicom_files[1].name in str(err.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"Rows": 256}, r"rows x cols \(256, 512\) differ"),
        ({"ImagePositionPatient": None}, "ImagePositionPatient is missing"),
        ({"ImageOrientationPatient": None}, "ImageOrientationPatient is missing"),
        ({"ImageOrientationPatient": [1, 0, 0, 0, 0, -1]}, "ImageOrientationPatient .* differs"),
        ({"PixelSpacing": [0.5, 0.5]}, "PixelSpacing differs"),
        ({"Modality": "MR"}, "files disagree on the Modality tag"),
    ],
)
def test_series_inconsistencies(
    tmp_path: Path, dicom_files: list[Path], changes: dict[str, object], message: str
) -> None:
    folder = _series_copy(dicom_files, tmp_path / "bad")
    # Edit the last file by name order so the first one stays the reference.
    target = folder / dicom_files[2].name
    edit_dicom(target, **changes)
    with pytest.raises(RadGrounderError, match=message) as err:
        read_dicom_series(folder)
    named = target.name if "disagree" not in message else folder.name
    assert named in str(err.value)


def test_series_broken_members(tmp_path: Path, dicom_files: list[Path]) -> None:
    folder = _series_copy(dicom_files, tmp_path / "cut")
    target = folder / dicom_files[1].name
    target.write_bytes(dicom_files[1].read_bytes()[:2000])
    with pytest.raises(RadGrounderError, match="no PixelData") as err:
        read_dicom_series(folder)
    assert target.name in str(err.value)
    shutil.copyfile(dicom_files[1], target)
    ds = pydicom.dcmread(target)
    _garbage_j2k(ds)
    ds.save_as(target)
    with pytest.raises(RadGrounderError, match="cannot decode pixel data") as err:
        read_dicom_series(folder)
    assert target.name in str(err.value)
    with pytest.raises(RadGrounderError, match="DICOM folder not found"):
        read_dicom_series(tmp_path / "missing")


def test_zero_size_images(tmp_path: Path) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    # A well-formed PNG whose header says 0 x 4 pixels (Pillow refuses to write one).
    header = struct.pack(">IIBBBBB", 0, 4, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    path = tmp_path / "zero.png"
    path.write_bytes(png)
    with pytest.raises(RadGrounderError, match=r"zero\.png: cannot read image file"):
        load_scan(path)
    with pytest.raises(RadGrounderError, match="zero-size"):
        normalize(np.zeros((0, 5)), "CT")
    with pytest.raises(RadGrounderError, match="zero-size"):
        display_image(np.zeros((5, 0)), "MR")
    with pytest.raises(RadGrounderError, match="non-empty"):
        resize_bilinear(np.zeros((1, 0, 5)))
