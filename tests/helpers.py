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
