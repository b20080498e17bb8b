"""The README's five-minute tour runs as written on the bundled data (slow: trains 200 steps)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def tour_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Five-minute tour", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands, current = [], ""
    for line in block.splitlines():
        line = line.split(" # ")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not line:
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def test_readme_tour_runs_as_written(tmp_path):
    # A scratch working directory that sees the repository's data and configs.
    for name in ("data", "configs"):
        (tmp_path / name).symlink_to(REPO / name)
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    commands = tour_commands()
    assert [shlex.split(c)[1] for c in commands] == [
        "inspect", "labels", "labels", "labels", "train", "eval", "predict", "serve",
    ]  # fmt: skip
    for command in commands[:-1]:
        args = shlex.split(command.replace(".venv/bin/", ""))
        res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert res.returncode == 0, (command, res.stderr[-2000:])
    summary = json.loads((tmp_path / "runs/eval-tiny/summary.json").read_text())
    assert summary["dataset"]["n"] == 40
    assert len((tmp_path / "runs/predict/predictions.jsonl").read_text().splitlines()) == 20

    # serve: start it, ask for health, stop it
    args = [*shlex.split(commands[-1].replace(".venv/bin/", "")), "--port", "8765"]
    server = subprocess.Popen(args, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen("http://127.0.0.1:8765/v1/health", timeout=1) as r:
                    assert json.loads(r.read()) == {"status": "ok"}
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the server did not come up")
    finally:
        server.terminate()
        server.wait(timeout=30)
