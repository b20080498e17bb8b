"""Per-sample scores and run summaries: what ``radgrounder eval`` writes per row and overall."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from radgrounder.evaluation.metrics import (
    bleu,
    bootstrap_ci,
    cider,
    exact_match,
    grounding_iou,
    grounding_iou_detect_reference,
    map50,
    mask_dice,
    mask_iou,
    recall,
    rouge_l,
    token_f1,
)
from radgrounder.grounding import Box, box_iou, union_box
from radgrounder.imaging import resize_nearest

TEXT_METRICS = ("f1", "accuracy", "recall", "cider", "bleu1", "bleu4", "rouge_l")
GROUNDING_METRICS = (
    "grounding_iou",
    "grounding_iou_detect_legacy",
    "grounding_iou_segment_legacy",
    "box_iou",
    "mask_iou",
    "mask_dice",
)
NAN = float("nan")


def _overlap(a: Any, b: Any) -> float:
    return box_iou(a, b) if isinstance(a, Box) else mask_iou(a, b)


def score_grounding(
    pred: Sequence[tuple[str, Any, dict[str, Any]]],
    ref: Sequence[tuple[str, Any, dict[str, Any]]],
    matcher: str | Callable[[str, str], float],
) -> dict[str, Any]:
    """Grounding scores of one sample from its (keyword, region, info) pairs.

    - ``grounding_iou`` (ours): similarity clipped to [0, 1], greedy matching, sum of
      IoU x similarity over max(n_ref, n_pred); NaN when both sides are empty (the sample
      says nothing about grounding), 0 when one side is.
    - ``grounding_iou_detect_legacy``: the reference detection evaluator exactly, including
      its box-index bug (:func:`grounding_iou_detect_reference`; unclipped cosine, same
      denominator); NaN without reference keywords, so the mean over a run equals its
      dataset value.
    - ``grounding_iou_segment_legacy``: the reference segmentation evaluator (clipped,
      min(n_ref, n_pred) pairs matched even at similarity 0, over the matched count, both
      empty = 1).
    - ``box_iou`` / ``mask_iou`` / ``mask_dice``: mean over the pairs of ours whose
      keywords are similar at all (similarity > 0); NaN when there is none.
    """
    if pred and ref and not isinstance(pred[0][1], Box):
        shape = ref[0][1].shape
        pred = [(k, resize_nearest(np.asarray(m, bool), *shape), i) for k, m, i in pred]
    p = [(k, r) for k, r, _ in pred]
    g = [(k, r) for k, r, _ in ref]
    ours = grounding_iou(p, g, matcher, denominator="max", overlap=_overlap, clamp=True)
    detect = grounding_iou_detect_reference(p, g, matcher, overlap=_overlap)
    segment = grounding_iou(p, g, matcher, denominator="matched", overlap=_overlap, clamp=True)
    out: dict[str, Any] = {
        "grounding_iou": NAN if not p and not g else ours["grounding_iou"],
        "grounding_iou_detect_legacy": detect if g else NAN,
        "grounding_iou_segment_legacy": segment["grounding_iou"],
        "box_iou": NAN,
        "mask_iou": NAN,
        "mask_dice": NAN,
    }
    pairs = [p for p in ours["pairs"] if p[3] > 0]  # keywords that actually correspond
    if pairs:
        ious = [iou for _, _, iou, _ in pairs]
        if isinstance(ref[0][1], Box):
            out["box_iou"] = float(np.mean(ious))
        else:
            out["mask_iou"] = float(np.mean(ious))
            out["mask_dice"] = float(
                np.mean([mask_dice(pred[j][1], ref[i][1]) for i, j, _, _ in pairs])
            )
    out["class_ious"] = [
        {"class": ref[i][2].get("class_name") or ref[i][0], "iou": iou} for i, _, iou, _ in pairs
    ]
    return out


def text_scores(
    preds: Sequence[str],
    refs: Sequence[str],
    groups: Sequence[Any],
) -> dict[str, list[float]]:
    """Per-sample text metrics. CIDEr's document frequencies come from the references of
    each group (e.g. one task in one language), not from unrelated samples of the run."""
    n = len(preds)
    out: dict[str, list[float]] = {
        "f1": [token_f1(p, r) for p, r in zip(preds, refs, strict=True)],
        "accuracy": [exact_match(p, r) for p, r in zip(preds, refs, strict=True)],
        "recall": [recall(p, r) for p, r in zip(preds, refs, strict=True)],
        "rouge_l": [rouge_l(p, r) for p, r in zip(preds, refs, strict=True)],
        "cider": [NAN] * n,
    }
    b = bleu(list(preds), list(refs), n=4) if n else {}
    out["bleu1"] = list(b.get("sentence_bleu_1", []))
    out["bleu4"] = list(b.get("sentence_bleu_4", []))
    members: dict[Any, list[int]] = defaultdict(list)
    for i, key in enumerate(groups):
        members[key].append(i)
    for idx in members.values():
        values = cider([preds[i] for i in idx], [refs[i] for i in idx])
        for i, v in zip(idx, values, strict=True):
            out["cider"][i] = v
    return out


def subsets(rows: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    """Row indices of ``all`` and of every subset worth reporting: ``open``/``closed``
    (question types), ``task=…`` and ``language=…`` when a run mixes several."""
    out: dict[str, list[int]] = {"all": list(range(len(rows)))}
    for kind in ("open", "closed"):
        idx = [i for i, r in enumerate(rows) if r.get("question_type") == kind]
        if idx:
            out[kind] = idx
    for column in ("task", "language"):
        values = sorted({r[column] for r in rows})
        if len(values) > 1:
            for v in values:
                out[f"{column}={v}"] = [i for i, r in enumerate(rows) if r[column] == v]
    return out


def summarize_metrics(
    rows: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    *,
    n_resamples: int,
    seed: int,
) -> dict[str, dict[str, dict[str, float | int]]]:
    """Per subset and metric: mean, percentile bootstrap CI and n over the finite values."""
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for name, idx in subsets(rows).items():
        table: dict[str, dict[str, float | int]] = {}
        for metric in metrics:
            values = [rows[i].get(metric) for i in idx]
            finite = [float(v) for v in values if v is not None and math.isfinite(v)]
            if finite:
                table[metric] = bootstrap_ci(finite, n_resamples=n_resamples, seed=seed)
        if table:
            out[name] = table
    return out


def corpus_bleu(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Corpus BLEU-1/4 per subset (the reference reports the corpus value)."""
    out = {}
    for name, idx in subsets(rows).items():
        b = bleu([rows[i]["prediction"] for i in idx], [rows[i]["reference"] for i in idx], n=4)
        out[name] = {"bleu1": float(b["bleu_1"]), "bleu4": float(b["bleu_4"])}
    return out


def detection_map(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Class-aware mAP@0.5 over the grounded samples. Generated boxes carry no confidence,
    so every box scores 1: the value describes the model's single operating point."""
    preds, refs, names = [], [], {}
    for rec in records:
        for side, target in (("pred_spans", preds), ("ref_spans", refs)):
            for span in rec.get(side) or []:
                if span.get("class_id") is None or not span.get("boxes"):
                    continue
                cid = int(span["class_id"])
                names.setdefault(cid, span.get("class_name") or str(cid))
                box = union_box(Box(*b) for b in span["boxes"])
                if side == "pred_spans":
                    target.append((rec["id"], cid, box, 1.0))
                else:
                    target.append((rec["id"], cid, box))
    if not refs:
        return None
    result = map50(preds, refs)
    return {
        "map50": result["map50"],
        "ap_per_class": {names[c]: ap for c, ap in result["ap_per_class"].items()},
    }
