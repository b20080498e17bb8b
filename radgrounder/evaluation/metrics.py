"""Evaluation metrics (spec §7.2, §7.5, §7.6).

Text metrics live in :mod:`radgrounder.evaluation.metrics_text`, grounding metrics in
:mod:`radgrounder.evaluation.metrics_grounding`; both are re-exported here together with
:func:`bootstrap_ci`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from radgrounder.errors import RadGrounderError
from radgrounder.evaluation.metrics_grounding import (
    box_iou,
    generalized_iou,
    grounding_iou,
    grounding_iou_detect_reference,
    map50,
    mask_dice,
    mask_iou,
)
from radgrounder.evaluation.metrics_meteor import meteor
from radgrounder.evaluation.metrics_text import (
    bleu,
    cider,
    exact_match,
    recall,
    rouge_l,
    simple_preprocess,
    squad_normalize,
    squad_tokens,
    token_f1,
)

__all__ = [
    "bleu",
    "bootstrap_ci",
    "box_iou",
    "cider",
    "exact_match",
    "generalized_iou",
    "grounding_iou",
    "grounding_iou_detect_reference",
    "map50",
    "mask_dice",
    "mask_iou",
    "meteor",
    "recall",
    "rouge_l",
    "simple_preprocess",
    "squad_normalize",
    "squad_tokens",
    "token_f1",
]

_CHUNK_ELEMENTS = 4_000_000  # resample indices held in memory at once


def resample_means(x: np.ndarray, *, n_resamples: int, seed: int) -> np.ndarray:
    """Means of ``n_resamples`` resamples of ``x`` with replacement from
    ``numpy.random.default_rng(seed)``; index matrices are drawn row by row in chunks, so
    the result does not depend on the chunk size."""
    n = x.size
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // n)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, rows):
        stop = min(start + rows, n_resamples)
        means[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def bootstrap_ci(
    values: Iterable[float],
    *,
    n_resamples: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float | int]:
    """Percentile bootstrap confidence interval of the mean (spec §7.6).

    Draws ``n_resamples`` resamples of the per-sample ``values`` with replacement from
    ``numpy.random.default_rng(seed)`` (index matrices drawn row by row in chunks, so the
    result does not depend on the chunk size), takes each resample's mean and returns
    ``mean`` (of the values), ``low``/``high`` (the ``100*alpha/2`` and ``100*(1-alpha/2)``
    percentiles of the resample means, linear interpolation), ``n`` and ``bootstrap_mean``
    (mean of the resample means). Per-sample scores are used as given; e.g. CIDEr keeps its
    full-set IDF.
    """
    x = np.asarray(list(values), dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise RadGrounderError("bootstrap_ci: need a non-empty 1-D list of values")
    if not np.all(np.isfinite(x)):
        raise RadGrounderError("bootstrap_ci: values must be finite numbers")
    if n_resamples < 1:
        raise RadGrounderError(f"bootstrap_ci: n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < alpha < 1.0:
        raise RadGrounderError(f"bootstrap_ci: alpha must lie in (0, 1), got {alpha}")
    n = x.size
    means = resample_means(x, n_resamples=n_resamples, seed=seed)
    low, high = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {
        "mean": float(x.mean()),
        "low": float(low),
        "high": float(high),
        "n": int(n),
        "bootstrap_mean": float(means.mean()),
    }
