"""Training throughput: the reference's engine vs ours on the same model, data and batch.

Prints JSON. (a) ``reference``: transformers' Trainer as the released configs use it (eager
attention, gradient checkpointing, loss from the model's own ``labels`` path, padding to the
longest sample). (b) ``ours``: the radgrounder recipe's step (SDPA where the architecture has
it, no gradient checkpointing, loss on target tokens normalised per window). Both run the
same examples in the same batches.

    .venv/bin/python benchmarks/bench_train.py --size tiny --steps 20          # CPU
    python benchmarks/bench_train.py --size 3b --steps 30 --batch-size 8       # GPU

MFU (GPU only) = model FLOPs / (time x peak bf16 FLOPs of the device). Model FLOPs count the
language model's forward and backward over every token (image tokens included), the frozen
vision tower's forward, and attention scores; gradient-checkpointing recomputation is not
counted as useful work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from radgrounder.modeling import init_model, load_model
from radgrounder.training.collate import image_seq_length, make_batch
from radgrounder.training.data import Example

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def synthetic_examples(n: int, tokenizer, seed: int = 0) -> list[Example]:
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


def model_flops(model, batch) -> float:
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


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_reference(path: Path, batches, device, dtype) -> float:
    """Forward/backward/step as the HF Trainer does it for the reference recipe."""
    loaded = load_model(path, dtype=dtype, attn="eager")
    model = loaded.model.to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    for p in model.model.vision_tower.parameters():
        p.requires_grad = False
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()

    def step(batch):
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

    return timed(step, batches, device)


def run_ours(path: Path, batches, device, dtype) -> float:
    from radgrounder.training.recipe import _token_losses

    loaded = load_model(path, dtype=dtype, attn="sdpa")
    model = loaded.model.to(device)
    for p in model.model.vision_tower.parameters():
        p.requires_grad = False
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()

    def step(batch):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(
                input_ids=batch["input_ids"],
                pixel_values=batch["pixel_values"],
                attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"],
            )
        sums, counts = _token_losses(out.logits, batch["labels"])
        (sums.sum() / counts.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, batches, device)


def timed(step, batches, device) -> float:
    step(batches[0])  # warm-up: allocator, kernels
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", choices=("tiny", "3b"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":
        torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as tmp:
        path = init_model(
            args.size, "detection", Path(tmp) / "m", dtype="bfloat16" if args.size == "3b" else None
        )
        loaded = load_model(path)
        n_img = image_seq_length(loaded.config)
        examples = synthetic_examples(args.batch_size * (args.steps + 1), loaded.tokenizer)
        batches = []
        for i in range(args.steps + 1):
            chunk = examples[i * args.batch_size : (i + 1) * args.batch_size]
            b = make_batch(chunk, loaded.tokenizer, n_image_tokens=n_img)
            batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()})
        flops = float(np.mean([model_flops(loaded.model, b) for b in batches[1:]]))
        tokens = float(np.mean([int(b["attention_mask"].sum()) for b in batches[1:]]))
        del loaded
        result = {}
        for name, fn in (("reference", run_reference), ("ours", run_ours)):
            seconds = fn(path, batches, device, dtype)
            steps = len(batches) - 1
            entry = {
                "samples_per_s": round(steps * args.batch_size / seconds, 3),
                "tokens_per_s": round(steps * tokens / seconds, 1),
                "peak_memory_mb": round(peak_memory_mb(device), 1),
                "model_tflops_per_s": round(steps * flops / seconds / 1e12, 4),
            }
            if device == "cuda":
                name_gpu = torch.cuda.get_device_name()
                peak = next((v for k, v in PEAK_BF16.items() if k in name_gpu), None)
                entry["mfu"] = round(steps * flops / seconds / peak, 4) if peak else None
            result[name] = entry
            if device == "cuda":
                torch.cuda.empty_cache()
    result["speedup_samples_per_s"] = round(
        result["ours"]["samples_per_s"] / result["reference"]["samples_per_s"], 3
    )
    print(
        json.dumps(
            {
                "size": args.size,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "device": device,
                "device_name": torch.cuda.get_device_name()
                if device == "cuda"
                else platform.processor(),
                "engines": result,
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
