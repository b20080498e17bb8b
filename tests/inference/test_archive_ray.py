"""Archive predict on a real Ray head (started in another folder, stopped by its own process
ids): relative inputs and ``--out`` from the client's folder give the local executor's
result, two actors load the model once each, and an actor killed with kill -9 costs a
retry, not the run (slow; run by CI)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.inference.archive_corpus import EXPECTED, comparable, make_archive, manifest
from tests.ray_cluster import AUTH, pids_matching, ray_head

pytestmark = pytest.mark.slow
pytest.importorskip("ray")


@pytest.fixture(scope="module")
def head() -> Iterator[str]:
    with ray_head(num_cpus=2) as address:
        yield address


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny) -> Path:
    root = tmp_path_factory.mktemp("ray-client")
    make_archive(root / "arc")
    shutil.copytree(tiny["detection"], root / "model")
    return root


def _predict(client: Path, out: str, *extra: str, env: dict | None = None):
    cmd = [sys.executable, "-m", "radgrounder", "predict", "arc", "--model", "model",
           "--out", out, *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=client, env=env, capture_output=True, text=True, timeout=900)


def _statuses(out: Path) -> dict[str, str]:
    return {x["key"].rsplit("-", 1)[0]: x["status"] for x in manifest(out) if x["key"]}


def test_archive_predict_on_ray_equals_the_local_executor(head: str, client: Path):
    env = {**os.environ, **AUTH, "RAY_ADDRESS": head}
    on_ray = _predict(client, "out_ray", "--executor", "ray", "--workers", "2", env=env)
    assert on_ray.returncode == 3, on_ray.stderr[-3000:]  # the broken .dcm
    assert "model loads 2" in on_ray.stdout  # one per actor, never one per series
    local = _predict(client, "out_local")
    assert local.returncode == 3, local.stderr[-3000:]
    assert "model loads 1" in local.stdout
    assert _statuses(client / "out_ray") == EXPECTED
    assert comparable(client / "out_ray") == comparable(client / "out_local")


def test_a_killed_actor_costs_a_retry_not_the_run(head: str, client: Path, tmp_path: Path):
    work = tmp_path / "work"
    shutil.copytree(client, work)
    for n in range(6):  # enough jobs that the kill lands while some are left
        shutil.copy(work / "arc" / "patient2" / "ct_sm.nii.gz", work / "arc" / f"v{n}.nii.gz")
    env = {**os.environ, **AUTH, "RAY_ADDRESS": head}
    cmd = [sys.executable, "-m", "radgrounder", "predict", "arc", "--model", "model",
           "--out", "out", "--executor", "ray", "--workers", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    killed, deadline = None, time.time() + 300
    while killed is None and time.time() < deadline and proc.poll() is None:
        busy = pids_matching("ray::ArchiveWorker.process")
        if busy:
            killed = busy[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=900)
    assert killed is not None, "the run ended before an actor could be killed"
    assert proc.returncode == 3, stderr[-3000:]
    assert "Traceback" not in stderr
    statuses = _statuses(work / "out")
    assert statuses.pop("patient3_broken.dcm") == "failed"
    assert set(statuses.values()) == {"done"} and len(statuses) == 3 + 6
    assert "model loads 3" in stdout or "model loads 2" in stdout, stdout
