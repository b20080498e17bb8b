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
    """The error's type and first line; for a Ray task error, those of the task's own
    exception (Ray's message starts with the task's name and process id)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


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
    # A dead worker breaks the whole pool: every unfinished job comes back, the culprit among
    # them. Those are rerun; a job lost twice runs alone in a pool of its own, so that only a
    # job that kills its own worker is reported lost, never its neighbours.
    strikes = [0] * len(jobs)
    pending = list(range(len(jobs)))
    while pending:
        shared = [i for i in pending if strikes[i] < 2]
        lost = _pool_round(fn, jobs, shared, workers, on_done) if shared else []
        for i in (i for i in pending if strikes[i] >= 2):
            if _pool_round(fn, jobs, [i], 1, on_done):
                on_lost(jobs[i], DIED)
        for i in lost:
            strikes[i] += 1
        pending = lost


def _pool_round(
    fn: Callable[[Any], Any],
    jobs: Sequence[Any],
    indices: list[int],
    workers: int,
    on_done: Callable[[Any], None],
) -> list[int]:
    """Run ``jobs[indices]`` in a fresh process pool; the indices whose worker died."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    lost: list[int] = []
    # spawn: forking a process that already holds threads (torch, BLAS) can deadlock.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(fn, jobs[i]): i for i in indices}
        for fut in as_completed(futures):
            try:
                result = fut.result()
            except BrokenProcessPool:
                lost.append(futures[fut])
                continue
            on_done(result)
    return sorted(lost)


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
    per actor so none waits for the driver. Returns the number of actors started.

    An actor that dies is replaced. The call it was running when it died is suspect: its jobs
    are retried one per call, and a job that kills its actor again is reported lost. Its
    queued call is innocent and simply runs elsewhere."""
    ray = connect_ray()
    from ray.exceptions import RayActorError  # type: ignore[import-not-found]

    remote_class = ray.remote(max_restarts=0, max_task_retries=0)(actor_class)
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    fresh: deque[Any] = deque(jobs)
    suspects: deque[Any] = deque()  # on their second try: one job per call
    inflight: dict[Any, tuple[Any, list[Any], int, bool]] = {}  # ref -> actor, jobs, seq, suspect
    actors: list[Any] = []
    running_at_death: dict[int, int] = {}  # id(actor) -> the seq of the call it was running
    counter = {"started": 0, "seq": 0}

    def start() -> Any:
        counter["started"] += 1
        actor = remote_class.options(**options).remote(**init_kwargs)
        actors.append(actor)
        return actor

    def submit(actor: Any) -> None:
        if suspects:
            batch, suspect = [suspects.popleft()], True
        else:
            batch = [fresh.popleft() for _ in range(min(jobs_per_call, len(fresh)))]
            suspect = False
        if batch:
            counter["seq"] += 1
            ref = actor.process.remote(batch)
            inflight[ref] = (actor, batch, counter["seq"], suspect)

    def calls_of(actor: Any) -> int:
        return sum(1 for a, *_ in inflight.values() if a is actor)

    for _ in range(min(workers, max(1, -(-len(fresh) // jobs_per_call)))):
        actor = start()
        submit(actor)
        submit(actor)
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1)
        actor, batch, seq, suspect = inflight.pop(ready[0])
        try:
            outputs = ray.get(ready[0])
        except Exception as exc:
            if not isinstance(exc, RayActorError):  # the call raised: its jobs, once more
                for job in batch:
                    (on_lost(job, f"Ray call failed: {_first_line(exc)}") if suspect
                     else suspects.append(job))  # fmt: skip
                submit(actor)
                continue
            if id(actor) not in running_at_death:
                others = [s for a, _, s, _ in inflight.values() if a is actor]
                running_at_death[id(actor)] = min([seq, *others])
            if seq == running_at_death[id(actor)]:
                for job in batch:
                    on_lost(job, DIED) if suspect else suspects.append(job)
            else:
                fresh.extendleft(reversed(batch))
            if actor in actors:
                actors.remove(actor)
                with contextlib.suppress(Exception):
                    ray.kill(actor)
                if (fresh or suspects) and len(actors) < workers:
                    start()
        else:
            for out in outputs:
                on_done(out)
        for other in list(actors):
            while (fresh or suspects) and calls_of(other) < 2:
                submit(other)
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor)
    return counter["started"]
