"""Text metrics (spec §7.2): token F1, exact match, recall, CIDEr-D, BLEU and ROUGE-L.

All are pure Python/numpy; they reproduce the reference implementations (SQuAD
``compute_f1``, OVQA "SIMPLE" preprocessing, pycocoevalcap 1.2 ``Cider``, ``Bleu`` and
``Rouge``) without depending on them. METEOR lives in
:mod:`radgrounder.evaluation.metrics_meteor`.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

from radgrounder.errors import RadGrounderError

__all__ = [
    "bleu",
    "cider",
    "exact_match",
    "recall",
    "rouge_l",
    "simple_preprocess",
    "squad_normalize",
    "squad_tokens",
    "token_f1",
]

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_NOT_SIMPLE = re.compile(r"[^a-zA-Z0-9äöüÄÖÜß ]")


def squad_normalize(text: str) -> str:
    """SQuAD ``normalize_answer``: lowercase, delete ASCII punctuation, remove the whole
    words ``a``/``an``/``the``, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_tokens(text: str) -> list[str]:
    """SQuAD ``get_tokens``: the normalised text split on whitespace ([] for empty)."""
    return squad_normalize(text).split() if text else []


def simple_preprocess(text: str) -> str:
    """OVQA "SIMPLE" preprocessing: every character outside ``[a-zA-Z0-9äöüÄÖÜß ]``
    (newlines included) becomes a space; then strip, lowercase, collapse whitespace."""
    return " ".join(_NOT_SIMPLE.sub(" ", text).strip().lower().split())


def token_f1(pred: str, ref: str) -> float:
    """SQuAD token F1 of one sample.

    Tokens are :func:`squad_tokens`. With ``common`` the size of the multiset intersection,
    P = common/|pred|, R = common/|ref|, F1 = 2PR/(P+R). If either side has no tokens the
    result is 1.0 when both are empty, else 0.0; no overlap gives 0.0.
    """
    p, g = squad_tokens(pred), squad_tokens(ref)
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def exact_match(pred: str, ref: str) -> float:
    """1.0 if both strings are equal after :func:`simple_preprocess`, else 0.0."""
    return float(simple_preprocess(pred) == simple_preprocess(ref))


def recall(pred: str, ref: str) -> float:
    """Token recall: :func:`simple_preprocess`, then :func:`squad_tokens` on both sides;
    |common| / |ref tokens|. An empty reference gives 1.0 if the prediction is empty too,
    else 0.0."""
    p = squad_tokens(simple_preprocess(pred))
    g = squad_tokens(simple_preprocess(ref))
    if not g:
        return float(not p)
    return sum((Counter(p) & Counter(g)).values()) / len(g)


def _check_pairs(preds: Sequence[str], refs: Sequence[str]) -> None:
    if len(preds) != len(refs):
        raise RadGrounderError(
            f"metrics: {len(preds)} predictions but {len(refs)} references; need one each"
        )


def _ngrams(text: str, n: int) -> Counter[tuple[str, ...]]:
    words = text.split()
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def cider(
    preds: Sequence[str], refs: Sequence[str], *, n: int = 4, sigma: float = 6.0
) -> list[float]:
    """Per-sample CIDEr-D, identical to pycocoevalcap 1.2 ``Cider`` with one reference each.

    Definition (no tokenizer, no lowercasing: n-grams from ``str.split()``):

    - document frequency df(g) = number of *references of this set* containing n-gram g;
      with N = len(refs), weight w(g) = tf(g) * (log N - log max(1, df(g))).
    - for each order k = 1..n, c_k = sum_g min(w_hyp(g), w_ref(g)) * w_ref(g) /
      (|w_hyp| |w_ref|) (the division is skipped if a norm is 0), times the Gaussian
      penalty exp(-delta^2 / (2 sigma^2)).
    - score = 10 * mean_k c_k.

    ``delta`` is the difference in the number of *bigrams* of hypothesis and reference; this
    reproduces pycocoevalcap, whose "length" counts 2-gram occurrences (it equals the word
    length difference unless one side has no words).
    The scores depend on the whole evaluated set through df and N (spec §7.2).
    """
    _check_pairs(preds, refs)
    if not preds:
        return []
    ref_counts = [_ngrams(r, n) for r in refs]
    hyp_counts = [_ngrams(p, n) for p in preds]
    df: Counter[tuple[str, ...]] = Counter()
    for c in ref_counts:
        df.update(c.keys())
    log_n = math.log(float(len(refs)))

    def vec(counts: Counter[tuple[str, ...]]) -> tuple[list[dict], np.ndarray, int]:
        v: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        norm = np.zeros(n)
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = float(tf) * (log_n - math.log(max(1.0, float(df.get(g, 0)))))
            v[k][g] = w
            norm[k] += w * w
            if k == 1:
                length += tf
        return v, np.sqrt(norm), length

    scores: list[float] = []
    for hc, rc in zip(hyp_counts, ref_counts, strict=True):
        vh, nh, lh = vec(hc)
        vr, nr, lr = vec(rc)
        penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
        val = np.zeros(n)
        for k in range(n):
            for g, w in vh[k].items():
                wr = vr[k].get(g, 0.0)
                val[k] += min(w, wr) * wr
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= penalty
        scores.append(float(np.mean(val)) * 10.0)
    return scores


def bleu(preds: Sequence[str], refs: Sequence[str], n: int = 4) -> dict[str, float | list[float]]:
    """Corpus BLEU-1..n as pycocoevalcap ``Bleu(n)`` with one reference per sample.

    Whitespace tokens; clipped n-gram matches and guesses are summed over the corpus;
    BLEU-k = (prod_{j<=k} (correct_j + 1e-15) / (guess_j + 1e-9))^(1/k), times the brevity
    penalty exp(1 - r/c) when c < r (c, r: summed hypothesis / reference lengths).
    Keys ``bleu_1``..``bleu_n`` hold the corpus values; ``sentence_bleu_1``.. hold the
    per-sample values computed the same way (the reference's CSV columns).
    """
    _check_pairs(preds, refs)
    tiny, small = 1e-15, 1e-9
    tot_correct, tot_guess = [0] * n, [0] * n
    tot_test = tot_ref = 0
    sentence: list[list[float]] = [[] for _ in range(n)]
    for p, r in zip(preds, refs, strict=True):
        pc, rcnt = _ngrams(p, n), _ngrams(r, n)
        testlen, reflen = len(p.split()), len(r.split())
        guess = [max(0, testlen - k) for k in range(n)]
        correct = [0] * n
        for g, c in pc.items():
            correct[len(g) - 1] += min(rcnt.get(g, 0), c)
        tot_test += testlen
        tot_ref += reflen
        score = 1.0
        ratio = (testlen + tiny) / (reflen + small)
        for k in range(n):
            tot_correct[k] += correct[k]
            tot_guess[k] += guess[k]
            score *= (correct[k] + tiny) / (guess[k] + small)
            s = score ** (1.0 / (k + 1))
            sentence[k].append(s * math.exp(1 - 1 / ratio) if ratio < 1 else s)
    out: dict[str, float | list[float]] = {}
    score = 1.0
    ratio = (tot_test + tiny) / (tot_ref + small)
    for k in range(n):
        score *= (tot_correct[k] + tiny) / (tot_guess[k] + small)
        s = score ** (1.0 / (k + 1))
        out[f"bleu_{k + 1}"] = s * math.exp(1 - 1 / ratio) if ratio < 1 else s
    for k in range(n):
        out[f"sentence_bleu_{k + 1}"] = sentence[k]
    return out


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str, beta: float = 1.2) -> float:
    """ROUGE-L F-measure as pycocoevalcap ``Rouge`` (one reference).

    Tokens come from ``str.split(" ")`` (so ``""`` is one empty token, as in the
    reference); P = LCS/|pred|, R = LCS/|ref|, score = (1+b^2)PR / (R + b^2 P), 0 if P or R
    is 0.
    """
    tp, tr = pred.split(" "), ref.split(" ")
    lcs = _lcs(tr, tp)
    p, r = lcs / len(tp), lcs / len(tr)
    if p == 0 or r == 0:
        return 0.0
    return (1 + beta**2) * p * r / (r + beta**2 * p)
