"""Training examples from a folder in the reference's RefRad2D layout (spec §5.1, §5.7).

Reads what the reference's loaders read (and what ``radgrounder labels export`` writes):
``snippet2rsopids_<split>_<mod>_only.json`` split files, ``rsopid_2_segment_v3_<mod>.json``,
``refrad2d_reports.parquet``, zstd DICOM slices and ``.npy`` label slices. A slice with
keywords in its language becomes a grounded report, tagged the way the reference's loaders
tag it: every whole-word occurrence of a keyword, the class's first stored box (detection) or
``<seg>…</seg>`` with the class mask (segmentation; masks in text order here).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radgrounder.datasets.example import TASK_PROMPT, Example, resize_mask
from radgrounder.errors import RadGrounderError
from radgrounder.grounding import Box
from radgrounder.imaging import preprocess_slice
from radgrounder.labels.regions import part_ids, union_pixel_box
from radgrounder.prompts import build_prompt, clean_punctuation

if TYPE_CHECKING:
    from radgrounder.training.config import SourceConfig

_LANG = {"en": ("english", "keywords_eng"), "de": ("german", "keywords_de")}


def segmentation_keywords(keywords: list) -> list:
    """The segmentation loader's keyword order and filter (spec §2.3): longest first, and a
    keyword contained in another keyword is dropped (``Niere`` beside ``linke Niere``), so
    it is tagged nowhere."""
    ordered = sorted(keywords, key=lambda k: -len(k[0]))
    names = [k[0] for k in ordered]
    return [k for k in ordered if not any(k[0] != o and k[0] in o for o in names)]


def _choices(item: dict[str, Any]) -> list[str] | None:
    """Answer choices as the reference appends them: only for ``multiple`` questions, one
    per line; an empty list still adds its (empty) line."""
    if str(item.get("question_type", "")).strip().lower() != "multiple":
        return None
    return [str(c) for c in item.get("choices") or []] or [""]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise RadGrounderError(f"not valid JSON ({exc})", path=path) from None


class RefRad2DSource:
    """Grounded reports (and plain reports / VQA where a slice has no keywords)."""

    def __init__(self, cfg: SourceConfig, variant: str, *, preset: str, size: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.name = cfg.name or f"refrad2d:{Path(cfg.path).name}"
        self.root, self.variant, self.preset, self.size = Path(cfg.path), variant, preset, size
        if not (self.root / "refrad2d_reports.parquet").is_file():
            raise RadGrounderError(
                "not a RefRad2D folder (no refrad2d_reports.parquet)", path=self.root
            )
        table_path = self.root / "refrad2d_reports.parquet"
        try:
            reports = {r["rsopid"]: r for r in pq.read_table(table_path).to_pylist()}
        except (pa.ArrowException, OSError, KeyError) as exc:
            raise RadGrounderError(
                f"not a readable reports table ({exc})", path=table_path
            ) from None
        self.index: dict[str, dict[str, Any]] = {}
        for mod in ("ct", "mr"):
            f = self.root / f"rsopid_2_segment_v3_{mod}.json"
            if f.is_file():
                index = _read_json(f)
                if not isinstance(index, dict):
                    raise RadGrounderError("expected a mapping rsopid -> entry", path=f)
                self.index.update(index)
        self.items: list[tuple[str, str, dict[str, Any]]] = []
        for f in sorted(self.root.glob(f"filtered_*_splits/snippet2rsopids_{cfg.split}_*.json")):
            split = _read_json(f)
            try:
                for rsopids in split.values():
                    for rsopid in rsopids:
                        for lang in cfg.languages:
                            if (reports.get(rsopid) or {}).get(_LANG[lang][0]):
                                self.items.append((rsopid, lang, reports[rsopid]))
            except (AttributeError, TypeError, KeyError) as exc:
                raise RadGrounderError(
                    f"expected a mapping snippet -> [rsopid, ...] ({exc})", path=f
                ) from None
        if not self.items:
            raise RadGrounderError(
                f"source {self.name}: no slices for split {cfg.split!r}", path=self.root
            )
        self.items.sort(key=lambda t: (t[0], t[1]))

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, rsopid: str) -> tuple[np.ndarray, str]:
        import pydicom
        import zstandard

        path = self.root / "dicoms" / rsopid[:2] / f"{rsopid}.dcm.zst"
        try:
            raw = zstandard.ZstdDecompressor().decompress(path.read_bytes())
            ds = pydicom.dcmread(io.BytesIO(raw))
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:
            raise RadGrounderError(f"cannot read slice ({exc})", path=path) from exc
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        return pixels * slope + intercept, str(ds.Modality)

    def _tag(
        self,
        text: str,
        keywords: list,
        entry: dict[str, Any],
        labels: np.ndarray | None,
        shape: tuple[int, int],
    ) -> tuple[str, list[np.ndarray]]:
        h, w = shape
        boxes = {}
        for x1, y1, x2, y2, cid in entry["bboxes"]:
            boxes.setdefault(int(cid), (x1, y1, x2, y2))
        order = keywords if self.variant == "detection" else segmentation_keywords(keywords)
        spans: list[tuple[int, int, str, int]] = []

        def union(cid: int) -> tuple | None:
            return union_pixel_box([boxes[c] for c in part_ids(cid) if c in boxes])

        for kw, _name, cid in order:
            # As the reference: a keyword is tagged only where its class is in the slice.
            if union(int(cid)) is None:
                continue
            for m in re.finditer(rf"\b{re.escape(kw)}\b", text):
                if all(m.end() <= s or m.start() >= e for s, e, _, _ in spans):
                    spans.append((m.start(), m.end(), kw, int(cid)))
        spans.sort()
        out, pos, masks = [], 0, []
        for start, end, kw, cid in spans:
            out.append(text[pos:start])
            if self.variant == "detection":
                box = Box.from_pixels(*union(cid), w, h)
                locs = "".join(f"<loc{int(v * 512 + 1e-9):04d}>" for v in box.as_tuple())
                out.append(f"<p bbox={locs} id=<seg{cid:03d}>>{kw}</p>")
            else:
                out.append(f"<seg>{kw}</seg>")
                masks.append(resize_mask(np.isin(labels, part_ids(cid)), self.size))
            pos = end
        out.append(text[pos:])
        return "".join(out), masks

    def example(self, i: int, rng: np.random.Generator, prefix_style: str) -> Example:
        rsopid, lang, report = self.items[i]
        fields = report[_LANG[lang][0]]
        pixels, modality = self._image(rsopid)
        image = preprocess_slice(pixels, modality, preset=self.preset, size=self.size)
        entry = self.index.get(rsopid)
        keywords = (entry or {}).get(_LANG[lang][1]) or []
        # The stored sentence is cleaned again, as the reference's loaders do (spec §1.7).
        text = clean_punctuation(fields["CleanedSentence"] or "")
        if entry and keywords and text:
            labels = None
            if self.variant == "segmentation":
                labels = np.load(self.root / entry["segment_slice_path"])
            target, masks = self._tag(text, keywords, entry, labels, pixels.shape)
            task = "grounded-report"
        else:
            vqa = (fields.get("dicom_vqa") or []) + (fields.get("snippet_vqa") or [])
            if vqa and (not text or rng.random() < 0.5):
                item = vqa[int(rng.integers(len(vqa)))]
                prompt = build_prompt(
                    "vqa", lang, question=item["question"], choices=_choices(item)
                )
                return Example(
                    f"{rsopid}/{lang}/vqa",
                    self.name,
                    "vqa",
                    lang,
                    image,
                    prompt,
                    str(item["answer"]),
                    [],
                    {},
                )
            target, masks, task = text, [], "report"
        prompt = build_prompt(
            TASK_PROMPT[(task, self.variant)],
            lang,
            clinical_info=fields.get("ReportKlinischeAngabenCleaned"),
            clinical_question=fields.get("ReportFragestellungCleaned"),
            prefix_style=prefix_style,
            rng=rng,
        )
        return Example(
            f"{rsopid}/{lang}/{task}", self.name, task, lang, image, prompt, target, masks, {}
        )
