"""The benchmark harness, and the pages its numbers go to: docs/benchmarks.md and README's
summary are exactly what ``benchmarks/run_all.py`` renders from docs/benchmarks.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import harness  # noqa: E402
import run_all  # noqa: E402


def _data() -> dict:
    return json.loads(run_all.JSON_PATH.read_text(encoding="utf-8"))


def test_the_benchmarks_page_is_rendered_from_the_recorded_runs() -> None:
    data = _data()
    assert set(data["results"]) == set(run_all.BENCHMARKS)
    page = run_all.PAGE.read_text(encoding="utf-8")
    assert page == run_all.render_page(data["results"], data["meta"])


def test_readme_quotes_the_benchmarks_page() -> None:
    data = _data()
    readme = run_all.README.read_text(encoding="utf-8")
    block = readme[readme.index(run_all.START) : readme.index(run_all.END) + len(run_all.END)]
    assert block == run_all.render_readme_block(data["results"], data["meta"])
    # Every ratio README shows is one of the page's numbers.
    page = run_all.PAGE.read_text(encoding="utf-8")
    for _, _, comp in run_all.comparison_rows(data["results"]):
        assert f"{run_all._fmt(comp['median'])}×" in block
        assert f"{run_all._fmt(comp['median'])}×" in page


def test_every_recorded_comparison_is_interleaved_and_judged() -> None:
    for name, result in _data()["results"].items():
        machine = result["machine"]
        assert {"cpu_model", "cpu_count", "loadavg_start", "loadavg_end"} <= set(machine), name
        assert result["comparisons"], name
        for key, comp in result["comparisons"].items():
            assert len(comp["rounds"]) >= harness.MIN_ROUNDS, (name, key)
            assert comp["min"] <= comp["median"] <= comp["max"], (name, key)
            spread = (comp["max"] - comp["min"]) / comp["median"]
            assert comp["spread"] == pytest.approx(spread, abs=1e-3), (name, key)
            assert comp["unstable"] == (comp["spread"] > harness.UNSTABLE_SPREAD), (name, key)


def test_interleave_alternates_the_order_and_discards_the_warmup() -> None:
    calls: list[str] = []
    seconds = harness.interleave(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 4, warmup=1
    )
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
    assert [len(v) for v in seconds.values()] == [4, 4]


def test_interleave_repeats_fast_sides_to_fill_a_round() -> None:
    import time

    counts = {"fast": 0, "slow": 0}

    def fast() -> None:
        counts["fast"] += 1

    def slow() -> None:
        counts["slow"] += 1
        time.sleep(0.02)

    seconds = harness.interleave({"fast": fast, "slow": slow}, 5, min_round_s=0.05)
    assert counts["slow"] <= 1 + 5 * 3  # 0.02 s calls: at most 3 per round
    assert counts["fast"] > 100  # a no-op is repeated until the round lasts 0.05 s
    assert all(s < 0.01 for s in seconds["fast"])  # reported per call, not per round
    assert all(s >= 0.02 for s in seconds["slow"])


def test_spread_report_flags_wide_spreads() -> None:
    calm = harness.spread_report([1.0, 1.05, 0.98, 1.02, 1.01])
    assert calm["median"] == 1.01 and not calm["unstable"]
    noisy = harness.spread_report([0.3, 0.6, 2.1, 1.0, 1.2])
    assert noisy["unstable"] and noisy["spread"] == pytest.approx((2.1 - 0.3) / 1.0, abs=1e-4)
    times = {"ref": [2.0, 2.2, 1.8, 2.0, 2.0], "ours": [1.0, 1.1, 0.9, 1.0, 1.0]}
    assert harness.speedup(times, "ref", "ours")["median"] == 2.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        "bench_regions.py --slices 16 --rounds 5",
        "bench_keywords.py --n 50 --rounds 5",
        "bench_infer.py --size tiny --n 4 --batch-size 2 --new-tokens 2 --rounds 5",
        "bench_train.py --size tiny --steps 1 --batch-size 2 --rounds 5",
        "bench_archive.py --quick --no-ray",
    ],
    ids=lambda a: a.split()[0],
)
def test_each_benchmark_reports_its_comparisons(command: str) -> None:
    args = command.split()
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / args[0]), *args[1:]],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert result["comparisons"]
    for comp in result["comparisons"].values():
        assert len(comp["rounds"]) == 5 and comp["median"] > 0
    assert result["machine"]["loadavg_end"]
