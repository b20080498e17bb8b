"""One worker thread that batches prepared items of concurrent requests into model calls,
with admission control: a bounded queue, per-request deadlines, and cancellation of work
whose client has gone."""

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


class QueueFull(Exception):
    """The batcher holds as many items as it admits; ``retry_after`` is a guess in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full, retry after {retry_after} s")
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    """A job's deadline passed before all its items were generated."""


@dataclass(eq=False)
class _Job:
    units: list[list[Any]]
    max_new_tokens: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Any]]
    deadline: float | None = None
    results: list[Any] = field(default_factory=list)
    next_unit: int = 0
    cancelled: bool = False  # set from the event loop: the client left or timed out
    settled: bool = False
    counted: int = 0  # this job's items still counted as pending (admission)

    @property
    def n_items(self) -> int:
        return sum(len(u) for u in self.units)

    @property
    def remaining_items(self) -> int:
        return sum(len(u) for u in self.units[self.next_unit :])

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


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

    Scheduling: when idle, the worker waits for a first job, then up to ``window_s`` seconds
    for more (or until ``max_batch`` items wait). Each model call takes at most ``max_batch``
    items, one image's items at a time from each waiting job in turn (round robin among the
    jobs with the oldest job's ``max_new_tokens``), so a request of one slice that arrives
    while a request of 200 slices runs waits for one call, not for the 200 slices.

    Admission: at most ``max_queued`` items wait or run (a larger job is admitted only when
    nothing else is queued); :meth:`submit` raises :class:`QueueFull` beyond. Jobs whose
    deadline passed get :class:`DeadlineExceeded`; cancelled jobs (the awaiting task was
    cancelled: client disconnected or timed out) are dropped before their next call, and a
    call whose jobs are all cancelled is stopped between generation steps through the
    ``should_stop`` callback passed to ``run_fn``.
    """

    def __init__(
        self,
        run_fn: RunFn,
        *,
        max_batch: int = 8,
        window_s: float = 0.02,
        max_queued: int = 64,
        pass_should_stop: bool = False,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch: must be at least 1, got {max_batch}")
        if window_s < 0:
            raise ValueError(f"batch_window_s: must not be negative, got {window_s}")
        if max_queued < 1:
            raise ValueError(f"max_queued: must be at least 1, got {max_queued}")
        self.run_fn = run_fn
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_queued = max_queued
        self.pass_should_stop = pass_should_stop
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending = 0  # items admitted and not yet finished
        self._call_seconds = 1.0  # running estimate of one model call's duration
        self.stats = {"calls": 0, "items": 0, "cancelled_jobs": 0, "expired_jobs": 0}

    @property
    def pending_items(self) -> int:
        with self._lock:
            return self._pending

    def start(self) -> None:
        """Start the worker thread (done lazily by :meth:`submit` too)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, name="radgrounder-batcher", daemon=True
                )
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Let the worker finish the call it is in and end."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._queue.put(_STOP)
            thread.join(timeout)

    def retry_after(self) -> int:
        """Seconds until the queue has probably drained (at least 1)."""
        with self._lock:
            return self._retry_after_locked()

    def check_admission(self, n_items: int = 1) -> None:
        """Raise :class:`QueueFull` if ``n_items`` more would not be admitted now."""
        with self._lock:
            self._admit_locked(n_items)

    def _admit_locked(self, n_items: int) -> None:
        """The admission rule: room for ``n_items``, or nothing else pending."""
        if self._pending and self._pending + n_items > self.max_queued:
            raise QueueFull(self._retry_after_locked())

    def _retry_after_locked(self) -> int:
        calls = -(-self._pending // self.max_batch)
        return max(1, round(calls * self._call_seconds))

    async def submit(
        self, items: Sequence[Any], max_new_tokens: int, *, timeout_s: float | None = None
    ) -> list[Any]:
        """Queue ``items`` and wait for their results (in order). Raises :class:`QueueFull`
        when not admitted and :class:`DeadlineExceeded` after ``timeout_s``; cancelling the
        awaiting task cancels the job."""
        if not items:
            return []
        units = _units(items)
        n = sum(len(u) for u in units)
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        job = _Job(units, int(max_new_tokens), loop, loop.create_future(), deadline)
        with self._lock:
            self._admit_locked(n)
            self._pending += n
            job.counted = n
        self.start()
        self._queue.put(job)
        try:
            if timeout_s is None:
                return await job.future
            try:
                return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
            except TimeoutError:
                raise DeadlineExceeded(f"not finished within {timeout_s:g} s") from None
        finally:
            if not job.future.done():
                job.cancelled = True
                # Admission frees its place now, not when the worker next looks at it.
                self._uncount(job, job.n_items)

    # -- worker thread -------------------------------------------------------------------

    def _uncount(self, job: _Job, n: int) -> None:
        with self._lock:
            n = min(n, job.counted)
            job.counted -= n
            self._pending -= n

    def _release(self, job: _Job) -> None:
        self._uncount(job, job.n_items)
        job.next_unit = len(job.units)

    def _drain(self, active: list[_Job], block: bool) -> bool:
        """Move queued jobs into ``active``; True when told to stop."""
        if block and not active:
            first = self._queue.get()
            if first is _STOP:
                return True
            active.append(first)
            deadline = time.monotonic() + self.window_s
            while sum(j.remaining_items for j in active) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if nxt is _STOP:
                    return True
                active.append(nxt)
        while True:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                return False
            if nxt is _STOP:
                return True
            active.append(nxt)

    def _prune(self, active: list[_Job]) -> None:
        now = time.monotonic()
        for job in list(active):
            if job.cancelled or job.future.cancelled():
                self.stats["cancelled_jobs"] += 1
                self._release(job)
                active.remove(job)
            elif job.expired(now):
                self.stats["expired_jobs"] += 1
                self._release(job)
                active.remove(job)
                _settle(job, error=DeadlineExceeded("deadline passed while queued"))

    def _chunk(self, active: list[_Job]) -> list[tuple[_Job, list[Any]]]:
        """Up to ``max_batch`` items, one unit per job in turn (oldest job first)."""
        tokens = active[0].max_new_tokens
        jobs = [j for j in active if j.max_new_tokens == tokens]
        taken = {id(j): j.next_unit for j in jobs}
        chunk: list[tuple[_Job, list[Any]]] = []
        size = 0
        progress = True
        while progress:
            progress = False
            for job in jobs:
                k = taken[id(job)]
                if k >= len(job.units):
                    continue
                unit = job.units[k]
                if chunk and size + len(unit) > self.max_batch:
                    return chunk
                chunk.append((job, unit))
                size += len(unit)
                taken[id(job)] = k + 1
                progress = True
                if size >= self.max_batch:
                    return chunk
        return chunk

    def _work(self) -> None:
        active: list[_Job] = []
        while True:
            if self._drain(active, block=True):
                return
            self._prune(active)
            if not active:
                continue
            chunk = self._chunk(active)
            self._run_chunk(chunk)
            for job in {id(j): j for j, _ in chunk}.values():
                if job.next_unit >= len(job.units) and job in active:
                    active.remove(job)
                    if not (job.cancelled or job.settled):
                        _settle(job, result=job.results)

    def _run_chunk(self, chunk: list[tuple[_Job, list[Any]]]) -> None:
        jobs = list({id(j): j for j, _ in chunk}.values())
        items = [item for _, unit in chunk for item in unit]
        tokens = chunk[0][0].max_new_tokens
        kwargs: dict[str, Any] = {"max_new_tokens": tokens}
        if self.pass_should_stop:
            kwargs["should_stop"] = lambda: all(j.cancelled for j in jobs)
        started = time.perf_counter()
        try:
            results = self.run_fn(items, **kwargs)
            if len(results) != len(chunk):
                raise RuntimeError(f"run returned {len(results)} results for {len(chunk)}")
        except Exception as exc:  # reported to every request in the chunk
            logger.warning("batch of %d items failed: %s", len(items), type(exc).__name__)
            for job in jobs:
                self._release(job)
                _settle(job, error=exc)
            return
        elapsed = time.perf_counter() - started
        self.stats["calls"] += 1
        self.stats["items"] += len(items)
        with self._lock:
            self._call_seconds = 0.7 * self._call_seconds + 0.3 * elapsed
        for (job, unit), result in zip(chunk, results, strict=True):
            self._uncount(job, len(unit))
            job.results.append(result)
            job.next_unit += 1


def _settle(
    job: _Job, *, result: list[Any] | None = None, error: BaseException | None = None
) -> None:
    job.settled = True

    def apply() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result or [])

    with contextlib.suppress(RuntimeError):  # the request's event loop is gone
        job.loop.call_soon_threadsafe(apply)
