"""labels build on a real Ray cluster: a head started in another folder (``ray start --head``
in a temporary folder, stopped by its own process ids), relative inputs and a relative
``--out``: byte-for-byte the local executor's dataset (slow; run by CI)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES
from tests.labels.test_build import tree_bytes

pytestmark = pytest.mark.slow
pytest.importorskip("ray")


def _pids_using(folder: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if folder in cmdline and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids


# Ray >= 2.59 authenticates with a token by default; the head and the driver share this one.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    # A short folder: Ray's socket paths live under it and must stay below 108 bytes.
    folder = tempfile.mkdtemp(prefix="rg-ray-", dir="/tmp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = Path(sys.executable).with_name("ray")
    started = subprocess.run(
        [str(ray), "start", "--head", f"--temp-dir={folder}/t", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats"],
        cwd=folder, capture_output=True, text=True, timeout=180, env={**os.environ, **AUTH},
    )  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _pids_using(folder):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + 15
            while _pids_using(folder) and time.time() < deadline:
                time.sleep(0.2)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_ray_build_from_another_folder_equals_the_local_one(ray_head: str, tmp_path: Path):
    client = tmp_path / "client"
    for name in ("scans", "labels"):
        shutil.copytree(EXAMPLES / "layout" / name, client / "lay" / name, symlinks=False)
    shutil.copy(EXAMPLES / "reports.jsonl", client / "lay")
    args = ["--scans", "lay/scans", "--labels", "lay/labels", "--reports", "lay/reports.jsonl",
            "--no-vqa"]  # fmt: skip
    cmd = [sys.executable, "-m", "radgrounder", "labels", "build", *args]
    env = {**os.environ, **AUTH, "RAY_ADDRESS": ray_head}
    on_ray = subprocess.run([*cmd, "--out", "out_ray", "--executor", "ray"], cwd=client,
                            env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    assert "scans built 4, resumed 0, failed 0" in on_ray.stdout
    local = subprocess.run([*cmd, "--out", "out_local"], cwd=client, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert local.returncode == 0, local.stderr[-3000:]
    ray_tree, local_tree = tree_bytes(client / "out_ray"), tree_bytes(client / "out_local")
    assert any(k.startswith("slices/") for k in ray_tree)  # the data reached the driver's --out
    assert ray_tree == local_tree
