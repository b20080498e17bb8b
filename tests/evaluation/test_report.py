"""Tests for radgrounder.evaluation.report: a self-contained report.html for a run folder."""

from __future__ import annotations

import base64
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from radgrounder.errors import RadGrounderError
from radgrounder.evaluation import report as R

NAN = float("nan")
XSS = "<script>alert(1)</script>"
VOID = {"img", "meta", "br", "hr", "link", "input", "col", "wbr", "source"}


def _row(i: int, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": f"vqa-rad:{i}",
        "dataset": "vqa-rad",
        "split": "test",
        "task": "vqa",
        "language": "en",
        "question_type": "closed" if i % 2 else "open",
        "prompt": f"answer en Is there a nodule in image {i}?",
        "raw_prediction": "yes",
        "prediction": "yes",
        "raw_reference": "yes",
        "reference": "yes",
        "image_ref": f"img{i}.png",
        "error": None,
        "llm_judge_status": None,
        "llm_judge_reason": None,
        "pred_spans": "[]",
        "ref_spans": "[]",
        "class_ious": "[]",
        "f1": 1.0 - i / 100,
        "accuracy": float(i % 2),
        "recall": 1.0,
        "cider": 1.5 + i / 10,
        "bleu1": 0.5,
        "bleu4": NAN,
        "rouge_l": 0.75,
    }
    row.update(over)
    return row


def _summary(**over: Any) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "format": "radgrounder-eval/1",
        "created": "2026-11-25T14:00:00+00:00",
        "dataset": {
            "name": "vqa-rad",
            "split": "test",
            "root": "/data/vqa",
            "sha256": "ab" * 32,
            "n": 735,
            "n_failed": 0,
        },
        "model": {
            "path": "models/detection",
            "sha256": "0123456789abcdef" * 4,
            "variant": "detection",
        },
        "generation": {
            "batch_size": 16,
            "max_new_tokens": 200,
            "greedy": True,
            "mask_threshold": "probability",
            "preset": "reference",
        },
        "compat": "none",
        "versions": {"radgrounder": "0.1.0", "torch": "2.13.0", "python": "3.11.7"},
        "bootstrap": {"n_resamples": 10000, "seed": 0, "alpha": 0.05},
        "metrics": {
            "all": {
                "f1": {"mean": 0.5, "low": 0.46, "high": 0.54, "n": 735, "bootstrap_mean": 0.5},
                "cider": {"mean": 1.23456, "low": 1.1, "high": 1.37, "n": 735},
            },
            "open": {"f1": {"mean": 0.31234, "low": 0.25, "high": 0.37, "n": 251}},
            "closed": {"accuracy": {"mean": 0.75, "low": 0.7149, "high": 0.7851, "n": 484}},
            "language=de": {"f1": {"mean": 0.4, "low": 0.3, "high": 0.5, "n": 12}},
        },
        "corpus": {"all": {"bleu1": 0.41, "bleu4": 0.12}, "open": {"bleu1": 0.3, "bleu4": 0.1}},
        "map50": None,
        "judge": None,
        "failures": [],
    }
    summary.update(over)
    return summary


def make_run(
    root: Path,
    rows: list[dict[str, Any]] | None = None,
    summary: dict[str, Any] | None = None,
    examples: list[dict[str, Any]] | None = None,
) -> Path:
    """A run folder: samples.parquet, summary.json and optionally examples/ with PNGs."""
    rows = rows if rows is not None else [_row(i) for i in range(5)]
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "samples.parquet")
    (root / "summary.json").write_text(json.dumps(summary or _summary()), encoding="utf-8")
    if examples is not None:
        (root / "examples").mkdir()
        for entry in examples:
            Image.new("RGB", (8, 6), (200, 30, 30)).save(root / entry["file"])
        (root / "examples" / "index.json").write_text(json.dumps(examples), encoding="utf-8")
    return root


class Doc(HTMLParser):
    """Collects tables (rows of cell texts), images, headings; checks tags are balanced."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.images: list[dict[str, str | None]] = []
        self.headings: list[str] = []
        self._cell: list[str] | None = None
        self._heading: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs))
        if tag in VOID:
            return
        self.stack.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag in ("h1", "h2", "h3"):
            self._heading = []

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
            return
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None
        elif tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append("".join(self._heading))
            self._heading = None

    def handle_data(self, data: str) -> None:
        for buf in (self._cell, self._heading):
            if buf is not None:
                buf.append(data)


def _tables_by_heading(text: str) -> dict[str, list[list[str]]]:
    """Each h3/h2 heading mapped to the first table that follows it."""
    out: dict[str, list[list[str]]] = {}
    for chunk in text.split("<h")[1:]:
        if chunk[:1] not in "23" or "</h" not in chunk:
            continue
        heading = Doc(f"<h{chunk[: chunk.index('</h') + 5]}").headings[0]
        tables = Doc(chunk[chunk.index("</h") + 5 :]).tables
        if tables:
            out[heading] = tables[0]
    return out


def _report(run: Path, **kwargs: Any) -> tuple[str, Doc]:
    path = R.write_report(run, **kwargs)
    text = path.read_text(encoding="utf-8")
    doc = Doc(text)
    assert doc.errors == [] and doc.stack == [], (doc.errors, doc.stack)
    return text, doc


def test_summary_tables_show_means_with_ci_for_every_subset(tmp_path: Path) -> None:
    judge = {
        "url": "http://localhost:8000/v1",
        "model": "judge-7b",
        "n": 735,
        "ok": 730,
        "unparseable": 3,
        "error": 2,
        "mean_score": 3.9,
        "mean_normalized": 0.72,
    }
    run = make_run(tmp_path / "run", summary=_summary(judge=judge))
    text, doc = _report(run)
    tables = _tables_by_heading(text)

    subsets = [h for h in doc.headings if h.startswith("Subset: ")]
    assert subsets == ["Subset: all", "Subset: open", "Subset: closed", "Subset: language=de"]
    assert tables["Subset: all"][0] == ["metric", "mean", "95% CI", "n"]
    assert ["f1", "0.500", "[0.460, 0.540]", "735"] in tables["Subset: all"]
    assert ["cider", "1.235", "[1.100, 1.370]", "735"] in tables["Subset: all"]  # CIDEr > 1 kept
    assert ["f1", "0.312", "[0.250, 0.370]", "251"] in tables["Subset: open"]
    assert ["accuracy", "0.750", "[0.715, 0.785]", "484"] in tables["Subset: closed"]
    assert ["f1", "0.400", "[0.300, 0.500]", "12"] in tables["Subset: language=de"]
    assert tables["Corpus-level"][1:] == [
        ["bleu1", "all", "0.410"],
        ["bleu4", "all", "0.120"],
        ["bleu1", "open", "0.300"],
        ["bleu4", "open", "0.100"],
    ]
    assert "Detection" not in tables  # map50 is null
    judge_rows = dict(map(tuple, tables["LLM judge"][1:]))
    assert judge_rows["ok"] == "730" and judge_rows["unparseable"] == "3"
    assert judge_rows["error"] == "2" and judge_rows["mean_score"] == "3.900"

    header = {r[0]: r[1] for r in doc.tables[0]}
    assert header["Dataset"] == "vqa-rad / test"
    assert header["Model"] == "models/detection (variant detection, 0123456789ab)"
    assert "torch 2.13.0" in header["Versions"] and "max_new_tokens=200" in header["Generation"]
    assert header["Compat"] == "none"
    assert header["Samples"] == "735 (0 failed)" and 'class="notice"' not in text


def test_data_is_escaped_everywhere(tmp_path: Path) -> None:
    rows = [
        _row(0, prediction=XSS, raw_prediction=f"<seg012>{XSS}", prompt="a < b & c"),
        _row(1, class_ious=json.dumps([{"class": "<b>liver</b>", "iou": 0.5}])),
    ]
    summary = _summary()
    summary["metrics"]["<i>subset</i>"] = {"f1": {"mean": 0.1, "low": 0.0, "high": 0.2, "n": 2}}
    examples = [{"id": "x", "file": "examples/0000.png", "caption": f"caption {XSS}"}]
    run = make_run(tmp_path / "run", rows=rows, summary=summary, examples=examples)
    text, doc = _report(run, title=f"Title {XSS}")

    assert "<script" not in text.lower()
    assert "<b>liver" not in text and "<i>subset" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "a &lt; b &amp; c" in text
    assert f"Title {XSS}" in doc.headings  # decoded by the parser back to the original text
    assert "Subset: <i>subset</i>" in doc.headings
    cells = [c for t in doc.tables for r in t for c in r]
    assert XSS in cells and "<b>liver</b>" in cells


def test_images_embedded_as_data_uris(tmp_path: Path) -> None:
    rows = [_row(i, meteor=NAN, my_metric=0.1 * i) for i in range(6)]
    rows[0]["class_ious"] = json.dumps([{"class": "liver", "iou": 0.4}])
    summary = _summary(map50={"map50": 0.31, "ap_per_class": {"liver": 0.8, "spleen": 0.0}})
    examples = [
        {"id": "vqa-rad:3", "file": "examples/0003.png", "caption": "pred vs ref"},
        {"id": "vqa-rad:4", "file": "examples/0004.png", "caption": "second"},
    ]
    run = make_run(tmp_path / "run", rows=rows, summary=summary, examples=examples)
    text, doc = _report(run)

    assert 'src="http' not in text and "href=" not in text and "<link" not in text
    alts = [img["alt"] for img in doc.images]
    # every float column with values gets a histogram (bleu4 and meteor are all NaN)
    metrics_with_values = ["f1", "accuracy", "recall", "cider", "bleu1", "rouge_l", "my_metric"]
    assert [a for a in alts if a.startswith("histogram")] == [
        f"histogram of {m}" for m in metrics_with_values
    ]
    assert "mean IoU per class" in alts and "AP@50 per class" in alts
    assert "vqa-rad:3: pred vs ref" in alts and "vqa-rad:4: second" in alts
    assert len(doc.images) == len(metrics_with_values) + 2 + 2
    for img in doc.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        assert base64.b64decode(img["src"][len(prefix) :]).startswith(b"\x89PNG\r\n\x1a\n")
    assert _tables_by_heading(text)["Detection"][1:] == [["mAP@50", "0.310"]]


def test_per_class_grounding_means_by_hand(tmp_path: Path) -> None:
    rows = [
        _row(
            0,
            task="grounded-report",
            class_ious=json.dumps(
                [{"class": "liver", "iou": 0.5}, {"class": "spleen", "iou": 0.2}]
            ),
        ),
        _row(1, task="grounded-report", class_ious=json.dumps([{"class": "liver", "iou": 0.7}])),
        _row(2, task="grounded-report", class_ious="[]"),
        _row(3, error="cannot read image", class_ious=None, f1=None),
        _row(
            4,
            task="grounded-report",
            class_ious=json.dumps(
                [{"class": "kidney_left", "iou": 0.9}, {"class": "liver", "iou": 0.0}]
            ),
        ),
    ]
    # liver: (0.5 + 0.7 + 0.0) / 3 = 0.4; spleen: 0.2; kidney_left: 0.9
    summary = _summary(map50={"map50": 0.5, "ap_per_class": {"liver": 0.8, "aorta": 0.25}})
    run = make_run(tmp_path / "run", rows=rows, summary=summary)
    text, _ = _report(run)
    table = _tables_by_heading(text)["Per-class grounding"]
    assert table == [
        ["class", "mean IoU", "n", "AP@50"],
        ["kidney_left", "0.900", "1", "–"],
        ["liver", "0.400", "3", "0.800"],
        ["spleen", "0.200", "1", "–"],
        ["aorta", "–", "0", "0.250"],
    ]


@pytest.mark.parametrize("map50", [None, {"map50": 0.0, "ap_per_class": {}}])
def test_no_grounding_section_without_grounding_data(tmp_path: Path, map50: Any) -> None:
    rows = [_row(0, class_ious="[]"), _row(1, class_ious=None)]
    run = make_run(tmp_path / "run", rows=rows, summary=_summary(map50=map50))
    text, doc = _report(run)
    assert "Per-class grounding" not in doc.headings
    assert 'id="per-class"' not in text
    assert not any(img["alt"].endswith("per class") for img in doc.images)


def test_failures_listed(tmp_path: Path) -> None:
    failures = [
        {"id": "vqa-rad:17", "error": "cannot read image <root>/x.png (file not found)"},
        {"id": "vqa-rad:18", "error": "CUDA out of memory"},
    ]
    summary = _summary(failures=failures)
    summary["dataset"]["n_failed"] = 2
    rows = [_row(0), _row(17, error=failures[0]["error"], f1=None, accuracy=None)]
    text, _ = _report(make_run(tmp_path / "run", rows=rows, summary=summary))
    assert '<div class="notice"><strong>2 sample(s) failed</strong>' in text
    notice = Doc(text.split('<div class="notice">')[1].split("</div>")[0]).tables[0]
    assert notice == [["id", "error"], *([f["id"], f["error"]] for f in failures)]
    assert "&lt;root&gt;/x.png" in text


def test_sample_tables_first_and_lowest_f1(tmp_path: Path) -> None:
    rows = [_row(i, f1=(i * 37 % 25) / 25, prediction="w " * 400) for i in range(25)]
    rows[5]["f1"] = NAN  # no F1: never among the lowest
    text, _ = _report(make_run(tmp_path / "run", rows=rows))
    tables = _tables_by_heading(text)
    first = tables["First 20 samples"]
    assert [r[0] for r in first[1:]] == [f"vqa-rad:{i}" for i in range(20)]
    assert first[0][:5] == ["id", "task", "prompt", "prediction", "reference"]
    assert all(len(r[3]) <= R.MAX_TEXT and r[3].endswith("…") for r in first[1:])
    lowest = tables["10 lowest-F1 samples"]
    scored = sorted((r for r in rows if not math.isnan(r["f1"])), key=lambda r: r["f1"])
    assert [r[0] for r in lowest[1:]] == [r["id"] for r in scored[:10]]
    assert lowest[1][first[0].index("f1")] == "0.000"


def test_missing_image_in_examples_is_reported_not_fatal(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", examples=[])
    (run / "examples" / "index.json").write_text(
        json.dumps(
            [
                {"id": "a", "file": "examples/none.png", "caption": "c"},
                {"id": "b", "file": "../outside.png", "caption": "d"},
            ]
        )
    )
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    text, doc = _report(run)
    assert "image missing: examples/none.png" in text and "image missing: ../outside.png" in text
    assert not any(img["alt"].startswith(("a:", "b:")) for img in doc.images)


@pytest.mark.parametrize("name", ["samples.parquet", "summary.json"])
def test_missing_files_raise(tmp_path: Path, name: str) -> None:
    run = make_run(tmp_path / "run")
    (run / name).unlink()
    with pytest.raises(RadGrounderError, match=re.escape(name)) as info:
        R.write_report(run)
    assert info.value.path == str(run / name)
    assert not (run / "report.html").exists()


def test_invalid_summary_json_raises(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    (run / "summary.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(RadGrounderError, match=r"summary\.json"):
        R.write_report(run)
    (run / "summary.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(RadGrounderError, match=r"summary\.json"):
        R.write_report(run)


def test_written_atomically_at_requested_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(tmp_path / "run")
    calls: list[Path] = []
    real = R.atomic_write_bytes

    def spy(path: str | Path, data: bytes) -> None:
        calls.append(Path(path))
        real(path, data)

    monkeypatch.setattr(R, "atomic_write_bytes", spy)
    assert R.write_report(run) == run / "report.html"
    out = tmp_path / "elsewhere" / "nested" / "eval.html"
    out.parent.mkdir(parents=True)
    out.write_text("old")
    assert R.write_report(run, out=str(out), title="Custom") == out
    assert calls == [run / "report.html", out]
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<title>Custom</title>" in text
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval.html"]  # no temp files left
    assert sorted(p.name for p in run.iterdir()) == [
        "report.html",
        "samples.parquet",
        "summary.json",
    ]
