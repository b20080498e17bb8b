"""Training configuration: one YAML file is the whole experiment, ``key=value`` overrides it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from radgrounder.errors import RadGrounderError


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )


@dataclass
class ModelConfig:
    init: str | None = "tiny"  # tiny | 3b: a random model of the real classes (with path unset)
    path: str | None = None  # a checkpoint folder or hub id to fine-tune instead
    variant: str = "detection"  # detection | segmentation
    dtype: str = "float32"  # weights: float32 | bfloat16
    attn_implementation: str = "sdpa"
    freeze_vision: bool = True
    train_projector: bool = True
    train_language_model: bool = True
    siglip_checkpoint: str | None = None  # fine-tuned SigLIP (open_clip/timm) for the tower
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SourceConfig:
    kind: str = "built"  # built | slake | vqa_rad | refrad2d
    path: str = ""
    name: str | None = None
    split: str = "train"
    weight: float = 1.0
    tasks: list[str] = field(default_factory=lambda: ["grounded-report", "vqa"])
    languages: list[str] = field(default_factory=lambda: ["en", "de"])
    images: str | None = None  # image folder for VQA-RAD


@dataclass
class BuildConfig:
    """Build a dataset from scans on first use (skipped when it exists)."""

    scans: str | None = None
    labels: str | None = None
    reports: str | None = None
    out: str | None = None


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    eval_sources: list[SourceConfig] = field(default_factory=list)
    temperature: float = 1.0
    prefix_style: str = "random"
    eval_prefix_style: str = "both"
    preset: str = "reference"
    image_size: int = 224
    augment: bool = False
    num_workers: int = 2  # DataLoader worker processes per rank (0: prepare in the main process)
    prefetch_factor: int = 2  # micro-batches each worker prepares ahead
    build: BuildConfig = field(default_factory=BuildConfig)


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | adafactor
    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 100
    # The experiment's batch: samples per optimizer step over all processes. Gradient
    # accumulation is derived from it: global_batch_size / (batch_size x world size).
    global_batch_size: int | None = None
    batch_size: int = 4  # per-device micro-batch
    grad_accum: int | None = None  # only without global_batch_size: per-process accumulation
    eval_batch_size: int = 8
    eval_every: int = 50
    eval_samples: int = 64
    save_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 10
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    seg_loss_weight: float = 0.1
    seg_loss_scaling: str = "mean"  # mean (per optimizer step) | reference (summed, spec §3.3)
    max_target_tokens: int | None = None
    loss_chunk_tokens: int = 1024  # LM head + loss over target positions, this many at a time
    wandb_project: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise RadGrounderError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise RadGrounderError(
                f"{where}.{key}: unknown setting (valid: {', '.join(sorted(fields))})"
            )

        sub = {
            "lora": LoraConfig,
            "model": ModelConfig,
            "data": DataConfig,
            "optim": OptimConfig,
            "build": BuildConfig,
        }.get(key)
        if sub is not None:
            value = _from_dict(sub, {} if value is None else value, f"{where}.{key}")
        elif key in ("sources", "eval_sources"):
            if value is None:
                value = []
            if not isinstance(value, list):
                raise RadGrounderError(f"{where}.{key}: expected a list of sources")
            value = [
                _from_dict(SourceConfig, v, f"{where}.{key}[{i}]") for i, v in enumerate(value)
            ]
        elif key == "betas":
            value = _betas(value, f"{where}.{key}")
        else:
            value = _coerce(value, str(fields[key].type), f"{where}.{key}")
        kwargs[key] = value
    return cls(**kwargs)


def _betas(value: Any, where: str) -> tuple[float, float]:
    try:
        if isinstance(value, str | bytes) or len(value) != 2:
            raise TypeError
        b1, b2 = (float(v) for v in value)
    except (TypeError, ValueError):
        raise RadGrounderError(f"{where}: expected two numbers [b1, b2], got {value!r}") from None
    return b1, b2


def _coerce(value: Any, type_name: str, where: str) -> Any:
    """YAML reads ``1e-3`` as a string; numbers and flags are converted by the field's type."""
    if value is None and "None" in type_name:
        return None
    base = type_name.split("|")[0].strip()
    if base == "str":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # a name such as 2024
        if not isinstance(value, str):
            raise RadGrounderError(f"{where}: expected text, got {value!r}")
        return value
    if base.startswith("list["):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RadGrounderError(f"{where}: expected a list of names, got {value!r}")
        return value
    try:
        if base == "float":
            return float(value)
        if base == "int":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if base == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "false", "no", "0"):
                return str(value).lower() in ("true", "yes", "1")
            raise ValueError
    except (TypeError, ValueError):
        raise RadGrounderError(f"{where}: expected {base}, got {value!r}") from None
    return value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``tree[a][b]... = value`` for ``a.b...``; digits index lists (``data.sources.0.path``)."""
    parts = dotted.split(".")
    if not all(parts):
        raise RadGrounderError(f"override {dotted}: empty key")
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "config"
        if isinstance(node, list):
            if not part.isdigit():
                raise RadGrounderError(f"override {dotted}: {where} is a list; expected an index")
            i = int(part)
            if i >= len(node):
                raise RadGrounderError(
                    f"override {dotted}: {where} has {len(node)} entries, no index {i}"
                )
            if last:
                node[i] = value
                return
            node = node[i]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise RadGrounderError(f"override {dotted}: {where} is not a section")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config and apply ``section.key=value`` overrides (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RadGrounderError("training config not found", path=path)
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise RadGrounderError("not a YAML text file (not UTF-8)", path=path) from None
        except yaml.YAMLError as exc:
            raise RadGrounderError(f"invalid YAML ({_yaml_problem(exc)})", path=path) from None
        if not isinstance(tree, dict):
            raise RadGrounderError(
                f"expected a mapping of settings, got a {type(tree).__name__}", path=path
            )
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RadGrounderError(f"override {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    cfg = _from_dict(TrainConfig, tree, "config")
    _validate(cfg)
    return cfg


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: where and what."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def _validate(cfg: TrainConfig) -> None:
    checks = [
        (
            cfg.model.variant in ("detection", "segmentation"),
            "model.variant",
            "detection or segmentation",
        ),
        (
            cfg.model.path or cfg.model.init in ("tiny", "small", "3b"),
            "model.init",
            "tiny, small or 3b (or set model.path)",
        ),
        (cfg.precision in ("fp32", "bf16"), "precision", "fp32 or bf16"),
        (cfg.seg_loss_scaling in ("mean", "reference"), "seg_loss_scaling", "mean or reference"),
        (cfg.optim.optimizer in ("adamw", "adafactor"), "optim.optimizer", "adamw or adafactor"),
        (
            cfg.optim.schedule in ("cosine", "linear", "constant"),
            "optim.schedule",
            "cosine, linear or constant",
        ),
        (cfg.max_steps > 0, "max_steps", "a positive number"),
        (cfg.batch_size > 0, "batch_size", "a positive number"),
        (cfg.grad_accum is None or cfg.grad_accum > 0, "grad_accum", "a positive number"),
        (
            cfg.global_batch_size is None or cfg.global_batch_size > 0,
            "global_batch_size",
            "a positive number",
        ),
        (
            cfg.global_batch_size is None or cfg.grad_accum is None,
            "grad_accum",
            "unset when global_batch_size is set (it is derived from the world size)",
        ),
        (cfg.loss_chunk_tokens > 0, "loss_chunk_tokens", "a positive number"),
        (cfg.data.num_workers >= 0, "data.num_workers", "0 or more"),
        (cfg.data.prefetch_factor > 0, "data.prefetch_factor", "a positive number"),
        (cfg.data.temperature > 0, "data.temperature", "positive"),
        (cfg.eval_every > 0, "eval_every", "a positive number"),
        (cfg.save_every > 0, "save_every", "a positive number"),
        (cfg.log_every > 0, "log_every", "a positive number"),
        (cfg.eval_batch_size > 0, "eval_batch_size", "a positive number"),
        (cfg.eval_samples >= 0, "eval_samples", "0 or more"),
        (cfg.data.image_size > 0, "data.image_size", "a positive number"),
        (cfg.model.dtype in ("float32", "bfloat16"), "model.dtype", "float32 or bfloat16"),
        (
            cfg.model.attn_implementation in ("sdpa", "eager"),
            "model.attn_implementation",
            "sdpa or eager",
        ),
        (0 <= cfg.optim.warmup_ratio <= 1, "optim.warmup_ratio", "a fraction from 0 to 1"),
    ]
    for ok, field_name, expected in checks:
        if not ok:
            raise RadGrounderError(f"config.{field_name}: expected {expected}")
    _validate_names(cfg)
    for group in ("sources", "eval_sources"):
        for i, src in enumerate(getattr(cfg.data, group)):
            _validate_source(src, f"config.data.{group}[{i}]")


def _validate_names(cfg: TrainConfig) -> None:
    from radgrounder.imaging.normalize import PRESETS
    from radgrounder.prompts import PREFIX_STYLES

    for value, where, allowed in (
        (cfg.data.preset, "data.preset", PRESETS),
        (cfg.data.prefix_style, "data.prefix_style", PREFIX_STYLES),
        (cfg.data.eval_prefix_style, "data.eval_prefix_style", PREFIX_STYLES),
    ):
        if value not in allowed:
            raise RadGrounderError(
                f"config.{where}: unknown {value!r} (expected one of {', '.join(allowed)})"
            )


_SOURCE_SPLITS = {
    "built": ("train", "val", "test"),
    "slake": ("train", "val", "validate", "test"),
    "vqa_rad": ("train", "val", "test"),
}
SOURCE_TASKS = ("grounded-report", "grounded-vqa", "report", "vqa")
LANGUAGES = ("en", "de")


def _check_choices(field: str, values: list[str], allowed: Any, expected: str) -> None:
    """A non-empty list whose every value is in ``allowed``, else one error naming ``field``."""
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise RadGrounderError(
            f"{field}: unknown {bad} (expected {expected})" if bad else f"{field}: empty"
        )


def _validate_source(src: SourceConfig, where: str) -> None:
    if src.kind not in ("built", "slake", "vqa_rad", "refrad2d"):
        raise RadGrounderError(
            f"{where}.kind: unknown {src.kind!r} (built, slake, vqa_rad, refrad2d)"
        )
    if src.weight <= 0:
        raise RadGrounderError(f"{where}.weight: must be positive")
    if not src.path:
        raise RadGrounderError(f"{where}.path: the dataset folder is not set")
    splits = _SOURCE_SPLITS.get(src.kind)
    if splits and src.split not in splits:
        raise RadGrounderError(
            f"{where}.split: unknown {src.split!r} for {src.kind} (expected {', '.join(splits)})"
        )
    _check_choices(f"{where}.tasks", src.tasks, SOURCE_TASKS, f"some of {', '.join(SOURCE_TASKS)}")
    _check_choices(f"{where}.languages", src.languages, LANGUAGES, "en and/or de")


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def batch_layout(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """``(grad_accum, global_batch_size)`` for ``world_size`` processes.

    With ``global_batch_size`` the experiment is fixed and accumulation adapts to the world
    size; a global batch that ``batch_size x world_size`` does not divide is refused.
    """
    per_step = cfg.batch_size * world_size
    if cfg.global_batch_size is None:
        accum = cfg.grad_accum or 1
        return accum, per_step * accum
    if cfg.global_batch_size % per_step:
        total = cfg.global_batch_size
        fits = [b for b in range(1, cfg.batch_size + 1) if total % (b * world_size) == 0]
        hint = f"; per-device batch sizes that fit: {fits}" if fits else ""
        raise RadGrounderError(
            f"config.global_batch_size: {cfg.global_batch_size} is not divisible by "
            f"batch_size x processes = {cfg.batch_size} x {world_size} = {per_step}{hint}"
        )
    return cfg.global_batch_size // per_step, cfg.global_batch_size
