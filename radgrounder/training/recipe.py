"""The training recipe, top to bottom: engine, model, data, optimiser, loop, checkpoints, export.

The distributed engine (``engine.make_accelerator``: one process, DDP, FSDP or DeepSpeed, chosen
by the launcher) does accumulation, gradient sync, sharded state and checkpoints; this file
only states the experiment.

Loss (spec §1.2, §3.3, §6.5): language-model cross-entropy on target tokens only, summed over
the whole accumulation window on every rank and divided by that window's target-token count, so
neither accumulation nor the number of processes changes the objective. The segmentation
variant adds ``seg_loss_weight · (BCE + Dice)``: with ``seg_loss_scaling: mean`` averaged over
every mask of the window (again the same for any layout of the global batch); ``reference``
takes each micro-batch's mean and sums them, as the reference's Trainer did, so its weight
grows with accumulation.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radgrounder.errors import RadGrounderError
from radgrounder.fileio import atomic_write_json
from radgrounder.training.checkpoints import (
    agree_on_resume_step,
    checkpoint_dir,
    save_checkpoint,
    take_run_lock,
)
from radgrounder.training.collate import image_seq_length, make_batch
from radgrounder.training.config import TrainConfig, config_to_dict
from radgrounder.training.data import Mixture
from radgrounder.training.engine import make_accelerator, requested_engine, without_zero3_init
from radgrounder.training.loader import make_loader, single_threaded
from radgrounder.training.objective import IGNORE, TrainingObjective
from radgrounder.training.setup import (
    build_model,
    check_paths,
    dataset_pending,
    ensure_dataset,
    make_optimizer,
    make_sources,
    trainable_report,
)

TASKS = ("grounded-report", "grounded-vqa", "report", "vqa")


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    last_loss: float
    eval_loss: float | None
    main_process: bool = True


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Logger:
    def __init__(self, out: Path, cfg: TrainConfig, main: bool) -> None:
        self.main = main
        self.path = out / "logs" / "train.jsonl"
        self.tb = None
        self.wandb = None
        if main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "logs" / "tensorboard"))
            except ImportError:
                self.tb = None
            if cfg.wandb_project:
                import wandb  # optional extra

                self.wandb = wandb.init(project=cfg.wandb_project, config=config_to_dict(cfg))

    def log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint a resume starts from)."""
        if not self.main or not self.path.is_file():
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in keep))


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    examples,
    cfg: TrainConfig,
    n_image_tokens: int,
    seg_token_id: int | None,
    accelerator,
    n_examples: int | None = None,
) -> dict[str, float]:
    """Mean target-token loss over held-out examples, overall and per task.

    ``model`` is a model or the (prepared) ``TrainingObjective``; ``examples`` a list of
    examples or a function ``i -> example`` for ``i < n_examples``. Sharded: each rank scores
    its slice of every ``eval_batch_size x world`` block and the sums are reduced. A rank with
    nothing left in the last block still runs one (discarded) forward, because a sharded
    engine's forward is a collective.
    """
    objective = model
    if not isinstance(accelerator.unwrap_model(model), TrainingObjective):
        objective = TrainingObjective(model, segmentation=seg_token_id is not None)
    if callable(examples):
        examples_for = examples
    else:
        n_examples, examples_for = len(examples), examples.__getitem__
    world, rank = accelerator.num_processes, accelerator.process_index
    sums = torch.zeros(2 * len(TASKS) + 2, dtype=torch.float64, device=accelerator.device)
    bs = cfg.eval_batch_size
    objective.eval()
    for block in range(0, n_examples, bs * world):
        mine = list(range(block + rank * bs, min(block + (rank + 1) * bs, n_examples)))
        weight = 1.0 if mine else 0.0
        batch = make_batch(
            [examples_for(i) for i in (mine or [0])],
            tokenizer,
            n_image_tokens=n_image_tokens,
            seg_token_id=seg_token_id,
            max_target_tokens=cfg.max_target_tokens,
        )
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with accelerator.autocast():
            out = objective(**batch)
        rows = zip(batch["tasks"], out["lm_sums"].tolist(), out["counts"].tolist(), strict=True)
        for task, s, c in rows:
            k = TASKS.index(task)
            sums[2 * k] += weight * s
            sums[2 * k + 1] += weight * c
            sums[-2] += weight * s
            sums[-1] += weight * c
    objective.train()
    sums = accelerator.reduce(sums, "sum").tolist()
    metrics = {"eval_loss": sums[-2] / max(sums[-1], 1)}
    for k, task in enumerate(TASKS):
        if sums[2 * k + 1]:
            metrics[f"eval_loss/{task}"] = sums[2 * k] / sums[2 * k + 1]
    return metrics


def train(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Run (or resume) the training described by ``cfg`` on this launch's processes."""
    from radgrounder.modeling.generation import flush_denormals

    with flush_denormals():
        return _train(cfg, progress=progress)


def _optimizer_steps(optimizer) -> int:
    """The underlying torch optimizer's step counter (through accelerate/DeepSpeed wrappers)."""
    inner = optimizer
    for _ in range(4):
        if isinstance(inner, torch.optim.Optimizer) and inner.state:
            break
        inner = getattr(inner, "optimizer", None)
        if inner is None:
            return -1
    steps = [float(s["step"]) for s in inner.state.values() if "step" in s]
    return int(max(steps)) if steps else 0


def _train(cfg: TrainConfig, *, progress: bool) -> TrainResult:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader forks workers
    out = Path(cfg.output_dir)
    # Bad paths and broken datasets are reported before anything is written: no lock, no
    # dataset build, no initial checkpoint. A dataset built on first use is read after it.
    check_paths(cfg)
    data = None if dataset_pending(cfg) else make_sources(cfg)
    accelerator, accum, global_batch = make_accelerator(cfg)
    lock = take_run_lock(out, accelerator)
    try:
        return _run(cfg, out, accelerator, accum, global_batch, progress, data)
    finally:
        lock.release()


def _run(
    cfg: TrainConfig,
    out: Path,
    accelerator,
    accum: int,
    global_batch: int,
    progress: bool,
    data: tuple[list[Any], list[Any]] | None = None,
):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    main, world = accelerator.is_main_process, accelerator.num_processes
    rank = accelerator.process_index
    _set_seed(cfg.seed)
    # The main process builds the dataset and the initial model first; the others then find
    # them on disk (a shared filesystem for several nodes).
    with accelerator.main_process_first(), without_zero3_init(accelerator):
        ensure_dataset(cfg)
        sources, eval_sources = data if data is not None else make_sources(cfg)
        model, tokenizer = build_model(cfg, out)
    _set_seed(cfg.seed + rank)  # dropout streams differ per rank; rank 0 is the 1-process run
    segmentation = cfg.model.variant == "segmentation"
    seg_token_id = tokenizer.convert_tokens_to_ids("</seg>") if segmentation else None
    n_image_tokens = image_seq_length(model.config)
    mixture = Mixture(sources, [s.weight for s in cfg.data.sources], cfg.data.temperature, cfg.seed)
    eval_example = None
    if cfg.data.eval_sources:
        eval_mix = Mixture(
            eval_sources, [s.weight for s in cfg.data.eval_sources], 1.0, cfg.seed + 1
        )

        def eval_example(i: int):
            with single_threaded():
                return eval_mix.example(0, i, cfg.data.eval_prefix_style)

    optimizer, scheduler = make_optimizer(cfg, model)
    objective = TrainingObjective(model, segmentation=segmentation, chunk=cfg.loss_chunk_tokens)
    loader = make_loader(
        mixture,
        tokenizer,
        prefix_style=cfg.data.prefix_style,
        max_steps=cfg.max_steps,
        batch_size=cfg.batch_size,
        grad_accum=accum,
        world_size=world,
        n_image_tokens=n_image_tokens,
        seg_token_id=seg_token_id,
        max_target_tokens=cfg.max_target_tokens,
        num_workers=cfg.data.num_workers,
        prefetch_factor=cfg.data.prefetch_factor,
    )
    sampler = loader.batch_sampler
    counts = trainable_report(model)  # before prepare: FSDP replaces parameters by shards
    objective, optimizer, scheduler, loader = accelerator.prepare(
        objective, optimizer, scheduler, loader
    )
    logger = _Logger(out, cfg, main)
    if main:
        atomic_write_json(out / "config.json", config_to_dict(cfg))
        report = dict(counts)
        report.update(
            engine=accelerator.distributed_type.value.lower(),
            processes=world,
            batch_size=cfg.batch_size,
            grad_accum=accum,
            global_batch_size=global_batch,
        )
        atomic_write_json(out / "trainable.json", report)
    start = agree_on_resume_step(out, accelerator)
    if start > cfg.max_steps:
        raise RadGrounderError(
            f"output_dir {out} holds a run already at step {start}, past max_steps="
            f"{cfg.max_steps}: raise max_steps to continue it, or train into another output_dir"
        )
    if start:
        accelerator.load_state(str(checkpoint_dir(out, start)))
        logger.truncate_after(start)
    sampler.set_start(start)
    if main and start < cfg.max_steps:
        print(
            f"radgrounder train: {requested_engine()} x {world} process(es), global batch "
            f"{global_batch} = {cfg.batch_size} per device x {world} x {accum} accumulation; "
            + (f"resuming after step {start}" if start else "starting at step 1"),
            flush=True,
        )
        if cfg.global_batch_size is None and world > 1:
            print(
                "radgrounder train: warning: global_batch_size is not set, so the batch "
                f"(and the experiment) grows with the number of processes; set "
                f"global_batch_size={global_batch} to keep this one on any layout",
                file=sys.stderr,
                flush=True,
            )
    objective.train()
    last_loss, eval_loss, t0 = float("nan"), None, time.perf_counter()
    batches = iter(loader)
    scale_ref = cfg.seg_loss_scaling == "reference"
    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not (progress and main)) as bar:
        task = bar.add_task("train", total=cfg.max_steps, completed=start, loss="-")
        for step in range(start + 1, cfg.max_steps + 1):
            window = [next(batches) for _ in range(accum)]
            local = torch.stack(
                [
                    sum((b["labels"][:, 1:] != IGNORE).sum() for b in window).double(),
                    torch.tensor(
                        float(sum(len(b.get("seg_token_pos", ())) for b in window)),
                        dtype=torch.float64,
                        device=accelerator.device,
                    ),
                ]
            )
            tokens, masks = accelerator.reduce(local, "sum").tolist()
            # Each rank's gradient is divided by accum (accelerate/DeepSpeed) and averaged
            # over ranks; scaling back makes the step's gradient that of the global sums.
            factor = world * accum
            stats = torch.zeros(2 * len(TASKS) + 1, dtype=torch.float64, device=accelerator.device)
            grad_norm = None
            for b in window:
                with accelerator.accumulate(objective):
                    with accelerator.autocast():
                        o = objective(**b)
                    loss = o["lm_sums"].sum() / max(tokens, 1) * factor
                    if segmentation:
                        if scale_ref:
                            n_here = max(len(b.get("seg_token_pos", ())), 1)
                            seg = o["seg_sum"] / n_here * accum
                        else:
                            seg = o["seg_sum"] / max(masks, 1) * factor
                        loss = loss + cfg.seg_loss_weight * seg
                        stats[-1] += o["seg_sum"].detach().double()
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(
                            objective.parameters(), cfg.optim.max_grad_norm
                        )
                # Per-task sums stay on the device: no host sync per micro-batch.
                rows = torch.tensor([2 * TASKS.index(t) for t in b["tasks"]], device=stats.device)
                stats.index_add_(0, rows, o["lm_sums"].detach().double())
                stats.index_add_(0, rows + 1, o["counts"].double())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            stats = accelerator.reduce(stats, "sum").tolist()
            lm = sum(stats[0:-1:2]) / max(tokens, 1)
            seg_mean = stats[-1] / max(masks, 1)
            last_loss = lm + (cfg.seg_loss_weight * seg_mean if segmentation else 0.0)
            bar.update(task, completed=step, loss=f"{last_loss:.4f}")
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                record = {
                    "step": step,
                    "loss": last_loss,
                    "lm_loss": lm,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "target_tokens": int(tokens),
                    "optimizer_step": _optimizer_steps(optimizer),
                    "elapsed_s": round(time.perf_counter() - t0, 3),
                }
                if segmentation:
                    record["seg_loss"] = seg_mean
                    record["masks"] = int(masks)
                for k, name in enumerate(TASKS):
                    if stats[2 * k + 1]:
                        record[f"loss/{name}"] = stats[2 * k] / stats[2 * k + 1]
                        record[f"tokens/{name}"] = int(stats[2 * k + 1])
                logger.log(record)
            if eval_example and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                metrics = evaluate(
                    objective,
                    tokenizer,
                    eval_example,
                    cfg,
                    n_image_tokens,
                    seg_token_id,
                    accelerator,
                    n_examples=cfg.eval_samples,
                )
                eval_loss = metrics["eval_loss"]
                logger.log({"step": step, **metrics})
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save_checkpoint(out, step, accelerator, cfg.keep_checkpoints)
    final = out / "final"
    _export(objective, tokenizer, final, cfg, out, accelerator)
    if math.isnan(last_loss) and start >= cfg.max_steps:
        last_loss = _last_logged(out, "loss")
    return TrainResult(out, final, cfg.max_steps, last_loss, eval_loss, main)


def _export(objective, tokenizer, final: Path, cfg: TrainConfig, out: Path, accelerator) -> None:
    """Write the trained model where ``load_model`` reads it (LoRA merged first).

    Engines that shard the parameters (FSDP, ZeRO-3) gather a full state dict on rank 0 (a
    collective, so every rank takes part) and rank 0 loads it into a fresh model.
    """
    from accelerate.utils import DistributedType

    from radgrounder.training.setup import export_final

    kind = accelerator.distributed_type
    state = None
    if kind == DistributedType.FSDP:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # accelerate's get_state_dict always offloads to CPU, which crashes on CPU processes.
        full = FullStateDictConfig(offload_to_cpu=accelerator.device.type != "cpu", rank0_only=True)
        with FSDP.state_dict_type(objective, StateDictType.FULL_STATE_DICT, full):
            state = objective.state_dict()
    elif kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        state = accelerator.get_state_dict(objective)
    if accelerator.is_main_process:
        if state is None:
            model = accelerator.unwrap_model(objective).model
        else:
            with without_zero3_init(accelerator):
                model, _ = build_model(cfg, out)
            inner = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
            model.load_state_dict(inner, strict=True)
        export_final(model, tokenizer, final, cfg)
    accelerator.wait_for_everyone()


def _last_logged(out: Path, key: str) -> float:
    path = out / "logs" / "train.jsonl"
    values = [json.loads(line).get(key) for line in path.read_text().splitlines() if line.strip()]
    values = [v for v in values if v is not None]
    return float(values[-1]) if values else float("nan")
