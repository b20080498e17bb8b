"""Inference throughput: a naive one-by-one ``generate`` loop vs ``Predictor`` batching.

Prints JSON. Both run the same slices of the bundled DICOM series (repeated to ``--n``) with
the same grounded-report prompt, greedy, a fixed number of new tokens (``min_new_tokens`` =
``max_new_tokens``, so a random model and a trained one do the same work).

- ``naive``: per slice, preprocess, build a batch of one and call ``model.generate``.
- ``batched``: ``Predictor.predict`` over all slices, ``--batch-size`` per left-padded batch.

Latency is per slice: for ``naive`` the time of its own call; for ``batched`` the time of the
batch it was part of (all slices arrive at once). Throughput is slices / total wall time.
The two are timed interleaved over ``--rounds`` rounds after a discarded warm-up round
(``benchmarks/harness.py``); the speedup is taken per round.

    .venv/bin/python benchmarks/bench_infer.py --size tiny --n 32 --batch-size 8     # CPU
    python benchmarks/bench_infer.py --size 3b --n 128 --batch-size 32 --dtype bfloat16   # GPU
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

import numpy as np
import torch
from harness import MIN_ROUNDS, Machine, spread_report  # benchmarks/harness.py

from radgrounder.imaging import load_scan, preprocess_slice
from radgrounder.inference import Predictor
from radgrounder.modeling import init_model, load_model
from radgrounder.modeling.generation import flush_denormals
from radgrounder.prompts import build_prompt, collate_examples, encode_example
from radgrounder.training.collate import image_seq_length

SERIES = Path(__file__).resolve().parents[1] / "data" / "totalseg_example" / "example_ct_dicom"


def _stats(latencies: list[float], total: float, n: int) -> dict[str, float]:
    return {
        "slices_per_s": n / total,
        "total_s": total,
        "p50_latency_s": float(np.percentile(latencies, 50)),
        "p95_latency_s": float(np.percentile(latencies, 95)),
    }


def naive(loaded, slices, prompt: str, tokens: int) -> dict[str, float]:
    tok, model = loaded.tokenizer, loaded.model
    n_img = image_seq_length(loaded.config)
    latencies = []
    start = time.perf_counter()
    for sl in slices:
        t0 = time.perf_counter()
        pixels = torch.from_numpy(preprocess_slice(sl)[None]).to(model.device, model.dtype)
        enc = collate_examples([encode_example(tok, prompt, image_seq_length=n_img)],
                               pad_token_id=tok.pad_token_id, padding_side="left",
                               return_tensors="pt")  # fmt: skip
        with torch.inference_mode():
            model.generate(
                input_ids=enc["input_ids"].to(model.device),
                attention_mask=enc["attention_mask"].to(model.device),
                token_type_ids=torch.zeros_like(enc["input_ids"]).to(model.device),
                pixel_values=pixels,
                do_sample=False,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                pad_token_id=tok.pad_token_id,
            )
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        latencies.append(time.perf_counter() - t0)
    return _stats(latencies, time.perf_counter() - start, len(slices))


def batched(predictor: Predictor, slices, tokens: int) -> dict[str, float]:
    model = predictor.loaded.model
    gen = model.generation_config
    gen.min_new_tokens = tokens
    start = time.perf_counter()
    preds = predictor.predict(slices, "grounded-report", max_new_tokens=tokens)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    gen.min_new_tokens = None
    bs, n = predictor.batch_size, len(preds)
    sizes = [min(bs, n - (i // bs) * bs) for i in range(n)]  # the size of each slice's batch
    return _stats([p.timings["generate_s"] * k for p, k in zip(preds, sizes, strict=True)],
                  total, n)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", choices=("tiny", "small", "3b"))
    parser.add_argument("--variant", default="detection", choices=("detection", "segmentation"))
    parser.add_argument("--n", type=int, default=32, help="slices")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5, help=f"timed rounds (>= {MIN_ROUNDS})")
    args = parser.parse_args()
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = Machine()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    volume = load_scan(SERIES)
    slices = [volume.slice(k % volume.n_slices) for k in range(args.n)]
    rounds: dict[str, list[dict[str, float]]] = {"naive": [], "batched": []}
    with tempfile.TemporaryDirectory() as tmp, flush_denormals():
        folder = init_model(args.size, args.variant, Path(tmp) / "m", seed=0)
        loaded = load_model(folder, device=device, dtype=args.dtype)
        prompt = build_prompt(
            "grounded-report-detect" if args.variant == "detection" else "grounded-report-segment"
        )
        predictor = Predictor(loaded, batch_size=args.batch_size)
        sides = {
            "naive": lambda: naive(loaded, slices, prompt, args.new_tokens),
            "batched": lambda: batched(predictor, slices, args.new_tokens),
        }
        for r in range(1 + args.rounds):  # round 0: warm-up, discarded; the order alternates
            for name in ("naive", "batched") if r % 2 == 0 else ("batched", "naive"):
                stats = sides[name]()
                if r > 0:
                    rounds[name].append(stats)
    results = {
        name: {key: round(statistics.median(s[key] for s in per_round), 4) for key in per_round[0]}
        for name, per_round in rounds.items()
    }
    speedup = spread_report(
        [b["slices_per_s"] / n["slices_per_s"]
         for n, b in zip(rounds["naive"], rounds["batched"], strict=True)]
    )  # fmt: skip
    print(
        json.dumps(
            {
                "benchmark": "inference",
                "command": shlex.join([sys.executable, *sys.argv]),
                "size": args.size,
                "variant": args.variant,
                "n_slices": args.n,
                "batch_size": args.batch_size,
                "new_tokens": args.new_tokens,
                "rounds": args.rounds,
                "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                "threads": torch.get_num_threads(),
                "dtype": str(loaded.model.dtype),
                **results,
                "comparisons": {
                    "batched_over_naive_slices_per_s": {
                        "what": f"{args.size} model, {args.n} slices, batch {args.batch_size}: "
                        "slices/s, Predictor batching / one-by-one generate",
                        **speedup,
                    }
                },
                "unstable": speedup["unstable"],
                "machine": machine.report(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
