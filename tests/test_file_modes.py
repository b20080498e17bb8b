"""Every output follows the umask, as a plain ``open()`` would: a model folder (safetensors
writes 0600 by itself), a dataset, a predict and an eval output, written under umask 022 (the
group and others can read) and 077 (private)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from radgrounder.fileio import atomic_write_bytes, current_umask, file_mode
from tests.conftest import EXAMPLES
from tests.helpers import run_cli


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    before = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(before)


def _modes(root: Path) -> dict[str, int]:
    return {
        p.relative_to(root).as_posix() + ("/" if p.is_dir() else ""): stat.S_IMODE(p.stat().st_mode)
        for p in [root, *root.rglob("*")]
    }


def _expect_umask(root: Path, mask: int) -> None:
    wrong = {
        k: oct(v)
        for k, v in _modes(root).items()
        if v != ((0o777 if k.endswith("/") or k == "" else 0o666) & ~mask)
    }
    # The root of a folder made by the test harness itself is not ours to judge.
    wrong.pop("./", None)
    assert not wrong, f"not following umask {oct(mask)}: {wrong}"


def test_the_helper_reads_the_umask_and_writes_with_it(umask, tmp_path):
    assert current_umask() == umask
    assert file_mode() == 0o666 & ~umask
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o666 & ~umask


def test_model_dataset_predict_and_eval_outputs_follow_the_umask(umask, tmp_path, capsys):
    from radgrounder.modeling import init_model

    model = init_model("tiny", "detection", tmp_path / "model", seed=0)
    _expect_umask(model, umask)
    scans, labels = tmp_path / "scans", tmp_path / "labels"
    for d in (scans, labels):
        d.mkdir()
    for name in ("ct_upper_abdomen.nii.gz", "mr_upper_abdomen.nii.gz"):
        (scans / name).symlink_to(EXAMPLES / "layout" / "scans" / name)
        (labels / name).symlink_to(EXAMPLES / "layout" / "labels" / name)
    build = ["labels", "build", "--scans", str(scans), "--labels", str(labels), "--reports",
             str(EXAMPLES / "reports.jsonl"), "--out", str(tmp_path / "ds"), "--no-vqa",
             "--split", "0.5,0,0.5"]  # fmt: skip
    code, cap = run_cli(build, capsys)
    assert code == 0, cap.err
    _expect_umask(tmp_path / "ds", umask)
    predict = ["predict", str(EXAMPLES / "example_ct_dicom"), "--model", str(model), "--out",
               str(tmp_path / "pred"), "--max-new-tokens", "4"]  # fmt: skip
    code, cap = run_cli(predict, capsys)
    assert code == 0, cap.err
    _expect_umask(tmp_path / "pred", umask)
    code, cap = run_cli(["eval", "--model", str(model), "--dataset", "built", "--data-root",
                         str(tmp_path / "ds"), "--split", "test", "--max-new-tokens", "4",
                         "--out", str(tmp_path / "eval"), "--quiet"], capsys)  # fmt: skip
    assert code == 0, cap.err
    _expect_umask(tmp_path / "eval", umask)
