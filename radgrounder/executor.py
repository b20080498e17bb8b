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
_DEAD_ACTOR_WAIT_S = 120.0  # for the other calls of a dead actor to resolve
_MAX_FAILED_STARTS = 3  # actors in a row whose __init__ raised: then no more are started


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


def _init_error(exc: BaseException) -> str:
    """The exception an actor's ``__init__`` raised: the last line of Ray's message, which
    ends with the traceback's ``Type: message``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


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

    An actor that dies is replaced. Which of its calls killed it is known only when it had
    one in flight: a process that exits can take the reply of the call it had just finished
    with it. So the jobs of every call it lost are retried one per call, each alone on its
    actor, and a job that kills its actor again there is reported lost. An actor that cannot
    start (its ``__init__`` raised) blames no job; after three such starts in a row with no
    call answered in between no more are started, and the jobs left are reported lost with
    the reason."""
    ray = connect_ray()
    from ray.exceptions import RayActorError  # type: ignore[import-not-found]

    remote_class = ray.remote(max_restarts=0, max_task_retries=0)(actor_class)
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    fresh: deque[Any] = deque(jobs)
    suspects: deque[Any] = deque()  # on their second try: one job per call, alone
    inflight: dict[Any, tuple[Any, list[Any], bool]] = {}  # ref -> actor, jobs, suspect
    actors: list[Any] = []
    state = {"started": 0, "failed_starts": 0, "why": ""}

    def start() -> None:
        state["started"] += 1
        actors.append(remote_class.options(**options).remote(**init_kwargs))

    def submit(actor: Any) -> bool:
        mine = [suspect for a, _, suspect in inflight.values() if a is actor]
        if len(mine) >= 2 or any(mine):  # a suspect has its actor to itself
            return False
        if suspects:
            if mine:
                return False
            batch, suspect = [suspects.popleft()], True
        else:
            batch = [fresh.popleft() for _ in range(min(jobs_per_call, len(fresh)))]
            suspect = False
        if batch:
            inflight[actor.process.remote(batch)] = (actor, batch, suspect)
        return bool(batch)

    def call_failed(batch: list[Any], suspect: bool, why: str) -> None:
        for job in batch:
            on_lost(job, why) if suspect else suspects.append(job)

    def settle(ref: Any, batch: list[Any], suspect: bool) -> Exception | None:
        """Hand a finished call's outputs on, or its jobs back when the call raised; the
        error when its actor died (the caller decides what that means for the jobs)."""
        try:
            outputs = ray.get(ref)
        except RayActorError as exc:
            return exc
        except Exception as exc:  # the call raised: its jobs, once more, one per call
            call_failed(batch, suspect, f"Ray call failed: {_first_line(exc)}")
            return None
        state["failed_starts"] = 0
        for out in outputs:
            on_done(out)
        return None

    def actor_died(actor: Any, batch: list[Any], suspect: bool, exc: Exception) -> None:
        actors.remove(actor)
        with contextlib.suppress(Exception):
            ray.kill(actor)
        # Its other calls have failed too or succeeded (a success can reach the driver after
        # the news of the death): wait for all of them.
        refs = [ref for ref, (a, *_) in inflight.items() if a is actor]
        resolved = set(ray.wait(refs, num_returns=len(refs), timeout=_DEAD_ACTOR_WAIT_S)[0])
        lost = [(batch, suspect)]
        for ref in refs:
            _, other, other_suspect = inflight.pop(ref)
            if ref not in resolved or settle(ref, other, other_suspect) is not None:
                lost.append((other, other_suspect))
        if getattr(exc, "actor_init_failed", False):  # no job was run: none is to blame
            state["failed_starts"] += 1
            state["why"] = _init_error(exc)
            for jobs_back, _ in reversed(lost):
                fresh.extendleft(reversed(jobs_back))
        else:
            for jobs_lost, was_suspect in lost:
                call_failed(jobs_lost, was_suspect and len(lost) == 1, DIED)
        room = len(actors) < workers and state["failed_starts"] < _MAX_FAILED_STARTS
        if (fresh or suspects) and room:
            start()

    for _ in range(min(workers, max(1, -(-len(fresh) // jobs_per_call)))):
        start()
    while True:
        for actor in actors:
            while submit(actor):
                pass
        if not inflight:
            break
        ready, _ = ray.wait(list(inflight), num_returns=1)
        actor, batch, suspect = inflight.pop(ready[0])
        died = settle(ready[0], batch, suspect)
        if died is not None:
            actor_died(actor, batch, suspect, died)
    for job in [*suspects, *fresh]:  # only when no actor could start
        on_lost(job, f"no worker could start: {state['why']}")
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor)
    return state["started"]
