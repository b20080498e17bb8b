"""``radgrounder predict ARCHIVE --out OUT``: one job per series / volume / picture, outputs
equal to single-scan predict, a manifest, failures collected, resume, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from radgrounder.errors import RadGrounderError
from radgrounder.inference.archive import ArchiveSettings, discover, predict_archive
from tests.helpers import run_cli
from tests.inference.archive_corpus import (
    EXPECTED,
    SERIES_UID,
    SKIPPED,
    comparable,
    make_archive,
    manifest,
)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_archive(tmp_path_factory.mktemp("archive") / "archive")


@pytest.fixture(scope="module")
def predicted(archive: Path, tiny, tmp_path_factory: pytest.TempPathFactory):
    from radgrounder.cli import main

    out = tmp_path_factory.mktemp("archive-out") / "out"
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(archive), "--model", str(tiny["detection"]), "--out", str(out)])
    return out, exc.value.code


def _by_prefix(lines: list[dict]) -> dict[str, dict]:
    out = {}
    for line in lines:
        if line["key"] is not None:
            prefix = line["key"].rsplit("-", 1)[0]
            assert prefix not in out, f"two jobs for {prefix}"
            out[prefix] = line
    return out


def test_discovery_groups_a_split_series_and_skips_what_is_no_scan(archive: Path):
    found = discover(archive)
    kinds = {j.key.rsplit("-", 1)[0]: j for j in found.jobs}
    assert set(kinds) == set(EXPECTED)
    series = kinds["patient1_study1"]
    assert series.kind == "dicom-series" and series.series_uid == SERIES_UID
    assert series.sources == ["patient1/study1/part1", "patient1/study1/part2"]
    assert len(series.files) == 20
    assert {r["sources"][0] for r in found.skipped} == SKIPPED
    assert kinds["patient3_broken.dcm"].error  # known unreadable before any worker runs
    # Keys are stable: the same archive gives the same keys.
    assert [j.key for j in discover(archive).jobs] == [j.key for j in found.jobs]


def test_archive_predict_writes_every_job_and_lists_the_failure(predicted, capsys):
    out, code = predicted
    assert code == 3  # one job failed
    lines = manifest(out)
    jobs = _by_prefix(lines)
    assert {k: v["status"] for k, v in jobs.items()} == EXPECTED
    skipped = {line["sources"][0] for line in lines if line["status"] == "skipped"}
    assert skipped == SKIPPED
    assert "DICM" in jobs["patient3_broken.dcm"]["reason"]
    assert jobs["patient1_study1"]["slices"] == 20 and jobs["patient1_study1"]["modality"] == "CT"
    assert jobs["patient2_nifti_mr.nii.gz"]["modality"] == "MR"
    for prefix, line in jobs.items():
        folder = out / line["key"]
        if line["status"] == "done":
            assert (folder / "predictions.jsonl").is_file() and (folder / "series.json").is_file()
            n = len((folder / "predictions.jsonl").read_text().splitlines())
            assert n == line["slices"] == len(list((folder / "overlays").iterdir()))
        else:
            assert not folder.exists(), prefix
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_the_series_job_equals_single_scan_predict_of_that_series(predicted, archive, tiny,
                                                                  tmp_path, capsys):  # fmt: skip
    out, _ = predicted
    single = tmp_path / "single"
    args = ["predict", str(archive / "patient1" / "study1"), "--model", str(tiny["detection"]),
            "--all-slices", "--out", str(single)]  # fmt: skip
    code, _ = run_cli(args, capsys)
    assert code == 0
    job = out / _by_prefix(manifest(out))["patient1_study1"]["key"]
    a, b = comparable(job), comparable(single)
    a.pop("job.json")
    for tree in (a, b):
        tree["predictions.jsonl"] = [
            {k: v for k, v in r.items() if k != "input"} for r in tree["predictions.jsonl"]
        ]
        tree["series.json"] = {
            k: v for k, v in json.loads(tree["series.json"]).items() if k != "source"
        }
    assert a == b


def test_a_rerun_rewrites_nothing(predicted, archive, tiny, capsys):
    out, _ = predicted
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.rglob("*") if p.is_file()}
    manifest_before = (out / "manifest.jsonl").read_bytes()
    code, cap = run_cli(["predict", str(archive), "--model", str(tiny["detection"]),
                         "--out", str(out)], capsys)  # fmt: skip
    assert code == 3  # the broken file still fails, and is still listed
    assert "scans done 0, resumed 3, failed 1" in cap.out
    assert "model loads 0" in cap.out  # the file known to be broken needs no model
    after = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.rglob("*") if p.is_file()}
    changed = {p.name for p in before if before[p] != after.get(p)}
    assert changed <= {"manifest.jsonl"}
    assert (out / "manifest.jsonl").read_bytes() == manifest_before


def test_another_task_into_the_same_folder_is_refused(predicted, archive, tiny, capsys):
    out, _ = predicted
    code, cap = run_cli(["predict", str(archive), "--model", str(tiny["detection"]),
                         "--out", str(out), "--language", "de"], capsys)  # fmt: skip
    assert code == 1
    assert cap.err.count("\n") == 1 and "other settings (language)" in cap.err


def test_changed_inputs_are_predicted_again(archive, tiny, tmp_path):
    import shutil

    arc = tmp_path / "arc"
    shutil.copytree(archive / "patient2", arc / "patient2")
    out = tmp_path / "out"
    first = predict_archive(tiny["detection"], arc, out, progress=False)
    assert (first.done, first.failed) == (2, {})
    vol = arc / "patient2" / "ct_sm.nii.gz"
    os.utime(vol, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = predict_archive(tiny["detection"], arc, out, progress=False)
    assert (second.done, second.resumed) == (1, 1)
    assert len(manifest(out)) == 3  # 2 jobs + the label map, each once


def test_include_limit_modality_and_shared_batches(archive, tiny, tmp_path):
    from radgrounder.inference import Predictor

    predictor = Predictor(tiny["detection"], batch_size=8)
    sizes: list[int] = []
    run = predictor.run

    def counting(items, *a, **k):
        sizes.append(len(items))
        return run(items, *a, **k)

    predictor.run = counting  # type: ignore[method-assign]
    report = predict_archive(
        predictor, archive, tmp_path / "nifti", ArchiveSettings(modality="MR"),
        include=["*.nii.gz"], progress=False,
    )  # fmt: skip
    assert (report.n_jobs, report.done) == (2, 2)
    # 30 + 20 slices of two volumes: every batch full but the last, none split at a volume
    assert sizes == [8, 8, 8, 8, 8, 8, 2]
    assert report.batches == 7 and report.batch_fill == pytest.approx(50 / 56)
    modalities = {line["modality"] for line in manifest(tmp_path / "nifti") if line["key"]}
    assert modalities == {"MR"}
    limited = predict_archive(predictor, archive, tmp_path / "one", include=["*.nii.gz"],
                              limit=1, progress=False)  # fmt: skip
    assert limited.n_jobs == 1
    with pytest.raises(RadGrounderError, match="limit"):
        predict_archive(predictor, archive, tmp_path / "x", limit=0, progress=False)


def test_a_single_series_folder_keeps_the_single_scan_form(tiny, tmp_path, capsys, examples):
    out = tmp_path / "single"
    code, cap = run_cli(["predict", str(examples / "example_ct_dicom"), "--model",
                         str(tiny["detection"]), "--out", str(out)], capsys)  # fmt: skip
    assert code == 0 and (out / "predictions.jsonl").is_file()
    assert not (out / "manifest.jsonl").exists()
    forced = tmp_path / "forced"
    args = ["predict", str(examples / "example_ct_dicom"), "--model", str(tiny["detection"]),
            "--out", str(forced), "--archive"]  # fmt: skip
    code, cap = run_cli(args, capsys)
    assert code == 0, cap.err
    assert [line["status"] for line in manifest(forced) if line["key"]] == ["done"]


def test_archive_only_options_need_an_archive(tiny, tmp_path, capsys, examples):
    code, cap = run_cli(["predict", str(examples / "example_ct_sm.nii.gz"), "--model",
                         str(tiny["detection"]), "--out", str(tmp_path / "o"), "--limit", "2"],
                        capsys)  # fmt: skip
    assert code == 2 and "apply to an archive folder" in cap.err


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_9_during_an_archive_predict_then_rerun_equals_an_uninterrupted_run(
    archive, tiny, tmp_path
):
    import shutil

    arc = tmp_path / "arc"
    shutil.copytree(archive, arc)
    for n in range(4):  # more jobs, so the kill lands in the middle
        shutil.copy(arc / "patient2" / "ct_sm.nii.gz", arc / "patient2" / f"copy{n}.nii.gz")
    cmd = [sys.executable, "-m", "radgrounder", "predict", str(arc), "--model",
           str(tiny["detection"])]  # fmt: skip
    ref = subprocess.run([*cmd, "--out", str(tmp_path / "ref")], capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert ref.returncode == 3, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline:
        if out.is_dir() and sum(1 for p in out.iterdir() if p.is_dir()) >= 2:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    published = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert 0 < len(published) < 6, "the kill did not land mid-run"
    rerun = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 3, rerun.stderr
    assert "Traceback" not in rerun.stderr
    assert comparable(out) == comparable(tmp_path / "ref")


def test_a_folder_without_scans_is_one_error(tiny, tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "report.pdf").write_bytes(b"%PDF-1.4\n")
    code, cap = run_cli(["predict", str(folder), "--model", str(tiny["detection"]), "--out",
                         str(tmp_path / "o")], capsys)  # fmt: skip
    assert code == 1 and cap.err.count("\n") == 1
    assert "no scans in the folder (1 other file(s) looked at)" in cap.err
    assert not (tmp_path / "o").exists()
