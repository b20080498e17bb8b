import json
import subprocess
import sys

import numpy as np
import pytest

from radgrounder.anatomy import load_schema
from radgrounder.errors import RadGrounderError
from radgrounder.imaging import read_dicom_series, read_label_map
from radgrounder.labels.regions import (
    extract_regions,
    group_box,
    part_ids,
    slice_geometry,
    slice_regions,
    slices_along,
    unify_label_volume,
)
from tests.conftest import EXAMPLES

SCHEMA = load_schema()


def naive_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)


@pytest.fixture(scope="module")
def ct_unified():
    return unify_label_volume(read_label_map(EXAMPLES / "example_seg.nii.gz"))


def test_union_boxes_equal_the_class_bounding_box_on_every_slice(ct_unified):
    n_checked = 0
    for r in extract_regions(ct_unified):
        s = ct_unified[r.index]
        assert r.classes == tuple(int(c) for c in np.unique(s) if c)
        for cid, box in r.boxes.items():
            assert box == naive_box(s == cid)
            assert r.areas[cid] == int((s == cid).sum())
            n_checked += 1
    assert n_checked > 300


def test_instances_are_same_class_8_connected_components():
    s = np.zeros((12, 12), np.uint8)
    s[1:3, 1:3] = 5  # liver, instance A
    s[3, 3] = 5  # touches A diagonally: same instance (8-connectivity)
    s[8:10, 8:11] = 5  # liver, instance B
    s[1:3, 3:6] = 1  # spleen touching liver: a separate class, not merged
    s[6, 0] = 1  # a one-pixel spleen island
    r = slice_regions(s, instances=True)
    assert r.boxes[5] == (1, 1, 11, 10)
    assert r.instances[5] == [(1, 1, 4, 4), (8, 8, 11, 10)]
    assert r.instances[1] == [(0, 6, 1, 7), (3, 1, 6, 3)]
    assert slice_regions(s, min_area=2).instances[1] == [(3, 1, 6, 3)]


def test_mr_ids_are_mapped_by_name(tmp_path):
    labels = read_label_map(EXAMPLES / "example_seg_mr.nii.gz")
    unified = unify_label_volume(labels)
    raw = labels.data
    # total_mr 10 = lung_left -> unified 118; 23 = aorta -> 52; 5 = liver stays 5
    assert np.array_equal(unified == 52, raw == 23)
    assert np.array_equal(unified == 5, raw == 5)
    assert set(np.unique(unified)) <= set(SCHEMA.ids) | {0}


def test_label_map_without_names_needs_a_task():
    labels = read_label_map(EXAMPLES / "example_seg.nii.gz")
    labels.metadata["label_names"] = None
    with pytest.raises(RadGrounderError, match="label_task"):
        unify_label_volume(labels)
    assert np.array_equal(
        unify_label_volume(labels, label_task="total"), labels.data.astype(np.uint8)
    )


def test_generic_classes_ground_on_their_parts(ct_unified):
    lung_left = SCHEMA.by_name("lung_left").id
    lobes = [SCHEMA.by_name(n).id for n in ("lung_upper_lobe_left", "lung_lower_lobe_left")]
    assert set(part_ids(lung_left)) == {lung_left, *lobes}
    for r in extract_regions(ct_unified):
        present = [lobe for lobe in lobes if lobe in r.boxes]
        box = group_box(r, lung_left)
        if not present:
            assert box is None
        else:
            assert box == naive_box(np.isin(ct_unified[r.index], lobes))


def test_slice_axes_and_dicom_geometry():
    vol = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    assert slices_along(vol, "coronal").shape == (3, 2, 4)
    assert slices_along(vol, "sagittal").shape == (4, 2, 3)
    assert slices_along(vol, "coronal")[0, 0, 0] == vol[1, 0, 0]  # superior on top
    with pytest.raises(RadGrounderError, match="slice_axis"):
        slices_along(vol, "oblique")
    series = read_dicom_series(EXAMPLES / "example_ct_dicom")
    geometry = slice_geometry(series.affine, series.shape, "axial")
    assert geometry[0] == ([-249.5117, -437.5117, -804.5], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    assert geometry[-1][0][2] == -766.5


def test_regions_cli_writes_one_line_per_slice(tmp_path):
    out = tmp_path / "regions.jsonl"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "radgrounder",
            "labels",
            "regions",
            str(EXAMPLES / "example_seg.nii.gz"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 30
    liver = SCHEMA.by_name("liver").id
    assert str(liver) in lines[20]["boxes"]
