import json

import numpy as np
from PIL import Image

from radgrounder.anatomy import load_schema
from radgrounder.demo import ground_slice, run_demo
from radgrounder.grounding import codec
from radgrounder.imaging import read_label_map
from tests.conftest import EXAMPLES


def test_ground_slice_boxes_come_from_the_label_map():
    gs = ground_slice(EXAMPLES / "example_ct_sm.nii.gz", EXAMPLES / "example_seg.nii.gz", 20)
    labels = read_label_map(EXAMPLES / "example_seg.nii.gz").data[20]
    caption = gs.captions["en"]
    liver = next(s for s in caption.spans if s.class_name == "liver")
    rows, cols = np.nonzero(labels == 5)
    h, w = labels.shape
    box = liver.boxes[0]
    # exclusive max, truncated onto the 224 grid as the reference does
    assert box.x1 == int(cols.min() * 224 / w) / 224
    assert box.x2 == int((cols.max() + 1) * 224 / w) / 224
    assert box.y1 == int(rows.min() * 224 / h) / 224
    assert np.array_equal(liver.mask, labels == 5)
    de = gs.captions["de"]
    assert "Leber" in [s.label for s in de.spans]
    assert [s.class_id for s in de.spans] == [s.class_id for s in caption.spans]


def test_run_demo_writes_overlays_and_targets(tmp_path):
    summary = run_demo(tmp_path)
    written = json.loads((tmp_path / "demo.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert [s["kind"] for s in written["scans"]] == ["nifti", "nifti", "dicom-series", "nifti"]
    assert [s["modality"] for s in written["scans"]] == ["CT", "MR", "CT", None]
    assert written["scans"][3]["extra"]["label_map"] is True
    assert {g["language"] for g in written["grounded"]} == {"en", "de"}
    names = load_schema().names_by_id()
    for g in written["grounded"]:
        png = Image.open(tmp_path / g["overlay"])
        assert png.mode == "RGB" and png.width >= 300
        decoded = codec("radgrounder-detect", class_names=names).decode(g["target_detect"])
        assert decoded.text == g["text"] and decoded.problems == []
        assert all(s.class_name and s.boxes for s in decoded.spans)
        assert g["target_segment"].count("</seg>") == len(decoded.spans)


def test_demo_pipeline_end_to_end_quick(tmp_path):
    """The whole loop with a few training steps: every stage writes what the page shows."""
    from html.parser import HTMLParser

    from radgrounder.demo_pipeline import run_pipeline

    result = run_pipeline(tmp_path, max_steps=3, eval_limit=4, max_new_tokens=6)
    out = tmp_path
    assert (result.model / "config.json").is_file()
    manifest = json.loads((out / "dataset" / "manifest.json").read_text())
    assert "ct_dicom_series" in json.dumps(manifest)
    assert sorted(p.stem for p in (out / "dataset" / "samples" / "test").glob("*.parquet")) == [
        "ct_dicom_series"
    ]
    for run in ("model", "baseline"):
        summary = json.loads((out / "eval" / run / "summary.json").read_text())
        assert summary["dataset"]["n"] == 4 and summary["dataset"]["split"] == "test"
        assert "grounding_iou" in summary["metrics"]["all"]
    for lang in ("en", "de"):
        lines = (out / "predict" / lang / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == 20 and json.loads(lines[0])["language"] == lang
        assert (out / "predict" / lang / "series.json").is_file()
    page = result.index_html.read_text()
    assert "mean-box baseline" in page and "can and cannot show" in page
    base = json.loads((out / "eval" / "baseline" / "summary.json").read_text())
    assert f"{base['metrics']['all']['box_iou']['mean']:.3f}" in page
    assert (out / "training_curve.png").is_file()

    class Images(HTMLParser):
        def __init__(self):
            super().__init__()
            self.srcs: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.srcs.append(dict(attrs)["src"])

    parser = Images()
    parser.feed(page)
    assert len(parser.srcs) >= 6
    for src in parser.srcs:
        assert (out / src).is_file(), src

    # A rerun resumes every stage; a changed evaluation setting starts that evaluation afresh.
    again = run_pipeline(tmp_path, max_steps=3, eval_limit=5, max_new_tokens=6)
    assert again.summary["model"]["dataset"]["n"] == 5
    assert again.summary["baseline"]["dataset"]["n"] == 5
