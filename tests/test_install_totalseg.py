"""``make totalseg``'s constraint keeps the installed torch: without it pip would replace the
pinned CPU torch by another build (nnunetv2 -> timm -> torchvision). A dry run against the
package index (slow: it resolves about 60 packages)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_the_totalseg_extra_installs_without_replacing_torch(tmp_path):
    import torch

    constraint = tmp_path / "torch-constraint.txt"
    constraint.write_text(f"torch=={torch.__version__}\n")
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report",
         str(report), "-e", f"{REPO}[totalseg]", "-c", str(constraint)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0 and "No matching distribution" in proc.stderr + proc.stdout:
        pytest.skip("the package index is not reachable")
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert "totalsegmentator" in names
    assert "torch" not in names, "pip would replace the installed torch"
    assert not {n for n in names if n.startswith("nvidia-")}, "pip would pull CUDA libraries"
    make = (REPO / "Makefile").read_text()
    assert "-c $(VENV)/torch-constraint.txt" in make and "torch==' + torch.__version__" in make
