"""The CLI as a user runs it: a real subprocess, its stdout, stderr and exit code."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import EXAMPLES


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "radgrounder", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_inspect_nifti_ct_json():
    res = run("inspect", str(EXAMPLES / "example_ct_sm.nii.gz"), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["kind"] == "nifti" and info["modality"] == "CT"
    assert info["shape"] == [30, 101, 122] and info["n_slices"] == 30
    assert info["spacing"] == [3.0, 3.0, 3.0]
    assert info["orientation"] == "SPL" and info["source_orientation"] == "RAS"
    assert (info["value_min"], info["value_max"]) == (-1100.0, 1207.0)


def test_inspect_dicom_series_table():
    res = run("inspect", str(EXAMPLES / "example_ct_dicom"))
    assert res.returncode == 0, res.stderr
    table = dict(line.split(None, 1) for line in res.stdout.splitlines() if "  " in line)
    assert table["kind"].strip() == "dicom-series"
    assert table["modality"].strip() == "CT (tag)"
    assert "20 x 512 x 512" in res.stdout
    assert "-1024 .. 1839" in res.stdout
    assert "JPEG 2000" in res.stdout


def test_inspect_png(tmp_path):
    path = tmp_path / "slice.png"
    Image.fromarray(np.arange(64 * 48, dtype=np.uint8).reshape(48, 64)).save(path)
    res = run("inspect", str(path), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["kind"] == "image" and info["shape"] == [1, 48, 64] and info["modality"] is None


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p.write_bytes(
            (EXAMPLES / "example_ct_dicom").iterdir().__next__().read_bytes()[:2000]
        ),
        lambda p: p.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 50),
        lambda p: p.write_text("hello"),
    ],
    ids=["truncated-dicom", "garbage-after-preamble", "text-file"],
)
def test_inspect_bad_file_is_one_clean_line(tmp_path, make):
    path = tmp_path / "broken.dcm"
    make(path)
    res = run("inspect", str(path))
    assert res.returncode == 1
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("radgrounder: error:") and "broken.dcm" in lines[0]
    assert "Traceback" not in res.stderr


def test_inspect_missing_path_and_bad_modality(tmp_path):
    res = run("inspect", str(tmp_path / "nope.nii.gz"))
    assert res.returncode == 1 and "nope.nii.gz" in res.stderr and "Traceback" not in res.stderr
    res = run("inspect", str(EXAMPLES / "example_ct_sm.nii.gz"), "--modality", "PET")
    assert res.returncode == 1 and "PET" in res.stderr and len(res.stderr.splitlines()) == 1


def _leaf_commands():
    import typer.main

    from radgrounder.cli import app

    root = typer.main.get_command(app)

    def walk(group, prefix):
        for name, cmd in sorted(group.commands.items()):
            if hasattr(cmd, "commands"):
                yield from walk(cmd, [*prefix, name])
            else:
                yield [*prefix, name], cmd

    return list(walk(root, []))


def test_every_help_ends_with_an_example_that_parses():
    """Each subcommand's --help ends with an example; the example's arguments are accepted by
    that command's parser (known options, required values present)."""
    import shlex

    leaves = _leaf_commands()
    names = {" ".join(path) for path, _ in leaves}
    assert {"inspect", "demo", "eval", "compare", "predict", "serve", "train"} <= names
    assert {"labels build", "labels segment", "model init"} <= names
    for path, cmd in leaves:
        res = run(*path, "--help")
        assert res.returncode == 0, path
        last = res.stdout.strip().splitlines()[-1].strip()
        prefix = "radgrounder " + " ".join(path)
        assert last.startswith(prefix), (path, last)
        args = shlex.split(last)[1 + len(path) :]
        ctx = cmd.make_context(" ".join(path), args, resilient_parsing=False)
        assert ctx.params, path
