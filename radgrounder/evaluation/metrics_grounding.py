"""Grounding metrics (spec §7.5): box IoU / GIoU, mask Dice / IoU, class-aware mAP@0.5 and
keyword grounding IoU ("G-IoU" = grounding IoU, not generalized IoU)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from radgrounder.errors import RadGrounderError
from radgrounder.evaluation.metrics_text import token_f1
from radgrounder.grounding import Box, box_iou

__all__ = [
    "box_iou",
    "generalized_iou",
    "grounding_iou",
    "map50",
    "mask_dice",
    "mask_iou",
]


def generalized_iou(a: Box, b: Box) -> float:
    """Generalized IoU (Rezatofighi et al. 2019): IoU - (|C| - |A u B|) / |C|, with C the
    smallest box enclosing both; in [-1, 1]. If C has zero area (both boxes degenerate and
    collinear) the result is 1.0 for equal boxes and -1.0 otherwise (our convention)."""
    cw = max(a.x2, b.x2) - min(a.x1, b.x1)
    ch = max(a.y2, b.y2) - min(a.y1, b.y1)
    c = cw * ch
    if c <= 0:
        return 1.0 if a.as_tuple() == b.as_tuple() else -1.0
    iw = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    ih = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = iw * ih
    union = a.area + b.area - inter
    iou = inter / union if union > 0 else 0.0
    return iou - (c - union) / c


def _binary_pair(pred: np.ndarray, gt: np.ndarray, threshold: float) -> tuple[np.ndarray, ...]:
    p, g = np.asarray(pred), np.asarray(gt)
    if p.shape != g.shape:
        raise RadGrounderError(f"masks: shapes differ, prediction {p.shape} vs truth {g.shape}")
    p = p if p.dtype == bool else p > threshold
    g = g if g.dtype == bool else g > threshold
    return p, g


def mask_dice(pred: np.ndarray, gt: np.ndarray, *, threshold: float = 0.5) -> float:
    """Dice = 2|P n G| / (|P| + |G|). Non-boolean masks are binarised with ``> threshold``
    (spec §7.5 uses 0.5, on logits for predictions). Both masks empty gives 1.0."""
    p, g = _binary_pair(pred, gt, threshold)
    total = int(p.sum()) + int(g.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(p, g).sum()) / total


def mask_iou(pred: np.ndarray, gt: np.ndarray, *, threshold: float = 0.5) -> float:
    """IoU = |P n G| / |P u G| after binarising as :func:`mask_dice`. Both masks empty
    (empty union) gives 1.0, as the reference segmentation evaluator does."""
    p, g = _binary_pair(pred, gt, threshold)
    union = int(np.logical_or(p, g).sum())
    return 1.0 if union == 0 else int(np.logical_and(p, g).sum()) / union


_REC_THRS = np.linspace(0.0, 1.0, 101)


def map50(
    predictions: Sequence[tuple[Hashable, Hashable, Box, float]],
    references: Sequence[tuple[Hashable, Hashable, Box]],
    *,
    iou_threshold: float = 0.5,
    max_dets: int = 100,
) -> dict[str, object]:
    """Class-aware mean average precision at IoU >= 0.5, as pycocotools ``COCOeval`` (bbox,
    area "all", AP at the 0.5 threshold).

    Per (image, class) the ``max_dets`` highest-scoring predictions are greedily matched in
    score order to the unmatched reference with the largest IoU >= ``iou_threshold``.
    Per class, detections of all images are ranked by score, precision is made monotone
    (non-increasing) and sampled at the 101 recall points 0, 0.01, .., 1 (0 beyond the
    highest recall); AP is the mean of those samples. mAP is the mean AP over classes with
    at least one reference (classes with predictions only are ignored, as in COCO); it is
    NaN when there are no references.

    Predictions are ``(image_id, class_id, box, score)``, references ``(image_id, class_id,
    box)``. Returns ``{"map50": float, "ap_per_class": {class_id: ap}}``.
    """
    gts: dict[tuple, list[Box]] = defaultdict(list)
    dts: dict[tuple, list[tuple[float, Box]]] = defaultdict(list)
    for img, cls, box in references:
        gts[(img, cls)].append(box)
    for img, cls, box, score in predictions:
        dts[(img, cls)].append((float(score), box))
    classes = {c for _, c in gts}
    images = sorted({i for i, _ in gts} | {i for i, _ in dts}, key=lambda x: (str(type(x)), x))

    ap_per_class: dict[Hashable, float] = {}
    for cls in sorted(classes, key=lambda x: (str(type(x)), x)):
        scores: list[float] = []
        tps: list[bool] = []
        n_gt = 0
        for img in images:
            g = gts.get((img, cls), [])
            d = dts.get((img, cls), [])
            n_gt += len(g)
            order = np.argsort([-s for s, _ in d], kind="mergesort")[:max_dets]
            used = [False] * len(g)
            for di in order:
                score, dbox = d[di]
                best, m = min(iou_threshold, 1 - 1e-10), -1
                for gi, gbox in enumerate(g):
                    if used[gi]:
                        continue
                    iou = box_iou(dbox, gbox)
                    if iou < best:
                        continue
                    best, m = iou, gi
                if m >= 0:
                    used[m] = True
                scores.append(score)
                tps.append(m >= 0)
        order = np.argsort(-np.asarray(scores, dtype=float), kind="mergesort")
        tp = np.cumsum(np.asarray(tps, dtype=float)[order])
        fp = np.cumsum(1.0 - np.asarray(tps, dtype=float)[order])
        rc = tp / n_gt
        pr = tp / (tp + fp + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1] if pr.size else pr
        inds = np.searchsorted(rc, _REC_THRS, side="left")
        q = np.zeros(len(_REC_THRS))
        valid = inds < len(pr)
        q[valid] = pr[inds[valid]]
        ap_per_class[cls] = float(q.mean())
    mean = float(np.mean(list(ap_per_class.values()))) if ap_per_class else float("nan")
    return {"map50": mean, "ap_per_class": ap_per_class}


def _similarity_fn(matcher: str | Callable[[str, str], float]) -> Callable[[str, str], float]:
    if callable(matcher):
        return matcher
    if matcher == "exact":
        return lambda a, b: float(a == b)
    if matcher == "lexical":
        return lambda a, b: token_f1(a.replace("_", " "), b.replace("_", " "))
    raise RadGrounderError(f"grounding_iou: unknown matcher {matcher!r}; use exact or lexical")


def grounding_iou(
    pred_pairs: Sequence[tuple[str, Any]],
    ref_pairs: Sequence[tuple[str, Any]],
    matcher: str | Callable[[str, str], float] = "exact",
    *,
    denominator: str = "max",
    overlap: Callable[[Any, Any], float] = box_iou,
    clamp: bool = False,
) -> dict[str, Any]:
    """Grounding IoU of one sample: keywords matched by text similarity only, scored by
    box IoU x similarity (spec §7.5).

    Similarity: ``"exact"`` = 1.0 for identical strings else 0.0; ``"lexical"`` = SQuAD
    token F1 of the keywords with ``_`` read as a space (case, punctuation and articles
    ignored); or any callable ``(pred_kw, ref_kw) -> float``.
    Matching (as the detection evaluator): repeatedly take the largest remaining entry of
    the ref x pred similarity matrix (first in row-major order on ties), pair them, and
    remove the row and column, until one side is exhausted.

    ``denominator="max"`` (our definition and the detection evaluator's):
    G-IoU = sum_pairs IoU * sim / max(n_ref, n_pred); 0.0 if either side is empty.
    ``denominator="matched"`` (segmentation evaluator): min(n_ref, n_pred) pairs are matched,
    also at similarity 0, and all count: G-IoU = sum IoU * sim / n_matched; 1.0 if both
    sides are empty, 0.0 if exactly one is.
    ``overlap`` scores a (prediction region, reference region) pair: :func:`box_iou` on
    :class:`Box` regions by default, e.g. :func:`mask_iou` for masks (the segmentation
    evaluator). ``clamp=True`` clips similarities to [0, 1] before matching (the segmentation
    evaluator does; the detection evaluator does not).
    Returns ``grounding_iou``, ``mean_iou`` and ``mean_similarity`` over the pairs,
    ``n_matched`` and ``pairs``: ``(ref_index, pred_index, iou, similarity)`` per pair.
    """
    if denominator not in ("max", "matched"):
        raise RadGrounderError(
            f"grounding_iou: denominator must be max or matched, got {denominator!r}"
        )
    sim_fn = _similarity_fn(matcher)
    n_ref, n_pred = len(ref_pairs), len(pred_pairs)
    empty: dict[str, Any] = {
        "grounding_iou": 0.0,
        "mean_iou": 0.0,
        "mean_similarity": 0.0,
        "n_matched": 0,
        "pairs": [],
    }
    if n_ref == 0 or n_pred == 0:
        if denominator == "matched" and n_ref == 0 and n_pred == 0:
            return {**empty, "grounding_iou": 1.0}
        return empty
    sim = np.array([[sim_fn(p[0], r[0]) for p in pred_pairs] for r in ref_pairs], dtype=float)
    if clamp:
        sim = np.clip(sim, 0.0, 1.0)
    work = sim.copy()
    pairs: list[tuple[int, int]] = []
    for _ in range(min(n_ref, n_pred)):
        ri, pi = np.unravel_index(int(np.argmax(work)), work.shape)
        pairs.append((int(ri), int(pi)))
        work[ri, :] = -np.inf
        work[:, pi] = -np.inf
    if not pairs:
        return empty
    ious = np.array([overlap(pred_pairs[p][1], ref_pairs[r][1]) for r, p in pairs])
    sims = np.array([sim[r, p] for r, p in pairs])
    total = float(np.sum(ious * sims))
    denom = max(n_ref, n_pred) if denominator == "max" else len(pairs)
    return {
        "grounding_iou": total / denom,
        "mean_iou": float(ious.mean()),
        "mean_similarity": float(sims.mean()),
        "n_matched": len(pairs),
        "pairs": [
            (r, p, float(i), float(s)) for (r, p), i, s in zip(pairs, ious, sims, strict=True)
        ],
    }


def grounding_iou_detect_reference(
    pred_pairs: Sequence[tuple[str, Any]],
    ref_pairs: Sequence[tuple[str, Any]],
    matcher: str | Callable[[str, str], float] = "exact",
    *,
    overlap: Callable[[Any, Any], float] = box_iou,
) -> float:
    """The reference detection evaluator's sample G-IoU, its indexing bug included.

    Its ``match_keywords`` takes the largest entry of the similarity matrix of the keywords
    still unmatched (unclamped, first in row-major order on ties), then removes the two
    keywords but not their boxes; the pair's boxes are looked up with the indices of the
    shortened keyword lists in the full box lists. From the second match on it can score
    the wrong boxes (GT and prediction ``LIVER, L4``: both pairs scored with the LIVER
    boxes). Sum of IoU x similarity over max(n_ref, n_pred); 0.0 if either side is empty.
    The published detection G-IoU came from this; :func:`grounding_iou` is the correct one.
    """
    sim_fn = _similarity_fn(matcher)
    if not pred_pairs or not ref_pairs:
        return 0.0
    ref_words = [r[0] for r in ref_pairs]
    pred_words = [p[0] for p in pred_pairs]
    total = 0.0
    while ref_words and pred_words:
        sim = np.array([[sim_fn(p, r) for p in pred_words] for r in ref_words], dtype=float)
        ri, pi = np.unravel_index(int(np.argmax(sim)), sim.shape)
        total += overlap(pred_pairs[pi][1], ref_pairs[ri][1]) * float(sim[ri, pi])
        ref_words.pop(int(ri))
        pred_words.pop(int(pi))
    return total / max(len(ref_pairs), len(pred_pairs))
