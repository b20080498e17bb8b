"""labels build on a real Ray cluster: a head started in another folder (``ray start --head``
in a temporary folder, stopped by its own process ids), relative inputs and a relative
``--out``: byte-for-byte the local executor's dataset (slow; run by CI)."""

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

from tests.conftest import EXAMPLES
from tests.labels.test_build import tree_bytes
from tests.ray_cluster import AUTH, ray_head

pytestmark = pytest.mark.slow
pytest.importorskip("ray")


@pytest.fixture(scope="module")
def head() -> Iterator[str]:
    with ray_head() as address:
        yield address


def test_a_ray_build_from_another_folder_equals_the_local_one(head: str, tmp_path: Path):
    client = tmp_path / "client"
    for name in ("scans", "labels"):
        shutil.copytree(EXAMPLES / "layout" / name, client / "lay" / name, symlinks=False)
    shutil.copy(EXAMPLES / "reports.jsonl", client / "lay")
    # A scan that fails inside the worker: listed, the rest built, on Ray as locally.
    (client / "lay" / "scans" / "broken.nii.gz").write_bytes(b"not a nifti" * 50)
    shutil.copy(client / "lay" / "labels" / "ct_upper_abdomen.nii.gz",
                client / "lay" / "labels" / "broken.nii.gz")  # fmt: skip
    args = ["--scans", "lay/scans", "--labels", "lay/labels", "--reports", "lay/reports.jsonl",
            "--no-vqa"]  # fmt: skip
    cmd = [sys.executable, "-m", "radgrounder", "labels", "build", *args]
    env = {**os.environ, **AUTH, "RAY_ADDRESS": head}
    on_ray = subprocess.run([*cmd, "--out", "out_ray", "--executor", "ray"], cwd=client,
                            env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert on_ray.returncode == 3, on_ray.stderr[-3000:]
    assert "scans built 4, resumed 0, failed 1" in on_ray.stdout
    assert "failed: broken" in on_ray.stderr
    local = subprocess.run([*cmd, "--out", "out_local"], cwd=client, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert local.returncode == 3, local.stderr[-3000:]
    ray_tree, local_tree = tree_bytes(client / "out_ray"), tree_bytes(client / "out_local")
    assert any(k.startswith("slices/") for k in ray_tree)  # the data reached the driver's --out
    assert ray_tree == local_tree


def test_kill_9_during_a_ray_build_then_rerun_equals_the_local_build(head: str, tmp_path: Path):
    client = tmp_path / "client"
    for name in ("scans", "labels"):
        shutil.copytree(EXAMPLES / "layout" / name, client / "lay" / name, symlinks=False)
    shutil.copy(EXAMPLES / "reports.jsonl", client / "lay")
    cmd = [sys.executable, "-m", "radgrounder", "labels", "build", "--scans", "lay/scans",
           "--labels", "lay/labels", "--reports", "lay/reports.jsonl", "--no-vqa"]  # fmt: skip
    env = {**os.environ, **AUTH, "RAY_ADDRESS": head}
    local = subprocess.run([*cmd, "--out", "ref"], cwd=client, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert local.returncode == 0, local.stderr[-3000:]
    proc = subprocess.Popen([*cmd, "--out", "out", "--executor", "ray"], cwd=client, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    markers = client / "out" / "state" / "scans"
    deadline = time.time() + 300
    while time.time() < deadline and not (markers.is_dir() and any(markers.iterdir())):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (client / "out" / "manifest.json").exists(), "the kill came after the build"
    rerun = subprocess.run([*cmd, "--out", "out", "--executor", "ray"], cwd=client, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed" in rerun.stdout and "resumed 0," not in rerun.stdout
    assert tree_bytes(client / "out") == tree_bytes(client / "ref")
