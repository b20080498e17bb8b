"""DICOM SEG / SR export on the bundled 20-slice CT series, checked by re-reading the output.

The canonical↔source mapping is verified independently of the exporter: every source pixel
centre is sent through its image's IPP/IOP/PixelSpacing (LPS → RAS) and ``inv(volume.affine)``.
A rewritten copy of the series (pixels transposed and flipped, IOP changed to match, so the
canonical volume is identical) exercises every permutation and flip.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radgrounder.errors import RadGrounderError
from radgrounder.imaging import Volume, read_dicom_series, read_label_map
from radgrounder.inference.dicom_export import (
    DicomExportWarning,
    Finding,
    Segment3D,
    export_dicom_seg,
    export_dicom_sr,
)

hd = pytest.importorskip("highdicom")

DATA = Path(__file__).resolve().parents[2] / "data" / "totalseg_example"
SERIES = DATA / "example_ct_dicom"
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
pytestmark = pytest.mark.filterwarnings("ignore:source images lack:UserWarning")


def sop_uid(ds: pydicom.Dataset) -> str:
    return str(ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID)


def source_images(folder: Path) -> dict[str, pydicom.Dataset]:
    out = {}
    for p in sorted(folder.iterdir()):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out[sop_uid(ds)] = ds
    return out


def image_to_canonical(ds: pydicom.Dataset, volume: Volume, col: np.ndarray, row: np.ndarray):
    """Continuous source (col, row) pixel-centre coordinates → canonical (slice, row, col)."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    lps = (
        np.asarray(ds.ImagePositionPatient, dtype=float)
        + np.multiply.outer(col * dc, iop[:3])
        + np.multiply.outer(row * dr, iop[3:])
    )
    ras = np.c_[lps * LPS_TO_RAS, np.ones(len(lps))]
    return (np.linalg.inv(volume.affine) @ ras.T).T[:, :3]


def frame_to_canonical(ds: pydicom.Dataset, frame: np.ndarray, out: np.ndarray, volume: Volume):
    rows, cols = np.indices(frame.shape)
    ijk = image_to_canonical(ds, volume, cols.ravel().astype(float), rows.ravel().astype(float))
    idx = np.rint(ijk).astype(int)
    assert np.allclose(ijk, idx, atol=1e-3)
    out[idx[:, 0], idx[:, 1], idx[:, 2]] = frame.ravel()


@pytest.fixture(scope="module")
def flipped_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The series with pixels stored transposed and flipped in both axes.

    New IOP row/col directions are (0,-1,0)/(-1,0,0) (LPS) and IPP the old bottom-right pixel,
    so every image shows the same anatomy; the slice normal now points inferior.
    """
    dest = tmp_path_factory.mktemp("flipped")
    for p in sorted(SERIES.iterdir()):
        ds = pydicom.dcmread(p)
        old = ds.pixel_array
        n = old.shape[0]
        d = float(ds.PixelSpacing[0])
        ds.PixelData = np.ascontiguousarray(old[::-1, ::-1].T).tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ipp = np.asarray(ds.ImagePositionPatient, dtype=float) + (n - 1) * d * np.array([1, 1, 0])
        ds.ImagePositionPatient = [float(v) for v in ipp]
        ds.ImageOrientationPatient = [0, -1, 0, -1, 0, 0]
        ds.save_as(dest / p.name, enforce_file_format=True)
    return dest


@pytest.fixture(scope="module")
def volume() -> Volume:
    return read_dicom_series(SERIES)


@pytest.fixture(scope="module")
def masks(volume: Volume) -> dict[str, np.ndarray]:
    box = np.zeros(volume.shape, dtype=bool)
    box[5:10, 100:180, 300:420] = True
    labels = read_label_map(DATA / "example_seg_dicom.nii.gz")
    assert np.allclose(labels.affine, volume.affine)
    out = {
        "box": box,
        "bone": volume.data > 300,
        "liver": labels.data == 5,
        "rib": labels.data == 99,
    }
    assert all(m.any() for m in out.values())
    return out


@pytest.mark.parametrize("which", ["original", "flipped"])
def test_seg_round_trip(which, volume, masks, flipped_series, tmp_path):
    folder = SERIES if which == "original" else flipped_series
    vol = read_dicom_series(folder)
    np.testing.assert_array_equal(vol.data, volume.data)
    np.testing.assert_allclose(vol.affine, volume.affine)
    segments = [
        Segment3D("hypodense region in segment VI", masks["box"]),
        Segment3D("Knochen (> 300 HU)", masks["bone"]),
        Segment3D("liver", masks["liver"], class_id=5),
        Segment3D("nothing here", np.zeros(vol.shape, dtype=bool)),
        Segment3D("left 8th rib", masks["rib"].astype(np.uint8), class_name="rib_left_8"),
    ]
    with pytest.warns(DicomExportWarning, match="nothing here"):
        out = export_dicom_seg(folder, vol, segments, tmp_path / "out" / "seg.dcm")
    assert out == tmp_path / "out" / "seg.dcm"
    assert pydicom.dcmread(out).Modality == "SEG"
    seg = hd.seg.segread(out)
    assert seg.number_of_segments == 4
    descs = list(seg.SegmentSequence)
    assert [d.SegmentLabel for d in descs] == [s.label for i, s in enumerate(segments) if i != 3]
    assert descs[2].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Liver"
    assert descs[2].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert descs[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Lesion"
    assert descs[0].SegmentAlgorithmType == "AUTOMATIC"
    assert descs[3].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Rib"
    assert descs[3].SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"

    sources = source_images(folder)
    referenced = {
        i.ReferencedSOPInstanceUID
        for s in seg.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }
    assert referenced and referenced <= set(sources)

    uids = sorted(referenced)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1, 2, 3, 4]
    )
    for number, key in enumerate(["box", "bone", "liver", "rib"]):
        back = np.zeros(vol.shape, dtype=bool)
        for uid, frame in zip(uids, pixels[..., number], strict=True):
            frame_to_canonical(sources[uid], frame.astype(bool), back, vol)
        np.testing.assert_array_equal(back, masks[key], err_msg=key)
    if which == "flipped":  # the stored frames really are the transposed/flipped masks
        first = sources[uids[0]]
        k = round(float(image_to_canonical(first, vol, np.zeros(1), np.zeros(1))[0, 0]))
        np.testing.assert_array_equal(pixels[0, ..., 0], masks["box"][k][::-1, ::-1].T)


@pytest.mark.parametrize("which", ["original", "flipped"])
def test_sr_round_trip(which, volume, flipped_series, tmp_path):
    folder = SERIES if which == "original" else flipped_series
    vol = read_dicom_series(folder)
    findings = [
        Finding("hypodense Läsion im Segment VI", 3, (300.0, 120.0, 341.0, 150.0), class_id=5),
        Finding("small nodule", 12, (10.0, 20.5, 30.0, 44.0)),
        Finding("left kidney", 12, (350.0, 200.0, 400.0, 260.0), class_name="kidney_left"),
    ]
    text = "Liver: hypodense lesion in segment VI.\nSmall nodule, left kidney unremarkable."
    out = export_dicom_sr(folder, vol, findings, tmp_path / "sr.dcm", report_text=text)
    assert pydicom.dcmread(out).Modality == "SR"
    sr = hd.sr.srread(out)
    groups = sr.content.get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [f.label for f in findings]
    assert groups[0].finding_type.meaning == "Liver"
    assert groups[0].finding_sites[0].value.meaning == "Liver"
    assert groups[1].finding_type.value == "404684003" and not groups[1].finding_sites
    assert groups[2].finding_sites[0].laterality.meaning == "Left"

    sources = source_images(folder)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == sr.StudyInstanceUID
    for f, g in zip(findings, groups, strict=True):
        roi = g.roi
        assert roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        uid = roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        image = sources[uid]
        points = roi.value
        np.testing.assert_array_equal(points[0], points[-1])
        ijk = image_to_canonical(image, vol, points[:, 0] - 0.5, points[:, 1] - 0.5)
        np.testing.assert_allclose(ijk[:, 0], f.slice_index, atol=1e-6)
        x1, y1, x2, y2 = f.box_px
        got = {(round(c, 4), round(r, 4)) for r, c in ijk[:, 1:] + 0.5}
        assert got == {(x1, y1), (x2, y1), (x2, y2), (x1, y2)}
    qe = sr.ContentSequence[-1]
    assert qe.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"
    assert qe.ContentSequence[0].TextValue == text


def test_seg_errors(volume, masks, tmp_path):
    wrong = Segment3D("bad shape", np.zeros((20, 256, 256), dtype=bool))
    with pytest.raises(RadGrounderError, match="bad shape"):
        export_dicom_seg(SERIES, volume, [wrong], tmp_path / "a.dcm")
    empty = [Segment3D("a", np.zeros(volume.shape, bool)), Segment3D("b", np.zeros(volume.shape))]
    with pytest.raises(RadGrounderError, match="empty"):
        export_dicom_seg(SERIES, volume, empty, tmp_path / "b.dcm")
    partial = tmp_path / "five"
    partial.mkdir()
    for p in sorted(SERIES.iterdir())[:5]:
        shutil.copyfile(p, partial / p.name)
    ok = [Segment3D("box", masks["box"])]
    with pytest.raises(RadGrounderError, match=r"five.*not the series"):
        export_dicom_seg(partial, volume, ok, tmp_path / "c.dcm")
    with pytest.raises(RadGrounderError, match=r"five.*not the series"):
        export_dicom_sr(partial, volume, [Finding("x", 0, (0, 0, 5, 5))], tmp_path / "d.dcm")
    assert not list(tmp_path.glob("*.dcm"))


def test_sr_errors_and_missing_highdicom(volume, tmp_path, monkeypatch):
    with pytest.raises(RadGrounderError, match="slice index 20"):
        export_dicom_sr(SERIES, volume, [Finding("x", 20, (0, 0, 5, 5))], tmp_path / "a.dcm")
    with pytest.raises(RadGrounderError, match=r"all 1 box\(es\) are empty in their slice"):
        export_dicom_sr(SERIES, volume, [Finding("x", 0, (600, 0, 700, 5))], tmp_path / "b.dcm")
    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(RadGrounderError, match=r"pip install 'radgrounder\[dicom\]'"):
        export_dicom_sr(SERIES, volume, [Finding("x", 0, (0, 0, 5, 5))], tmp_path / "c.dcm")


def test_blank_uids_are_derived_consistently(volume, masks, tmp_path):
    """The bundled files have Study/Series UIDs blanked; SEG and SR must agree on substitutes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seg_path = export_dicom_seg(
            SERIES, volume, [Segment3D("box", masks["box"])], tmp_path / "s.dcm"
        )
        sr_path = export_dicom_sr(
            SERIES, volume, [Finding("x", 0, (0, 0, 5, 5))], tmp_path / "r.dcm"
        )
    assert any(
        w.category is DicomExportWarning and "StudyInstanceUID" in str(w.message) for w in caught
    )
    seg, sr = pydicom.dcmread(seg_path), pydicom.dcmread(sr_path)
    assert seg.StudyInstanceUID == sr.StudyInstanceUID
    assert (
        seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        == sr.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .SeriesInstanceUID
    )
    assert (
        seg.FrameOfReferenceUID
        == pydicom.dcmread(next(SERIES.iterdir()), stop_before_pixels=True).FrameOfReferenceUID
    )


def test_seg_of_a_gantry_tilted_series_references_each_slice(masks, tmp_path):
    """The sheared affine of a tilted CT maps back onto the source frames exactly."""
    import math

    from tests.imaging.test_archive_series import derive

    z0: list[float] = []

    def tilted(k: int, ds: pydicom.Dataset) -> pydicom.Dataset:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        z0.append(z) if not z0 else None
        ds.ImagePositionPatient = [x, y + (z - z0[0]) * math.tan(math.radians(12)), z]
        return ds

    folder = derive(tmp_path / "tilted", tilted)
    vol = read_dicom_series(folder)
    assert vol.metadata["gantry_tilt_deg"] == pytest.approx(12, abs=0.01)
    out = export_dicom_seg(folder, vol, [Segment3D("liver", masks["liver"], class_id=5)],
                           tmp_path / "seg.dcm")  # fmt: skip
    seg = hd.seg.segread(out)
    sources = source_images(folder)
    uids = sorted(
        i.ReferencedSOPInstanceUID
        for s in seg.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    )
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    back = np.zeros(vol.shape, dtype=bool)
    for uid, frame in zip(uids, pixels[..., 0], strict=True):
        frame_to_canonical(sources[uid], frame.astype(bool), back, vol)
    np.testing.assert_array_equal(back, masks["liver"])


def test_sr_drops_boxes_empty_in_their_slice_and_keeps_the_rest(volume, tmp_path):
    findings = [
        Finding("inferior vena cava", 3, (210.0, 256.0, 256.0, 256.0)),  # zero height
        Finding("liver", 3, (300.0, 120.0, 341.0, 150.0), class_id=5),
        Finding("outside", 4, (600.0, 0.0, 700.0, 5.0)),  # beyond the 512 columns
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export_dicom_sr(SERIES, volume, findings, tmp_path / "sr.dcm")
    dropped = [w.message for w in caught if "box(es) empty" in str(w.message)]
    assert len(dropped) == 1 and dropped[0].dropped == 2
    assert "'inferior vena cava' on slice 3" in str(dropped[0]) and "'outside'" in str(dropped[0])
    groups = hd.sr.srread(out).content.get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["liver"]


class _ScriptedDetections:
    """Stands in for the model in ``run_predict``: real :class:`Prediction` objects with the
    boxes a trained model emitted on the bundled series (one of them zero-height)."""

    variant = "detection"

    def predict(self, images, task, language, **_):
        from radgrounder.grounding import Box, GroundedText
        from radgrounder.inference import Prediction

        out = []
        for sl in images:
            h, w = sl.pixels.shape[:2]
            g = GroundedText.from_phrases([
                ("inferior vena cava", {"boxes": [Box(210 / w, 1.0, 1.0, 1.0)]}), " and ",
                ("liver", {"class_id": 5, "boxes": [Box(0.3, 0.3, 0.6, 0.6)]}), ".",
            ])  # fmt: skip
            out.append(Prediction(task, language, "", g.text, g, w, h, sl.source, sl.index))
        return out


def test_predict_export_names_and_counts_what_it_dropped(tmp_path):
    from radgrounder.inference.outputs import run_predict

    run = run_predict(_ScriptedDetections(), SERIES, tmp_path / "o", task="grounded-report",
                      all_slices=True, export="dicom-sr")  # fmt: skip
    assert run.export_dropped == 20  # the zero-height box on each of the 20 slices
    assert any("--export dicom-sr: 20 box(es) empty" in n for n in run.warnings)
    groups = hd.sr.srread(run.files["dicom-sr"]).content.get_planar_roi_measurement_groups()
    assert len(groups) == 20 and {g.tracking_identifier for g in groups} == {"liver"}


def test_seg_export_without_masks_says_what_the_segmentation_model_did(tmp_path, capsys):
    from radgrounder.modeling import init_model
    from tests.helpers import run_cli

    model = init_model("tiny", "segmentation", tmp_path / "seg-model", seed=0)
    code, cap = run_cli(["predict", str(SERIES), "--model", str(model), "--slice", "3",
                         "--max-new-tokens", "2", "--export", "dicom-seg", "--out",
                         str(tmp_path / "o")], capsys)  # fmt: skip
    assert code == 1 and cap.err.count("\n") == 1
    assert "the model emitted no mask in its 1 answer(s)" in cap.err
    assert "use the segmentation model" not in cap.err


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="needs dciodvfy (dicom3tools)")
def test_the_validator_that_checks_every_export_does_find_errors(volume, tmp_path):
    from tests.conftest import dciodvfy_errors

    out = export_dicom_sr(SERIES, volume, [Finding("liver", 3, (300.0, 120.0, 341.0, 150.0))],
                          tmp_path / "sr.dcm")  # fmt: skip
    assert dciodvfy_errors(out) == []
    ds = pydicom.dcmread(out)
    del ds.ContentSequence, ds.SOPClassUID
    broken = tmp_path / "broken.dicom"  # not *.dcm: the autouse check would fail on it
    ds.save_as(broken)
    assert dciodvfy_errors(broken)
