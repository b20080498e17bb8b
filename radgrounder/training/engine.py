"""The distributed engine: one ``Accelerator`` that does accumulation, gradient sync, sharded
state and checkpoints for a single process, DDP, FSDP or DeepSpeed alike.

The launcher decides the engine (``accelerate launch --config_file …`` or ``torchrun`` with
accelerate's environment variables); the recipe never branches on it except where an engine
needs configuration only the experiment knows (DeepSpeed's micro-batch, accumulation and
clipping). accelerate runs FSDP and DeepSpeed on GPUs only: on CPU processes
(``ACCELERATE_USE_CPU=1``) it silently falls back to plain data parallelism. So that a launch
file can be tried on a CPU machine, a CPU launch that asks for FSDP or DeepSpeed keeps that
engine on the gloo process group: the engine's own wrapping, sharding, step and checkpoint
code runs unchanged, on CPU tensors (``radgrounder.training.cpu_launch`` starts such runs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from radgrounder.errors import RadGrounderError
from radgrounder.training.config import TrainConfig, batch_layout

log = logging.getLogger(__name__)


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def requested_engine() -> str:
    """``fsdp``, ``deepspeed``, ``ddp`` or ``single`` from the launcher's environment."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


def reset_single_process_state() -> None:
    """Let one Python process run several trainings with different settings: accelerate keeps
    its state in process-wide singletons; a launched (distributed) run keeps it."""
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def make_accelerator(cfg: TrainConfig) -> tuple[Any, int, int]:
    """``(accelerator, grad_accum, global_batch_size)`` for this launch."""
    import torch
    from accelerate import Accelerator, PartialState
    from accelerate.utils import GradientAccumulationPlugin

    reset_single_process_state()
    engine = requested_engine()
    cpu = _flag("ACCELERATE_USE_CPU")
    if cpu or not torch.cuda.is_available():
        # accelerate and peft import DeepSpeed when it is installed; on a machine without
        # GPUs it would warn that it fell back to the CPU, on every run.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    world = PartialState(cpu=cpu).num_processes
    accum, global_batch = batch_layout(cfg, world)
    plugins: dict[str, Any] = {}
    if cpu and engine == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        # torch's FSDP cannot broadcast module states from rank 0 on CPU, so on CPU processes
        # every rank loads the (same) starting weights itself; the rest is as launched.
        for name in ("FSDP_SYNC_MODULE_STATES", "FSDP_CPU_RAM_EFFICIENT_LOADING"):
            os.environ[name] = "false"  # also read by transformers' from_pretrained
        plugin = FullyShardedDataParallelPlugin()
        plugins["fsdp_plugin"] = plugin
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        # Accumulation follows the micro-batch counter only: the recipe reads a whole window
        # ahead to count its tokens, so the loader's end is not a window boundary signal.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=accum, sync_with_dataloader=False
        ),
        # The recipe calls scheduler.step() once per optimizer step.
        step_scheduler_with_optimizer=False,
        **plugins,
    )
    if cpu and engine in ("fsdp", "deepspeed") and world > 1:
        _keep_engine_on_cpu(accelerator, engine, plugins.get("fsdp_plugin"))
    if accelerator.distributed_type.value == "DEEPSPEED":
        plugin = accelerator.state.deepspeed_plugin
        if plugin.zero_stage == 3 and plugin.zero3_init_flag:
            raise RadGrounderError(
                "DeepSpeed zero3_init_flag: true is not supported: every rank loads the model "
                "and ZeRO-3 partitions it when training starts; set zero3_init_flag: false in "
                "the launch file"
            )
        _configure_deepspeed(accelerator, cfg, accum, global_batch)
    return accelerator, accum, global_batch


def _keep_engine_on_cpu(accelerator: Any, engine: str, fsdp_plugin: Any) -> None:
    """Switch a CPU (gloo) data-parallel state to the FSDP or DeepSpeed engine."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    state = accelerator.state
    precision = accelerator.mixed_precision  # read before the switch (DeepSpeed reads its config)
    kind = DistributedType.FSDP if engine == "fsdp" else DistributedType.DEEPSPEED
    cpu = torch.device("cpu")
    # Both singletons: AcceleratorState re-reads PartialState whenever it is constructed.
    for s in (PartialState(), state):
        s.distributed_type = kind
        s.device = cpu
    if engine == "fsdp":
        # accelerate saves full-state-dict checkpoints with offload_to_cpu, which crashes
        # torch's FSDP on CPU tensors (SIGSEGV): CPU processes keep sharded checkpoints.
        if "FULL" in str(fsdp_plugin.state_dict_type):
            log.warning("FSDP on CPU processes: checkpoints use SHARDED_STATE_DICT")
            fsdp_plugin.set_state_dict_type("SHARDED_STATE_DICT")
        state.fsdp_plugin = fsdp_plugin
    else:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(precision)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        # As accelerate does for DeepSpeed on GPUs: the engine's config does mixed precision.
        state._mixed_precision = "no"
    log.info("%s engine on CPU processes (gloo)", engine)


def _configure_deepspeed(accelerator: Any, cfg: TrainConfig, accum: int, global_batch: int) -> None:
    """The values a DeepSpeed config may leave at ``auto`` come from the experiment; a launch
    file that contradicts them is overridden with a warning (its step would be another one)."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": global_batch,
        "gradient_clipping": cfg.optim.max_grad_norm,
    }
    for key, value in wanted.items():
        old = ds.get(key, "auto")
        if old not in ("auto", None) and old != value:
            log.warning("DeepSpeed config %s=%s overridden by the experiment: %s", key, old, value)
        ds[key] = value
    accelerator.gradient_accumulation_steps = accum


@contextmanager
def without_zero3_init(accelerator: Any) -> Iterator[None]:
    """Build or load a whole model on each rank under DeepSpeed ZeRO-3.

    With a ZeRO-3 config active, transformers constructs every model inside
    ``deepspeed.zero.Init``, which partitions each parameter as it is created (a collective).
    radgrounder loads the full model on every rank (rank 0 first, which may write the
    initial checkpoint) and DeepSpeed partitions it in ``prepare``; the export rebuilds it on
    rank 0 alone. ``zero3_init_flag: true`` is refused in ``make_accelerator``.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    keep = plugin.dschf
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(keep)
