"""Region extraction speed: ours vs the reference algorithm, against the I/O floor.

Prints JSON. The reference algorithm (spec §5.3) runs, per slice and per class present, an
8-connected component pass on the binary class mask and takes the union box; it is
re-implemented here with scipy (the reference uses OpenCV) so both sides run on one machine.

    .venv/bin/python benchmarks/bench_regions.py [--slices 400] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
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


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def run_case(path: Path, repeat: int, label_task: str = "total") -> dict:
    load_s, labels = best_of(lambda: read_label_map(path), repeat)

    def ours():
        unified = unify_label_volume(labels, label_task=label_task)
        return unified, [r.boxes for r in extract_regions(unified, instances=False)]

    def ours_instances():
        unified = unify_label_volume(labels, label_task=label_task)
        return list(extract_regions(unified, instances=True))

    ours_s, (unified, boxes) = best_of(ours, repeat)
    inst_s, _ = best_of(ours_instances, repeat)
    base_s, base = best_of(lambda: reference_boxes(unified), 1)
    if base != boxes:
        raise SystemExit(f"{path}: our boxes differ from the reference algorithm's")
    n = unified.shape[0]
    return {
        "slices": n,
        "shape": list(unified.shape),
        "ours_slices_per_s": round(n / ours_s, 1),
        "ours_with_instances_slices_per_s": round(n / inst_s, 1),
        "baseline_slices_per_s": round(n / base_s, 2),
        "speedup": round(base_s / ours_s, 1),
        "load_only_s": round(load_s, 3),
        "ours_s": round(ours_s, 3),
        "ours_with_instances_s": round(inst_s, 3),
        "baseline_s": round(base_s, 3),
        "boxes_identical": True,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cases = {}
    cases["example_ct"] = run_case(
        REPO / "data/totalseg_example/example_seg_fast_force_split.nii.gz", args.repeat
    )
    with tempfile.TemporaryDirectory() as tmp:
        synth = Path(tmp) / "synthetic.nii.gz"
        synthetic_label_map(synth, args.slices)
        cases[f"synthetic_512x512x{args.slices}"] = run_case(synth, args.repeat)
    print(
        json.dumps(
            {
                "cases": cases,
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
