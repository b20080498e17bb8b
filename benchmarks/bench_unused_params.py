"""DDP with a mask head one rank does not use: a zero-weighted head pass vs DDP's
``find_unused_parameters``. Both keep the ranks from hanging; this measures which costs less.

Run on 2 processes (CPU, gloo):

    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 \\
        benchmarks/bench_unused_params.py --size tiny --rounds 7 --steps 4

Rank 0's micro-batches carry masks, rank 1's none (the case that used to hang). (a)
``zero_pass``: the training objective runs the head once with weight zero on a rank without
masks, DDP as configured by the recipe (``find_unused_parameters=False``). (b) ``find_unused``:
no extra pass, DDP searches the autograd graph for unused parameters after every forward.
The two are timed interleaved (one discarded warm-up round each, then A B, B A, …); rank 0
prints JSON with per-round step times, medians and the per-round ratio find_unused/zero_pass
(> 1: the zero-weighted pass is cheaper).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from harness import Machine, spread_report  # benchmarks/harness.py
from torch.nn.parallel import DistributedDataParallel as DDP

from radgrounder.datasets import Example
from radgrounder.modeling import init_model, load_model
from radgrounder.training.collate import make_batch
from radgrounder.training.objective import TrainingObjective


def examples(n: int, with_masks: bool, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = rng.standard_normal((3, 224, 224)).astype(np.float32)
        if with_masks:
            target = "The <seg>liver</seg> is normal and the <seg>spleen</seg> is small."
            masks = [rng.random((224, 224)) > 0.7 for _ in range(2)]
            task = "grounded-report"
        else:
            target, masks, task = "no", [], "vqa"
        prompt = "<image>\nQuestion: Is there a lesion?\nAnswer: "
        out.append(Example(f"s{i}", "bench", task, "en", image, prompt, target, masks))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_flush_denormal(True)
    machine = Machine()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"m{rank}"
        init_model(args.size, "segmentation", path, seed=0)
        engines = {}
        for name, zero_pass in (("zero_pass", True), ("find_unused", False)):
            loaded = load_model(path)
            for p in loaded.model.model.vision_tower.parameters():
                p.requires_grad = False
            objective = TrainingObjective(loaded.model, segmentation=True, zero_pass=zero_pass)
            ddp = DDP(objective, find_unused_parameters=not zero_pass)
            opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-5)
            engines[name] = (ddp, opt)
        seg = loaded.tokenizer.convert_tokens_to_ids("</seg>")
        batch = make_batch(
            examples(args.batch_size, rank == 0, seed=rank),
            loaded.tokenizer,
            n_image_tokens=256,
            seg_token_id=seg,
        )

        def step(name: str) -> None:
            ddp, opt = engines[name]
            out = ddp(**batch)
            loss = out["lm_sums"].sum() / out["counts"].sum().clamp(min=1)
            if "seg_sum" in out:
                loss = loss + 0.1 * out["seg_sum"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def timed(name: str) -> float:
            dist.barrier()
            t = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            dist.barrier()
            return (time.perf_counter() - t) / args.steps

        for name in engines:  # warm-up, discarded
            timed(name)
        rounds: dict[str, list[float]] = {name: [] for name in engines}
        names = list(engines)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                rounds[name].append(timed(name))
    ratio = spread_report(
        [u / z for u, z in zip(rounds["find_unused"], rounds["zero_pass"], strict=True)]
    )
    if rank == 0:
        result = {
            "benchmark": "unused_params",
            "size": args.size,
            "batch_size": args.batch_size,
            "processes": dist.get_world_size(),
            "steps_per_round": args.steps,
            "rounds": args.rounds,
            "step_s": {k: [round(x, 4) for x in v] for k, v in rounds.items()},
            "median_step_s": {k: round(statistics.median(v), 4) for k, v in rounds.items()},
            "comparisons": {
                "find_unused_over_zero_pass_step_s": {
                    "what": "DDP step time, find_unused_parameters / zero-weighted head pass",
                    **ratio,
                }
            },
            "unstable": ratio["unstable"],
            "machine": machine.report(),
        }
        print(json.dumps(result, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
