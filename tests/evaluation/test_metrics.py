"""Tests for radgrounder.evaluation.metrics: hand-computed values, edge cases and
cross-checks against pycocoevalcap / pycocotools (skipped when they are not installed)."""

from __future__ import annotations

import contextlib
import io
import math
import random

import numpy as np
import pytest

from radgrounder.errors import RadGrounderError
from radgrounder.evaluation import metrics as M
from radgrounder.grounding import Box

# ---------------------------------------------------------------- token F1 / EM / recall


def test_token_f1_hand_computed():
    # pred tokens: [left, lung, nodule]; ref: [nodule, in, left, upper, lobe] ("the" dropped)
    # common 2 -> P = 2/3, R = 2/5, F1 = 2*(2/3)(2/5)/(2/3+2/5) = 0.5
    assert M.token_f1("Left lung nodule.", "The nodule in left upper lobe") == pytest.approx(0.5)
    assert M.token_f1("yes", "Yes!") == 1.0
    assert M.token_f1("no", "yes") == 0.0
    # multiset overlap: common = {x: 1, y: 1} = 2 -> P = R = 2/3
    assert M.token_f1("x x y", "x y y") == pytest.approx(2 / 3)


def test_token_f1_empty_cases():
    assert M.token_f1("", "") == 1.0
    assert M.token_f1("the", "a") == 1.0  # both normalise to no tokens
    assert M.token_f1("", "yes") == 0.0
    assert M.token_f1("yes", "") == 0.0


def test_exact_match_simple_preprocessing_keeps_umlauts():
    assert M.exact_match("  Left-Lung\nnodule ", "left lung nodule") == 1.0
    assert M.exact_match("Größe: 5 mm", "größe 5 mm") == 1.0
    assert M.exact_match("Größe", "grosse") == 0.0
    assert M.exact_match("the lung", "lung") == 0.0  # articles are kept
    assert M.exact_match("", "...") == 1.0
    assert M.simple_preprocess("Ä-B\tc") == "ä b c"


def test_recall():
    # gold tokens [left, lung, nodule]; pred has left, nodule -> 2/3
    assert M.recall("nodule, left side", "Left lung nodule") == pytest.approx(2 / 3)
    assert M.recall("a b c d", "b") == 1.0
    assert M.recall("", "") == 1.0
    assert M.recall("x", "") == 0.0
    assert M.recall("", "x") == 0.0
    # SIMPLE first: the hyphen becomes a space, so "left-lung" gives two tokens
    assert M.recall("left-lung", "left lung") == 1.0


# ---------------------------------------------------------------- CIDEr-D


def test_cider_hand_computed():
    # N = 2, every ref n-gram has df 1 -> weight ln 2. Sample 1 identical: orders 1-3 give
    # cosine 1, order 4 has no n-grams -> 10 * 3/4. Sample 2: unigram x matches (y has
    # df 0 -> weight ln 2 too), cosine = ln2^2 / (2 ln2^2) = 0.5 -> 10 * 0.5/4 = 1.25.
    assert M.cider(["a b c", "x y"], ["a b c", "x z"]) == pytest.approx([7.5, 1.25])
    assert M.cider(["a b", "c"], ["a b", "d"]) == pytest.approx([5.0, 0.0])


def test_cider_length_penalty_hand_computed():
    # "a b" vs ref "a b c": unigram cos = 2/(sqrt2 sqrt3), bigram cos = 1/sqrt2, delta =
    # 1 bigram -> penalty exp(-1/72); the second sample only provides the IDF (N = 2).
    got = M.cider(["a b", "q"], ["a b c", "z"])[0]
    want = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert got == pytest.approx(want)


def test_cider_edge_cases():
    assert M.cider([], []) == []
    assert M.cider(["a"], ["a"]) == [0.0]  # a single sample: IDF log(1) - log(1) = 0
    assert M.cider(["", "x"], ["y", "x"])[0] == 0.0
    assert M.cider(["A"], ["a"]) == [0.0]
    with pytest.raises(RadGrounderError):
        M.cider(["a"], ["a", "b"])


def _random_sentences(rng: random.Random, k: int) -> list[str]:
    vocab = ["the", "left", "lung", "nodule", "Lung", "nodule.", "no", "yes", "mass", "in", "of"]
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 9))) for _ in range(k)]


def test_cider_matches_pycocoevalcap():
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
    rng = random.Random(1)
    preds = _random_sentences(rng, 20)
    refs = [s or "x" for s in _random_sentences(rng, 20)]
    refs[3] = preds[3]  # guarantee some perfect and partial matches
    refs[4] = preds[4] + " extra words"
    mean, scores = cider_mod.Cider().compute_score(
        {i: [r] for i, r in enumerate(refs)}, {i: [p] for i, p in enumerate(preds)}
    )
    ours = M.cider(preds, refs)
    np.testing.assert_allclose(ours, scores, rtol=1e-10, atol=1e-12)
    assert np.mean(ours) == pytest.approx(mean)


# ---------------------------------------------------------------- BLEU / ROUGE-L


def test_bleu_hand_computed():
    # one sample, identical 4 tokens: all precisions 1, no brevity penalty
    out = M.bleu(["a b c d"], ["a b c d"])
    assert [out[f"bleu_{k}"] for k in range(1, 5)] == pytest.approx([1, 1, 1, 1])
    # "a b" vs "a b c d": p1 = p2 = 1, ratio 1/2 -> BP = exp(1 - 2); no 3-/4-gram guesses,
    # so p3 = p4 = 1e-15 / 1e-9 = 1e-6 (pycocoevalcap's smoothing constants)
    out = M.bleu(["a b"], ["a b c d"])
    assert out["bleu_1"] == pytest.approx(math.exp(-1))
    assert out["bleu_2"] == pytest.approx(math.exp(-1))
    assert out["bleu_4"] == pytest.approx((1e-6 * 1e-6) ** 0.25 * math.exp(-1))
    assert out["sentence_bleu_1"] == pytest.approx([math.exp(-1)])


def test_bleu_matches_pycocoevalcap():
    bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
    rng = random.Random(2)
    preds = [s or "y" for s in _random_sentences(rng, 20)]
    refs = [s or "x" for s in _random_sentences(rng, 20)]
    with contextlib.redirect_stdout(io.StringIO()):
        corpus, sentence = bleu_mod.Bleu(4).compute_score(
            {i: [r] for i, r in enumerate(refs)}, {i: [p] for i, p in enumerate(preds)}
        )
    ours = M.bleu(preds, refs)
    for k in range(4):
        assert ours[f"bleu_{k + 1}"] == pytest.approx(corpus[k], rel=1e-12)
        np.testing.assert_allclose(ours[f"sentence_bleu_{k + 1}"], sentence[k], rtol=1e-12)


def test_rouge_l_hand_computed_and_edges():
    # LCS("a b c d", "a c e") = 2: P = 2/3, R = 2/4
    p, r, b2 = 2 / 3, 0.5, 1.2**2
    assert M.rouge_l("a c e", "a b c d") == pytest.approx((1 + b2) * p * r / (r + b2 * p))
    assert M.rouge_l("x", "y") == 0.0
    assert M.rouge_l("", "") == 1.0  # split(" ") gives one empty token on each side
    assert M.rouge_l("", "a") == 0.0


def test_rouge_l_matches_pycocoevalcap():
    rouge_mod = pytest.importorskip("pycocoevalcap.rouge.rouge")
    rng = random.Random(3)
    preds, refs = _random_sentences(rng, 20), [s or "x" for s in _random_sentences(rng, 20)]
    preds = [p or "y" for p in preds]
    scorer = rouge_mod.Rouge()
    for p, r in zip(preds, refs, strict=True):
        assert M.rouge_l(p, r) == pytest.approx(scorer.calc_score([p], [r]))


# ---------------------------------------------------------------- boxes and masks


def test_box_iou_and_giou():
    a, b = Box(0.0, 0.0, 0.5, 0.5), Box(0.25, 0.25, 0.75, 0.75)
    # inter 1/16, union 7/16 -> IoU 1/7; hull 9/16 -> GIoU = 1/7 - (2/16)/(9/16)
    assert M.box_iou(a, b) == pytest.approx(1 / 7)
    assert M.generalized_iou(a, b) == pytest.approx(1 / 7 - 2 / 9)
    assert M.generalized_iou(a, a) == pytest.approx(1.0)
    far = M.generalized_iou(Box(0, 0, 0.01, 0.01), Box(0.99, 0.99, 1, 1))
    assert -1.0 <= far < -0.99
    # disjoint side by side: IoU 0, hull = union -> GIoU 0
    assert M.generalized_iou(Box(0, 0, 0.5, 1), Box(0.5, 0, 1, 1)) == pytest.approx(0.0)
    p = Box(0.3, 0.3, 0.3, 0.3)
    assert M.generalized_iou(p, p) == 1.0
    assert M.generalized_iou(p, Box(0.3, 0.3, 0.3, 0.6)) == -1.0


def test_mask_dice_and_iou():
    p = np.zeros((4, 4), bool)
    g = np.zeros((4, 4), bool)
    p[0, :3] = True  # 3 px
    g[0, 1:] = True  # 3 px, overlap 2
    assert M.mask_dice(p, g) == pytest.approx(2 * 2 / 6)
    assert M.mask_iou(p, g) == pytest.approx(2 / 4)
    empty = np.zeros((4, 4))
    assert M.mask_dice(empty, empty) == 1.0
    assert M.mask_iou(empty, empty) == 1.0
    assert M.mask_iou(p, empty) == 0.0
    # logits / probabilities are thresholded at > 0.5
    assert M.mask_iou(np.array([0.6, 0.5, 2.0]), np.array([1, 1, 1])) == pytest.approx(2 / 3)
    with pytest.raises(RadGrounderError):
        M.mask_iou(np.zeros((2, 2)), np.zeros((3, 3)))


# ---------------------------------------------------------------- mAP@0.5


def test_map50_hand_computed():
    g1, g2 = Box(0, 0, 0.2, 0.2), Box(0.5, 0.5, 0.7, 0.7)
    refs = [("img1", 1, g1), ("img1", 1, g2), ("img2", 2, g1)]
    preds = [
        ("img1", 1, g1, 0.9),  # TP
        ("img1", 1, Box(0.8, 0.8, 0.9, 0.9), 0.8),  # FP
        ("img1", 1, g2, 0.7),  # TP
        ("img2", 2, g2, 0.6),  # class 2 FP, its GT is missed
        ("img2", 3, g1, 0.5),  # class without references: ignored
    ]
    out = M.map50(preds, refs)
    # class 1: recall 0.5 at precision 1, recall 1 at precision 2/3 (monotone envelope):
    # recall points 0..0.5 (51) -> 1, 0.51..1 (50) -> 2/3
    ap1 = (51 * 1 + 50 * 2 / 3) / 101
    assert out["ap_per_class"] == pytest.approx({1: ap1, 2: 0.0})
    assert out["map50"] == pytest.approx(ap1 / 2)


def test_map50_edge_cases():
    g = Box(0, 0, 0.5, 0.5)
    assert M.map50([], [("i", 0, g)]) == {"map50": 0.0, "ap_per_class": {0: 0.0}}
    assert math.isnan(M.map50([("i", 0, g, 1.0)], [])["map50"])
    # the same prediction twice: the duplicate is a false positive
    assert M.map50([("i", 0, g, 1.0), ("i", 0, g, 0.5)], [("i", 0, g)])["map50"] == pytest.approx(
        1.0
    )
    # IoU exactly 0.5 counts
    half = Box(0, 0, 0.5, 0.25)
    assert M.box_iou(half, g) == 0.5
    assert M.map50([("i", 0, half, 1.0)], [("i", 0, g)])["map50"] == pytest.approx(1.0)


def _random_box(rng: np.random.Generator) -> Box:
    x1, y1 = rng.uniform(0, 0.7, 2)
    w, h = rng.uniform(0.05, 0.3, 2)
    return Box(float(x1), float(y1), float(x1 + w), float(y1 + h))


def _jitter(rng: np.random.Generator, b: Box) -> Box:
    d = rng.normal(0, 0.04, 4)
    x1, y1 = max(0.0, b.x1 + d[0]), max(0.0, b.y1 + d[1])
    x2, y2 = min(1.0, max(x1, b.x2 + d[2])), min(1.0, max(y1, b.y2 + d[3]))
    return Box(float(x1), float(y1), float(x2), float(y2))


def test_map50_matches_pycocotools():
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    refs, preds = [], []
    for img in range(15):
        for _ in range(int(rng.integers(0, 5))):
            cls = int(rng.integers(1, 4))
            b = _random_box(rng)
            refs.append((img, cls, b))
            if rng.random() < 0.8:
                preds.append((img, cls, _jitter(rng, b), float(rng.random())))
        for _ in range(int(rng.integers(0, 3))):
            preds.append((img, int(rng.integers(1, 4)), _random_box(rng), float(rng.random())))

    def xywh(b: Box) -> list[float]:
        return [b.x1 * 1000, b.y1 * 1000, (b.x2 - b.x1) * 1000, (b.y2 - b.y1) * 1000]

    gt = COCO()
    gt.dataset = {
        "images": [{"id": i, "width": 1000, "height": 1000} for i in range(15)],
        "categories": [{"id": c} for c in (1, 2, 3)],
        "annotations": [
            {"id": k + 1, "image_id": i, "category_id": c, "bbox": xywh(b), "iscrowd": 0,
             "area": xywh(b)[2] * xywh(b)[3]}
            for k, (i, c, b) in enumerate(refs)
        ],
    }  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(
            [{"image_id": i, "category_id": c, "bbox": xywh(b), "score": s} for i, c, b, s in preds]
        )
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ours = M.map50(preds, refs)
    assert ours["map50"] == pytest.approx(ev.stats[1], abs=1e-12)
    for k, c in enumerate(ev.params.catIds):
        prec = ev.eval["precision"][0, :, k, 0, 2]
        if (prec > -1).any():
            assert ours["ap_per_class"][c] == pytest.approx(prec.mean(), abs=1e-12)
    assert 0.1 < ours["map50"] < 1.0  # a non-trivial case


# ---------------------------------------------------------------- grounding IoU


def test_grounding_iou_exact_and_lexical():
    a, b = Box(0.0, 0.0, 0.5, 0.5), Box(0.25, 0.25, 0.75, 0.75)
    refs = [("liver", a), ("left kidney", b)]
    preds = [("liver", b), ("Left_Kidney", b), ("spleen", a)]
    out = M.grounding_iou(preds, refs, "exact")
    # exact: liver pair (IoU 1/7, sim 1); then all remaining sims are 0 -> still paired
    assert out["grounding_iou"] == pytest.approx((1 / 7) / 3)
    assert out["n_matched"] == 2
    out = M.grounding_iou(preds, refs, "lexical")
    # lexical: "Left_Kidney" ~ "left kidney" (F1 1, IoU 1) and liver (IoU 1/7)
    assert out["grounding_iou"] == pytest.approx((1 + 1 / 7) / 3)
    assert out["mean_iou"] == pytest.approx((1 + 1 / 7) / 2)
    seg = M.grounding_iou(preds, refs, "lexical", denominator="matched")
    assert seg["grounding_iou"] == pytest.approx((1 + 1 / 7) / 2)


def test_grounding_iou_empty_and_custom():
    a = Box(0, 0, 1, 1)
    assert M.grounding_iou([], [], "exact")["grounding_iou"] == 0.0
    assert M.grounding_iou([], [], "exact", denominator="matched")["grounding_iou"] == 1.0
    assert M.grounding_iou([("x", a)], [], "exact", denominator="matched")["grounding_iou"] == 0
    assert M.grounding_iou([], [("x", a)], "exact")["grounding_iou"] == 0.0
    half = M.grounding_iou([("x", a)], [("y", a)], lambda p, r: 0.5)
    assert half["grounding_iou"] == pytest.approx(0.5)
    with pytest.raises(RadGrounderError):
        M.grounding_iou([("x", a)], [("x", a)], "embedding")


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_basic():
    values = np.r_[np.zeros(50), np.ones(50)]
    out = M.bootstrap_ci(values, n_resamples=2000, seed=0)
    assert out["mean"] == 0.5
    assert out["n"] == 100
    # sd of the mean = 0.05 -> 95% interval about 0.5 +- 0.098
    assert 0.38 < out["low"] < 0.42 and 0.58 < out["high"] < 0.62
    assert out["bootstrap_mean"] == pytest.approx(0.5, abs=0.01)
    assert M.bootstrap_ci(values, n_resamples=2000, seed=0) == out
    assert M.bootstrap_ci(values, n_resamples=2000, seed=1) != out


def test_bootstrap_ci_constant_and_chunking(monkeypatch):
    c = M.bootstrap_ci([3.0] * 7, n_resamples=100)
    assert (c["mean"], c["low"], c["high"], c["bootstrap_mean"]) == (3.0, 3.0, 3.0, 3.0)
    values = np.random.default_rng(5).random(37)
    full = M.bootstrap_ci(values, n_resamples=500, seed=3)
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 37 * 7)  # 7 rows per chunk
    assert M.bootstrap_ci(values, n_resamples=500, seed=3) == full


def test_bootstrap_ci_rejects_bad_input():
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(RadGrounderError):
            M.bootstrap_ci(bad)
    with pytest.raises(RadGrounderError):
        M.bootstrap_ci([1.0], alpha=1.5)
