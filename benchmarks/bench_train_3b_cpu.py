"""One training step of the real 3B shapes on CPU in bf16: does it fit, and how long does it take.

Prints JSON. A random ``3b`` detection model (PaliGemma-2 3B/224 shapes) is written as a bf16
checkpoint to a temporary folder (about 6 GB) and loaded in bf16; the vision tower is frozen and
the rest trained with Adafactor (factored second moments, no first moment: AdamW's two fp32
states for ~2.6B parameters would not fit next to the weights in 24 GiB). Each step runs one
batch of one sample with a short grounded target through
``radgrounder.training.objective.TrainingObjective`` (the LM head only at target positions),
backward, gradient clipping at 1.0, the optimizer step and ``zero_grad``.

    .venv/bin/python benchmarks/bench_train_3b_cpu.py --steps 2

``init_model`` builds the weights in fp32 (~12 GB) before casting them, so it runs in a child
process: ``init_peak_rss_gib`` is that child's peak, ``peak_rss_gib`` this process's (load and
training). ``rss_gib_after`` gives the current and the peak RSS after each phase; the same
lines go to stderr as the run progresses, so a run killed for memory shows where it was.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import cpu_model  # benchmarks/harness.py

from radgrounder.datasets import Example
from radgrounder.modeling import init_model, load_model
from radgrounder.training.collate import image_seq_length, make_batch
from radgrounder.training.objective import TrainingObjective

GIB = 2**30
PROMPT = (
    "<image>\nClinical information: Pain.\nQuestion: Staging.\nCaption this image "
    "and detect keywords: "
)
TARGET = "The <p bbox=<loc0100><loc0120><loc0300><loc0340> id=<seg005>>liver</p> is normal."


def current_rss_gib() -> float:
    with open("/proc/self/statm", encoding="ascii") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / GIB


def peak_rss_gib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss * 1024 / GIB  # ru_maxrss is in KiB on Linux


class Progress:
    """Phase log: current and peak RSS after each phase, kept for the JSON and sent to stderr."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: dict[str, dict[str, float]] = {}

    def __call__(self, phase: str) -> None:
        entry = {
            "t_s": round(time.perf_counter() - self.start, 1),
            "rss": round(current_rss_gib(), 2),
            "peak": round(peak_rss_gib(), 2),
        }
        self.phases[phase] = entry
        print(f"[bench_train_3b_cpu] {phase}: {entry}", file=sys.stderr, flush=True)


def _init(path: str, seed: int) -> None:
    init_model("3b", "detection", path, seed=seed, dtype="bfloat16")


def make_example(seed: int) -> Example:
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((3, 224, 224)).astype(np.float32)
    return Example("s0", "bench", "grounded-report", "en", image, PROMPT, TARGET)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be positive")
    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    log = Progress()
    from transformers.optimization import Adafactor

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m"
        t0 = time.perf_counter()
        child = multiprocessing.get_context("spawn").Process(
            target=_init, args=(str(path), args.seed)
        )
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"init_model failed in the child process (exit {child.exitcode})")
        init_s = time.perf_counter() - t0
        init_peak = peak_rss_gib(resource.RUSAGE_CHILDREN)
        checkpoint_gib = sum(f.stat().st_size for f in path.iterdir()) / GIB
        log("init")

        t0 = time.perf_counter()
        loaded = load_model(path, dtype=torch.bfloat16)
        load_s = time.perf_counter() - t0
        log("load")

    model = loaded.model
    for p in model.model.vision_tower.parameters():
        p.requires_grad = False
    params = [p for p in model.parameters() if p.requires_grad]
    n_total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in params)
    opt = Adafactor(params, lr=1e-5, scale_parameter=False, relative_step=False)
    objective = TrainingObjective(model, segmentation=False, chunk=1024)
    objective.train()

    batch = make_batch(
        [make_example(args.seed)], loaded.tokenizer, n_image_tokens=image_seq_length(model.config)
    )
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    target_tokens = int((batch["labels"] != -100).sum())
    seq_len = int(batch["input_ids"].shape[1])
    log("setup")

    steps = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        out = objective(**batch)
        loss = out["lm_sums"].sum() / out["counts"].sum()
        t1 = time.perf_counter()
        log(f"step {i} forward")
        loss.backward()
        t2 = time.perf_counter()
        log(f"step {i} backward")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        log(f"step {i} optimizer")
        steps.append(
            {
                "total_s": round(t4 - t0, 2),
                "forward_s": round(t1 - t0, 2),
                "backward_s": round(t2 - t1, 2),
                "clip_s": round(t3 - t2, 2),
                "optimizer_s": round(t4 - t3, 2),
                "loss": round(float(loss.detach()), 4),
                "grad_norm": round(float(grad_norm), 4),
            }
        )

    result: dict[str, Any] = {
        "size": "3b",
        "variant": "detection",
        "dtype": "bfloat16",
        "optimizer": "Adafactor(lr=1e-5, scale_parameter=False, relative_step=False)",
        "batch_size": 1,
        "sequence_length": seq_len,
        "target_tokens": target_tokens,
        "params_total": n_total,
        "params_trainable": n_trainable,
        "checkpoint_gib": round(checkpoint_gib, 2),
        "init_s": round(init_s, 1),
        "load_s": round(load_s, 1),
        "steps": steps,
        "step_s": [s["total_s"] for s in steps],
        "init_peak_rss_gib": round(init_peak, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "rss_gib_after": log.phases,
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
