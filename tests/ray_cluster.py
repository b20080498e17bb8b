"""A real Ray head for the tests: ``ray start --head`` in a temporary folder, bound to
loopback, with an auth token the driver shares; stopped by its own process ids (never
``ray stop``, which would stop every Ray instance of the machine)."""

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


def pids_matching(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (Ray names its workers ray::Class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids


# Ray >= 2.59 authenticates with a token by default; the head and the driver share this one.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}


@contextlib.contextmanager
def ray_head(num_cpus: int = 2) -> Iterator[str]:
    # A short folder: Ray's socket paths live under it and must stay below 108 bytes.
    folder = tempfile.mkdtemp(prefix="rg-ray-", dir="/tmp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = Path(sys.executable).with_name("ray")
    started = subprocess.run(
        [str(ray), "start", "--head", f"--temp-dir={folder}/t", f"--port={port}",
         "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--include-dashboard=false",
         "--disable-usage-stats"],
        cwd=folder, capture_output=True, text=True, timeout=180, env={**os.environ, **AUTH},
    )  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids_matching(folder):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + 15
            while pids_matching(folder) and time.time() < deadline:
                time.sleep(0.2)
        shutil.rmtree(folder, ignore_errors=True)
