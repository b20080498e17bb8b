"""Where archive jobs run: in this process, a local process pool, or a Ray cluster.

Two shapes of work share this layer. ``labels build`` runs *tasks*: a plain function of one
job, any worker can take any job. Archive ``predict`` runs *actors*: each holds a model that
it loads once and is fed lists of jobs as it frees up. Either way a job whose worker dies (kill
-9, out of memory, a Ray node lost) is retried once and then reported as lost: a run never
aborts because one worker went away, and it always reaches the point where it writes its
manifest. Paths in the jobs are absolute (resolved on the driver), so a worker that starts
in another folder, or on another node with the same mounts, reads the same files.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from radgrounder.errors import RadGrounderError

EXECUTORS = ("local", "ray")
DIED = "its worker process died twice (killed, or out of memory?)"


def check_executor(executor: str, workers: int) -> None:
    if executor not in EXECUTORS:
        raise RadGrounderError(f"executor: unknown value {executor!r} (expected local or ray)")
    if workers < 1:
        raise RadGrounderError(f"workers: must be >= 1, got {workers}")


def connect_ray() -> Any:
    """The ``ray`` module, connected to ``RAY_ADDRESS`` (or a local instance): one clear
    error when Ray is missing or the cluster cannot be reached."""
    try:
        import ray  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RadGrounderError(
            "executor ray: Ray is not installed (pip install 'radgrounder[ray]')"
        ) from exc
    if not ray.is_initialized():
        try:
            ray.init(ignore_reinit_error=True, log_to_driver=False)
        except ConnectionError as exc:
            where = os.environ.get("RAY_ADDRESS") or "the local machine"
            raise RadGrounderError(
                f"executor ray: cannot reach the cluster at {where}: {exc}"
            ) from None
    return ray


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_tasks(
    fn: Callable[[Any], Any],
    jobs: Sequence[Any],
    *,
    executor: str = "local",
    workers: int = 1,
    on_done: Callable[[Any], None],
    on_lost: Callable[[Any, str], None],
) -> None:
    """``on_done(fn(job))`` for every job, in this process (``workers`` 1), a spawned
    process pool or Ray tasks; ``on_lost(job, reason)`` for a job whose worker died twice."""
    check_executor(executor, workers)
    if executor == "ray":
        _ray_tasks(fn, jobs, on_done, on_lost)
        return
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            on_done(fn(job))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    pending = list(jobs)
    for _ in range(2):
        lost: list[Any] = []
        # spawn: forking a process that already holds threads (torch, BLAS) can deadlock.
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(fn, job): job for job in pending}
            for fut in as_completed(futures):
                try:
                    result = fut.result()
                except BrokenProcessPool:  # a worker died: every unfinished job comes back
                    lost.append(futures[fut])
                    continue
                on_done(result)
        pending = lost
        if not pending:
            return
    for job in pending:
        on_lost(job, DIED)


def _ray_tasks(
    fn: Callable[[Any], Any],
    jobs: Sequence[Any],
    on_done: Callable[[Any], None],
    on_lost: Callable[[Any, str], None],
) -> None:
    ray = connect_ray()
    remote = ray.remote(max_retries=1)(fn)
    refs = {remote.remote(job): job for job in jobs}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        job = refs.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except Exception as exc:  # the task's worker died more often than Ray retries
            on_lost(job, f"Ray task failed: {_first_line(exc)}")
            continue
        on_done(result)


def run_actors(
    actor_class: type,
    init_kwargs: dict[str, Any],
    jobs: Sequence[Any],
    *,
    workers: int = 1,
    num_gpus: float = 0,
    num_cpus: float = 1,
    jobs_per_call: int = 4,
    on_done: Callable[[Any], None],
    on_lost: Callable[[Any, str], None],
) -> int:
    """Feed ``jobs`` to ``workers`` Ray actors of ``actor_class`` (made with ``init_kwargs``;
    its ``process(jobs)`` returns one output per job) as they free up, two calls in flight
    per actor so none waits for the driver. An actor that dies is replaced and the jobs of its
    unfinished calls are retried once on the others. Returns the number of actors started."""
    ray = connect_ray()
    from ray.exceptions import RayActorError  # type: ignore[import-not-found]

    remote_class = ray.remote(max_restarts=0, max_task_retries=0)(actor_class)
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    queue: deque[tuple[Any, int]] = deque((job, 0) for job in jobs)
    inflight: dict[Any, tuple[Any, list[tuple[Any, int]]]] = {}
    actors: list[Any] = []
    started = 0

    def start() -> Any:
        nonlocal started
        started += 1
        actor = remote_class.options(**options).remote(**init_kwargs)
        actors.append(actor)
        return actor

    def submit(actor: Any) -> None:
        batch = [queue.popleft() for _ in range(min(jobs_per_call, len(queue)))]
        if batch:
            inflight[actor.process.remote([job for job, _ in batch])] = (actor, batch)

    for _ in range(min(workers, max(1, -(-len(queue) // jobs_per_call)))):
        actor = start()
        submit(actor)
        submit(actor)
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1)
        actor, batch = inflight.pop(ready[0])
        try:
            outputs = ray.get(ready[0])
        except Exception as exc:
            died = isinstance(exc, RayActorError)
            for job, attempt in batch:
                if attempt == 0:
                    queue.append((job, 1))
                else:
                    on_lost(job, DIED if died else f"Ray call failed: {_first_line(exc)}")
            if died and actor in actors:
                actors.remove(actor)
                with contextlib.suppress(Exception):
                    ray.kill(actor)
                # The dead actor's other call fails too; its jobs come back the same way.
                if queue and len(actors) < workers:
                    submit(start())
            elif actor in actors:
                submit(actor)
            for other in list(actors):
                if queue and sum(1 for a, _ in inflight.values() if a is other) < 2:
                    submit(other)
            continue
        for out in outputs:
            on_done(out)
        submit(actor)
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor)
    return started
