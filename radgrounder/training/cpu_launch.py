"""Run an accelerate launch file on N CPU processes (gloo), to try a cluster setup on a laptop.

    python -m radgrounder.training.cpu_launch --config_file configs/accelerate/fsdp.yaml \\
        --num_processes 2 -m radgrounder train configs/tiny-cpu.yaml max_steps=4

``accelerate launch --cpu`` starts a single process whatever ``--num_processes`` says, and
accelerate runs FSDP and DeepSpeed on GPUs only. This reads the launch file with accelerate's
own parser, keeps its engine settings (FSDP sharding/wrap policy/state-dict type, DeepSpeed
ZeRO stage, …), forces one machine with N local processes and ``ACCELERATE_USE_CPU=1``, and
starts them with accelerate's own launchers (``torch.distributed.run``). The training then
keeps the engine on CPU processes (see ``radgrounder.training.engine``). For plain data
parallelism ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m radgrounder train …`` is
the same thing.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    from accelerate.commands.launch import (
        _validate_launch_command,
        deepspeed_launcher,
        launch_command_parser,
        multi_gpu_launcher,
        simple_launcher,
    )

    args = launch_command_parser().parse_args(sys.argv[1:] if argv is None else argv)
    processes = args.num_processes
    args, defaults, mp_from_config = _validate_launch_command(args)
    args.num_processes = processes or args.num_processes or 1
    args.num_machines, args.machine_rank = 1, 0
    args.main_process_ip = "127.0.0.1"
    args.main_process_port = args.main_process_port or 29500
    args.gpu_ids = None
    args.cpu = False  # the launchers below skip themselves for --cpu
    os.environ["ACCELERATE_USE_CPU"] = "1"
    if args.use_deepspeed:
        os.environ["DS_ACCELERATOR"] = "cpu"
        args.deepspeed_multinode_launcher = None
        fields = list(defaults.deepspeed_config) if defaults else []
        args.deepspeed_fields_from_accelerate_config = ",".join(
            fields + (["mixed_precision"] if mp_from_config else [])
        )
        deepspeed_launcher(args)
    elif args.num_processes > 1:
        multi_gpu_launcher(args)
    else:
        simple_launcher(args)


if __name__ == "__main__":
    main()
