"""Shared fixtures: the real TotalSegmentator example scans, loaded once per session.

Test modules are named ``test_imaging_*`` and nothing is imported from this file, because
sibling test folders may also have a ``conftest`` or ``test_normalize`` module.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from radgrounder.imaging import Volume, read_dicom_series, read_label_map, read_nifti

DATA = Path(__file__).resolve().parents[2] / "data" / "totalseg_example"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    return DATA / "example_ct_dicom"


@pytest.fixture(scope="session")
def dicom_files(dicom_dir: Path) -> list[Path]:
    """The 20 files in name order, which runs superior→inferior (z = -766.5 down to -804.5)."""
    return sorted(dicom_dir.iterdir())


@pytest.fixture(scope="session")
def ct_sm() -> Volume:
    return read_nifti(DATA / "example_ct_sm.nii.gz")


@pytest.fixture(scope="session")
def ct_sm_seg() -> Volume:
    return read_label_map(DATA / "example_seg.nii.gz")


@pytest.fixture(scope="session")
def mr_sm() -> Volume:
    return read_nifti(DATA / "example_mr_sm.nii.gz")


@pytest.fixture(scope="session")
def mr_sm_seg() -> Volume:
    return read_label_map(DATA / "example_seg_mr.nii.gz")


@pytest.fixture(scope="session")
def ct_series(dicom_dir: Path) -> Volume:
    return read_dicom_series(dicom_dir)


@pytest.fixture(scope="session")
def ct_series_seg() -> Volume:
    return read_label_map(DATA / "example_seg_dicom.nii.gz")
