"""NIfTI images and label maps: canonical orientation, modality, label names, alignment."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from radgrounder.errors import RadGrounderError
from radgrounder.imaging import Volume, nifti_label_names, read_label_map, read_nifti


def _centroid(labels: Volume, label: int) -> np.ndarray:
    idx = np.argwhere(labels.data == label)
    assert len(idx), f"label {label} is empty"
    return idx.mean(axis=0)


def _ids(labels: Volume) -> dict[str, int]:
    return {name: key for key, name in labels.metadata["label_names"].items()}


def test_ct_nifti_geometry_and_values(ct_sm: Volume) -> None:
    assert ct_sm.shape == (30, 101, 122)  # on disk 122x101x30 RAS
    assert ct_sm.n_slices == 30
    assert ct_sm.spacing == (3.0, 3.0, 3.0)
    assert ct_sm.orientation == "SPL"
    assert ct_sm.source_orientation == "RAS"
    assert ct_sm.kind == "nifti"
    assert ct_sm.data.dtype == np.float32
    assert ct_sm.data.flags["C_CONTIGUOUS"]
    # README: int16 CT, HU -1100..1207, p1/p50/p99 = -1013/-91/188.
    assert ct_sm.value_range() == (-1100.0, 1207.0)
    assert np.percentile(ct_sm.data, [1, 50, 99]).tolist() == [-1013.0, -91.0, 188.0]
    assert ct_sm.modality == "CT"
    assert ct_sm.metadata["modality_source"] == "inferred"


def test_ct_nifti_reorientation_is_a_real_flip(ct_sm: Volume, data_dir: Path) -> None:
    img = nib.load(data_dir / "example_ct_sm.nii.gz")
    raw = np.asanyarray(img.dataobj)
    for k, r, c in [(0, 0, 0), (3, 17, 90), (29, 100, 121), (12, 50, 5)]:
        assert ct_sm.data[k, r, c] == raw[122 - 1 - c, 101 - 1 - r, k]
        # The affine maps the new index to the same world point as the old one.
        world_new = ct_sm.affine @ [k, r, c, 1]
        world_old = img.affine @ [122 - 1 - c, 101 - 1 - r, k, 1]
        np.testing.assert_allclose(world_new, world_old, atol=1e-6)
    np.testing.assert_array_equal(ct_sm.data, raw[::-1, ::-1, :].transpose(2, 1, 0))


def test_ct_anatomy_matches_radiological_convention(ct_sm_seg: Volume) -> None:
    ids = _ids(ct_sm_seg)
    liver = _centroid(ct_sm_seg, ids["liver"])
    spleen = _centroid(ct_sm_seg, ids["spleen"])
    l1 = _centroid(ct_sm_seg, ids["vertebrae_L1"])
    t12 = _centroid(ct_sm_seg, ids["vertebrae_T12"])
    # Columns run patient right → left: the liver is on the image left.
    assert liver[2] < 61 < spleen[2]
    # Rows run anterior → posterior: the spine is behind the liver.
    assert l1[1] > liver[1] + 15
    # Slices run inferior → superior: T12 lies above L1 and the lungs are at the top.
    assert t12[0] > l1[0] + 5
    lungs = [v for k, v in ids.items() if k.startswith("lung_")]
    assert not np.isin(ct_sm_seg.data[0], lungs).any()
    assert np.isin(ct_sm_seg.data[-1], lungs).sum() > 500


def test_label_map_reads_integers_and_names(ct_sm_seg: Volume, data_dir: Path) -> None:
    assert ct_sm_seg.data.dtype == np.int32
    assert ct_sm_seg.shape == (30, 101, 122)
    names = ct_sm_seg.metadata["label_names"]
    assert len(names) == 117
    assert names[5] == "liver" and names[1] == "spleen"
    assert nifti_label_names(data_dir / "example_seg.nii.gz") == names
    assert nifti_label_names(data_dir / "example_seg_mr.nii.gz")[5] == "liver"
    assert nifti_label_names(data_dir / "example_ct_sm.nii.gz") is None
    assert ct_sm_seg.modality is None
    assert 5 in ct_sm_seg.metadata["labels_present"]


def test_ct_label_map_alignment(ct_sm: Volume, ct_sm_seg: Volume) -> None:
    np.testing.assert_array_equal(ct_sm.affine, ct_sm_seg.affine)
    liver_hu = float(np.median(ct_sm.data[ct_sm_seg.data == 5]))
    assert 0 < liver_hu < 150
    # The image corners (first rows/cols on every slice) are air outside the body.
    corner = ct_sm_seg.data[:, :8, :8] == 0
    assert corner.all()
    assert float(np.median(ct_sm.data[:, :8, :8])) < -900


def test_mr_nifti_from_lps(mr_sm: Volume, mr_sm_seg: Volume, data_dir: Path) -> None:
    assert mr_sm.shape == (20, 91, 117)
    assert mr_sm.source_orientation == "LPS"
    assert mr_sm.orientation == "SPL"
    assert mr_sm.value_range() == (-47.0, 833.0)
    assert mr_sm.modality == "MR"
    assert mr_sm.metadata["modality_source"] == "inferred"
    raw = np.asanyarray(nib.load(data_dir / "example_mr_sm.nii.gz").dataobj)
    np.testing.assert_array_equal(mr_sm.data, raw.transpose(2, 1, 0))
    # Alignment with its total_mr label map.
    assert mr_sm_seg.shape == mr_sm.shape
    np.testing.assert_array_equal(mr_sm_seg.affine, mr_sm.affine)
    liver = mr_sm_seg.data == 5
    assert all(liver[k].any() for k in range(mr_sm.n_slices))
    assert float(np.median(mr_sm.data[liver])) > 50 > float(np.median(mr_sm.data[:, :8, :8]))
    # Same anatomy test as CT from a differently oriented file: liver on the image left.
    assert _centroid(mr_sm_seg, 5)[2] < 117 / 2 < _centroid(mr_sm_seg, 1)[2]


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_4d_with_one_volume_is_squeezed(tmp_path: Path) -> None:
    data = np.full((4, 5, 6, 1), -1000, dtype=np.int16)
    vol = read_nifti(_save(tmp_path / "one.nii.gz", data))
    assert vol.shape == (6, 5, 4)
    assert vol.modality == "CT"


def test_2d_nifti_is_one_slice(tmp_path: Path) -> None:
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    vol = read_nifti(_save(tmp_path / "flat.nii", data))
    assert vol.shape == (1, 4, 3)
    assert vol.slice(0).pixels.shape == (4, 3)


def test_scaling_is_applied(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.array([[[0, 10]]], dtype=np.int16), np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, path)
    assert sorted(read_nifti(path).data.ravel().tolist()) == [-1024.0, -1004.0]


def test_sidecar_and_argument_set_modality(tmp_path: Path) -> None:
    path = _save(tmp_path / "scan.nii.gz", np.full((4, 4, 4), -1000, dtype=np.int16))
    assert read_nifti(path).modality == "CT"
    (tmp_path / "scan.json").write_text(json.dumps({"Modality": "MR"}))
    vol = read_nifti(path)
    assert (vol.modality, vol.metadata["modality_source"]) == ("MR", "sidecar")
    assert vol.metadata["sidecar"] == str(tmp_path / "scan.json")
    vol = read_nifti(path, modality="ct")
    assert (vol.modality, vol.metadata["modality_source"]) == ("CT", "argument")


def test_sidecar_without_modality_key_falls_back(tmp_path: Path) -> None:
    path = _save(tmp_path / "scan.nii", np.full((4, 4, 4), 300, dtype=np.int16))
    (tmp_path / "scan.json").write_text(json.dumps({"EchoTime": 0.01}))
    vol = read_nifti(path)
    assert (vol.modality, vol.metadata["modality_source"]) == ("MR", "inferred")


def test_float_label_map_with_integer_values(tmp_path: Path) -> None:
    data = np.array([[[0.0, 5.0], [1.0000001, 2.0]]], dtype=np.float32)
    vol = read_label_map(_save(tmp_path / "lab.nii.gz", data))
    assert vol.data.dtype == np.int32
    assert sorted(vol.data.ravel().tolist()) == [0, 1, 2, 5]
    assert vol.metadata["label_names"] is None


def test_small_ct_is_a_slab_of_the_full_ct(ct_sm: Volume, data_dir: Path) -> None:
    # README: example_ct_sm equals example_ct[:, :, 82:112] with the same affine (int32 on disk).
    full = read_nifti(data_dir / "example_ct.nii.gz")
    assert full.shape == (112, 101, 122)
    assert full.value_range() == (-1207.0, 3382.0)
    np.testing.assert_array_equal(full.data[82:112], ct_sm.data)
    # The crop kept the affine unchanged (README), so the slab is not at its true position.
    np.testing.assert_array_equal(full.affine, ct_sm.affine)


def test_label_map_modality_argument(data_dir: Path) -> None:
    vol = read_label_map(data_dir / "example_seg_mr.nii.gz", modality="mr")
    assert (vol.modality, vol.metadata["modality_source"]) == ("MR", "argument")
    with pytest.raises(RadGrounderError, match="unsupported modality 'US'"):
        read_label_map(data_dir / "example_seg_mr.nii.gz", modality="US")
