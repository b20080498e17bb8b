"""Region extraction speed: ours vs the reference algorithm, against the I/O floor.

Prints JSON. The reference algorithm (spec §5.3) runs, per slice and per class present, an
8-connected component pass on the binary class mask and takes the union box; it is
re-implemented here with scipy (the reference uses OpenCV) so both sides run on one machine.

    .venv/bin/python benchmarks/bench_regions.py [--slices 96] [--rounds 5]

Both sides run once per round on the same unified label volume, interleaved
(``benchmarks/harness.py``); loading the NIfTI is timed alone as the I/O floor.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from harness import MIN_ROUNDS, Machine, interleave, rate, speedup  # benchmarks/harness.py
from scipy import ndimage

from radgrounder.imaging import read_label_map
from radgrounder.labels.regions import extract_regions, unify_label_volume

REPO = Path(__file__).resolve().parents[1]
EIGHT = np.ones((3, 3), dtype=bool)


def reference_boxes(unified: np.ndarray) -> list[dict[int, tuple[int, int, int, int]]]:
    out = []
    for s in unified:
        boxes = {}
        for cid in np.unique(s):
            if cid == 0:
                continue
            comps, _ = ndimage.label(s == cid, structure=EIGHT)
            parts = [sl for sl in ndimage.find_objects(comps) if sl is not None]
            boxes[int(cid)] = (
                min(c.start for _, c in parts),
                min(r.start for r, _ in parts),
                max(c.stop for _, c in parts),
                max(r.stop for r, _ in parts),
            )
        out.append(boxes)
    return out


def synthetic_label_map(path: Path, slices: int, seed: int = 0) -> None:
    """117 CT classes as blocky regions: a coarse random grid upsampled by repetition, so a
    slice shows dozens of classes, each in several components."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 118, size=(32, 32, max(1, slices // 16)), dtype=np.uint8)
    vol = np.repeat(np.repeat(np.repeat(coarse, 16, 0), 16, 1), 16, 2)[:, :, :slices]
    img = nib.Nifti1Image(vol, np.diag([0.8, 0.8, 1.0, 1.0]))
    img.set_data_dtype(np.uint8)
    nib.save(img, path)


def run_case(path: Path, rounds: int, label_task: str = "total") -> dict:
    t = time.perf_counter()
    labels = read_label_map(path)
    load_s = time.perf_counter() - t
    unified = unify_label_volume(labels, label_task=label_task)
    results: dict[str, object] = {}

    def ours() -> None:
        u = unify_label_volume(labels, label_task=label_task)
        results["ours"] = [r.boxes for r in extract_regions(u, instances=False)]

    def ours_instances() -> None:
        u = unify_label_volume(labels, label_task=label_task)
        results["instances"] = list(extract_regions(u, instances=True))

    def reference() -> None:
        results["reference"] = reference_boxes(unified)

    seconds = interleave(
        {"reference": reference, "ours": ours, "ours_instances": ours_instances},
        rounds,
        min_round_s=0.5,
    )
    if results["reference"] != results["ours"]:
        raise SystemExit(f"{path}: our boxes differ from the reference algorithm's")
    n = unified.shape[0]
    return {
        "slices": n,
        "shape": list(unified.shape),
        "ours_slices_per_s": rate(seconds["ours"], n),
        "ours_with_instances_slices_per_s": rate(seconds["ours_instances"], n),
        "reference_slices_per_s": rate(seconds["reference"], n),
        "load_only_s": round(load_s, 3),
        "ours_median_s": round(statistics.median(seconds["ours"]), 4),
        "boxes_identical": True,
        "speedup": speedup(seconds, "reference", "ours"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=96, help="of the synthetic 512x512 map")
    parser.add_argument("--rounds", type=int, default=5, help=f"timed rounds (>= {MIN_ROUNDS})")
    args = parser.parse_args()
    if args.rounds < MIN_ROUNDS or args.slices < 1:
        parser.error(f"--rounds must be at least {MIN_ROUNDS} and --slices positive")
    machine = Machine()
    cases = {}
    cases["example_ct"] = run_case(
        REPO / "data/totalseg_example/example_seg_fast_force_split.nii.gz", args.rounds
    )
    with tempfile.TemporaryDirectory() as tmp:
        synth = Path(tmp) / "synthetic.nii.gz"
        synthetic_label_map(synth, args.slices)
        cases[f"synthetic_512x512x{args.slices}"] = run_case(synth, args.rounds)
    comparisons = {
        f"{name}_ours_over_reference": {
            "what": f"{name}: slices/s, ours / the reference algorithm",
            **case.pop("speedup"),
        }
        for name, case in cases.items()
    }
    result = {
        "benchmark": "regions",
        "command": shlex.join([sys.executable, *sys.argv]),
        "rounds": args.rounds,
        "cases": cases,
        "comparisons": comparisons,
        "unstable": any(c["unstable"] for c in comparisons.values()),
        "machine": machine.report(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
