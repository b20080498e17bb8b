"""``make bench``: run the CPU benchmarks, write docs/benchmarks.md and README's summary.

    .venv/bin/python benchmarks/run_all.py                 # all (about 12 minutes on 2 cores)
    .venv/bin/python benchmarks/run_all.py --only train    # one, merged into the existing page
    .venv/bin/python benchmarks/run_all.py --render        # rewrite the pages from the JSON

Each benchmark prints JSON (``benchmarks/harness.py``: interleaved rounds, per-round ratios
with median/min/max/spread, the machine). The JSON of every run is kept in
``docs/benchmarks.json``; ``docs/benchmarks.md`` (tables + that JSON) and the block between
the ``bench:start``/``bench:end`` markers in README.md are rendered from it, so the numbers on
both pages are the numbers of the last run. ``tests/test_benchmarks_doc.py`` checks that.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
JSON_PATH = REPO / "docs" / "benchmarks.json"
PAGE = REPO / "docs" / "benchmarks.md"
README = REPO / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
PY = sys.executable

# name -> command, run from the repository root
BENCHMARKS: dict[str, list[str]] = {
    "regions": [PY, "benchmarks/bench_regions.py", "--slices", "96", "--rounds", "5"],
    "keywords": [PY, "benchmarks/bench_keywords.py", "--n", "2000", "--rounds", "7"],
    "train": shlex.split(
        "benchmarks/bench_train.py --size tiny --steps 16 --batch-size 8 --rounds 9"
    ),
    "infer_tiny": shlex.split(
        "benchmarks/bench_infer.py --size tiny --n 32 --batch-size 8 --rounds 5"
    ),
    "infer_small": shlex.split(
        "benchmarks/bench_infer.py --size small --n 32 --batch-size 8 --rounds 5"
    ),
    "unused_params": [
        str(Path(PY).with_name("torchrun")),
        *shlex.split(
            "--nproc_per_node 2 benchmarks/bench_unused_params.py --size tiny --rounds 7 --steps 4"
        ),
    ],
    "serve": [PY, "benchmarks/bench_serve.py", "--quick"],
    "archive": [PY, "benchmarks/bench_archive.py"],
}
# Run several times in a row: the page shows how far the medians of consecutive runs agree.
REPEATS = {"train": 3}
for _command in BENCHMARKS.values():
    if _command[0].endswith(".py"):
        _command.insert(0, PY)
TITLES = {
    "regions": "Region extraction (`labels build`'s per-slice boxes)",
    "keywords": "Lexicon keyword extraction",
    "train": "Training step throughput",
    "infer_tiny": "Inference batching, tiny model",
    "infer_small": "Inference batching, small model",
    "unused_params": "DDP with an unused mask head on one rank (2 processes, gloo)",
    "serve": "Serving (uvicorn on loopback, tiny model)",
    "archive": "Archive predict (tiny model; local vs Ray actors; driver memory)",
}


def _display(command: list[str]) -> str:
    """The command as a user types it from the repository root."""
    shown = [".venv/bin/python" if c == PY else c for c in command]
    shown = [".venv/bin/torchrun" if c.endswith("/torchrun") else c for c in shown]
    prefix = "OMP_NUM_THREADS=1 " if "torchrun" in shown[0] else ""
    return prefix + shlex.join(shown)


def run_one(name: str) -> dict[str, Any]:
    command = BENCHMARKS[name]
    env = dict(os.environ, PYTHONPATH=str(REPO / "benchmarks"))
    if name == "unused_params":
        env["OMP_NUM_THREADS"] = "1"
    print(f"== {name}: {_display(command)}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"benchmark {name} failed with exit code {proc.returncode}")
    start = proc.stdout.index("{")
    result = json.loads(proc.stdout[start:])
    result["command"] = _display(command)
    result["wall_s"] = round(time.perf_counter() - t, 1)
    print(f"   {result['wall_s']} s", file=sys.stderr, flush=True)
    return result


def _fmt(v: float) -> str:
    return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"


def comparison_rows(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(benchmark, comparison key, comparison) for every comparison of every benchmark."""
    return [
        (name, key, comp)
        for name, res in results.items()
        for key, comp in res.get("comparisons", {}).items()
    ]


def summary_table(results: dict[str, Any]) -> str:
    lines = [
        "| benchmark | comparison | median | min | max | spread | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, _key, c in comparison_rows(results):
        verdict = "unstable (spread > 25 %)" if c["unstable"] else "stable"
        lines.append(
            f"| {name} | {c['what']} | {_fmt(c['median'])}× | {_fmt(c['min'])}× | "
            f"{_fmt(c['max'])}× | {c['spread'] * 100:.0f} % | {verdict} |"
        )
    return "\n".join(lines)


def _machine_line(results: dict[str, Any]) -> str:
    m = next(iter(results.values()))["machine"]
    torch = next(
        (r["machine"]["torch"] for r in results.values() if r["machine"].get("torch")), None
    )
    line = f"{m['cpu_model']}, {m['cpu_count']} cores, Python {m['python']}"
    return line + (f", torch {torch}" if torch else "")


def render_page(results: dict[str, Any], meta: dict[str, Any]) -> str:
    out = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`benchmarks/run_all.py`) — do not edit by hand; rerun it.",
        f"Last run: {meta['date']} on {_machine_line(results)}.",
        "",
        "Every comparison is timed interleaved: a discarded warm-up round, then rounds in which "
        "both sides run back to back, the order alternating (A B, B A, …). The ratio is taken "
        "per round; the table gives its median, min, max and spread ((max − min) / median). A "
        "spread above 25 % is marked unstable: the machine was too busy to trust that ratio "
        "(the load average at start and end is in each benchmark's JSON). Ratios > 1 mean the "
        "second side (ours, batched, concurrent, new) is faster.",
        "",
        summary_table(results),
        "",
    ]
    for name, res in results.items():
        out += [
            f"## {TITLES.get(name, name)}",
            "",
            "```bash",
            res["command"],
            "```",
            "",
            f"{res['wall_s']} s; machine load average {res['machine']['loadavg_start']} at the "
            f"start, {res['machine']['loadavg_end']} at the end.",
            "",
            *_repeat_lines(res),
            *_memory_lines(res),
            "<details><summary>JSON</summary>",
            "",
            "```json",
            json.dumps(res, indent=2),
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(out)


def _repeat_lines(res: dict[str, Any]) -> list[str]:
    lines = []
    for key, medians in res.get("repeats", {}).items():
        low, high = min(medians), max(medians)
        mid = (low + high) / 2
        lines.append(
            f"{len(medians)} consecutive runs of the same command, median {key}: "
            + ", ".join(f"{m:.3f}" for m in medians)
            + f" (all within ±{(high - low) / 2 / mid * 100:.1f} % of their midpoint; the JSON "
            "below is the first run)."
        )
    return [*lines, ""] if lines else []


def _memory_lines(res: dict[str, Any]) -> list[str]:
    mem = res.get("driver_memory")
    if not mem:
        return []
    lines = ["| scans | archive predict, driver peak RSS | labels build, driver peak RSS |",
             "|---|---|---|"]  # fmt: skip
    for n, m in mem["scans"].items():
        lines.append(f"| {n} | {m['predict_peak_rss_mib']:.0f} MiB | "
                     f"{m['build_peak_rss_mib']:.0f} MiB |")  # fmt: skip
    growth = ", ".join(f"{k.replace('_', ' ')} {v:.2f}×" for k, v in mem["growth"].items())
    verdict = "met" if mem["met"] else "NOT met"
    loads = {k: v["model_loads_per_run"] for k, v in res.get("sides", {}).items()}
    return [*lines, "", f"Growth: {growth} (goal {mem['goal']}: {verdict}). Model loads per "
            f"run: {loads}.", ""]  # fmt: skip


def render_readme_block(results: dict[str, Any], meta: dict[str, Any]) -> str:
    return "\n".join(
        [
            START,
            f"Measured by `make bench` on {meta['date']} ({_machine_line(results)}); every "
            "number, its command and its JSON are in [docs/benchmarks.md](docs/benchmarks.md).",
            "",
            summary_table(results),
            END,
        ]
    )


def write_pages(data: dict[str, Any]) -> None:
    results, meta = data["results"], data["meta"]
    PAGE.write_text(render_page(results, meta), encoding="utf-8")
    readme = README.read_text(encoding="utf-8")
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no {START} ... {END} block")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(head + render_readme_block(results, meta) + tail, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS))
    parser.add_argument("--render", action="store_true", help="only rewrite the pages")
    args = parser.parse_args()
    data = (
        json.loads(JSON_PATH.read_text(encoding="utf-8"))
        if JSON_PATH.is_file()
        else {"results": {}, "meta": {}}
    )
    if not args.render:
        for name in args.only or list(BENCHMARKS):
            runs = [run_one(name) for _ in range(REPEATS.get(name, 1))]
            result = runs[0]
            if len(runs) > 1:
                result["repeats"] = {
                    key: [r["comparisons"][key]["median"] for r in runs]
                    for key in result["comparisons"]
                }
            data["results"][name] = result
        data["results"] = {n: data["results"][n] for n in BENCHMARKS if n in data["results"]}
        data["meta"] = {"date": time.strftime("%Y-%m-%d")}
        JSON_PATH.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    write_pages(data)
    print(summary_table(data["results"]))


if __name__ == "__main__":
    main()
