"""Run by test_distributed under torchrun: each rank sees its own output_dir, as nodes without
a shared filesystem would; rank 0's holds a checkpoint at step 6."""

import sys
from pathlib import Path

import torch.distributed
from accelerate import Accelerator

from radgrounder.errors import RadGrounderError
from radgrounder.training.checkpoints import STATE_FILE, agree_on_resume_step, checkpoint_dir

accelerator = Accelerator(cpu=True)
out = Path(sys.argv[1]) / f"node{accelerator.process_index}"
if accelerator.is_main_process:
    ckpt = checkpoint_dir(out, 6)
    ckpt.mkdir(parents=True)
    (ckpt / STATE_FILE).write_text('{"step": 6}\n')
accelerator.wait_for_everyone()
try:
    step = agree_on_resume_step(out, accelerator)
    print(f"rank {accelerator.process_index}: resume step {step}", flush=True)
except RadGrounderError as exc:
    print(f"rank {accelerator.process_index}: error: {exc}", flush=True)
# Leave the process group cleanly: a live gloo group at interpreter exit can abort the process.
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()
