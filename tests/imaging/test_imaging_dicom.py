"""DICOM series and single files from the real JPEG 2000 CT example."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from radgrounder.errors import RadGrounderError
from radgrounder.imaging import Volume, read_dicom, read_dicom_series
from tests.helpers import copy_files, edit_dicom


def _native_crop(src: Path, dest: Path, size: int = 64, frames: int = 1) -> np.ndarray:
    """Write an uncompressed size x size (x frames) copy of ``src``; returns the stored pixels."""
    ds = pydicom.dcmread(src)
    stored = ds.pixel_array[:size, :size]
    pixels = np.stack([stored + i for i in range(frames)]) if frames > 1 else stored
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.Rows = ds.Columns = size
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.save_as(dest, enforce_file_format=True)
    return pixels


def test_series_geometry(ct_series: Volume) -> None:
    assert ct_series.shape == (20, 512, 512)
    assert ct_series.kind == "dicom-series"
    assert ct_series.spacing == (2.0, 0.9765625, 0.9765625)
    assert ct_series.orientation == "SPL"
    assert ct_series.source_orientation == "LPS"
    assert ct_series.modality == "CT"
    assert ct_series.metadata["modality_source"] == "tag"
    assert ct_series.metadata["n_files"] == 20
    assert ct_series.metadata["n_skipped_files"] == 0
    # Sorted by position (inferior first) although the file names run superior → inferior.
    positions = ct_series.metadata["slice_positions"]
    assert positions == [-804.5 + 2.0 * i for i in range(20)]
    # Index (0, 0, 0) is the first pixel of the z = -804.5 file; DICOM LPS -> RAS negates x, y.
    np.testing.assert_allclose(
        ct_series.affine @ [0, 0, 0, 1], [249.51171875, 437.51171875, -804.5, 1.0]
    )
    np.testing.assert_allclose(
        ct_series.affine @ [19, 511, 511, 1],
        [249.51171875 - 511 * 0.9765625, 437.51171875 - 511 * 0.9765625, -766.5, 1.0],
    )


def test_series_values_decode_jpeg2000(ct_series: Volume) -> None:
    assert ct_series.metadata["transfer_syntax_name"] == (
        "JPEG 2000 Image Compression (Lossless Only)"
    )
    assert ct_series.data.dtype == np.float32
    # README: SimpleITK reads HU -1024..1839.
    assert ct_series.value_range() == (-1024.0, 1839.0)


def test_series_order_uses_positions_not_names(ct_series: Volume, dicom_files: list[Path]) -> None:
    first_file = pydicom.dcmread(dicom_files[0])
    last_file = pydicom.dcmread(dicom_files[-1])
    assert float(first_file.ImagePositionPatient[2]) == -766.5
    assert float(last_file.ImagePositionPatient[2]) == -804.5
    assert int(first_file.InstanceNumber) < int(last_file.InstanceNumber)
    np.testing.assert_array_equal(ct_series.data[0], read_dicom(dicom_files[-1]).data[0])
    np.testing.assert_array_equal(ct_series.data[-1], read_dicom(dicom_files[0]).data[0])


def test_series_aligns_with_its_label_map(ct_series: Volume, ct_series_seg: Volume) -> None:
    assert ct_series_seg.source_orientation == "LAS"
    assert ct_series_seg.shape == ct_series.shape
    np.testing.assert_allclose(ct_series_seg.affine, ct_series.affine, atol=1e-4)
    mid = ct_series.n_slices // 2
    liver = ct_series_seg.data[mid] == 5
    assert liver.sum() > 10_000
    liver_hu = float(np.median(ct_series.data[mid][liver]))
    assert 0 < liver_hu < 200
    names = ct_series_seg.metadata["label_names"]
    bone = [k for k, n in names.items() if n.startswith(("vertebrae_", "rib_"))]
    bone_hu = float(np.median(ct_series.data[np.isin(ct_series_seg.data, bone)]))
    assert bone_hu > liver_hu + 50
    outside = ct_series_seg.data == 0
    assert float(np.median(ct_series.data[outside])) < -900
    # Liver on the image left (patient right), spleen on the image right.
    cols = [np.argwhere(ct_series_seg.data == k)[:, 2].mean() for k in (5, 1)]
    assert cols[0] < 256 < cols[1]


def test_shuffled_renamed_copy_gives_identical_volume(
    ct_series: Volume, dicom_files: list[Path], tmp_path: Path
) -> None:
    shuffled = list(dicom_files)
    random.Random(7).shuffle(shuffled)
    for i, f in enumerate(shuffled):
        shutil.copyfile(f, tmp_path / f"img_{i:03d}.dcm")
    copy = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(copy.data, ct_series.data)
    np.testing.assert_array_equal(copy.affine, ct_series.affine)


def test_single_file(dicom_files: list[Path]) -> None:
    vol = read_dicom(dicom_files[0])
    assert vol.shape == (1, 512, 512)
    assert vol.kind == "dicom-file"
    assert vol.modality == "CT"
    assert vol.value_range()[0] == -1024.0  # stored 0 + RescaleIntercept -1024
    assert vol.orientation == "SPL" and vol.source_orientation == "LPS"
    assert vol.spacing == (3.0, 0.9765625, 0.9765625)  # SliceThickness for a lone slice
    raw = pydicom.dcmread(dicom_files[0]).pixel_array
    np.testing.assert_array_equal(vol.data[0], raw.astype(np.float32) - 1024)
    sl = vol.slice(0)
    assert sl.pixel_spacing == (0.9765625, 0.9765625) and sl.modality == "CT"


def test_rescale_slope_and_rle(dicom_files: list[Path], tmp_path: Path) -> None:
    path = tmp_path / "native.dcm"
    stored = _native_crop(dicom_files[0], path)
    edit_dicom(path, RescaleSlope=2, RescaleIntercept=-1000)
    np.testing.assert_array_equal(read_dicom(path).data[0], stored * 2.0 - 1000)
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless, stored)
    ds.save_as(tmp_path / "rle.dcm")
    vol = read_dicom(tmp_path / "rle.dcm")
    assert vol.metadata["transfer_syntax_name"] == "RLE Lossless"
    np.testing.assert_array_equal(vol.data[0], stored * 2.0 - 1000)


def test_multiframe_frames_become_slices(dicom_files: list[Path], tmp_path: Path) -> None:
    path = tmp_path / "multi.dcm"
    stored = _native_crop(dicom_files[0], path, size=32, frames=3)
    vol = read_dicom(path)
    assert vol.shape == (3, 32, 32)
    np.testing.assert_array_equal(vol.data, stored.astype(np.float32) - 1024)


def test_missing_geometry_assumes_axial(dicom_files: list[Path], tmp_path: Path) -> None:
    path = tmp_path / "nogeo.dcm"
    _native_crop(dicom_files[0], path, size=16)
    edit_dicom(path, ImagePositionPatient=None, ImageOrientationPatient=None)
    vol = read_dicom(path)
    assert vol.metadata["geometry"] == "assumed"
    assert vol.orientation == "SPL"


def test_non_dicom_files_are_skipped_and_counted(dicom_files: list[Path], tmp_path: Path) -> None:
    folder = copy_files(dicom_files[:3], tmp_path / "series")
    (folder / "readme.txt").write_text("not DICOM")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dicomdir = FileDataset(str(folder / "DICOMDIR"), {}, file_meta=meta, preamble=b"\0" * 128)
    dicomdir.FileSetID = "TEST"
    dicomdir.save_as(folder / "DICOMDIR", enforce_file_format=True)
    (folder / "subfolder").mkdir()
    vol = read_dicom_series(folder)
    assert vol.shape == (3, 512, 512)
    assert vol.metadata["n_skipped_files"] == 2
    assert sorted(vol.metadata["skipped_files"]) == ["DICOMDIR", "readme.txt"]


def test_several_series_need_a_choice(dicom_files: list[Path], tmp_path: Path) -> None:
    folder = copy_files(dicom_files[:3], tmp_path / "mixed")
    other_uid = "1.2.3.4.5.6.7"
    edit_dicom(folder / dicom_files[2].name, SeriesInstanceUID=other_uid)
    main_uid = str(pydicom.dcmread(dicom_files[0]).SeriesInstanceUID)
    assert main_uid == ""  # the anonymised example has an empty SeriesInstanceUID
    with pytest.raises(RadGrounderError) as err:
        read_dicom_series(folder)
    msg = str(err.value)
    assert "mixed" in msg and "2 series" in msg
    assert "<no SeriesInstanceUID> (2 files)" in msg and f"{other_uid} (1 files)" in msg
    assert read_dicom_series(folder, series_uid=other_uid).shape == (1, 512, 512)
    two = read_dicom_series(folder, series_uid=main_uid)
    assert two.shape == (2, 512, 512) and two.metadata["n_series_in_folder"] == 2
    with pytest.raises(RadGrounderError, match="not found"):
        read_dicom_series(folder, series_uid="9.9.9")


def test_modality_tag_rules(dicom_files: list[Path], tmp_path: Path) -> None:
    path = tmp_path / "us.dcm"
    shutil.copyfile(dicom_files[0], path)
    edit_dicom(path, Modality="US")
    with pytest.raises(RadGrounderError, match=r"us\.dcm.*unsupported modality 'US'"):
        read_dicom(path)
    vol = read_dicom(path, modality="mr")
    assert (vol.modality, vol.metadata["modality_source"]) == ("MR", "argument")
    edit_dicom(path, Modality=None)
    with pytest.raises(RadGrounderError, match=r"us\.dcm.*Modality tag .* missing"):
        read_dicom(path)
    with pytest.raises(RadGrounderError, match=r"unsupported modality 'PET' \(expected CT or MR\)"):
        read_dicom(path, modality="PET")
