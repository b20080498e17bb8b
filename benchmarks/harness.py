"""What every benchmark shares: interleaved rounds, robust ratios and the machine they ran on.

A comparison of two sides (A = the baseline, B = ours) is timed interleaved: one discarded
warm-up round per side, then ``rounds`` rounds in which both sides run back to back, the order
alternating (A B, B A, A B, ...) so that a drift in machine load within a round cancels
instead of favouring the side that always runs second. The ratio is taken per round (both
sides adjacent in time) and reported with its median, min, max and spread
((max - min) / median); a spread above ``UNSTABLE_SPREAD`` marks the comparison ``unstable``:
rerun it on a quieter machine or with longer rounds.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

MIN_ROUNDS = 5
UNSTABLE_SPREAD = 0.25  # per-round ratio spread ((max - min) / median) above this: unstable


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Machine:
    """The machine a benchmark runs on, with the load average at its start and end."""

    def __init__(self) -> None:
        self.loadavg_start = os.getloadavg()

    def report(self, **extra: Any) -> dict[str, Any]:
        torch = sys.modules.get("torch")
        out: dict[str, Any] = {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": getattr(torch, "__version__", None),
            "loadavg_start": [round(v, 2) for v in self.loadavg_start],
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        }
        out.update(extra)
        return out


def interleave(
    sides: dict[str, Callable[[], Any]],
    rounds: int,
    *,
    warmup: int = 1,
    min_round_s: float = 0.0,
) -> dict[str, list[float]]:
    """Seconds per call of each side, one entry per round: ``warmup`` discarded rounds, then
    ``rounds`` rounds, the order of the sides reversed every other round. With
    ``min_round_s`` a side that is faster than that is called repeatedly within a round (the
    count calibrated in the warm-up), so timer resolution and one-off hiccups weigh less."""
    if rounds < 1 or warmup < 1:
        raise ValueError(f"rounds and warmup must be >= 1, got {rounds} and {warmup}")
    names = list(sides)
    reps = dict.fromkeys(names, 1)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            n = reps[name]
            t = time.perf_counter()
            for _ in range(n):
                sides[name]()
            per_call = (time.perf_counter() - t) / n
            if r < warmup:
                if per_call > 0 and min_round_s > 0:
                    reps[name] = max(1, math.ceil(min_round_s / per_call))
            else:
                seconds[name].append(per_call)
    return seconds


def spread_report(ratios: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and spread of per-round ratios, and whether they are too wide to trust."""
    if not ratios:
        raise ValueError("no ratios")
    median = statistics.median(ratios)
    spread = (max(ratios) - min(ratios)) / median if median else float("inf")
    return {
        "rounds": [round(r, 4) for r in ratios],
        "median": round(median, 4),
        "min": round(min(ratios), 4),
        "max": round(max(ratios), 4),
        "spread": round(spread, 4),
        "unstable": spread > UNSTABLE_SPREAD,
        "unstable_threshold": UNSTABLE_SPREAD,
    }


def speedup(seconds: dict[str, list[float]], baseline: str, ours: str) -> dict[str, Any]:
    """Per-round baseline time / our time (> 1: ours is faster), as :func:`spread_report`."""
    return spread_report([b / o for b, o in zip(seconds[baseline], seconds[ours], strict=True)])


def rate(seconds: Sequence[float], items: float) -> dict[str, Any]:
    """Items per second of each round and at the median round time."""
    return {
        "per_round": [round(items / s, 3) for s in seconds],
        "median": round(items / statistics.median(seconds), 3),
    }
