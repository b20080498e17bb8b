"""Model, data and optimiser set-up for the recipe: each a small function the recipe calls."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from radgrounder.errors import RadGrounderError
from radgrounder.training.config import TrainConfig


def _where(path: str | Path, what: str) -> str:
    return f"{what} {path}"


def _writable_folder(path: Path, what: str) -> None:
    """``path`` is a writable folder or can be made one (nothing is created here)."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        for parent in Path(os.path.abspath(path)).parents:
            if os.path.isdir(parent):
                if not os.access(parent, os.W_OK | os.X_OK):
                    raise RadGrounderError(
                        f"{_where(path, what)}: cannot be created, {parent} is not writable"
                    ) from None
                return
            if os.path.lexists(parent):
                raise RadGrounderError(
                    f"{_where(path, what)}: cannot be created, {parent} is not a folder"
                ) from None
        return
    except OSError as exc:
        raise RadGrounderError(f"{_where(path, what)}: {exc.strerror or exc}") from None
    if not os.path.isdir(path):
        raise RadGrounderError(f"{_where(path, what)}: exists and is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise RadGrounderError(f"{_where(path, what)}: not writable")


def _existing(path: str | Path, what: str, *, folder: bool | None = None) -> None:
    try:
        os.stat(path)
    except FileNotFoundError:
        kind = {True: "folder", False: "file", None: "file or folder"}[folder]
        raise RadGrounderError(f"{_where(path, what)}: no such {kind}") from None
    except OSError as exc:
        raise RadGrounderError(f"{_where(path, what)}: {exc.strerror or exc}") from None
    if folder is True and not os.path.isdir(path):
        raise RadGrounderError(f"{_where(path, what)}: not a folder")
    if folder is False and os.path.isdir(path):
        raise RadGrounderError(f"{_where(path, what)}: is a folder, expected a file")


def dataset_pending(cfg: TrainConfig) -> bool:
    """Whether ``data.build`` will build a dataset on first use (it does not exist yet)."""
    b = cfg.data.build
    return bool(b.out) and not (Path(b.out) / "manifest.json").is_file()


def check_paths(cfg: TrainConfig) -> None:
    """What a run reads and writes, checked before any work (no lock, no dataset build, no
    initial checkpoint): the output folder can be written, the model, SigLIP checkpoint,
    build inputs and source folders exist."""
    _writable_folder(Path(cfg.output_dir), "config.output_dir")
    m = cfg.model
    if m.path:
        local = Path(m.path).expanduser()
        text = str(m.path)
        parts = text.split("/")
        hub_like = len(parts) >= 2 and all(parts) and not text.startswith((".", "/", "~"))
        if local.exists() or not hub_like:
            _existing(local, "config.model.path", folder=True)
    if m.siglip_checkpoint:
        _existing(m.siglip_checkpoint, "config.model.siglip_checkpoint", folder=False)
    b = cfg.data.build
    building = dataset_pending(cfg)
    if building:
        if not (b.scans and b.labels and b.reports):
            raise RadGrounderError("config.data.build: needs scans, labels, reports and out")
        _existing(b.scans, "config.data.build.scans", folder=True)
        _existing(b.labels, "config.data.build.labels", folder=True)
        _existing(b.reports, "config.data.build.reports", folder=False)
        _writable_folder(Path(b.out), "config.data.build.out")
    if not cfg.data.sources:
        raise RadGrounderError("config.data.sources: no training data configured")
    for group in ("sources", "eval_sources"):
        for i, src in enumerate(getattr(cfg.data, group)):
            if building and Path(src.path).resolve() == Path(b.out).resolve():
                continue  # built on first use
            _existing(src.path, f"config.data.{group}[{i}].path", folder=True)


def make_sources(cfg: TrainConfig) -> tuple[list[Any], list[Any]]:
    """The readers of the training and held-out sources (their index files read, so a broken
    or empty dataset is reported before the model is made)."""
    from radgrounder.training.data import make_source

    size, preset, variant = cfg.data.image_size, cfg.data.preset, cfg.model.variant
    sources = [
        make_source(s, variant, preset=preset, size=size, augment=cfg.data.augment)
        for s in cfg.data.sources
    ]
    eval_sources = [
        make_source(s, variant, preset=preset, size=size) for s in cfg.data.eval_sources
    ]
    return sources, eval_sources


def ensure_dataset(cfg: TrainConfig) -> None:
    """Build the configured dataset on first use (``data.build``); skipped once it exists."""
    b = cfg.data.build
    if not b.out:
        return
    if (Path(b.out) / "manifest.json").is_file():
        return
    if not (b.scans and b.labels and b.reports):
        raise RadGrounderError("config.data.build: needs scans, labels, reports and out")
    from radgrounder.labels.build import build_dataset

    report = build_dataset(b.scans, b.labels, b.reports, b.out, progress=False)
    if report.failed:
        raise RadGrounderError(f"dataset build failed for {sorted(report.failed)}", path=b.out)


def map_siglip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fine-tuned SigLIP in open_clip/timm naming → vision-tower names (spec §6.6)."""
    out: dict[str, torch.Tensor] = {}
    prefix = "visual.trunk."
    for key, value in state.items():
        if prefix not in key:
            continue
        k = key.split(prefix, 1)[1]
        if k.startswith("attn_pool."):
            continue
        if k == "pos_embed":
            out["embeddings.position_embedding.weight"] = value[0]
            continue
        k = k.replace("patch_embed.proj", "embeddings.patch_embedding")
        if k.startswith("norm."):
            k = "post_layernorm." + k[len("norm.") :]
        if k.startswith("blocks."):
            k = "encoder.layers." + k[len("blocks.") :]
            if ".attn.qkv." in k:
                q, kk, v = value.chunk(3, dim=0)
                for name, part in (("q_proj", q), ("k_proj", kk), ("v_proj", v)):
                    out[k.replace("attn.qkv", f"self_attn.{name}")] = part
                continue
            k = (
                k.replace("attn.proj", "self_attn.out_proj")
                .replace("norm1", "layer_norm1")
                .replace("norm2", "layer_norm2")
            )
        out[k] = value
    return out


def load_siglip_checkpoint(model: Any, path: str | Path) -> None:
    """Load a fine-tuned SigLIP checkpoint (``state_dict`` with ``visual.trunk.*`` keys) into
    the vision tower, strictly."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    mapped = map_siglip_state_dict(state)
    if not mapped:
        raise RadGrounderError("no visual.trunk.* weights in the checkpoint", path=path)
    tower = model.model.vision_tower
    target = tower.state_dict()
    if "vision_model." in next(iter(target)):
        mapped = {f"vision_model.{k}": v for k, v in mapped.items()}
    missing = sorted(set(target) - set(mapped))
    unexpected = sorted(set(mapped) - set(target))
    if missing or unexpected:
        raise RadGrounderError(
            f"SigLIP checkpoint does not fit the vision tower (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})",
            path=path,
        )
    tower.load_state_dict(mapped, strict=True)


def initial_weights(cfg: TrainConfig, out: Path) -> Path | str:
    """``model.path``, or ``out/init`` with a random ``model.init`` model written on first use."""
    from radgrounder.modeling import init_model

    m = cfg.model
    if m.path:
        return m.path
    path = out / "init"
    if not (path / "config.json").is_file():
        torch.manual_seed(cfg.seed)
        init_model(m.init, m.variant, path, seed=cfg.seed)
    return path


def build_model(cfg: TrainConfig, out: Path) -> tuple[Any, Any]:
    """Load ``model.path`` or initialise a random ``model.init`` model; apply the freezing
    policy, a SigLIP checkpoint, gradient checkpointing and LoRA."""
    from radgrounder.modeling import load_model

    m = cfg.model
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(m.dtype)
    if dtype is None:
        raise RadGrounderError(f"config.model.dtype: expected float32 or bfloat16, got {m.dtype!r}")
    path = initial_weights(cfg, out)
    loaded = load_model(path, dtype=dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    if loaded.variant != m.variant:
        raise RadGrounderError(
            f"config.model.variant is {m.variant!r} but {path} holds a {loaded.variant} model"
        )
    if m.siglip_checkpoint:
        load_siglip_checkpoint(model, m.siglip_checkpoint)
    inner = model.model
    for p in model.parameters():
        p.requires_grad = False
    for p in inner.vision_tower.parameters():
        p.requires_grad = not m.freeze_vision
    for p in inner.multi_modal_projector.parameters():
        p.requires_grad = m.train_projector
    for p in inner.language_model.parameters():
        p.requires_grad = m.train_language_model and not m.lora.enabled
    for p in model.lm_head.parameters():
        p.requires_grad = m.train_language_model and not m.lora.enabled
    if hasattr(model, "segmentation_head"):
        for p in model.segmentation_head.parameters():
            p.requires_grad = True
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if m.lora.enabled:
        from peft import LoraConfig, get_peft_model

        keep = [
            n
            for n in ("multi_modal_projector", "segmentation_head")
            if n != "multi_modal_projector" or m.train_projector
        ]
        lora = LoraConfig(
            r=m.lora.r,
            lora_alpha=m.lora.alpha,
            lora_dropout=m.lora.dropout,
            target_modules=r".*language_model.*\.(" + "|".join(m.lora.target_modules) + r")",
            modules_to_save=keep,
        )
        model = get_peft_model(model, lora)
    return model, tokenizer


def trainable_report(model: Any) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable": trainable}


def make_optimizer(cfg: TrainConfig, model: Any) -> tuple[Any, Any]:
    """AdamW (or Adafactor) with the usual no-decay set (biases, norms) and a warm-up
    schedule over ``max_steps``."""
    from transformers import get_scheduler

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    if not decay and not no_decay:
        raise RadGrounderError("config.model: nothing is trainable")
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optim.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        optimizer = Adafactor(groups, lr=cfg.optim.lr, scale_parameter=False, relative_step=False)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)
    warmup = round(cfg.optim.warmup_ratio * cfg.max_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        cfg.optim.schedule
    ]
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=cfg.max_steps
    )
    return optimizer, scheduler


def export_final(model: Any, tokenizer: Any, final: Path, cfg: TrainConfig) -> None:
    """Write the trained model where ``load_model`` reads it (LoRA merged first)."""
    from radgrounder.modeling import save_model

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    save_model(model, tokenizer, final)
