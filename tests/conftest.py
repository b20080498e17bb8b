from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "data" / "totalseg_example"


@pytest.fixture(scope="session")
def examples() -> Path:
    return EXAMPLES


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error" lines of dicom3tools' validator for one DICOM file."""
    import subprocess

    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


def _exported_dicoms(root: Path) -> list[Path]:
    """SEG and SR objects under ``root`` (what radgrounder's DICOM export writes)."""
    import pydicom

    out = []
    for p in root.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["Modality"])
        except Exception:
            continue
        if ds.get("Modality") in ("SEG", "SR"):
            out.append(p)
    return out


@pytest.fixture(autouse=True)
def _validate_dicom_exports(request: pytest.FixtureRequest):
    """Every SEG and SR a test writes passes dciodvfy (dicom3tools, installed by .ci/run)
    without an "Error" line; without dciodvfy the check is skipped, except under CI."""
    yield
    tmp = request.node.funcargs.get("tmp_path") if hasattr(request.node, "funcargs") else None
    if tmp is None or not Path(tmp).is_dir():
        return
    import os
    import shutil

    files = _exported_dicoms(Path(tmp))
    if not files:
        return
    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (Debian's dicom3tools) is not installed; .ci/run installs it")
        return
    bad = {str(p): errs for p in files if (errs := dciodvfy_errors(p))}
    assert not bad, f"dciodvfy errors: {bad}"
