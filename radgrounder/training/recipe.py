"""The training recipe, top to bottom: model, data, optimiser, loop, checkpoints, final model.

Loss (spec §1.2, §3.3, §6.5): language-model cross-entropy on target tokens only, summed and
divided by the target-token count of the whole accumulation window, so accumulation does not
change the objective; for the segmentation variant plus weight · (BCE + Dice). With
``seg_loss_scaling: mean`` the mask term is averaged over the window's micro-batches that carry
masks; ``reference`` sums it over them, as the reference's Trainer did.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from radgrounder.errors import RadGrounderError
from radgrounder.fileio import atomic_write_json
from radgrounder.training.collate import image_seq_length, make_batch
from radgrounder.training.config import TrainConfig, config_to_dict
from radgrounder.training.data import Mixture, make_source
from radgrounder.training.setup import build_model, ensure_dataset, make_optimizer, trainable_report

IGNORE = -100


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    last_loss: float
    eval_loss: float | None


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed cross-entropy and target-token counts (shifted, labels != -100)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    ce = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    )
    ce = ce.view(shift_labels.shape)
    return ce.sum(1), (shift_labels != IGNORE).sum(1)


def _forward(model: torch.nn.Module, batch: dict[str, Any], segmentation: bool):
    kwargs = {
        k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "token_type_ids")
    }
    if segmentation and "seg_token_pos" in batch:
        kwargs["seg_token_pos"] = batch["seg_token_pos"]
    return model(**kwargs)


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(
    out: Path, step: int, model, optimizer, scheduler, keep: int, accelerator
) -> None:
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {
        "step": step,
        "model": {k: v for k, v in accelerator.unwrap_model(model).state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        },
    }
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # a checkpoint folder exists only once complete
    for old in _checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, model, optimizer, scheduler, accelerator) -> int:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    accelerator.unwrap_model(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return int(state["step"])


class _Logger:
    def __init__(self, out: Path, cfg: TrainConfig, main: bool) -> None:
        self.main = main
        self.path = out / "logs" / "train.jsonl"
        self.tb = None
        if main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "logs" / "tensorboard"))
            except ImportError:
                self.tb = None
            self.wandb = None
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
        if getattr(self, "wandb", None) is not None:
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
) -> dict[str, float]:
    """Mean target-token loss over held-out examples, overall and per task."""
    model.eval()
    totals: dict[str, list[float]] = {}
    for i in range(0, len(examples), cfg.eval_batch_size):
        chunk = examples[i : i + cfg.eval_batch_size]
        batch = make_batch(
            chunk,
            tokenizer,
            n_image_tokens=n_image_tokens,
            seg_token_id=seg_token_id,
            max_target_tokens=cfg.max_target_tokens,
        )
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with accelerator.autocast():
            out = _forward(model, batch, seg_token_id is not None)
        sums, counts = _token_losses(out.logits, batch["labels"])
        for task, s, c in zip(batch["tasks"], sums.tolist(), counts.tolist(), strict=True):
            for key in ("all", task):
                acc = totals.setdefault(key, [0.0, 0.0])
                acc[0] += s
                acc[1] += c
    model.train()
    return {
        f"eval_loss/{k}" if k != "all" else "eval_loss": v[0] / max(v[1], 1)
        for k, v in totals.items()
    }


def _reset_single_process_state() -> None:
    """Let one Python process run several trainings with different precision settings.

    accelerate keeps its state in a process-wide singleton; a launched (distributed) run
    keeps it, a plain single process starts clean each time.
    """
    import os

    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


def train(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Run (or resume) the training described by ``cfg``."""
    from radgrounder.modeling.generation import flush_denormals

    with flush_denormals():
        return _train(cfg, progress=progress)


def _train(cfg: TrainConfig, *, progress: bool) -> TrainResult:
    from accelerate import Accelerator
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    out = Path(cfg.output_dir)
    _reset_single_process_state()
    accelerator = Accelerator(mixed_precision="bf16" if cfg.precision == "bf16" else "no")
    main = accelerator.is_main_process
    _set_seed(cfg.seed)
    ensure_dataset(cfg)
    model, tokenizer = build_model(cfg, out)
    segmentation = cfg.model.variant == "segmentation"
    seg_token_id = tokenizer.convert_tokens_to_ids("</seg>") if segmentation else None
    n_image_tokens = image_seq_length(model.config)
    size, preset = cfg.data.image_size, cfg.data.preset
    if not cfg.data.sources:
        raise RadGrounderError("config.data.sources: no training data configured")
    sources = [
        make_source(s, cfg.model.variant, preset=preset, size=size, augment=cfg.data.augment)
        for s in cfg.data.sources
    ]
    mixture = Mixture(sources, [s.weight for s in cfg.data.sources], cfg.data.temperature, cfg.seed)
    eval_examples = []
    if cfg.data.eval_sources:
        eval_sources = [
            make_source(s, cfg.model.variant, preset=preset, size=size)
            for s in cfg.data.eval_sources
        ]
        eval_mix = Mixture(
            eval_sources, [s.weight for s in cfg.data.eval_sources], 1.0, cfg.seed + 1
        )
        eval_examples = [
            eval_mix.example(0, i, cfg.data.eval_prefix_style) for i in range(cfg.eval_samples)
        ]
    optimizer, scheduler = make_optimizer(cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    logger = _Logger(out, cfg, main)
    if main:
        atomic_write_json(out / "config.json", config_to_dict(cfg))
        atomic_write_json(out / "trainable.json", trainable_report(accelerator.unwrap_model(model)))

    start = 0
    done = _checkpoints(out)
    if done:
        start = _load_checkpoint(done[-1], model, optimizer, scheduler, accelerator)
        logger.truncate_after(start)
    world, rank = accelerator.num_processes, accelerator.process_index
    model.train()
    last_loss, eval_loss, t0 = float("nan"), None, time.perf_counter()
    columns = [
        TextColumn("[bold]train"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, disable=not (progress and main)) as bar:
        task = bar.add_task("train", total=cfg.max_steps, completed=start, loss="-")
        for step in range(start + 1, cfg.max_steps + 1):
            batches = []
            for micro in range(cfg.grad_accum):
                base = (micro * world + rank) * cfg.batch_size
                examples = [
                    mixture.example(step, base + j, cfg.data.prefix_style)
                    for j in range(cfg.batch_size)
                ]
                batches.append(
                    make_batch(
                        examples,
                        tokenizer,
                        n_image_tokens=n_image_tokens,
                        seg_token_id=seg_token_id,
                        max_target_tokens=cfg.max_target_tokens,
                    )
                )
            window = torch.tensor(
                float(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)),
                device=accelerator.device,
            )
            window = accelerator.reduce(window, "sum") / world  # DDP averages gradients
            n_mask_micro = max(1, sum("seg_token_pos" in b for b in batches))
            stats = {"lm_sum": 0.0, "tokens": 0, "seg": 0.0, "per_task": {}}
            for b in batches:
                b = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in b.items()}
                with accelerator.autocast():
                    output = _forward(model, b, segmentation)
                sums, counts = _token_losses(output.logits, b["labels"])
                loss = sums.sum() / window.clamp(min=1)
                mask_logits = getattr(output, "mask_logits", None)
                if mask_logits is not None and "segment_gt" in b:
                    from radgrounder.modeling import mask_loss

                    bce, dice = mask_loss(mask_logits.squeeze(1).float(), b["segment_gt"])
                    seg = bce + dice
                    scale = 1.0 if cfg.seg_loss_scaling == "reference" else 1.0 / n_mask_micro
                    loss = loss + cfg.seg_loss_weight * seg * scale
                    stats["seg"] += float(seg.detach()) / n_mask_micro
                accelerator.backward(loss)
                stats["lm_sum"] += float(sums.detach().sum())
                stats["tokens"] += int(counts.sum())
                for name, s, c in zip(
                    b["tasks"], sums.detach().tolist(), counts.tolist(), strict=True
                ):
                    acc = stats["per_task"].setdefault(name, [0.0, 0])
                    acc[0] += s
                    acc[1] += c
            grad_norm = accelerator.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], cfg.optim.max_grad_norm
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            lm = stats["lm_sum"] / max(stats["tokens"], 1)
            last_loss = lm + cfg.seg_loss_weight * stats["seg"]
            bar.update(task, completed=step, loss=f"{last_loss:.4f}")
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                record = {
                    "step": step,
                    "loss": last_loss,
                    "lm_loss": lm,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "target_tokens": stats["tokens"],
                    "elapsed_s": round(time.perf_counter() - t0, 3),
                }
                if segmentation:
                    record["seg_loss"] = stats["seg"]
                for name, (s, c) in sorted(stats["per_task"].items()):
                    record[f"loss/{name}"] = s / max(c, 1)
                    record[f"tokens/{name}"] = c
                logger.log(record)
            if eval_examples and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                metrics = evaluate(
                    model, tokenizer, eval_examples, cfg, n_image_tokens, seg_token_id, accelerator
                )
                eval_loss = metrics["eval_loss"]
                logger.log({"step": step, **metrics})
            if main and (step % cfg.save_every == 0 or step == cfg.max_steps):
                _save_checkpoint(
                    out, step, model, optimizer, scheduler, cfg.keep_checkpoints, accelerator
                )
            accelerator.wait_for_everyone()
    final = out / "final"
    if main:
        from radgrounder.training.setup import export_final

        export_final(accelerator.unwrap_model(model), tokenizer, final, cfg)
    accelerator.wait_for_everyone()
    if math.isnan(last_loss) and start >= cfg.max_steps:
        last_loss = _last_logged(out, "loss")
    return TrainResult(out, final, cfg.max_steps, last_loss, eval_loss)


def _last_logged(out: Path, key: str) -> float:
    path = out / "logs" / "train.jsonl"
    values = [json.loads(line).get(key) for line in path.read_text().splitlines() if line.strip()]
    values = [v for v in values if v is not None]
    return float(values[-1]) if values else float("nan")
