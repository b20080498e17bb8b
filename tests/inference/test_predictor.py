"""Predictor on tiny detection and segmentation models; series aggregation; the predict CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

import radgrounder.inference.batching as batching
from radgrounder.errors import RadGrounderError
from radgrounder.grounding import Box, GroundedText
from radgrounder.imaging import load_scan, read_label_map
from radgrounder.inference import Prediction, Predictor, aggregate_structures
from radgrounder.modeling.generation import Generated
from tests.conftest import EXAMPLES
from tests.helpers import run_cli

SERIES = EXAMPLES / "example_ct_dicom"
NIFTI = EXAMPLES / "example_ct_sm.nii.gz"
SERIES_LABELS = EXAMPLES / "layout" / "labels" / "ct_dicom_series.nii.gz"


def _script(monkeypatch, answer):
    """Replace the model's generation with fixed answers; all else (preprocessing, prompts,
    decoding, coordinate mapping) stays real."""
    seen = []

    def fake(loaded, examples, **kw):
        seen.append([ex.prompt for ex in examples])
        return [answer(ex) for ex in examples]

    monkeypatch.setattr(batching, "generate_examples", fake)
    return seen


def test_detection_boxes_map_back_to_the_input_grid(tiny, monkeypatch):
    text = "The <p bbox=<loc0128><loc0256><loc0384><loc0512> id=<seg005>>liver</p> is normal."
    _script(monkeypatch, lambda ex: Generated(text, [1]))
    volume = load_scan(NIFTI)
    pred = Predictor(tiny["detection"]).predict([volume.slice(7)], "grounded-report")[0]
    h, w = volume.data.shape[1:]
    assert (pred.width, pred.height, pred.slice_index) == (w, h, 7)
    assert pred.grounded.text == "The liver is normal."
    d = pred.to_dict()
    (span,) = d["spans"]
    assert span["class_name"] == "liver" and span["class_id"] == 5
    assert span["boxes"] == [[0.25, 0.5, 0.75, 1.0]]
    assert span["boxes_px"] == [[0.25 * w, 0.5 * h, 0.75 * w, 1.0 * h]]
    assert d["text"][span["start"] : span["end"]] == "liver"


def test_segmentation_masks_map_back_to_the_input_grid(tiny, monkeypatch):
    mask = np.zeros((224, 224), bool)
    mask[56:112, 112:224] = True
    _script(
        monkeypatch, lambda ex: Generated("Die <seg>Leber</seg> ist normal.", [1], masks=[mask])
    )
    volume = load_scan(NIFTI)
    pred = Predictor(tiny["segmentation"]).predict([volume.slice(3)], "grounded-report", "de")[0]
    h, w = volume.data.shape[1:]
    (span,) = pred.grounded.spans
    assert span.mask.shape == (h, w) and span.class_name == "liver"
    rows, cols = np.nonzero(span.mask)
    assert rows.min() == math.ceil(56 * h / 224) and rows.max() == math.ceil(112 * h / 224) - 1
    assert cols.min() == math.ceil(112 * w / 224) and cols.max() == w - 1


def test_batched_equals_one_by_one(tiny):
    volume = load_scan(SERIES)
    images = [volume.slice(k) for k in (2, 9, 15)]
    for variant in ("detection", "segmentation"):
        batched = Predictor(tiny[variant], batch_size=3)
        single = Predictor(batched.loaded, batch_size=1)
        kw = {"question": "Which organ is enlarged on this slice?", "max_new_tokens": 6}
        items = batched.prepare(images[:2], "vqa", question=kw["question"])
        items += batched.prepare(images[2:], "grounded-report", clinical_info="Pain.")
        a = batched.run(items, max_new_tokens=6)
        b = single.run(items, max_new_tokens=6)
        assert [p.raw_text for p in a] == [p.raw_text for p in b]
        assert [p.slice_index for p in a] == [2, 9, 15]
        assert a[0].prompt.endswith("Which organ is enlarged on this slice?\nAnswer: ")


def test_detect_asks_one_question_per_structure_and_joins_the_answers(tiny, monkeypatch):
    answers = iter(
        [
            "Ja, die <p bbox=<loc0010><loc0010><loc0100><loc0100> id=<seg002>>rechte Niere</p> "
            "ist im Bild vorhanden.",
            "Ja, die <p bbox=<loc0300><loc0010><loc0400><loc0100> id=<seg003>>linke Niere</p> "
            "ist im Bild vorhanden.",
        ]
    )
    seen = _script(monkeypatch, lambda ex: Generated(next(answers), [1]))
    pred = Predictor(tiny["detection"]).predict(
        [load_scan(SERIES).slice(10)], "detect", "de", structures=["Niere"]
    )[0]
    assert seen[0] == [
        "<image>\nIst die rechte Niere im Bild vorhanden? ",
        "<image>\nIst die linke Niere im Bild vorhanden? ",
    ]
    assert [s.class_name for s in pred.grounded.spans] == ["kidney_right", "kidney_left"]
    for s in pred.grounded.spans:
        assert pred.grounded.text[s.start : s.end] == s.label


def test_bad_requests_name_the_field(tiny):
    det = Predictor(tiny["detection"])
    image = load_scan(NIFTI).slice(0)
    with pytest.raises(RadGrounderError, match="task: 'segment' is not available"):
        det.predict([image], "segment", structures=["liver"])
    with pytest.raises(RadGrounderError, match="question"):
        det.predict([image], "vqa")
    with pytest.raises(RadGrounderError, match="structures: 'flux capacitor'"):
        det.predict([image], "detect", structures=["flux capacitor"])
    with pytest.raises(RadGrounderError, match="language"):
        det.predict([image], "report", "fr")
    with pytest.raises(RadGrounderError, match="no such file"):
        det.predict(["/nonexistent/scan.dcm"], "report")


def test_chat_folds_the_history_into_the_question(tiny, monkeypatch):
    seen = _script(monkeypatch, lambda ex: Generated("No.", [1]))
    det = Predictor(tiny["detection"])
    pred = det.chat(NIFTI, [("Is this a CT?", "Yes.")], "Is there free fluid?")
    assert seen[0] == ["<image>\nIs this a CT?\nYes.\nIs there free fluid?\nAnswer: "]
    assert pred.raw_text == "No." and pred.task == "vqa"


def test_series_boxes_equal_the_label_maps_3d_extent():
    """Predictions replaced by ground truth: per slice, each class's box from the label map.
    The aggregated 3-D box must equal the label map's own 3-D extent in patient mm."""
    volume = load_scan(SERIES)
    labels = read_label_map(SERIES_LABELS)
    assert labels.data.shape == volume.data.shape
    data = labels.data.astype(int)
    h, w = data.shape[1:]
    preds = []
    for k in range(data.shape[0]):
        parts = []
        for cid in np.unique(data[k])[1:]:
            rows, cols = np.nonzero(data[k] == cid)
            box = Box.from_pixels(cols.min(), rows.min(), cols.max() + 1, rows.max() + 1, w, h,
                                  grid=None)  # fmt: skip
            parts += [(f"c{cid}", {"class_id": int(cid), "class_name": f"c{cid}",
                                   "boxes": [box]}), " "]  # fmt: skip
        grounded = GroundedText.from_phrases(parts or [""])
        preds.append(Prediction("grounded-report", "en", "", "", grounded, w, h, None, k))
    structures = {s.key: s for s in aggregate_structures(preds, volume.affine, max_gap=10_000)}
    assert len(structures) >= 5
    for cid in np.unique(data)[1:]:
        s = structures[f"c{cid}"]
        ks, rows, cols = np.nonzero(data == cid)
        assert (s.slice_start, s.slice_end) == (ks.min(), ks.max())
        lo = np.array([ks.min(), rows.min(), cols.min()]) - 0.5
        hi = np.array([ks.max(), rows.max(), cols.max()]) + 0.5
        corners = np.array([[a, b, c, 1] for a in (lo[0], hi[0]) for b in (lo[1], hi[1])
                            for c in (lo[2], hi[2])])  # fmt: skip
        for affine in (volume.affine, labels.affine):  # the DICOM and the NIfTI geometry
            ras = (affine @ corners.T).T[:, :3]
            np.testing.assert_allclose(s.ras_min, ras.min(0), atol=0.05)
            np.testing.assert_allclose(s.ras_max, ras.max(0), atol=0.05)


def test_series_runs_split_at_gaps():
    def pred(k):
        fields = {"class_id": 5, "class_name": "liver", "boxes": [Box(0.1, 0.1, 0.5, 0.5)]}
        g = GroundedText.from_phrases([("liver", fields)])
        return Prediction("grounded-report", "en", "", "", g, 100, 100, None, k)

    found = aggregate_structures([pred(k) for k in (0, 1, 3, 7, 8)], np.eye(4), max_gap=1)
    assert [(s.slice_start, s.slice_end, s.n_slices) for s in found] == [(0, 3, 3), (7, 8, 2)]
    assert found[0].voxel_box == (-0.5, 9.5, 9.5, 3.5, 49.5, 49.5)
    # identity affine: RAS = (slice, row, col); LPS flips the first two axes
    assert found[0].to_dict()["lps_min_mm"] == [-3.5, -49.5, 9.5]


def test_predict_cli_on_the_dicom_series_nifti_and_png(tiny, tmp_path, capsys):
    out = tmp_path / "series"
    args = ["predict", str(SERIES), "--model", str(tiny["segmentation"]), "--out", str(out),
            "--all-slices", "--max-new-tokens", "4", "--language", "de"]  # fmt: skip
    code, cap = run_cli(args, capsys)
    assert code == 0, cap.err
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["slice_index"] for r in lines] == list(range(20))
    assert all(r["language"] == "de" and r["width"] == 512 for r in lines)
    assert len(list((out / "overlays").glob("*.png"))) == 20
    assert Image.open(out / lines[0]["overlay"]).size[0] >= 512
    assert "structures" in json.loads((out / "series.json").read_text())

    out = tmp_path / "nifti"
    args = ["predict", str(NIFTI), "--model", str(tiny["detection"]), "--out", str(out),
            "--slice", "3", "--task", "vqa", "--question", "Is this a CT?",
            "--max-new-tokens", "3"]  # fmt: skip
    code, cap = run_cli(args, capsys)
    assert code == 0, cap.err
    (line,) = (out / "predictions.jsonl").read_text().splitlines()
    assert json.loads(line)["prompt"] == "<image>\nIs this a CT?\nAnswer: "
    assert not (out / "series.json").exists()

    png = tmp_path / "slice.png"
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) % 255).astype(np.uint8)).save(png)
    code, cap = run_cli(["predict", str(png), "--model", str(tiny["detection"]), "--out",
                          str(tmp_path / "png"), "--max-new-tokens", "3"], capsys)  # fmt: skip
    assert code == 0, cap.err
    rec = json.loads((tmp_path / "png" / "predictions.jsonl").read_text())
    assert (rec["width"], rec["height"]) == (64, 48)

    code, cap = run_cli(["predict", str(SERIES), "--model", str(tiny["detection"]), "--out",
                          str(tmp_path / "bad"), "--slice", "40"], capsys)  # fmt: skip
    assert code == 1 and "out of range" in cap.err


def test_predict_cli_exports_dicom_seg_and_sr(tiny, tmp_path, monkeypatch, capsys):
    import highdicom as hd

    mask = np.zeros((224, 224), bool)
    mask[80:150, 30:120] = True
    _script(monkeypatch, lambda ex: Generated("The <seg>liver</seg> is normal.", [1], masks=[mask]))
    base = ["predict", str(SERIES), "--model", str(tiny["segmentation"]), "--slice", "10"]
    code, cap = run_cli([*base, "--out", str(tmp_path / "seg"), "--export", "dicom-seg"], capsys)
    assert code == 0, cap.err
    seg = hd.seg.segread(tmp_path / "seg" / "grounded_segmentation.dcm")
    assert seg.number_of_segments == 1
    assert seg.get_segment_description(1).segment_label == "liver"
    code, cap = run_cli([*base, "--out", str(tmp_path / "sr"), "--export", "dicom-sr"], capsys)
    assert code == 0, cap.err
    sr = hd.sr.srread(tmp_path / "sr" / "grounded_report_sr.dcm")
    assert "liver" in str(sr.ContentSequence)

    _script(monkeypatch, lambda ex: Generated("Nothing to see.", [1]))
    code, cap = run_cli([*base, "--out", str(tmp_path / "none"), "--export", "dicom-sr"], capsys)
    assert code == 1 and "nothing to export" in cap.err
