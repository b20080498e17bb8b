"""``radgrounder compare RUN_A RUN_B``: paired differences between two evaluation runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from radgrounder.errors import RadGrounderError
from radgrounder.evaluation.metrics import resample_means
from radgrounder.evaluation.scoring import subsets


def _load(run: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import pyarrow.parquet as pq

    run = Path(run)
    for name in ("summary.json", "samples.parquet"):
        if not (run / name).is_file():
            raise RadGrounderError(f"not an evaluation run folder (no {name})", path=run)
    try:
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RadGrounderError(f"summary.json is not valid JSON ({exc})", path=run) from None
    return summary, pq.read_table(run / "samples.parquet").to_pylist()


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, *, n_resamples: int = 10_000, seed: int = 0, alpha: float = 0.05
) -> dict[str, float | int]:
    """Paired bootstrap of mean(a - b) over the same samples.

    Resamples the per-sample differences with replacement (``default_rng(seed)``), and
    reports the observed ``diff``, the percentile CI ``low``/``high`` and a two-sided
    ``p_value`` = min(1, 2 * min(share of resampled means <= 0, share >= 0)): the smallest
    two-sided level at which the percentile interval excludes 0. Identical runs give
    diff 0, CI [0, 0] and p 1.
    """
    d = np.asarray(a, float) - np.asarray(b, float)
    if d.ndim != 1 or d.size == 0:
        raise RadGrounderError("paired_bootstrap: need two equally long, non-empty lists")
    n = d.size
    means = resample_means(d, n_resamples=n_resamples, seed=seed)
    low, high = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    p = min(1.0, 2.0 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0))))
    return {
        "diff": float(d.mean()),
        "low": float(low),
        "high": float(high),
        "p_value": p,
        "n": int(n),
    }


def compare_runs(
    run_a: str | Path,
    run_b: str | Path,
    *,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per subset and metric of the samples both runs scored (joined on ``id``): the mean
    of A, of B, and the paired bootstrap of A - B. Runs on different datasets or splits
    are refused."""
    sa, rows_a = _load(Path(run_a))
    sb, rows_b = _load(Path(run_b))
    key_a = (sa["dataset"]["name"], sa["dataset"]["split"], sa["dataset"].get("sha256"))
    key_b = (sb["dataset"]["name"], sb["dataset"]["split"], sb["dataset"].get("sha256"))
    if key_a[:2] != key_b[:2]:
        raise RadGrounderError(
            f"the runs evaluate different data: {key_a[0]}/{key_a[1]} vs {key_b[0]}/{key_b[1]}"
        )
    by_id = {r["id"]: r for r in rows_b}
    shared = [(r, by_id[r["id"]]) for r in rows_a if r["id"] in by_id]
    if not shared:
        raise RadGrounderError("the runs have no sample ids in common")
    metrics = [
        m
        for m in sa["metrics"].get("all", {})
        if m in sb["metrics"].get("all", {}) and m in rows_a[0] and m in rows_b[0]
    ]
    table: dict[str, dict[str, Any]] = {}
    for name, idx in subsets([a for a, _ in shared]).items():
        entry: dict[str, Any] = {}
        for m in metrics:
            pairs = [
                (shared[i][0][m], shared[i][1][m])
                for i in idx
                if _finite(shared[i][0][m]) and _finite(shared[i][1][m])
            ]
            if not pairs:
                continue
            a, b = np.array(pairs, float).T
            entry[m] = {
                "a": float(a.mean()),
                "b": float(b.mean()),
                **paired_bootstrap(a, b, n_resamples=n_resamples, seed=seed),
            }
        if entry:
            table[name] = entry
    return {
        "run_a": {"path": str(run_a), "model": sa.get("model", {}), "n": len(rows_a)},
        "run_b": {"path": str(run_b), "model": sb.get("model", {}), "n": len(rows_b)},
        "dataset": {"name": key_a[0], "split": key_a[1], "same_files": key_a[2] == key_b[2]},
        "n_shared": len(shared),
        "bootstrap": {"n_resamples": n_resamples, "seed": seed, "alpha": 0.05, "paired": True},
        "metrics": table,
    }


def _finite(v: Any) -> bool:
    return v is not None and math.isfinite(float(v))
