"""Run folder bookkeeping shared by all ranks: the run lock, checkpoint folders, resume step.

A checkpoint is ``checkpoints/step-NNNNNNN/``, written by ``accelerator.save_state`` on every
rank into ``step-NNNNNNN.tmp`` and renamed by rank 0 once all ranks have finished, so a folder
without ``.tmp`` is complete. Every rank must see the same ``output_dir``: on several nodes it
has to be a shared filesystem (the resume step is rank 0's, and each rank checks that it can
see that checkpoint before loading).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from radgrounder.errors import RadGrounderError
from radgrounder.fileio import apply_umask

_COMPLETE = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:07d}"


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint, oldest first."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _COMPLETE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def remove_partial_checkpoints(out: Path) -> list[Path]:
    """Delete ``*.tmp`` folders a crash during a save left behind; returns what was removed."""
    root = out / "checkpoints"
    stale = sorted(p for p in root.glob("*.tmp")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


class RunLock:
    """An exclusive lock on ``output_dir/.train.lock`` held by rank 0 for the whole run.

    A POSIX record lock (``lockf``), not ``flock``: forked DataLoader workers do not inherit
    it, so a job killed with -9 frees its run at once even while its orphaned workers exit.
    The kernel drops it when the process dies, so a crash never leaves a stale lock.
    """

    def __init__(self, out: Path) -> None:
        self.path = out / ".train.lock"
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; on failure return who holds it (a message), else None."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            return f"another training job is writing this output_dir ({holder})"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def take_run_lock(out: Path, accelerator: Any) -> RunLock:
    """Rank 0 locks the run folder; every rank learns whether it could (and raises if not)."""
    from accelerate.utils import broadcast_object_list

    lock = RunLock(out)
    message = [lock.acquire() if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(message, from_process=0)
    if message[0]:
        raise RadGrounderError(message[0], path=out)
    return lock


def agree_on_resume_step(out: Path, accelerator: Any) -> int:
    """Rank 0's latest complete checkpoint (0 for none), checked to be visible on every rank."""
    from accelerate.utils import broadcast_object_list, gather_object

    chosen = [0]
    if accelerator.is_main_process:
        remove_partial_checkpoints(out)
        done = complete_checkpoints(out)
        chosen = [done[-1][0] if done else 0]
    if accelerator.num_processes == 1:
        return chosen[0]
    broadcast_object_list(chosen, from_process=0)
    step = chosen[0]
    visible = step == 0 or checkpoint_dir(out, step).is_dir()
    everyone = gather_object([(accelerator.process_index, visible)])
    missing = sorted(rank for rank, ok in everyone if not ok)
    if missing:
        raise RadGrounderError(
            f"checkpoint step {step} is not visible on rank(s) {missing}: output_dir must be "
            "on a filesystem shared by every node",
            path=out,
        )
    return step


def save_checkpoint(out: Path, step: int, accelerator: Any, keep: int) -> Path:
    """Save the engine's whole state (sharded where the engine shards it) on every rank."""
    final = checkpoint_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    # Gemma ties lm_head to the embeddings; accelerate warns on every save that it stored the
    # shared tensor once, which is what loading expects.
    quiet = logging.getLogger("accelerate.utils.other")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        accelerator.save_state(str(tmp))
    finally:
        quiet.setLevel(level)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step}) + "\n")
        apply_umask(tmp)  # safetensors writes 0600 whatever the umask
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in complete_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
