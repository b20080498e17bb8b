"""Archive predict: throughput against the shell loop users write today, local vs Ray actors,
model loads per run, the batch fill, and the driver's peak memory as the archive grows.

Prints JSON. The archive is ``--series`` synthetic CT volumes (NIfTI, ``--slices`` slices of
48 x 48) predicted with the tiny random model of the real class, ``--max-new-tokens`` tokens.
Sides, each a fresh ``radgrounder`` process into an empty ``--out``, timed interleaved
(``benchmarks/harness.py``):

- ``loop``: one ``radgrounder predict VOLUME --all-slices`` per volume (the model loaded for
  every scan: what a shell loop over an archive does);
- ``local``: ``radgrounder predict ARCHIVE --out OUT`` (one model, shared batches);
- ``ray1`` / ``ray2``: the same with ``--executor ray --workers 1`` / ``2`` against a Ray head
  the benchmark starts in a temporary folder (and stops by its own process ids).

Memory: the peak RSS (``wait4``) of the driver process of ``labels build`` and of archive
``predict`` (local executor: the driver is also the worker) over 100 and 1,000 small synthetic
scans; the goal is at most 1.2x growth for 10x the scans.

    .venv/bin/python benchmarks/bench_archive.py                  # about 8 minutes on 2 cores
    .venv/bin/python benchmarks/bench_archive.py --quick          # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from harness import MIN_ROUNDS, Machine, interleave, rate, speedup  # benchmarks/harness.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.ray_cluster: the Ray head the tests start, too

PY = sys.executable


def _volume(path: Path, slices: int, size: int, seed: int) -> None:
    import nibabel as nib

    rng = np.random.default_rng(seed)
    data = rng.normal(40, 120, (size, size, slices)).clip(-1000, 1500).astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([0.8, 0.8, 3.0, 1.0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def make_archive(root: Path, n: int, slices: int, size: int = 48) -> list[Path]:
    files = []
    for i in range(n):
        folder = root / f"patient{i:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        files.append(folder / "ct.nii.gz")
        _volume(files[-1], slices, size, i)
    return files


def make_build_inputs(root: Path, n: int) -> tuple[Path, Path, Path]:
    import nibabel as nib

    scans, labels = root / "scans", root / "labels"
    scans.mkdir(parents=True)
    labels.mkdir()
    lines = []
    for i in range(n):
        sid = f"s{i:05d}"
        _volume(scans / f"{sid}.nii.gz", 2, 24, i)
        lab = np.zeros((24, 24, 2), np.uint8)
        lab[4:14, 4:16, :] = 5  # liver in TotalSegmentator's "total" task
        lab[15:20, 16:22, :] = 1  # spleen
        nib.save(nib.Nifti1Image(lab, np.diag([0.8, 0.8, 3.0, 1.0])), labels / f"{sid}.nii.gz")
        text = "The liver is normal. The spleen is not enlarged."
        lines.append(json.dumps({"scan_id": sid, "language": "en", "text": text}))
    (root / "reports.jsonl").write_text("\n".join(lines) + "\n")
    return scans, labels, root / "reports.jsonl"


def peak_rss_mib(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run ``cmd``; its peak resident set (MiB, from ``wait4``) and its stdout."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode not in (0,):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    return usage.ru_maxrss / 1024, text


def _run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--series", type=int, default=6)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    ap.add_argument("--rss-scans", default="100,1000")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args = ap.parse_args()
    if args.quick:
        args.series, args.slices, args.rounds, args.rss_scans = 2, 2, MIN_ROUNDS, "10,30"
    machine = Machine()
    from radgrounder.modeling import init_model

    tmp = Path(tempfile.mkdtemp(prefix="rg-bench-archive-"))
    model = init_model("tiny", "detection", tmp / "model", seed=0)
    archive = tmp / "archive"
    volumes = make_archive(archive, args.series, args.slices)
    rg = [PY, "-m", "radgrounder"]
    common = ["--model", str(model), "--max-new-tokens", str(args.max_new_tokens)]
    loads: dict[str, list[int]] = {}
    fill: dict[str, list[float]] = {}
    counter = {"n": 0}

    def fresh_out() -> str:
        counter["n"] += 1
        return str(tmp / "out" / str(counter["n"]))

    def archive_side(name: str, extra: list[str], env: dict[str, str] | None = None):
        def side() -> None:
            text = _run([*rg, "predict", str(archive), *common, "--out", fresh_out(), *extra],
                        env)  # fmt: skip
            loads.setdefault(name, []).append(int(re.search(r"model loads (\d+)", text)[1]))
            m = re.search(r"batch fill (\d+)%", text)
            fill.setdefault(name, []).append(int(m[1]) / 100 if m else float("nan"))

        return side

    def loop() -> None:
        base = fresh_out()
        for i, vol in enumerate(volumes):
            _run([*rg, "predict", str(vol), *common, "--all-slices", "--out", f"{base}/{i}"])
        loads.setdefault("loop", []).append(len(volumes))

    sides = {"loop": loop, "local": archive_side("local", [])}
    head = None
    if not args.no_ray:
        from tests.ray_cluster import AUTH, ray_head

        head = ray_head(num_cpus=2)
        address = head.__enter__()
        env = {**os.environ, **AUTH, "RAY_ADDRESS": address}
        sides["ray1"] = archive_side("ray1", ["--executor", "ray", "--workers", "1"], env)
        sides["ray2"] = archive_side("ray2", ["--executor", "ray", "--workers", "2"], env)
    try:
        seconds = interleave(sides, args.rounds)
    finally:
        if head is not None:
            head.__exit__(None, None, None)
    n_slices = args.series * args.slices
    sides_out = {
        name: {
            "median_s": round(float(np.median(s)), 3),
            "jobs_per_min": rate(s, args.series * 60),
            "slices_per_s": rate(s, n_slices),
            "model_loads_per_run": sorted(set(loads[name])),
            "batch_fill": None if name == "loop" else round(float(np.nanmedian(fill[name])), 3),
        }
        for name, s in seconds.items()
    }
    comparisons = {
        "loop_vs_local": {
            "what": "shell loop (a model load per scan) → predict ARCHIVE",
            **speedup(seconds, "loop", "local"),
        },
    }
    if not args.no_ray:
        for n in ("ray1", "ray2"):
            comparisons[f"local_vs_{n}"] = {
                "what": f"predict ARCHIVE local → Ray, {n[-1]} worker(s)",
                **speedup(seconds, "local", n),
            }

    memory = {}
    sizes = [int(x) for x in args.rss_scans.split(",")]
    for n in sizes:
        root = tmp / f"rss{n}"
        make_archive(root / "archive", n, 1, size=24)
        rss, _ = peak_rss_mib([*rg, "predict", str(root / "archive"), "--model", str(model),
                               "--max-new-tokens", "2", "--out", str(root / "pred")])  # fmt: skip
        scans, labels, reports = make_build_inputs(root / "build", n)
        rss_b, _ = peak_rss_mib([*rg, "labels", "build", "--scans", str(scans), "--labels",
                                 str(labels), "--reports", str(reports), "--no-vqa",
                                 "--label-task", "total", "--out", str(root / "ds")])  # fmt: skip
        memory[str(n)] = {"predict_peak_rss_mib": round(rss, 1),
                          "build_peak_rss_mib": round(rss_b, 1)}  # fmt: skip
    lo, hi = memory[str(sizes[0])], memory[str(sizes[-1])]
    growth = {
        "predict": round(hi["predict_peak_rss_mib"] / lo["predict_peak_rss_mib"], 3),
        "labels_build": round(hi["build_peak_rss_mib"] / lo["build_peak_rss_mib"], 3),
    }
    result = {
        "benchmark": "archive",
        "config": {**vars(args), "volume": [48, 48, args.slices], "model": "tiny (random)"},
        "sides": sides_out,
        "comparisons": comparisons,
        "driver_memory": {
            "scans": memory,
            "growth": growth,
            "goal": f"at most 1.2x from {sizes[0]} to {sizes[-1]} scans",
            "met": all(g <= 1.2 for g in growth.values()),
        },
        "machine": machine.report(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
