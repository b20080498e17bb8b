"""One worker thread that batches prepared items of concurrent requests into model calls."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("radgrounder.serve")

RunFn = Callable[..., list[Any]]


@dataclass
class _Job:
    units: list[list[Any]]
    max_new_tokens: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Any]]
    results: list[Any] = field(default_factory=list)

    @property
    def n_items(self) -> int:
        return sum(len(u) for u in self.units)


def _units(items: Sequence[Any]) -> list[list[Any]]:
    """Consecutive items that share one preprocessed image (the per-structure questions of
    ``detect``/``segment``): ``predictor.run`` answers each such run with one result, so
    they stay together in one call."""
    units: list[list[Any]] = []
    last: object = None
    for item in items:
        image = getattr(getattr(item, "example", None), "image", None)
        key = item if image is None else image
        if units and key is last:
            units[-1].append(item)
        else:
            units.append([item])
        last = key
    return units


_STOP = object()


class Batcher:
    """Collects the prepared items that requests submit and runs them through ``run_fn``
    (``predictor.run``) on a single worker thread, never on the event loop.

    The worker waits for a first job, then keeps collecting jobs for up to ``window_s``
    seconds or until ``max_batch`` items are waiting, and calls ``run_fn(items,
    max_new_tokens=n)`` once per group of items with equal ``max_new_tokens`` (in chunks of
    at most ``max_batch`` items; a job larger than that is spread over chunks, but the items
    of one image are never split).
    """

    def __init__(self, run_fn: RunFn, *, max_batch: int = 8, window_s: float = 0.02) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch: must be at least 1, got {max_batch}")
        if window_s < 0:
            raise ValueError(f"batch_window_s: must not be negative, got {window_s}")
        self.run_fn = run_fn
        self.max_batch = max_batch
        self.window_s = window_s
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the worker thread (done lazily by :meth:`submit` too)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, name="radgrounder-batcher", daemon=True
                )
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Let the worker finish the jobs it holds and end."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._queue.put(_STOP)
            thread.join(timeout)

    async def submit(self, items: Sequence[Any], max_new_tokens: int) -> list[Any]:
        """Queue ``items`` and wait for their results (in order)."""
        if not items:
            return []
        self.start()
        loop = asyncio.get_running_loop()
        job = _Job(_units(items), int(max_new_tokens), loop, loop.create_future())
        self._queue.put(job)
        return await job.future

    # -- worker thread -------------------------------------------------------------------

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, n_items = [first], first.n_items
        deadline = time.monotonic() + self.window_s
        while n_items < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                nxt = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if nxt is _STOP:
                return jobs, True
            jobs.append(nxt)
            n_items += nxt.n_items
        return jobs, False

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            jobs, stop = self._collect(first)
            for tokens in dict.fromkeys(j.max_new_tokens for j in jobs):
                self._run_group([j for j in jobs if j.max_new_tokens == tokens], tokens)
            if stop:
                return

    def _chunks(self, jobs: list[_Job]) -> list[list[tuple[_Job, list[Any]]]]:
        chunks: list[list[tuple[_Job, list[Any]]]] = [[]]
        size = 0
        for job in jobs:
            if job.future.cancelled():
                continue
            for unit in job.units:
                if chunks[-1] and size + len(unit) > self.max_batch:
                    chunks.append([])
                    size = 0
                chunks[-1].append((job, unit))
                size += len(unit)
        return [c for c in chunks if c]

    def _run_group(self, jobs: list[_Job], max_new_tokens: int) -> None:
        failed: dict[int, BaseException] = {}
        for chunk in self._chunks(jobs):
            keys = {id(job) for job, _ in chunk}
            if keys <= failed.keys():
                continue
            items = [item for _, unit in chunk for item in unit]
            try:
                results = self.run_fn(items, max_new_tokens=max_new_tokens)
                if len(results) != len(chunk):
                    raise RuntimeError(f"run returned {len(results)} results for {len(chunk)}")
            except Exception as exc:  # reported to every request in the chunk
                logger.warning("batch of %d items failed: %s", len(items), type(exc).__name__)
                for key in keys:
                    failed.setdefault(key, exc)
                continue
            for (job, _), result in zip(chunk, results, strict=True):
                job.results.append(result)
        for job in jobs:
            error = failed.get(id(job))
            if error is not None:
                _settle(job, error=error)
            elif not job.future.cancelled():
                _settle(job, result=job.results)


def _settle(
    job: _Job, *, result: list[Any] | None = None, error: BaseException | None = None
) -> None:
    def apply() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result or [])

    with contextlib.suppress(RuntimeError):  # the request's event loop is gone
        job.loop.call_soon_threadsafe(apply)
