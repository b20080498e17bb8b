"""Small helpers shared by test modules."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom


def copy_files(files: list[Path], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, dest / f.name)
    return dest


def edit_dicom(path: Path, **changes: object) -> None:
    """Rewrite a DICOM file with attributes set (value None deletes the attribute)."""
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def run_cli(args: list[str], capsys) -> tuple[int, object]:
    """Run ``radgrounder ARGS`` in-process; returns (exit code, captured output)."""
    from radgrounder.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr()


def single_torch_thread():
    """Fixture body: one intra-op thread. The tiny models gain nothing from more, and two
    OpenMP threads on two busy cores spin-wait each other into 50x slowdowns."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
