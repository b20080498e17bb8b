"""The executor layer's failure paths with real worker deaths: a pool process, a Ray task's
worker and a Ray actor that exit with ``os._exit`` (as kill -9 or the OOM killer would leave
them). Retried once, then reported lost; never an abort."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from radgrounder.executor import DIED, run_actors, run_tasks


def _die_on_odd(job: int) -> int:
    if job % 2:
        os._exit(1)
    return job * 10


def test_a_dying_pool_worker_is_retried_once_then_reported_lost():
    done, lost = [], []
    run_tasks(_die_on_odd, [0, 1, 2, 4], workers=2, on_done=done.append,
              on_lost=lambda job, why: lost.append((job, why)))  # fmt: skip
    assert sorted(done) == [0, 20, 40]
    assert lost == [(1, DIED)]


def test_unknown_executor_and_workers_are_refused():
    from radgrounder.errors import RadGrounderError

    with pytest.raises(RadGrounderError, match="executor"):
        run_tasks(abs, [1], executor="dask", on_done=print, on_lost=print)
    with pytest.raises(RadGrounderError, match="workers"):
        run_tasks(abs, [1], workers=0, on_done=print, on_lost=print)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_ray_task_whose_worker_always_dies_is_lost_and_the_rest_done(local_ray):
    def task(job: int) -> int:  # defined here: shipped to the workers by value
        if job == 3:
            os._exit(1)
        if job == 5:
            raise ValueError("a bug in the task")
        return job + 100

    done, lost = [], []
    run_tasks(task, [1, 2, 3, 4, 5], executor="ray", on_done=done.append,
              on_lost=lambda job, why: lost.append((job, why)))  # fmt: skip
    assert sorted(done) == [101, 102, 104]
    reasons = dict(lost)
    assert sorted(reasons) == [3, 5]
    assert all(r.startswith("Ray task failed") for r in reasons.values())
    assert "a bug in the task" in reasons[5]


@pytest.mark.slow
def test_a_dead_actor_is_replaced_and_its_jobs_retried(local_ray, tmp_path: Path):
    class Worker:
        def __init__(self, flag: str) -> None:
            self.flag = Path(flag)
            self.pid = os.getpid()

        def process(self, jobs: list[str]) -> list[tuple[str, int]]:
            out = []
            for job in jobs:
                if job == "dies-once" and not self.flag.exists():
                    self.flag.write_text("died")
                    os._exit(1)
                if job == "dies-always":
                    os._exit(1)
                out.append((job, self.pid))
            return out

    done, lost = [], []
    jobs = ["a", "b", "dies-once", "c", "dies-always", "d"]
    started = run_actors(Worker, {"flag": str(tmp_path / "flag")}, jobs, workers=2,
                         jobs_per_call=1, on_done=done.append,
                         on_lost=lambda job, why: lost.append((job, why)))  # fmt: skip
    assert sorted(job for job, _ in done) == ["a", "b", "c", "d", "dies-once"]
    assert lost == [("dies-always", DIED)]
    # Two actors to start with and a replacement after a death while work remains (three
    # deaths: dies-once, dies-always twice). A job that finished just before its actor died
    # (its reply lost with the process) is retried alone, not blamed: never more deaths.
    assert 3 <= started <= 5
    assert len({pid for _, pid in done}) <= started


class _StartsAfter:
    """An actor whose ``__init__`` raises until ``fail`` earlier starts have (counted in a
    file), as a model that cannot load would."""

    def __init__(self, count: str, fail: int) -> None:
        path = Path(count)
        tries = int(path.read_text()) if path.exists() else 0
        path.write_text(str(tries + 1))
        if tries < fail:
            raise FileNotFoundError(f"model: no such folder /nowhere/{tries}")

    def process(self, jobs: list[int]) -> list[int]:
        return [job * 2 for job in jobs]


@pytest.mark.slow
def test_an_actor_that_cannot_start_blames_no_job(local_ray, tmp_path: Path):
    done, lost = [], []
    started = run_actors(_StartsAfter, {"count": str(tmp_path / "n"), "fail": 1}, [1, 2, 3, 4],
                         workers=1, jobs_per_call=1, on_done=done.append,
                         on_lost=lambda job, why: lost.append((job, why)))  # fmt: skip
    assert (sorted(done), lost, started) == ([2, 4, 6, 8], [], 2)


@pytest.mark.slow
def test_a_model_that_never_loads_is_one_reason_for_every_job(local_ray, tmp_path: Path):
    done, lost = [], []
    started = run_actors(_StartsAfter, {"count": str(tmp_path / "n"), "fail": 99}, [1, 2, 3],
                         workers=2, jobs_per_call=1, on_done=done.append,
                         on_lost=lambda job, why: lost.append((job, why)))  # fmt: skip
    assert done == []
    assert sorted(job for job, _ in lost) == [1, 2, 3]
    for _, why in lost:
        assert re.fullmatch(r"no worker could start: FileNotFoundError: model: no such "
                            r"folder /nowhere/\d", why), why  # fmt: skip
    assert started == 2 + 2  # two, then replacements until three failed starts in a row
