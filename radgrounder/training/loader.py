"""The training DataLoader: a deterministic, resumable, rank-sharded stream of micro-batches.

Sample ``slot`` of optimizer step ``step`` is ``Mixture.example(step, slot)``, a pure function of
(seed, step, slot). A step's global batch is slots ``0 … global_batch_size-1``; micro-batch
``m`` of rank ``r`` holds slots ``(m · world + r) · batch_size + j``. The batch sampler lists the
micro-batches of every step in (step, micro, rank) order and accelerate's batch-sampler shard
hands rank ``r`` every ``world``-th one, so any layout of the same global batch (1 process x
accumulation 4, 4 processes, 2 x 2) trains on exactly the same samples, and a resumed run
starts at its step without replaying the ones before it. Worker processes prepare the batches
(image decoding, augmentation, tokenisation) while the model computes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from radgrounder.training.collate import make_batch
from radgrounder.training.data import Mixture


@contextmanager
def single_threaded() -> Iterator[None]:
    """Prepare data on one intra-op thread, as a worker process does.

    torch's multi-threaded bilinear resize splits the image at thread-dependent points and
    rounds a few pixels 1 ulp differently; on one thread the pixels are the same in the main
    process, in a worker and on a machine with any number of cores.
    """
    n = torch.get_num_threads()
    if n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n != 1:
            torch.set_num_threads(n)


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Micro-batches of ``(step, slot)`` indices for steps ``start+1 … max_steps``."""

    def __init__(
        self, *, max_steps: int, batch_size: int, grad_accum: int, world_size: int
    ) -> None:
        self.max_steps, self.batch_size = max_steps, batch_size
        self.grad_accum, self.world_size = grad_accum, world_size
        self.start = 0

    def set_start(self, step: int) -> None:
        """Continue after ``step`` (the resumed checkpoint's)."""
        self.start = step

    def __len__(self) -> int:
        return (self.max_steps - self.start) * self.grad_accum * self.world_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.batch_size
        for step in range(self.start + 1, self.max_steps + 1):
            for micro in range(self.grad_accum):
                for rank in range(self.world_size):
                    base = (micro * self.world_size + rank) * b
                    yield [(step, base + j) for j in range(b)]


class MixtureDataset(Dataset):
    """``dataset[(step, slot)]`` is that slot's example."""

    def __init__(self, mixture: Mixture, prefix_style: str) -> None:
        self.mixture, self.prefix_style = mixture, prefix_style

    def __getitem__(self, index: tuple[int, int]):
        step, slot = index
        with single_threaded():
            return self.mixture.example(step, slot, self.prefix_style)

    def __len__(self) -> int:  # not used for sampling; the batch sampler decides
        return 0


def make_loader(
    mixture: Mixture,
    tokenizer: Any,
    *,
    prefix_style: str,
    max_steps: int,
    batch_size: int,
    grad_accum: int,
    world_size: int,
    n_image_tokens: int,
    seg_token_id: int | None,
    max_target_tokens: int | None,
    num_workers: int,
    prefetch_factor: int,
) -> DataLoader:
    sampler = StepBatchSampler(
        max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, world_size=world_size
    )
    collate = partial(
        make_batch,
        tokenizer=tokenizer,
        n_image_tokens=n_image_tokens,
        seg_token_id=seg_token_id,
        max_target_tokens=max_target_tokens,
    )
    extra: dict[str, Any] = {}
    if num_workers:
        extra = {"prefetch_factor": prefetch_factor, "persistent_workers": False}
    return DataLoader(
        MixtureDataset(mixture, prefix_style),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        **extra,
    )
