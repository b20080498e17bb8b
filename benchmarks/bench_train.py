"""Training throughput: the reference's engine vs ours on the same model, data and batches.

Prints JSON. (a) ``reference``: transformers' Trainer as the released configs use it (eager
attention, gradient checkpointing, loss from the model's own ``labels`` path, padding to the
longest sample). (b) ``ours``: the radgrounder training step, i.e. the model wrapped in
``radgrounder.training.objective.TrainingObjective`` (SDPA attention, no gradient
checkpointing, the LM head computed only at target positions, loss = summed target-token
cross-entropy / target-token count of the batch). Both use AdamW, freeze the vision tower and
clip gradients at 1.0.

Both engines are set up once (model loaded, optimizer built) and then timed interleaved on the
same pre-built batches: one discarded warm-up round per engine, then ``--rounds`` rounds in
which both engines run ``--steps`` optimizer steps back to back, the order alternating
(reference ours, ours reference, ...; see ``benchmarks/harness.py``). Reported per engine:
samples/s of every round and their median; tokens/s and model TFLOP/s at the median. The
ratio ours/reference is taken per round (same round, adjacent in time, so drift in machine
load cancels as far as it can); its spread = (max - min) / median, and the run is marked
``unstable`` when the spread exceeds ``harness.UNSTABLE_SPREAD``: rerun on a quieter machine or with
more ``--steps``. ``machine.loadavg_start``/``loadavg_end`` show what else was running.

    .venv/bin/python benchmarks/bench_train.py --size tiny --steps 16 --batch-size 8   # CPU
    python benchmarks/bench_train.py --size 3b --steps 10 --batch-size 8 --rounds 7   # GPU

Memory: both models and optimizers are resident for the whole run. On CUDA each engine's
``peak_memory_mb`` is the ``max_memory_allocated`` over its rounds (peak stats reset before
every round), and ``resident_memory_mb`` what was allocated when its round started (both
engines' weights and optimizer states); the difference is that engine's working memory. On
CPU only the process-wide peak RSS (``ru_maxrss``) is available and is reported once.

MFU (CUDA only) = model FLOPs / (time x peak bf16 FLOPs of the device). Model FLOPs count the
language model's forward and backward over every token (image tokens included; the LM head
over every position too, although ``ours`` computes it only at target positions), the frozen
vision tower's forward, and attention scores. Both engines are credited with the same model
FLOPs per batch, so their TFLOP/s ratio equals their throughput ratio; gradient-checkpointing
recomputation is not counted as useful work.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import MIN_ROUNDS, Machine, speedup  # benchmarks/harness.py
from torch import nn

from radgrounder.datasets import Example
from radgrounder.modeling import init_model, load_model
from radgrounder.training.collate import image_seq_length, make_batch
from radgrounder.training.objective import TrainingObjective

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

Batch = dict[str, Any]


def synthetic_examples(n: int, seed: int = 0) -> list[Example]:
    """Grounded-report-shaped examples with realistic lengths (30-120 target tokens)."""
    rng = np.random.default_rng(seed)
    words = [
        "the",
        "liver",
        "spleen",
        "kidney",
        "is",
        "normal",
        "no",
        "lesion",
        "left",
        "right",
        "lobe",
        "size",
        "enlarged",
    ]
    out = []
    for i in range(n):
        k = int(rng.integers(20, 90))
        text = " ".join(rng.choice(words, k))
        target = f"The <p bbox=<loc0100><loc0120><loc0300><loc0340> id=<seg005>>liver</p> {text}."
        prompt = (
            "<image>\nClinical information: Pain.\nQuestion: Staging.\nCaption this image "
            "and detect keywords: "
        )
        image = rng.standard_normal((3, 224, 224)).astype(np.float32)
        out.append(Example(f"s{i}", "bench", "grounded-report", "en", image, prompt, target))
    return out


def model_flops(model: nn.Module, batch: Batch) -> float:
    cfg = model.config
    text, vision = cfg.text_config, cfg.vision_config
    n_vis = sum(p.numel() for p in model.model.vision_tower.parameters())
    n_lm = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" not in n)
    tokens = int(batch["attention_mask"].sum())
    b, t = batch["input_ids"].shape
    n_img = (vision.image_size // vision.patch_size) ** 2
    attn = 4 * text.num_hidden_layers * t * t * text.num_attention_heads * text.head_dim * b
    vis_attn = 4 * vision.num_hidden_layers * n_img * n_img * vision.hidden_size * b
    return 6 * n_lm * tokens + 3 * attn + 2 * n_vis * n_img * b + vis_attn


@dataclass
class Engine:
    name: str
    step: Callable[[Batch], None]
    seconds: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)
    resident_mb: list[float] = field(default_factory=list)


def _trainable(model: nn.Module) -> torch.optim.Optimizer:
    for p in model.model.vision_tower.parameters():
        p.requires_grad = False
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def reference_engine(path: Path, device: str, dtype: torch.dtype) -> Engine:
    """Forward/backward/step as the HF Trainer does it for the reference recipe."""
    model = load_model(path, dtype=dtype, attn="eager").model.to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    opt = _trainable(model)
    model.train()

    def step(batch: Batch) -> None:
        out = model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"].to(dtype),
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            labels=batch["labels"],
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Engine("reference", step)


def ours_engine(path: Path, device: str, dtype: torch.dtype) -> Engine:
    """The radgrounder step: the model under ``TrainingObjective``, SDPA, no checkpointing."""
    model = load_model(path, dtype=dtype, attn="sdpa").model.to(device)
    opt = _trainable(model)
    objective = TrainingObjective(model, segmentation=False, chunk=1024)
    objective.train()

    def step(batch: Batch) -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = objective(**batch)
        (out["lm_sums"].sum() / out["counts"].sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Engine("ours", step)


def run_round(engine: Engine, batches: list[Batch], device: str, record: bool) -> None:
    """Time ``len(batches)`` steps of ``engine``; with ``record`` false (warm-up) discard it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() / 2**20
    start = time.perf_counter()
    for batch in batches:
        engine.step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if not record:
        return
    engine.seconds.append(seconds)
    if device == "cuda":
        engine.peak_mb.append(torch.cuda.max_memory_allocated() / 2**20)
        engine.resident_mb.append(resident)


def engine_report(
    engine: Engine, batch_size: int, steps: int, tokens: float, flops: float, device: str
) -> dict[str, Any]:
    per_round = [steps * batch_size / s for s in engine.seconds]
    median_s = statistics.median(engine.seconds)
    entry: dict[str, Any] = {
        "samples_per_s_rounds": [round(v, 3) for v in per_round],
        "samples_per_s_median": round(steps * batch_size / median_s, 3),
        "tokens_per_s": round(steps * tokens / median_s, 1),
        "model_tflops_per_s": round(steps * flops / median_s / 1e12, 4),
    }
    if device == "cuda":
        name_gpu = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name_gpu), None)
        entry["mfu"] = round(steps * flops / median_s / peak, 4) if peak else None
        entry["peak_memory_mb"] = round(max(engine.peak_mb), 1)
        entry["resident_memory_mb"] = round(max(engine.resident_mb), 1)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", choices=("tiny", "small", "3b"))
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per timed round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7, help=f"timed rounds (>= {MIN_ROUNDS})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS} (got {args.rounds})")
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be positive")

    machine = Machine()
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":
        torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as tmp:
        path = init_model(
            args.size,
            "detection",
            Path(tmp) / "m",
            seed=args.seed,
            dtype="bfloat16" if args.size == "3b" else None,
        )
        loaded = load_model(path)
        n_img = image_seq_length(loaded.config)
        examples = synthetic_examples(args.batch_size * args.steps, seed=args.seed)
        batches = []
        for i in range(args.steps):
            chunk = examples[i * args.batch_size : (i + 1) * args.batch_size]
            b = make_batch(chunk, loaded.tokenizer, n_image_tokens=n_img)
            batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()})
        flops = float(np.mean([model_flops(loaded.model, b) for b in batches]))
        tokens = float(np.mean([int(b["attention_mask"].sum()) for b in batches]))
        targets = float(np.mean([int((b["labels"] != -100).sum()) for b in batches]))
        del loaded
        engines = [reference_engine(path, device, dtype), ours_engine(path, device, dtype)]

    for engine in engines:
        run_round(engine, batches, device, record=False)
    for r in range(args.rounds):  # the order alternates: drift within a round cancels
        for engine in engines if r % 2 == 0 else engines[::-1]:
            run_round(engine, batches, device, record=True)

    reference, ours = engines
    ratio = speedup({"reference": reference.seconds, "ours": ours.seconds}, "reference", "ours")
    result: dict[str, Any] = {
        "benchmark": "train",
        "size": args.size,
        "batch_size": args.batch_size,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "seed": args.seed,
        "device": device,
        "mean_tokens_per_batch": tokens,
        "mean_target_tokens_per_batch": targets,
        "engines": {
            e.name: engine_report(e, args.batch_size, args.steps, tokens, flops, device)
            for e in engines
        },
        "comparisons": {
            "ours_over_reference_samples_per_s": {
                "what": "training samples/s, ours / the reference's engine",
                **ratio,
            }
        },
        "unstable": ratio["unstable"],
    }
    if device == "cpu":
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["process_peak_rss_mb"] = round(rss_mb, 1)
    result["machine"] = machine.report(
        gpu=torch.cuda.get_device_name() if device == "cuda" else None,
        torch_threads=torch.get_num_threads(),
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
